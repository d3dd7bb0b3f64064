"""The lab's SOCKS5 proxy (tests/netlab.py): CONNECT only, optionally with username/password (RFC 1929),
logging each request as `target-host:port` to DIR/socks.log. Run inside the lab's network namespace.

    lab_socks.py DIR ADDRESS PORT [USERNAME PASSWORD]
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys

DIR = sys.argv[1]
CREDENTIALS = (sys.argv[4].encode(), sys.argv[5].encode()) if len(sys.argv) > 5 else None


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        want = 2 if CREDENTIALS else 0
        if ver != 5 or want not in methods:
            writer.write(b"\x05\xff")
            return
        writer.write(bytes([5, want]))
        if CREDENTIALS:
            _, ulen = await reader.readexactly(2)
            user = await reader.readexactly(ulen)
            (plen,) = await reader.readexactly(1)
            pw = await reader.readexactly(plen)
            ok = (user, pw) == CREDENTIALS
            writer.write(b"\x01" + (b"\x00" if ok else b"\x01"))
            if not ok:
                return
        _, _, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntoa(await reader.readexactly(4))
        elif atyp == 3:
            (ln,) = await reader.readexactly(1)
            host = (await reader.readexactly(ln)).decode()
        else:
            writer.write(b"\x05\x08\x00\x01" + b"\0" * 6)
            return
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        with open(DIR + "/socks.log", "a") as log:  # noqa: ASYNC230 (a few bytes, in a test's helper)
            log.write(f"{host}:{port}\n")
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, TimeoutError):
            writer.write(b"\x05\x05\x00\x01" + b"\0" * 6)
            return
        writer.write(b"\x05\x00\x00\x01" + b"\0" * 6)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, sys.argv[2], int(sys.argv[3]))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
