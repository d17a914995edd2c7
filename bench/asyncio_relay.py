"""The baseline: a minimal asyncio server speaking chatd's line protocol (NICK, PAIR, MSG,
FROM with n), with no backup of any kind. What a plain relay costs, for the ratios in bench/."""

import asyncio
import sys

nicks, targets, counts = {}, {}, {}  # nick -> writer; writer -> target; writer -> received


async def serve(reader, writer):
    me = None
    while line := await reader.readline():
        verb, _, arg = line.decode().rstrip("\r\n").partition(" ")
        if verb == "NICK":
            me = arg
            nicks[me] = writer
            writer.write(f"OK NICK {me}\n".encode())
        elif verb == "PAIR":
            targets[writer] = arg
            writer.write(f"OK PAIR {arg}\n".encode())
            peer = nicks.get(arg)
            if peer is not None and targets.get(peer) == me:
                counts[writer] = counts[peer] = 0
                writer.write(f"PAIRED {arg}\n".encode())
                peer.write(f"PAIRED {me}\n".encode())
        elif verb == "MSG":
            peer = nicks.get(targets.get(writer))
            if peer is not None and targets.get(peer) == me:
                counts[peer] += 1
                peer.write(f"FROM {me} {counts[peer]} {arg}\n".encode())
                await peer.drain()
            else:
                writer.write(b"ERR not-paired\n")
    writer.close()


async def main(port):
    server = await asyncio.start_server(serve, "127.0.0.1", port, limit=1 << 17, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
