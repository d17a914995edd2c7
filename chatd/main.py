"""``chatd``: the command line, and the start: fresh, restored, or waiting for ``chatctl restore``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys

from fdkeep.errors import Error
from fdkeep.loop import raise_fd_limit, stop_on_signals
from fdkeep.systemd import ServiceManager
from holderd.client import default_socket as holderd_socket

from . import faults, lastwords
from .control import ControlServer, default_socket as control_socket, instance_socket
from .bundles import clients_the_fd_limit_allows
from .holders import LISTEN_NAME, Holders, HolderdHolder, SystemdHolder
from .journal import BOX_RING, Journal
from .protocols import import_web_codec, web_unavailable
from .reports import status_line
from .lifecycle import HandedOver, Lifecycle, Where
from .server import STALL_TIMEOUT, ChatServer, Role
from .sessions import GRACE, RESUME_BURST, RESUME_RATE, ResumeGate
from .standby import Turns
from .statedir import StateDir, seal_file

log = logging.getLogger("chatd")

DEFAULT_HTTP_PORT = 8080


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chatd",
        description=(
            "A chat server, the line protocol on TCP and the web chat (a page and its WebSocket), "
            "whose client connections survive its crash: every socket is kept in holderd and in "
            "systemd's fd store, and a new chatd takes them back. See README.md."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=5001,
                        help="the line protocol's TCP port; 0 picks a free one (default %(default)s). A chatd "
                        "that restores listens here (and on --host, --http-port) instead of on the listening "
                        "socket it takes back if that one is elsewhere, and the clients connected stay; "
                        "with 0 it keeps the one it takes back")
    parser.add_argument("--http-port", type=int, default=None,
                        help="the web port: the chat page at /, its WebSocket at /ws, /healthz; 0 picks a free "
                        f"one, -1 serves no web (default {DEFAULT_HTTP_PORT}, or none, with a warning, if h11 "
                        "and wsproto are not installed)")
    parser.add_argument(
        "--control",
        default=control_socket(own_service=True),
        help="control socket for chatctl (default: $CHATD_CONTROL or %(default)s; with --lease, only "
        "while serving: each of those taking turns answers at its own socket too, see --instance)",
    )
    parser.add_argument(
        "--holder",
        default=holderd_socket(),
        help="holderd's socket (default: $HOLDERD_SOCKET or %(default)s)",
    )
    parser.add_argument("--no-holderd", action="store_true",
                        help="keep no copies in holderd: only systemd's fd store keeps chatd's sockets (outside "
                        "systemd nothing does, and a crash ends every connection)")
    parser.add_argument(
        "--lease", action="store_true",
        help="take turns with another chatd started the same way (the warm standby): serve only "
        "while holding holderd's lease 'chatd', else wait, started and ready, and take over the "
        "moment the one serving dies (see chatd/standby.py)",
    )
    parser.add_argument(
        "--instance", metavar="NAME",
        help="with --lease: this process's name among the ones taking turns (chatd@.service passes %%i); "
        "it answers chatctl at its own control socket, --control's path with @NAME before the extension "
        "(e.g. control@1.sock), and at --control's path too while it serves (default: its pid)",
    )
    parser.add_argument(
        "--restore",
        action="store_true",
        help="start only by restoring what the holders keep; fail if they keep nothing "
        "(without this flag chatd restores if it can, else starts afresh)",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="with --restore: wait for `chatctl restore` before taking the sockets back",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop whatever the holders keep for chatd and start afresh (ends those connections)",
    )
    parser.add_argument(
        "--state-dir", metavar="DIR",
        help="keep the journal (every client's nick, pairing, counts and bytes in flight) in the file DIR/journal "
        "instead of in memory (DIR is made, mode 0700, if missing): then chatd starts from it even when the "
        "holders keep nothing (holderd and its fd store stopped or killed with chatd, or a reboot); the "
        "connections are gone then, not the records. The units pass /var/lib/chatd. See README.md, "
        "\"The state directory\"",
    )
    parser.add_argument(
        "--seal", action="store_true",
        help="with --state-dir, and nothing else: put DIR/journal on disk and mark it so (chatd.service runs "
        "this once both chatd instances have stopped), so that chatd trusts it after a reboot; refused while "
        "a chatd serves from it. A chatd that stops seals its journal itself",
    )
    parser.add_argument(
        "--max-clients", type=int, default=0,
        help="connection limit (default: as many as the hard RLIMIT_NOFILE allows: that limit less 128 fds "
        "for chatd itself and about 1%% for the bundles, e.g. 19,715 of 20,000; past the limit a client "
        "gets ERR server-full)",
    )
    parser.add_argument(
        "--max-per-address", type=int, default=256, metavar="N",
        help="connections one client address may have, so that one host cannot take every slot; "
        "past it a client gets ERR too-many-connections (an HTTP 503 on the web port). Loopback "
        "is exempt: put a reverse proxy on this host, or set 0 (no limit) behind one elsewhere "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--stall-timeout", type=float, default=STALL_TIMEOUT, metavar="SECONDS",
        help="close a client that takes none of its queued output for this long (default %(default)s)",
    )
    parser.add_argument(
        "--session-grace", type=float, default=GRACE, metavar="SECONDS",
        help="how long the session of a client whose connection ended without QUIT waits for it to "
        "RESUME: its nick and pairing are kept and what its peer sends waits (default %(default)g: a phone "
        "changing networks, a laptop waking, a proxy restarting)",
    )
    parser.add_argument(
        "--resume-rate", type=float, default=RESUME_RATE, metavar="PER_SECOND",
        help=f"resumes admitted per second when a crowd comes back at once (after {RESUME_BURST} at once); the "
        "others hear ERR busy <seconds> and come back then (default %(default)g)",
    )
    parser.add_argument(
        "--no-journal", action="store_true",
        help="write no crash-surviving state, only to measure what the journal costs (bench/rates.py): "
        "a crash then loses what was in flight and every count",
    )
    parser.add_argument(
        "--no-replay", action="store_true",
        help="on restore, throw away what the dead chatd had read and not handled and what it had "
        "committed and not sent, instead of finishing it (loses messages: for tests that must show loss)",
    )
    parser.add_argument(
        "--cluster", metavar="URLS",
        help="join other chatd hosts through NATS JetStream (comma-separated nats:// URLs of its servers): "
        "nicks are unique across hosts and pairs may span them, exactly once (see chatd/cluster.py); "
        "off by default: one host needs no broker",
    )
    parser.add_argument(
        "--host-id", metavar="NAME", default=None,
        help="this host's name in the cluster, [A-Za-z0-9_-]{1,32}, the same across restarts "
        "(default: the machine's host name)",
    )
    parser.add_argument(
        "--host-lease", metavar="SECONDS", type=float, default=10.0,
        help="with --cluster: how long this host's lease lasts unrenewed; when a host is gone that long, "
             "the other hosts free its nicks (default 10; the same on every host)")
    parser.add_argument(
        "--nats-creds", metavar="FILE",
        help="with --cluster: this host's NATS key (an nkey seed, DIR/hosts/<host>.nk made by `chatctl nats-secrets`): "
             "the servers let only listed hosts in, each with its own permissions")
    parser.add_argument(
        "--nats-ca", metavar="FILE",
        help="with --cluster: the CA that signed the NATS servers' certificates (DIR/ca.pem of `chatctl "
             "nats-secrets`): connect with TLS and verify the server")
    parser.add_argument("--no-outbox", action="store_true",
                        help="with --cluster: publish forwards without keeping them in the journal first "
                        "(loses messages in a crash: for tests that must show loss)")
    parser.add_argument("--no-cursor", action="store_true",
                        help="with --cluster: read the stream from new messages on after a restart instead of "
                        "from the journal's cursor (loses messages: for tests that must show loss)")
    parser.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="serve Prometheus metrics (counts since the service began, kept across crashes; README.md, "
        "\"Metrics\") over HTTP on this port, 0 for any free one; only the chatd serving listens, and a "
        "takeover moves it (default: none; chatd@.service passes 9471)")
    parser.add_argument(
        "--metrics-address", default="127.0.0.1", metavar="ADDRESS",
        help="the address --metrics-port listens on (default %(default)s: this host only; the metrics "
        "carry no nick or message, but counts of clients are still nobody else's business)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the least important messages logged, to stderr (default %(default)s)")
    parser.add_argument("--direct-same-host", action="store_true",
                        help="with --cluster: tell a message between two clients of this host at once instead "
                        "of storing it in the stream first (faster; the loss of this host then loses what "
                        "it had handled and not delivered: for benchmarks and tests that must show loss)")
    args = parser.parse_args(argv)
    if args.cluster:
        from .cluster import HOST_ID_RE

        args.host_id = args.host_id or re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32]
        if not HOST_ID_RE.match(args.host_id):
            parser.error(f"--host-id {args.host_id!r} must be 1-32 of A-Z a-z 0-9 _ -")
    elif args.no_outbox or args.no_cursor or args.direct_same_host or args.host_id or args.nats_creds \
            or args.nats_ca:
        parser.error("--host-id, --nats-creds, --nats-ca, --no-outbox, --no-cursor and --direct-same-host go "
                     "with --cluster")
    if args.wait and not args.restore:
        parser.error("--wait goes with --restore")
    if args.fresh and args.restore:
        parser.error("--fresh and --restore contradict each other")
    if args.lease and (args.no_holderd or args.wait):
        parser.error("--lease needs holderd (it keeps the lease) and cannot go with --wait")
    if args.instance is not None and not args.lease:
        parser.error("--instance goes with --lease")
    if args.instance is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.instance):
        parser.error(f"--instance {args.instance!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if args.lease and args.instance is None:
        args.instance = str(os.getpid())
    if args.max_per_address < 0:
        parser.error("--max-per-address must be 0 (no limit) or more")
    if args.max_clients < 0:
        parser.error("--max-clients must be 0 (as many as the fd limit allows) or more")
    if not args.session_grace > 0:
        parser.error("--session-grace must be more than 0 seconds")
    if not args.resume_rate > 0:
        parser.error("--resume-rate must be more than 0")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be 0-65535")
    if args.seal and not args.state_dir:
        parser.error("--seal needs --state-dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="chatd: %(levelname)s %(message)s", stream=sys.stderr)
    state_dir = StateDir(args.state_dir) if args.state_dir else None
    if args.seal:
        try:
            log.info("%s", seal_file(state_dir.journal_path))
        except Error as exc:
            log.error("%s", exc.message)
            return 1
        return 0
    # A fatal signal, or the watchdog's SIGQUIT, prints where chatd was; once it serves, into
    # its last words for its successor (chatd.lastwords).
    lastwords.to_stderr()
    try:
        faults.arm()
    except Error as exc:
        log.error("%s", exc.message)
        return 2
    web_problem = web_unavailable() if args.http_port is None or args.http_port >= 0 else None
    if web_problem and args.http_port is not None:
        log.error("%s", web_problem)
        return 2
    if web_problem:
        log.warning("no web chat: %s", web_problem)
        args.http_port = -1
    elif args.http_port is None:
        args.http_port = DEFAULT_HTTP_PORT
    fd_limit = raise_fd_limit()
    allowed = clients_the_fd_limit_allows(fd_limit)
    if args.max_clients == 0:
        args.max_clients = allowed
    elif args.max_clients > allowed:
        log.warning("--max-clients %d is more than RLIMIT_NOFILE %d allows (each client is an open socket and "
                    "the same socket in flight in a bundle): serving at most %d; raise LimitNOFILE= for more",
                    args.max_clients, fd_limit, allowed)
        args.max_clients = allowed
    manager = ServiceManager()
    holders = [] if args.no_holderd else [HolderdHolder(args.holder)]
    if manager.present:
        holders.append(SystemdHolder(manager))
    if args.no_journal:
        Journal.durable = False
        log.warning("--no-journal: nothing in flight survives a crash (a benchmark setting)")
    server = ChatServer(Holders(holders), args.max_clients, manager, args.stall_timeout, replay=not args.no_replay,
                        max_per_address=args.max_per_address, session_grace=args.session_grace)
    server.sessions.gate = ResumeGate(args.resume_rate)
    if args.cluster:
        server.box_size = BOX_RING
    server.instance = args.instance
    if state_dir is not None:
        try:
            state_dir.prepare()
        except Error as exc:
            log.error("%s", exc.message)
            return 1
        server.state_dir = state_dir
    if args.fresh:
        server.holders.forget_all("--fresh")
        if state_dir is not None:
            state_dir.set_aside("--fresh")
    # With --lease each process answers at its own socket, and at args.control once it serves.
    own_control = instance_socket(args.control, args.instance) if args.lease else args.control
    metrics = (args.metrics_address, args.metrics_port) if args.metrics_port is not None else None
    lifecycle = Lifecycle(server, Where(args.host, args.port, None if args.http_port < 0 else args.http_port,
                                        restore_only=args.restore, metrics=metrics))
    try:
        control = ControlServer(server, own_control, restore_now=lifecycle.restore_now)
    except OSError as exc:
        log.error("cannot open the control socket %s: %s", own_control, exc.strerror or exc)
        return 1
    # With --lease, SIGTERM of the one serving hands over to the standby at the end of the turn.
    turns = Turns(lifecycle, control, args.control, args.holder) if args.lease else None
    stop_on_signals(log, unless=turns.hand_over_instead_of_stopping if turns is not None else None)

    if args.cluster:
        # Made before restoring, started once serving: a member restored paired across hosts
        # must not have its commands handled before the directory shows its peer again.
        from .bus import Bus
        from .cluster import Cluster, ServerMembers

        try:
            bus = Bus([url.strip() for url in args.cluster.split(",") if url.strip()], args.host_id,
                      host_lease=args.host_lease, creds=args.nats_creds, ca=args.nats_ca)
        except Error as exc:
            log.error("%s", exc.message)
            return 2
        if not (args.nats_creds and args.nats_ca):
            log.warning("cluster: NATS without %s: anyone who reaches its servers can forge, read or take this "
                        "cluster's messages and nicks. Fix: `chatctl nats-secrets` (README, \"Security across hosts\")",
                        " and ".join(what for what, given in (("credentials (--nats-creds)", args.nats_creds),
                                                              ("TLS (--nats-ca)", args.nats_ca)) if not given))
        server.cluster = Cluster(bus, args.host_id, server.room, ServerMembers(server), server.loop,
                                 outbox=not args.no_outbox, cursor=not args.no_cursor,
                                 durable_same_host=not args.direct_same_host, session_grace=args.session_grace)

    stopped = False
    try:
        if args.wait:
            lifecycle.wait_for_restore(args.control)
        elif turns is not None:
            if not turns.start(systemd_passed_a_listener=LISTEN_NAME in manager.passed_names()):
                return 1
        else:
            try:
                lifecycle.serve()
            except Error:
                return 1
        if lifecycle.role in (Role.STANDBY, Role.WAITING) and args.http_port >= 0:
            # Now, while it waits, rather than in the restore of its first web client: the
            # start left it out (a cold restart waits for the start, see web_unavailable).
            try:
                import_web_codec()
            except ImportError as exc:
                log.error("the web chat's libraries are installed but do not import (%s): reinstall "
                          "process-backup, or pass --http-port -1", exc)
        server.serve_forever()
    except HandedOver:
        # The lease is the successor's, and so is everything else: exit now, without the
        # interpreter's teardown (thousands of sockets to free), which would take the
        # cores the successor restores on (a handover's gap was half as long again with it).
        logging.shutdown()
        os._exit(0)
    except SystemExit as exc:
        stopped = True
        if exc.code:
            return exc.code
    finally:
        if lifecycle.role is Role.SERVING:
            if stopped:  # a stop, not an exception: the next chatd counts it planned (chatd.tally)
                server.journal.set_owner(0, 0)
            seal(server)
        manager.stopping(f"stopping; {status_line(server)}")
        control.close()
        server.cluster.close()
        if server.metrics is not None:
            server.metrics.close()
    return 0


def seal(server: ChatServer) -> None:
    """A chatd that served and stops (not a handover: that exits before) seals its journal: a file
    on disk is then trusted after a reboot (chatd.statedir). A memfd has nothing to seal."""
    try:
        server.journal.seal()
    except OSError as exc:
        log.error("could not seal the journal as chatd stops (%s): after a reboot it will be set aside, and the "
                  "sessions in it lost, unless `chatd --state-dir DIR --seal` succeeds before", exc.strerror or exc)
        return
    if server.journal.on_disk:
        log.info("journal sealed at commit %d: on disk as it is now", server.journal.committed)
