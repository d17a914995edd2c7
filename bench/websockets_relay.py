"""The web baseline: what a Python user would write instead of chatd's web path. A minimal chat
relay on the ``websockets`` library (asyncio), speaking chatd's web protocol (README "The web
chat"): ``nick``, ``pair`` and ``msg`` in, ``ok``, ``paired`` and ``from`` (with ``n``) out, one
JSON text message each, with no backup of any kind. For the ratios in bench/web_rates.py.

    .venv/bin/python bench/websockets_relay.py [PORT]    (prints the port it listens on)

Like chatd, it negotiates no compression (chatd's could not survive a crash) and takes messages
of up to 64 KiB.
"""

import asyncio
import json
import sys

from websockets.asyncio.server import serve

nicks, targets, counts = {}, {}, {}  # nick -> connection; connection -> target; connection -> received


def encode(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


async def chat(connection):
    me = None
    try:
        async for text in connection:
            try:
                command = json.loads(text)
                kind = command.get("type")
            except (ValueError, AttributeError):
                await connection.send(encode({"type": "error", "code": "unknown-command"}))
                continue
            if kind == "nick":
                me = command.get("name")
                nicks[me] = connection
                await connection.send(encode({"type": "ok", "command": "nick", "name": me}))
            elif kind == "pair":
                peer_name = command.get("peer")
                targets[connection] = peer_name
                await connection.send(encode({"type": "ok", "command": "pair", "name": peer_name}))
                peer = nicks.get(peer_name)
                if peer is not None and targets.get(peer) == me:
                    counts[connection] = counts[peer] = 0
                    await connection.send(encode({"type": "paired", "peer": peer_name}))
                    await peer.send(encode({"type": "paired", "peer": me}))
            elif kind == "msg":
                peer = nicks.get(targets.get(connection))
                if peer is not None and targets.get(peer) == me:
                    counts[peer] += 1
                    # send() waits while the peer's buffer is full: the same back-pressure
                    # as the line relay's drain().
                    await peer.send(encode({"type": "from", "from": me, "n": counts[peer],
                                            "text": command.get("text", "")}))
                else:
                    await connection.send(encode({"type": "error", "code": "not-paired"}))
            else:
                await connection.send(encode({"type": "error", "code": "unknown-command"}))
    finally:
        if me is not None and nicks.get(me) is connection:
            del nicks[me]
        targets.pop(connection, None)
        counts.pop(connection, None)


async def main(port: int) -> None:
    async with serve(chat, "127.0.0.1", port, compression=None, max_size=64 * 1024, max_queue=64,
                     backlog=4096) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
