"""The sandboxes' DNS resolver: UDP and TCP on the gateway's port 53 (every sandbox's /etc/resolv.conf
names it). A query is answered for the sandbox it comes from (known by its source address): a name its
policy denies gets REFUSED; the rest is forwarded to the sandbox's own `dnsServers`, else to the
server's upstream resolvers (`--dns`, default: the host's /etc/resolv.conf).

Everything a sandbox sends is hostile input: a query is parsed only if it is small enough for DNS (512
bytes on UDP unless EDNS asks more, at most 65,535 on TCP), must hold one question, and each sandbox may
have only so many queries in flight (the rest get SERVFAIL), so one sandbox cannot make the server do
unbounded work. Answers come from upstream as they are, with the sandbox's query ID; positive answers
are kept for their TTL (at most a minute), per name, type and upstream servers.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode

from sandboxd.network.policy import NetworkPolicy

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32  # queries per sandbox being forwarded at once
UPSTREAM_TIMEOUT = 3.0
TCP_IDLE = 10.0
MAX_TCP_CONNECTIONS = 8  # per sandbox
CACHE_ENTRIES = 4096
CACHE_TTL = 60  # s, at most


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    servers = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append(parts[1])
    except OSError:
        pass
    return servers


class Resolver:
    def __init__(
        self, address: str, upstream: list[str], policy_for: Callable[[str], NetworkPolicy | None], port: int = 53
    ) -> None:
        self.address = address
        self.port = port
        self.upstream = upstream
        self.policy_for = policy_for  # the policy of the sandbox with this address (None: no sandbox)
        self._in_flight: Counter[str] = Counter()
        self._tcp: Counter[str] = Counter()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._cache: dict[tuple, tuple[float, bytes]] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(self.address, self.port), reuse_port=False
        )
        self._tcp_server = await asyncio.start_server(self._serve_tcp, self.address, self.port, reuse_address=True)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()

    async def answer(self, wire: bytes, client: str, tcp: bool) -> bytes | None:
        """The reply to one query from `client`, or None to say nothing (not a query, not a sandbox)."""
        policy = self.policy_for(client)
        if policy is None:
            return None
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, struct.error):
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        name = query.question[0].name.to_text(omit_final_dot=True)
        if not policy.name_allowed(name):
            return _reply(query, dns.rcode.REFUSED)
        upstream = list(policy.dns_servers) if policy.dns_servers else self.upstream
        q = query.question[0]
        key = (name.lower(), q.rdtype, q.rdclass, tuple(upstream), query.payload >= 1232)
        hit = self._cache.get(key)
        if hit is not None and not tcp:
            if hit[0] > time.monotonic():
                return wire[:2] + hit[1][2:]  # the cached answer, with this query's ID
            del self._cache[key]
        if not upstream or self._in_flight[client] >= MAX_IN_FLIGHT:
            return _reply(query, dns.rcode.SERVFAIL)
        self._in_flight[client] += 1
        try:
            for server in upstream:
                try:
                    if tcp:
                        response = await dns.asyncquery.tcp(query, server, timeout=UPSTREAM_TIMEOUT)
                    else:
                        response = await dns.asyncquery.udp(
                            query, server, timeout=UPSTREAM_TIMEOUT, ignore_unexpected=True, raise_on_truncation=False
                        )
                    out = response.to_wire(max_size=65535 if tcp else max(512, query.payload))
                    self._keep(key, response, out)
                    return out
                except (dns.exception.DNSException, OSError, EOFError) as e:
                    log.debug("upstream %s failed for %s: %s", server, name, e)
            return _reply(query, dns.rcode.SERVFAIL)
        finally:
            self._in_flight[client] -= 1
            if not self._in_flight[client]:
                del self._in_flight[client]

    def _keep(self, key: tuple, response: dns.message.Message, wire: bytes) -> None:
        """Answers are kept for their smallest TTL (at most CACHE_TTL; none when it is 0)."""
        if response.rcode() != dns.rcode.NOERROR or response.flags & dns.flags.TC or not response.answer:
            return
        ttl = min(min(rrset.ttl for rrset in response.answer), CACHE_TTL)
        if ttl <= 0:
            return
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (time.monotonic() + ttl, wire)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[0]
        if self.policy_for(client) is None or self._tcp[client] >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._tcp[client] += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (length,) = struct.unpack("!H", head)
                wire = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE)
                reply = await self.answer(wire, client, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp[client] -= 1
            if not self._tcp[client]:
                del self._tcp[client]
            writer.close()


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    r = dns.message.make_response(query)
    r.set_rcode(rcode)
    return r.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > 4096:
            return
        asyncio.get_running_loop().create_task(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = await self.resolver.answer(data, addr[0], tcp=False)
        except Exception:
            log.exception("DNS query from %s failed", addr[0])
            return
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
