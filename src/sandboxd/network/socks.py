"""A SOCKS5 client (RFC 1928, with RFC 1929 username/password), for the egress proxy's tunnel: a
sandbox's `network.egressProxy` is where its outbound TCP goes, after its policy has allowed it.

Optionally over TLS to the proxy (`tls`: the system trust store, or the given CA; TLS 1.2 or newer; the
certificate is always checked; no fallback to plaintext). Every reply is read with a deadline and
checked field by field; a refusal raises `SocksError` naming the proxy's reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Any

HANDSHAKE_TIMEOUT = 10.0
REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class SocksError(ConnectionError):
    pass


@dataclass(frozen=True)
class ProxyConfig:
    """`network.egressProxy`, checked."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    server_name: str | None = None
    ca_cert: str | None = None

    @classmethod
    def from_api(cls, value: Any) -> ProxyConfig:
        if not isinstance(value, dict) or not isinstance(value.get("address"), str):
            raise ValueError("network.egressProxy must be an object with an 'address' of the form host:port")
        host, sep, port_s = value["address"].strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536 or len(host) > 253:
            raise ValueError(f"network.egressProxy.address {value['address']!r} is not host:port")
        username, password = value.get("username"), value.get("password")
        for name, v in (("username", username), ("password", password)):
            if v is not None and (not isinstance(v, str) or len(v.encode()) > 255 or not v):
                raise ValueError(f"network.egressProxy.{name} must be a string of 1 to 255 bytes")
        if password is not None and username is None:
            raise ValueError("network.egressProxy.password needs a username")
        tls = value.get("tls")
        server_name = ca_cert = None
        enabled = False
        if isinstance(tls, dict):
            enabled = tls.get("enabled", True) is not False
            server_name = tls.get("serverName", tls.get("server_name"))
            ca_cert = tls.get("caCert", tls.get("ca_cert"))
            for name, v in (("serverName", server_name), ("caCert", ca_cert)):
                if v is not None and (not isinstance(v, str) or len(v) > 65536):
                    raise ValueError(f"network.egressProxy.tls.{name} must be a string")
            if ca_cert is not None:
                try:
                    ssl.create_default_context(cadata=ca_cert)
                except (ssl.SSLError, ValueError) as e:
                    raise ValueError(f"network.egressProxy.tls.caCert is not a PEM certificate: {e}") from None
        elif tls is not None and not isinstance(tls, bool):
            raise ValueError("network.egressProxy.tls must be true, false or an object")
        else:
            enabled = bool(tls)
        return cls(host, int(port_s), username, password, enabled, server_name, ca_cert)

    def to_api(self) -> dict[str, Any]:
        """As E2B reports it: never the password nor the CA."""
        out: dict[str, Any] = {"address": f"{self.host}:{self.port}"}
        if self.username is not None:
            out["username"] = self.username
        if self.tls:
            out["tls"] = {"enabled": True, **({"serverName": self.server_name} if self.server_name else {})}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "address": f"{self.host}:{self.port}",
            "username": self.username,
            "password": self.password,
            "tls": {"enabled": self.tls, "serverName": self.server_name, "caCert": self.ca_cert} if self.tls else None,
        }


async def connect_marked(address: tuple[str, int], mark: int, timeout: float) -> socket.socket:
    """A TCP connection from the host carrying `mark` (SO_MARK), which the sandbox table's output hook
    polices: the egress proxy's connections, to a destination or to a SOCKS5 proxy."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tunnel(
    proxy: ProxyConfig, host: str, port: int, mark: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to (host, port) through the proxy. `host` is an IPv4 address or a name (the proxy
    resolves names). The connection to the proxy carries `mark` (policed by the sandbox table)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(proxy.host, proxy.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    if not infos:
        raise SocksError(f"the egress proxy {proxy.host} does not resolve")
    # resolved once, and this address used for the whole connection (AF_INET: the sockaddr is (host, port))
    addr = (str(infos[0][4][0]), int(infos[0][4][1]))
    sock = await connect_marked(addr, mark, HANDSHAKE_TIMEOUT)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            ctx = None
            if proxy.tls:
                ctx = (
                    ssl.create_default_context(cadata=proxy.ca_cert) if proxy.ca_cert else ssl.create_default_context()
                )
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ctx, server_hostname=(proxy.server_name or proxy.host) if ctx else None
            )
            try:
                await _handshake(reader, writer, proxy, host, port)
            except BaseException:
                writer.close()
                raise
            return reader, writer
    except BaseException:
        sock.close()
        raise


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: ProxyConfig, host: str, port: int
) -> None:
    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    writer.write(bytes([5, len(methods)]) + methods)
    ver, method = await reader.readexactly(2)
    if ver != 5:
        raise SocksError("the egress proxy does not speak SOCKS5")
    if method == 2:
        if proxy.username is None:
            raise SocksError("the egress proxy asks for credentials and none were given")
        user, pw = proxy.username.encode(), (proxy.password or "").encode()
        writer.write(bytes([1, len(user)]) + user + bytes([len(pw)]) + pw)
        _, status = await reader.readexactly(2)
        if status != 0:
            raise SocksError("the egress proxy refused the username and password")
    elif method != 0:
        raise SocksError("the egress proxy accepts none of our authentication methods")
    try:
        target = b"\x01" + ipaddress.IPv4Address(host).packed
    except ValueError:
        name = host.encode("idna")
        target = b"\x03" + bytes([len(name)]) + name
    writer.write(b"\x05\x01\x00" + target + struct.pack("!H", port))
    ver, rep, _, atyp = await reader.readexactly(4)
    if ver != 5:
        raise SocksError("malformed reply from the egress proxy")
    if rep != 0:
        raise SocksError(f"the egress proxy refused the connection: {REPLIES.get(rep, f'error {rep}')}")
    if atyp == 1:
        await reader.readexactly(4 + 2)
    elif atyp == 3:
        (n,) = await reader.readexactly(1)
        await reader.readexactly(n + 2)
    elif atyp == 4:
        await reader.readexactly(16 + 2)
    else:
        raise SocksError("malformed reply from the egress proxy")
