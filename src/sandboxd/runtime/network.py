"""Sandbox networking on the host: a network namespace per sandbox, a veth link to the host, NAT out,
and an nftables table that polices every packet a sandbox sends.

Topology (routed, no bridge). Each sandbox has one address from the server's pool (`--network-cidr`,
default 10.213.0.0/16) on its `eth0`, a /32; its default route goes to the pool's first address, the
*gateway*, which lives on a portless bridge device of the server (`sg<instance>`) and is where sandboxd's own
services for sandboxes listen (the DNS resolver). The host end of the veth (`sx<instance><n>`) has no
address, only the route `<address>/32 dev sx…`. Every packet a sandbox sends is therefore routed by the
host, and so passes the table's hooks with the sandbox's own interface as its input:

- prerouting: a source address that does not route back through the interface it came in by
  (`fib saddr . iif`) is dropped (no spoofing), and so is all IPv6;
- prerouting (nat): the TCP to ports 80 and 443 of a sandbox whose policy names hosts goes to the
  egress proxy on the gateway (`@intercept`);
- input (to any address of the host): only DNS to the gateway (and the proxy, from those sent to it);
  the rest is rejected;
- forward: to another sandbox (of any sandboxd server), to the pool, link-local (metadata) and other
  special ranges is rejected; then the sandbox's own policy chain, when it has one (`@egress`, looked up
  by source address, on every packet, so a new policy also stops existing connections);
  replies come back through conntrack; nothing else may enter a sandbox interface;
- output: the egress proxy's connections (marked) may not reach the host, the pool or blocked ranges;
- postrouting: traffic leaving for anything but a sandbox is masqueraded.

Making a sandbox's network costs ~10 ms (a netns, a veth pair, addresses and routes on both sides), so it
is done ahead of time: one namespace is kept ready (`take` hands it out and prepares the next), and the
create helper joins it (`sbxhelper create --netns`). The namespace lives exactly as long as the sandbox's
processes: when the last one exits, the kernel removes the namespace, the veth pair and its route, so a
crash of the server leaves no interface behind. Addresses are reused only after the sandbox is gone and
its conntrack entries are deleted.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd.runtime.base import Egress, RuntimeError_
from sandboxd.runtime.nft import Nft, NftError

log = logging.getLogger(__name__)

DEFAULT_CIDR = "10.213.0.0/16"
CLONE_NEWNET = 0x40000000
IFF_MULTICAST = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)
# Conntrack entries of sandbox connections carry this mark, so that a sandbox's can be found and deleted.
CT_MARK = 0x5BD0_0000
# The egress proxy's own connections carry this mark (SO_MARK), which the table polices (network/egress.py).
PROXY_MARK = 0x5BD1_0000
# Where the egress proxy listens, on the gateway.
PROXY_PORT = 15001
# Where the host's IP forwarding setting from before any sandboxd changed it is kept (tmpfs: a reboot
# resets both).
FORWARD_ORIG = Path("/run/sandboxd/ip_forward.orig")
# Never reachable from a sandbox, whatever its policy: this host, link-local (cloud metadata at
# 169.254.169.254), multicast and the other special ranges.
BLOCKED_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3", "255.255.255.255/32")


class NetworkError(RuntimeError_):
    """Sandbox networking cannot be set up as asked (the message says why and what to do)."""


class AddressPoolExhausted(NetworkError):
    """Every address of the pool is a live sandbox's."""


@dataclass
class Prepared:
    """A network namespace ready for a sandbox: its fd (the create helper joins it), address, host link."""

    fd: int
    address: str
    ifname: str
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


# The sandbox's own namespace (it cannot change them: they belong to the host's user namespace).
NETNS_SYSCTLS = {
    # A socket the sandbox's last process left with unacknowledged data keeps the namespace, and so the
    # sandbox's address, alive while it retries: give up after one retry.
    "ipv4/tcp_orphan_retries": "1",
    "ipv4/tcp_fin_timeout": "5",
    # eth0 gets no IPv6 (not even link-local); lo keeps ::1.
    "ipv6/conf/default/disable_ipv6": "1",
}


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _new_netns(host_fd: int) -> tuple[int, socket.socket]:
    """A new network namespace (its fd) and a route netlink socket inside it. Runs on the netns thread:
    unshare changes only the calling thread's namespace, which goes back to the host's before returning."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    try:
        for name, value in NETNS_SYSCTLS.items():  # /proc/sys/net is the opener's namespace's
            with open(f"/proc/sys/net/{name}", "w") as f:
                f.write(value)
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)  # NETLINK_ROUTE
        except BaseException:
            os.close(fd)
            raise
    finally:
        _setns(host_fd)
    return fd, sock


class HostNetwork:
    """The pool, the gateway, the nftables table and the prepared namespaces of one server instance."""

    def __init__(self, instance: str, cidr: str, netns_thread: Executor, host_netns_fd: int) -> None:
        try:
            self.pool = ipaddress.IPv4Network(cidr)
        except ValueError as e:
            raise NetworkError(f"--network-cidr {cidr!r} is not an IPv4 network: {e}") from None
        if self.pool.num_addresses < 4 or not self.pool.is_private:
            raise NetworkError(
                f"--network-cidr {cidr}: give a private IPv4 range of at least 4 addresses (e.g. {DEFAULT_CIDR})"
            )
        self.gateway = str(self.pool.network_address + 1)
        self._first = int(self.pool.network_address) + 2
        self._last = int(self.pool.broadcast_address) - 1
        tag = instance.lstrip("i")[:5]
        self.prefix = f"sx{tag}"  # host ends of the sandboxes' veths
        self.gw_dev = f"sg{tag}"
        self.table = f"sandboxd_{instance}"
        self._netns_thread = netns_thread
        self._host_fd = host_netns_fd
        self._lock = threading.Lock()  # the route socket and the address book
        self._used: set[int] = set()
        self._ready: set[int] = set()  # addresses of namespaces prepared but not given to a sandbox
        self._next = self._first
        self._spare: Prepared | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._policy_lock = threading.Lock()
        self._chains: set[str] = set()  # addresses with a policy chain
        self._intercepted: set[str] = set()  # addresses whose web traffic goes to the egress proxy
        self._tunneled: set[str] = set()  # addresses whose every TCP connection goes to the egress proxy
        from pyroute2 import IPRoute  # imported here: a server without networking never loads it

        logging.getLogger("pyroute2").setLevel(max(logging.INFO, log.getEffectiveLevel()))  # not every message

        self._ipr = IPRoute()
        self._nft = Nft()
        self._check_pool()
        self._gateway_up()

    # -- set-up ------------------------------------------------------------------------------------
    def _ours(self, ifname: str | None) -> bool:
        return bool(ifname) and (ifname == self.gw_dev or str(ifname).startswith(self.prefix))

    def _check_pool(self) -> None:
        """Refuse a pool that overlaps any network the host has (routes or addresses of its interfaces),
        ours from an earlier run excepted."""
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        for addr in self._ipr.get_addr(family=socket.AF_INET):
            ifname = names.get(addr["index"])
            net = ipaddress.IPv4Network(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False)
            if not self._ours(ifname) and net.overlaps(self.pool):
                raise NetworkError(
                    f"the sandbox network {self.pool} overlaps {net} of the host's interface {ifname}: choose a "
                    "free range with --network-cidr"
                )
        for route in self._ipr.get_routes(family=socket.AF_INET, table=254):
            if route["dst_len"] == 0 or route.get_attr("RTA_DST") is None:
                continue
            ifname = names.get(route.get_attr("RTA_OIF"))
            net = ipaddress.IPv4Network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
            if not self._ours(ifname) and net.overlaps(self.pool):
                raise NetworkError(
                    f"the sandbox network {self.pool} overlaps the host's route to {net} (dev {ifname}; another "
                    "sandboxd server on this host?): choose a free range with --network-cidr"
                )

    def _gateway_up(self) -> None:
        links = self._ipr.link_lookup(ifname=self.gw_dev)
        if not links:
            self._ipr.link("add", ifname=self.gw_dev, kind="bridge")  # no ports: it only holds the address
            links = self._ipr.link_lookup(ifname=self.gw_dev)
        idx = links[0]
        _no_ipv6(self.gw_dev)
        self._ipr.link("set", index=idx, flags=0, change=IFF_MULTICAST)  # no IGMP reports of its own
        have = {a.get_attr("IFA_ADDRESS") for a in self._ipr.get_addr(index=idx, family=socket.AF_INET)}
        if self.gateway not in have:
            self._ipr.addr("add", index=idx, address=self.gateway, prefixlen=32)
        self._ipr.link("set", index=idx, state="up")
        _enable_forwarding()

    def installed(self) -> bool:
        try:
            self._nft.run(f"list chain inet {self.table} forward")
        except NftError:
            return False
        return True

    def install(self, sandboxes: Iterable[tuple[str, Egress]]) -> None:
        """(Re)write the table in one transaction: the base chains and the policy of every sandbox given
        (address, egress). A server re-adopting sandboxes calls this once, so that their policies hold
        without a gap; a sandbox not named loses its policy."""
        pool, p, gw, t = str(self.pool), self.prefix, self.gateway, self.table
        guard_forward = _forwarding_was_off()
        lines = [
            f"table inet {t} {{}}",
            f"delete table inet {t}",
            f"""table inet {t} {{
  map egress {{ type ipv4_addr : verdict; }}
  set intercept {{ type ipv4_addr; }}
  set tunnel {{ type ipv4_addr; }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname "{p}*" meta nfproto ipv6 drop
    iifname "{p}*" fib saddr . iif oif missing drop
  }}
  chain gateway_out {{
    type filter hook output priority raw; policy accept;
    oifname "{self.gw_dev}" notrack
  }}
  chain tag_new {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{p}*" ct state new ct mark set {CT_MARK:#x}
  }}
  chain intercept_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{p}*" ip saddr @tunnel fib daddr type local return
    iifname "{p}*" ip saddr @tunnel ip daddr {{ {pool}, {", ".join(BLOCKED_V4)} }} return
    iifname "{p}*" ip saddr @tunnel meta l4proto tcp dnat ip to {gw}:{PROXY_PORT}
    iifname "{p}*" ip saddr @intercept tcp dport {{ 80, 443 }} dnat ip to {gw}:{PROXY_PORT}
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname "{p}*" jump from_sandbox
  }}
  chain from_sandbox {{
    ip daddr {gw} udp dport 53 accept
    ip daddr {gw} tcp dport 53 accept
    ip daddr {gw} tcp dport {PROXY_PORT} ip saddr @intercept accept
    ip daddr {gw} tcp dport {PROXY_PORT} ip saddr @tunnel accept
    reject with icmpx admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{p}*" jump from_sandbox_out
    oifname "{p}*" ct state established,related accept
    oifname "{p}*" drop
    {'iifname != "sx*" oifname != "sx*" drop' if guard_forward else ""}
  }}
  chain from_sandbox_out {{
    oifname "sx*" reject with icmpx admin-prohibited
    ip daddr {{ {pool}, {", ".join(BLOCKED_V4)} }} reject with icmpx admin-prohibited
    ip saddr @tunnel reject with icmpx admin-prohibited
    ip saddr vmap @egress
  }}
  chain proxied {{
    type filter hook output priority filter - 10; policy accept;
    meta mark {PROXY_MARK:#x} fib daddr type local reject with icmpx admin-prohibited
    meta mark {PROXY_MARK:#x} ip daddr {{ {pool}, {", ".join(BLOCKED_V4)} }} reject with icmpx admin-prohibited
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != "sx*" masquerade
  }}
}}""",
        ]
        with self._policy_lock:
            self._chains.clear()
            self._intercepted.clear()
            self._tunneled.clear()
            sandboxes = list(sandboxes)
            for address, egress in sandboxes:
                lines += self._policy_lines(address, egress)
                self._record(address, egress)
            try:
                self._nft.run("\n".join(lines))
            except NftError as e:
                self._chains.clear()
                self._intercepted.clear()
                self._tunneled.clear()
                raise NetworkError(f"installing the sandbox firewall (nftables table {t}) failed: {e}") from e

    def _chain(self, address: str) -> str:
        return "p_" + address.replace(".", "_")

    def _policy_lines(self, address: str, egress: Egress) -> list[str]:
        """The nft commands that make `egress` the sandbox's policy: a chain of its own when it denies
        anything, its address in @intercept when its TCP to ports 80 and 443 goes to the egress proxy."""
        t, chain = self.table, self._chain(address)
        lines: list[str] = []
        if egress.open and address in self._chains:
            lines += [f"delete element inet {t} egress {{ {address} }}", f"delete chain inet {t} {chain}"]
        elif not egress.open:
            lines += [f"add chain inet {t} {chain}", f"flush chain inet {t} {chain}"]
            if egress.allow:
                lines.append(f"add rule inet {t} {chain} ip daddr {{ {', '.join(egress.allow)} }} accept")
            deny = ", ".join(egress.deny)
            lines.append(f"add rule inet {t} {chain} ip daddr {{ {deny} }} reject with icmpx admin-prohibited")
            if address not in self._chains:
                lines.append(f"add element inet {t} egress {{ {address} : jump {chain} }}")
        for name, on, book in (
            ("intercept", egress.intercept, self._intercepted),
            ("tunnel", egress.tunnel, self._tunneled),
        ):
            if on and address not in book:
                lines.append(f"add element inet {t} {name} {{ {address} }}")
            elif not on and address in book:
                lines.append(f"delete element inet {t} {name} {{ {address} }}")
        return lines

    def _record(self, address: str, egress: Egress) -> None:
        for book, on in (
            (self._chains, not egress.open),
            (self._intercepted, egress.intercept),
            (self._tunneled, egress.tunnel),
        ):
            if on:
                book.add(address)
            else:
                book.discard(address)

    def set_egress(self, address: str, egress: Egress, cut: bool = True) -> None:
        """Make `egress` the sandbox's policy, in one transaction. Every packet meets the policy in force
        (no shortcut for established connections), and the conntrack entries of the sandbox's connections
        are deleted, so a connection the new policy denies is cut at once."""
        with self._policy_lock:
            lines = self._policy_lines(address, egress)
            if not lines:
                return
            try:
                self._nft.run("\n".join(lines))
            except NftError as e:
                raise NetworkError(f"updating the sandbox's firewall failed: {e}") from e
            self._record(address, egress)
        if cut and not egress.default:
            self.forget_connections(address)  # (a conntrack dump: ~15 ms even when there is nothing)

    # -- namespaces and addresses ------------------------------------------------------------------
    def _ifname(self, n: int) -> str:
        """The host end of the veth of the sandbox with address number `n` (unique among live sandboxes)."""
        return f"{self.prefix}{n - int(self.pool.network_address):x}"

    def _allocate(self) -> str:
        with self._lock:
            size = self._last - self._first + 1
            for i in range(size):
                n = self._first + (self._next - self._first + i) % size
                # Round robin; and not while the last holder's link exists (its namespace is still going:
                # a socket it left may hold it for a few seconds).
                if n not in self._used and not os.path.exists(f"/sys/class/net/{self._ifname(n)}"):
                    self._used.add(n)
                    self._next = n + 1
                    return str(ipaddress.IPv4Address(n))
        raise AddressPoolExhausted(
            f"the sandbox network {self.pool} has no free address (it has room for {size} sandboxes): kill "
            "sandboxes you no longer need, or give --network-cidr a bigger range"
        )

    def claim(self, address: str) -> None:
        with self._lock:
            self._used.add(int(ipaddress.IPv4Address(address)))

    def release(self, address: str) -> None:
        """The sandbox is gone (its namespace with it): delete its policy and conntrack entries, free the address."""
        try:
            self.set_egress(address, Egress())
        except NetworkError as e:
            log.warning("removing the policy of %s failed: %s", address, e)
        self.forget_connections(address)
        with self._lock:
            self._used.discard(int(ipaddress.IPv4Address(address)))

    def forget_connections(self, address: str) -> None:
        from pyroute2 import Conntrack

        try:
            with Conntrack() as ct:
                for entry in list(ct.dump_entries(mark=CT_MARK)):
                    if entry.tuple_orig.saddr == address:
                        try:
                            ct.delete(entry)
                        except OSError:
                            pass  # gone meanwhile
        except OSError as e:
            log.warning("could not delete conntrack entries of %s: %s", address, e)

    def forget_all_but(self, keep: set[str]) -> None:
        """At start: conntrack entries of sandboxes not re-adopted (a crash left them)."""
        from pyroute2 import Conntrack

        try:
            with Conntrack() as ct:
                for entry in list(ct.dump_entries(mark=CT_MARK)):
                    src = entry.tuple_orig.saddr
                    if src and ipaddress.IPv4Address(src) in self.pool and src not in keep:
                        try:
                            ct.delete(entry)
                        except OSError:
                            pass
        except OSError as e:
            log.warning("could not clean conntrack: %s", e)

    def _prepare_sync(self, fd: int, sock: socket.socket) -> Prepared:
        from pyroute2 import IPRoute

        address = self._allocate()
        n = int(ipaddress.IPv4Address(address))
        with self._lock:
            self._ready.add(n)  # (until take() gives it to a sandbox)
        ifname = self._ifname(n)
        prepared = Prepared(fd=fd, address=address, ifname=ifname)
        inner = None
        try:
            inner = IPRoute(use_socket=sock)
            with self._lock:
                if self._ipr.link_lookup(ifname=ifname):  # its last sandbox's namespace is still being removed
                    raise NetworkError(f"interface {ifname} of a sandbox that just ended still exists")
                self._ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                idx = self._ipr.link_lookup(ifname=ifname)[0]
                _no_ipv6(ifname)  # the host end has no address at all, not even a link-local one
                self._ipr.link("set", index=idx, state="up")
                self._ipr.route("add", dst=f"{address}/32", oif=idx, scope="link")
            eth0 = inner.link_lookup(ifname="eth0")[0]
            inner.link("set", index=1, state="up")  # lo
            inner.addr("add", index=eth0, address=address, prefixlen=32)
            inner.link("set", index=eth0, state="up")
            inner.route("add", dst=f"{self.gateway}/32", oif=eth0, scope="link")
            inner.route("add", gateway=self.gateway, oif=eth0)
        except BaseException:
            prepared.close()  # the namespace goes, and the veth with it
            with self._lock:
                self._used.discard(n)
                self._ready.discard(n)
            raise

        finally:
            if inner is not None:
                inner.close()
            else:
                sock.close()
        return prepared

    async def _prepare(self) -> Prepared:
        loop = asyncio.get_running_loop()
        fd, sock = await loop.run_in_executor(self._netns_thread, _new_netns, self._host_fd)
        try:
            return await asyncio.to_thread(self._prepare_sync, fd, sock)
        except NetworkError:
            raise
        except Exception as e:
            raise NetworkError(f"setting up the sandbox's network failed: {e}") from e

    async def take(self) -> Prepared:
        """A ready namespace: the one kept prepared if there is one, else one made now. The next is then
        prepared in the background."""
        spare, self._spare = self._spare, None
        if spare is None:
            spare = await self._prepare()
        with self._lock:
            self._ready.discard(int(ipaddress.IPv4Address(spare.address)))
        if self._spare_task is None or self._spare_task.done():
            self._spare_task = asyncio.get_running_loop().create_task(self._refill())
        return spare

    async def _refill(self) -> None:
        await asyncio.sleep(0)  # (the create that took the last one goes on first)
        if self._spare is not None:
            return
        try:
            self._spare = await self._prepare()
        except Exception as e:
            log.warning("preparing a sandbox network ahead failed: %s", e)

    def give_back(self, prepared: Prepared) -> None:
        """A create failed before a sandbox joined the namespace."""
        prepared.close()
        with self._lock:
            self._used.discard(int(ipaddress.IPv4Address(prepared.address)))
            self._ready.discard(int(ipaddress.IPv4Address(prepared.address)))

    def close(self) -> None:
        """The server stops. The spare goes; the table and the gateway stay while sandboxes are kept
        running (their policies hold, and the next server run takes them over)."""
        if self._spare_task is not None:
            self._spare_task.cancel()
        if self._spare is not None:
            self.give_back(self._spare)
            self._spare = None
        with self._lock:
            kept = self._used - self._ready  # sandboxes kept running (prepared namespaces go with us)
        if not kept:
            try:
                self._nft.run(f"table inet {self.table} {{}}\ndelete table inet {self.table}")
            except NftError as e:
                log.warning("removing nftables table %s failed: %s", self.table, e)
            _off_loop(self._remove_gateway)
        _off_loop(self._ipr.close)
        self._nft.close()

    def _remove_gateway(self) -> None:
        for idx in self._ipr.link_lookup(ifname=self.gw_dev):
            self._ipr.link("del", index=idx)


def _no_ipv6(ifname: str) -> None:
    Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1\n")


def _off_loop(fn: Callable[[], object]) -> None:
    """Run `fn` in another thread when this one runs an event loop: pyroute2's synchronous calls run
    their own loop, which asyncio allows only where none runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    t = threading.Thread(target=fn, name="sandboxd-net-close")
    t.start()
    t.join()


def _enable_forwarding() -> None:
    """Sandboxes' traffic is routed by the host. The setting from before is kept (host-wide, on tmpfs),
    and when it was off, the table drops every forwarded packet that is not a sandbox's, so the host does
    not start routing for anyone else."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    current = path.read_text().strip()
    if not FORWARD_ORIG.exists():
        FORWARD_ORIG.parent.mkdir(parents=True, exist_ok=True)
        FORWARD_ORIG.write_text(current + "\n")
    if current != "1":
        path.write_text("1\n")


def _forwarding_was_off() -> bool:
    try:
        return FORWARD_ORIG.read_text().strip() == "0"
    except OSError:
        return False
