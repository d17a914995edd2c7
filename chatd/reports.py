"""What chatd says about itself: to chatctl (``status``, ``clients``) and to systemd (its status line).

Reports only read: each asks the owners (the server's connections and room, the holders, the
listeners, the cluster) and changes nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fdkeep.text import plural

from .server import Role

if TYPE_CHECKING:
    from .server import ChatServer


def status(server: "ChatServer") -> dict:
    """What `chatctl status` shows of this chatd."""
    working, held = server.holders.report()
    return {
        "pid": os.getpid(),
        "uid": os.geteuid(),
        "instance": server.instance,
        "port": server.port,
        "http_port": server.http_port,
        "serving": server.listeners.line is not None,
        "role": server.role.value,
        "awaiting_restore": server.role is Role.WAITING,
        "clients": server.client_count(),
        "adopting": len(server.adoption),
        #: Sessions whose connection ended, waiting for their clients to resume (chatd.sessions).
        "detached": len(server.sessions),
        "max_clients": server.max_clients,
        "pairs": len(server.room.pairs()),
        "started": server.started,
        "restored_at": server.restored_at,
        "restore": server.restore_summary,
        # The journal's file on disk (--state-dir), None for a memfd.
        "journal": server.state_dir.journal_path if server.state_dir is not None else None,
        "holders": working,
        "held": held,
        "cluster": server.cluster.status(),
        # Where Prometheus scrapes this chatd (--metrics-port), once it serves; else None.
        "metrics": server.metrics.listening if server.metrics is not None else None,
    }

def clients(server: "ChatServer") -> list[dict]:
    """One row per client, for `chatctl clients`: those connected, then the detached sessions."""
    held = next((holder.held() for holder in server.holders if holder.label == "holderd"), None)
    rows = []
    for member_id, connection in sorted(server.connections.items()):
        rows.append(_client_row(server, member_id, connection, remote=connection.remote,
                                held=None if held is None else server.bundles.held_in(member_id, held),
                                state=connection.state.value))
    for member_id, detached in sorted(server.sessions.detached.items()):
        rows.append(_client_row(server, member_id, detached, remote=None, held=None, state="detached"))
    return rows


def _client_row(server: "ChatServer", member_id: int, kept, **fields) -> dict:
    member = server.room.members.get(member_id)
    outbox = kept.outbox
    return {
        "id": member_id,
        "nick": member.nick if member else None,
        "target": member.target if member else None,
        "peer": member.peer.nick if member and member.peer else None,
        "received": member.received if member else 0,
        "protocol": kept.codec.protocol,
        "queued": outbox.end - outbox.sent,
        "session": bool(member and member.token),
        # Sent and kept until the client ACKs it (a session's: chatd.sessions).
        "kept": outbox.sent - outbox.kept,
        **fields,
    }


def status_line(server: "ChatServer") -> str:
    """The one line systemd shows (`systemctl status`)."""
    if server.role is Role.STANDBY:
        return "standby: takes over the moment the chatd serving dies"
    if server.role is not Role.SERVING:
        return "waiting for `chatctl restore`"
    pairs = len(server.room.pairs())
    web = f", web on {server.http_port}" if server.http_port else ""
    clients = server.client_count()
    adopting = f" ({len(server.adoption)} still being adopted)" if server.adoption else ""
    return f"{plural(clients, 'client')}{adopting}, {plural(pairs, 'pair')} on port {server.port}{web}"
