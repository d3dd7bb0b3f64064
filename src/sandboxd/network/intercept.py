"""The egress proxy's interception, for hosts with `network.rules`: it reads (HTTP) or terminates (TLS)
the sandbox's requests to those hosts and sets the rules' headers on each, so that credentials live on
the host and never enter the sandbox.

- TLS is terminated only for a host that has rules: with a certificate for the name the client asked
  for, signed by the sandbox's own CA (`SandboxCA`, kept in the sandbox's state dir on the host and
  added to the sandbox's trust store when its rules are set). Everything else keeps going through the
  proxy untouched. The upstream connection is TLS again, verified against the host's trust store (and
  `--egress-ca-file`).
- Requests are parsed with h11, one at a time, on both sides: each request must name the same host as
  the connection was opened for (421 otherwise), so a kept-alive connection cannot carry a request for
  another host; a `101 Switching Protocols` answer turns the connection into a byte pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import h11

from sandboxd import pki

MAX_HEAD = 64 * 1024
READ = 64 * 1024
LEAF_DAYS = 7
CONTEXTS = 256  # TLS contexts (one per name) kept per sandbox


class Stream:
    """Bytes in and out: an asyncio connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def recv(self) -> bytes:
        return await self.reader.read(READ)

    async def send(self, data: bytes) -> None:
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class TlsServerStream(Stream):
    """TLS served to the sandbox over an existing connection whose first bytes (the ClientHello, read to
    learn the name) were already taken: they are fed to the TLS engine first."""

    def __init__(self, inner: Stream, ctx: ssl.SSLContext, first: bytes) -> None:
        super().__init__(inner.reader, inner.writer)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.incoming.write(first)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(READ)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client left during the TLS handshake") from None

    async def recv(self) -> bytes:
        while True:
            try:
                return self.tls.read(READ)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send(self, data: bytes) -> None:
        if data:
            self.tls.write(data)
            await self._flush()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.tls.unwrap()
        self.writer.write(self.outgoing.read())
        self.writer.close()


class SandboxCA:
    """A sandbox's own CA for intercepted TLS: `<state dir>/egress-ca.pem` and `.key` (0600, host side)."""

    def __init__(self, directory: Path) -> None:
        cert_path, key_path = directory / "egress-ca.pem", directory / "egress-ca.key"
        if cert_path.exists() and key_path.exists():
            self.cert, self.key = pki.load(cert_path.read_bytes(), key_path.read_bytes())
        else:
            self.cert, self.key = pki.make_ca(f"sandboxd egress proxy ({directory.name})", days=3650)
            pki.write_private(key_path, pki.key_pem(self.key))
            pki.write_private(cert_path, pki.cert_pem(self.cert))
        self.pem = pki.cert_pem(self.cert).decode()
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def context_for(self, name: str) -> ssl.SSLContext:
        ctx = self._contexts.get(name)
        if ctx is not None:
            self._contexts.move_to_end(name)
            return ctx
        cert, key = pki.issue(self.cert, self.key, [name], days=LEAF_DAYS)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # load_cert_chain wants files: a memfd keeps the key off every disk
        import os

        fd = os.memfd_create("leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pki.cert_pem(cert) + pki.cert_pem(self.cert) + pki.key_pem(key))
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._contexts[name] = ctx
        if len(self._contexts) > CONTEXTS:
            self._contexts.popitem(last=False)
        return ctx


class Misdirected(Exception):
    pass


async def _next(conn: h11.Connection, stream: Stream) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.recv())
            continue
        return event


def _host_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k.lower() == b"host":
            host = v.decode("latin-1").strip().lower()
            return host.rsplit(":", 1)[0] if ":" in host and not host.startswith("[") else host
    return None


async def relay_http(
    client: Stream, upstream: Stream, name: str, headers_now: Callable[[], dict[str, str]], first: bytes
) -> None:
    """HTTP/1.1 from the sandbox to upstream, request by request, with the headers `headers_now()` gives
    (asked for each request: secrets are filled in then) set on each. A KeyError from it (a secret that
    does not exist) answers that request 502 and ends the connection."""
    s = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    c = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    if first:
        s.receive_data(first)
    while True:
        event = await _next(s, client)
        if not isinstance(event, h11.Request):
            return
        if _host_of(event.headers) not in (name, None):
            await client.send(s.send(h11.Response(status_code=421, headers=[(b"content-length", b"0")])))
            await client.send(s.send(h11.EndOfMessage()))
            return
        try:
            set_headers = headers_now()
        except KeyError as e:
            body = f"sandboxd: the network rule for {name} names secret {e.args[0]!r}, which does not exist\n".encode()
            head = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
            await client.send(s.send(h11.Response(status_code=502, headers=head)))
            await client.send(s.send(h11.Data(data=body)) + s.send(h11.EndOfMessage()))
            return
        replaced = {k.lower().encode() for k in set_headers}
        extra = [(k.encode(), v.encode()) for k, v in set_headers.items()]
        headers = [(k, v) for k, v in event.headers if k.lower() not in replaced] + extra
        await upstream.send(c.send(h11.Request(method=event.method, target=event.target, headers=headers)))
        if not await _forward_body(s, client, c, upstream):
            return
        while True:
            event = await _next(c, upstream)
            if isinstance(event, h11.InformationalResponse):
                await client.send(s.send(event))
                if event.status_code == 101:  # the connection is no longer HTTP: pipe it
                    await client.send(c.trailing_data[0])
                    await upstream.send(s.trailing_data[0])
                    await asyncio.gather(_pipe(client, upstream), _pipe(upstream, client))
                    return
            elif isinstance(event, h11.Response):
                await client.send(s.send(event))
                break
            else:
                return
        if not await _forward_body(c, upstream, s, client):
            return
        if h11.MUST_CLOSE in (s.our_state, s.their_state, c.our_state, c.their_state):
            return
        s.start_next_cycle()
        c.start_next_cycle()


async def _forward_body(src: h11.Connection, src_stream: Stream, dst: h11.Connection, dst_stream: Stream) -> bool:
    """A message's body, from one side to the other, to its end; False if the connection ended first."""
    while True:
        event = await _next(src, src_stream)
        if isinstance(event, h11.Data):
            await dst_stream.send(dst.send(h11.Data(data=event.data)))
        elif isinstance(event, h11.EndOfMessage):
            await dst_stream.send(dst.send(h11.EndOfMessage()))
            return True
        else:
            return False


async def _pipe(a: Stream, b: Stream) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await a.recv():
            await b.send(data)
