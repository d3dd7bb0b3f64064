"""The egress proxy: where a sandbox whose policy names hosts has its outgoing TCP to ports 80 and 443
sent (nftables redirects it to the gateway, runtime/network.py). It learns the name the client asked
for, from HTTP's `Host` or from TLS's SNI, decides by the sandbox's policy (network/policy.py), and
connects on the sandbox's behalf:

- a name the policy allows is connected to by *its own* addresses (resolved here, by the sandbox's DNS
  servers or the server's), not the address the sandbox chose: an allowed name cannot carry traffic to
  another address;
- otherwise the address the sandbox connected to decides, as the kernel would have.

The proxy's own connections carry a mark (SO_MARK) that the table checks in the output hook: they may
not reach this host, the sandbox pool, link-local or special addresses, whatever DNS said (no DNS
rebinding to the host). A denied HTTP request gets a 403 that says why; a denied TLS connection is
closed. Each sandbox may have so many proxied connections at once; every read has a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import h11

from sandboxd.network.intercept import SandboxCA, Stream, TlsServerStream, relay_http
from sandboxd.network.policy import NetworkPolicy, matches
from sandboxd.network.socks import connect_marked, open_tunnel

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
MAX_HEAD = 16 * 1024  # an HTTP request head, or a TLS ClientHello, must fit
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 256  # per sandbox
BUFFER = 64 * 1024
DNS_CACHE = 4096  # names
DNS_CACHE_TTL = 60.0  # s, at most


class Denied(Exception):
    pass


@dataclass(eq=False)
class _Conn:
    client: str
    name: str | None
    address: str  # where it was connected
    writer: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello record (None: none given). Raises ValueError on a malformed
    or incomplete record; every length is checked against what is there."""

    def take(buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
        if pos + n > len(buf):
            raise ValueError("truncated")
        return buf[pos : pos + n], pos + n

    def num(buf: bytes, pos: int, n: int) -> tuple[int, int]:
        b, pos = take(buf, pos, n)
        return int.from_bytes(b, "big"), pos

    if len(hello) < 5 or hello[0] != 0x16:
        raise ValueError("not a TLS handshake")
    length = int.from_bytes(hello[3:5], "big")
    body, _ = take(hello, 5, length)
    kind, pos = num(body, 0, 1)
    if kind != 1:
        raise ValueError("not a ClientHello")
    hlen, pos = num(body, pos, 3)
    body, _ = take(body, pos, hlen)
    pos = 2 + 32  # version, random
    n, pos = num(body, pos, 1)
    _, pos = take(body, pos, n)  # session id
    n, pos = num(body, pos, 2)
    _, pos = take(body, pos, n)  # cipher suites
    n, pos = num(body, pos, 1)
    _, pos = take(body, pos, n)  # compression methods
    if pos == len(body):
        return None
    n, pos = num(body, pos, 2)
    exts, _ = take(body, pos, n)
    pos = 0
    while pos < len(exts):
        etype, pos = num(exts, pos, 2)
        elen, pos = num(exts, pos, 2)
        data, pos = take(exts, pos, elen)
        if etype == 0:  # server_name
            _, p = num(data, 0, 2)
            while p < len(data):
                ntype, p = num(data, p, 1)
                nlen, p = num(data, p, 2)
                name, p = take(data, p, nlen)
                if ntype == 0:
                    return name.decode("ascii")
            return None
    return None


def http_host(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        if not line:
            break
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"host":
            host = value.strip().decode("ascii", errors="strict")
            if host.startswith("["):
                return None
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


class EgressProxy:
    def __init__(
        self,
        address: str,
        port: int,
        policy_for: Callable[[str], NetworkPolicy | None],
        upstream_dns: list[str],
        mark: int,
        ca_for: Callable[[str], SandboxCA | None] = lambda _: None,
        upstream_ca_file: str | None = None,
        fill: Callable[[str, str], str] = lambda text, client: text,
    ) -> None:
        # (a rule's header value, the sandbox's address) -> the value with its placeholders filled in
        self.fill = fill
        self.ca_for = ca_for  # the CA of the sandbox with this address, for intercepted TLS
        # intercepted TLS goes on to the real host over TLS verified against the host's trust store
        self.upstream_tls = ssl.create_default_context()
        if upstream_ca_file:
            self.upstream_tls.load_verify_locations(upstream_ca_file)
        self.upstream_tls.set_alpn_protocols(["http/1.1"])
        self.address = address
        self.port = port
        self.policy_for = policy_for
        self.upstream_dns = upstream_dns
        self.mark = mark
        self._server: asyncio.Server | None = None
        self._count: Counter[str] = Counter()
        self._conns: dict[str, set[_Conn]] = defaultdict(set)
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[float, list[str]]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.address, self.port, reuse_address=True)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conns in self._conns.values():
            for c in list(conns):
                c.writer.close()

    def policy_changed(self, client: str) -> None:
        """Cut the proxied connections of `client` that its new policy does not allow."""
        policy = self.policy_for(client)
        for c in list(self._conns.get(client, ())):
            if policy is None or not policy.allows(c.name, c.address):
                c.writer.close()
                if c.upstream is not None:
                    c.upstream.close()

    async def _resolve(self, name: str, policy: NetworkPolicy) -> list[str]:
        """The name's IPv4 addresses, by the sandbox's DNS servers or the server's; answers are kept for
        their TTL (at most a minute; a bounded cache shared by the sandboxes that use the same servers)."""
        servers = tuple(policy.dns_servers) if policy.dns_servers else tuple(self.upstream_dns)
        key = (name, servers)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = list(servers)
        r.lifetime = 5.0
        try:
            answer = await r.resolve(name, "A")
        except dns.exception.DNSException as e:
            raise Denied(f"{name} does not resolve: {e}") from None
        addresses = [rr.to_text() for rr in answer]
        if len(self._cache) >= DNS_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (now + min(answer.rrset.ttl if answer.rrset else 0, DNS_CACHE_TTL), addresses)
        return addresses

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[0]
        policy = self.policy_for(client)
        if policy is None or self._count[client] >= MAX_CONNECTIONS:
            writer.close()
            return
        self._count[client] += 1
        conn: _Conn | None = None
        tls = False
        try:
            try:
                dst, port = original_destination(writer.get_extra_info("socket"))
            except OSError:
                return  # not redirected here by the table
            # The name is looked for only where the policy names hosts, on the web's ports: other
            # protocols may wait for the server to speak first.
            head, name = b"", None
            if (policy.has_names or policy.rules) and port in (80, 443):
                head = await self._read_head(reader)
                tls = head[:1] == b"\x16"
                try:
                    name = sni(head) if tls else http_host(head)
                except (ValueError, UnicodeDecodeError):
                    name = None
                if name is not None:
                    name = name.lower().rstrip(".")
            else:
                tls = True  # (no 403 page for a protocol we did not read)
            if not policy.allows(name, dst):
                raise Denied(f"{name or dst} is not allowed by this sandbox's network policy")
            by_name = name is not None and matches(name, policy.allow_names)
            conn = _Conn(client, name, dst, writer)
            self._conns[client].add(conn)
            if policy.egress_proxy is not None:  # through the sandbox's SOCKS5 proxy; closed if it fails
                up_reader, up_writer = await open_tunnel(
                    policy.egress_proxy, name if by_name and name else dst, port, self.mark
                )
            else:
                targets = await self._resolve(name, policy) if by_name and name else [dst]
                up_reader, up_writer = await self._connect(targets, port)
            conn.upstream = up_writer
            headers = policy.headers_for(name, dst)
            if headers is not None and (name is not None or not tls):
                await self._intercept(client, name or dst, tls, head, headers, reader, writer, up_reader, up_writer)
                return
            if head:
                up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except Denied as e:
            if not tls:
                body = f"sandboxd: {e}\n".encode()
                writer.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._count[client] -= 1
            if not self._count[client]:
                del self._count[client]
            if conn is not None:
                self._conns[client].discard(conn)
                if not self._conns[client]:
                    del self._conns[client]
                if conn.upstream is not None:
                    conn.upstream.close()
            writer.close()

    async def _intercept(
        self,
        client: str,
        name: str,
        tls: bool,
        head: bytes,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """A request to a host with rules: read (HTTP) or terminate (TLS) it, and set the rules' headers."""
        sandbox_side: Stream = Stream(reader, writer)
        first = head
        if tls:
            ca = self.ca_for(client)
            if ca is None:
                raise ConnectionError("no CA for this sandbox's intercepted TLS")
            server = TlsServerStream(sandbox_side, ca.context_for(name), head)
            async with asyncio.timeout(HEAD_TIMEOUT):
                await server.handshake()
            sandbox_side, first = server, b""
            await up_writer.start_tls(self.upstream_tls, server_hostname=name)
        try:
            fill = self.fill

            def headers_now() -> dict[str, str]:
                return {k: fill(v, client) for k, v in headers.items()}

            await relay_http(sandbox_side, Stream(up_reader, up_writer), name, headers_now, first)
        except h11.ProtocolError:
            pass
        finally:
            sandbox_side.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        """Enough of the stream to know the name: a whole TLS record, or an HTTP head (bounded)."""
        buf = b""
        async with asyncio.timeout(HEAD_TIMEOUT):
            while len(buf) < MAX_HEAD:
                chunk = await reader.read(MAX_HEAD - len(buf))
                if not chunk:
                    break
                buf += chunk
                if buf[:1] == b"\x16":
                    if len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
                        break
                elif b"\r\n\r\n" in buf:
                    break
        return buf

    async def _connect(self, targets: list[str], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: Exception | None = None
        for target in targets:
            try:
                sock = await connect_marked((target, port), self.mark, CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                last = e
                continue
            try:
                return await asyncio.open_connection(sock=sock)
            except OSError as e:
                sock.close()
                last = e
        raise ConnectionError(f"could not connect to {targets}: {last}")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
