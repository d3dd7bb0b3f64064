"""Sandbox networking on the host: a network namespace per sandbox, a veth link to the host, NAT out,
and an nftables table that polices every packet a sandbox sends.

Topology (routed, no bridge). Each sandbox has one address from the server's pool (`--network-cidr`,
default 10.213.0.0/16) on its `eth0`, a /32; its default route goes to the pool's first address, the
*gateway*, which lives on a portless bridge device of the server (`sg<instance>`) and is where sandboxd's own
services for sandboxes listen (the DNS resolver). The host end of the veth (`sx<instance><n>`) has no
address, only the route `<address>/32 dev sx…`. Every packet a sandbox sends is therefore routed by the
host, and so passes the table's hooks with the sandbox's own interface as its input:

- prerouting: a source address that does not route back through the interface it came in by
  (`fib saddr . iif`) is dropped (no spoofing); all IPv6 too when sandboxes have none (see IPv6 below);
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

IPv6, when the host has it: an address at the same place in a unique-local /64 of the server's, router
fe80::1 on the host end, NAT66, and the IPv6 twin of each rule above.

Making a sandbox's network costs ~10 ms (~16 with IPv6: a netns, a veth pair, addresses and routes on both
sides), so it is done ahead of time: one namespace is kept ready (`take` hands it out; `refill`, called
once the create is done, prepares the next a little later), and the create helper joins it
(`sbxhelper create --netns`). The namespace lives exactly as long as the sandbox's
processes: when the last one exits, the kernel removes the namespace, the veth pair and its route, so a
crash of the server leaves no interface behind. Addresses are reused only after the sandbox is gone and
its conntrack entries are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
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
# The server's own network namespace, which threads that entered a sandbox's go back to.
HOST_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
# Conntrack entries of sandbox connections carry this mark, so that a sandbox's can be found and deleted.
CT_MARK = 0x5BD0_0000
# The egress proxy's own connections carry this mark (SO_MARK), which the table polices (network/egress.py).
PROXY_MARK = 0x5BD1_0000
# Where the egress proxy listens, on the gateway.
PROXY_PORT = 15001
REFILL_DELAY = 0.05  # s after a create, the next namespace is prepared (not during the create, nor its first command)
SWEEP_DELAY = 0.5  # s: the conntrack entries of sandboxes that ended are deleted together, this long after
# Where the host's IP forwarding setting from before any sandboxd changed it is kept (tmpfs: a reboot
# resets both).
FORWARD_ORIG = Path("/run/sandboxd/ip_forward.orig")
# Never reachable from a sandbox, whatever its policy: this host, link-local (cloud metadata at
# 169.254.169.254), multicast and the other special ranges.
BLOCKED_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3", "255.255.255.255/32")
# The same for IPv6: unspecified, loopback, link-local, multicast, and the cloud metadata address.
BLOCKED_V6 = ("::/128", "::1/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128")
GATEWAY6 = "fe80::1"  # the host end of every sandbox's link: the sandbox's IPv6 default router
FORWARD6_ORIG = Path("/run/sandboxd/ip6_forward.orig")


def default_cidr6(instance: str) -> str:
    """A unique-local /64 of the server's own (RFC 4193), from its instance name."""
    h = hashlib.sha256(instance.encode()).hexdigest()
    return f"fd{h[0:2]}:{h[2:6]}:{h[6:10]}:{h[10:14]}::/64"


def host_has_ipv6() -> bool:
    """A default IPv6 route in the main table: the host reaches an IPv6 network, so sandboxes may too."""
    try:
        with open("/proc/net/ipv6_route") as f:
            return any(line.split()[0] == "0" * 32 and line.split()[1] == "00" for line in f)
    except OSError:
        return False


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
    address6: str = ""
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


# The sandbox's own namespace (it cannot change them: they belong to the host's user namespace).
_NETNS_SYSCTLS = {
    # A socket the sandbox's last process left with unacknowledged data keeps the namespace, and so the
    # sandbox's address, alive while it retries: give up after one retry.
    "ipv4/tcp_orphan_retries": "1",
    "ipv4/tcp_fin_timeout": "5",
}
# Without IPv6: eth0 gets none (not even link-local); lo keeps ::1.
NETNS_SYSCTLS = {**_NETNS_SYSCTLS, "ipv6/conf/default/disable_ipv6": "1"}
# With IPv6: eth0 gets its address from us at once: no router advertisements, no autoconfiguration, no DAD.
NETNS_SYSCTLS_V6 = {
    **_NETNS_SYSCTLS,
    "ipv6/conf/default/accept_ra": "0",
    "ipv6/conf/default/autoconf": "0",
    "ipv6/conf/default/accept_dad": "0",
}


def setns(fd: int) -> None:
    """The calling thread (only) enters the network namespace of `fd` (an nsfs file or a pidfd)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _new_netns(sysctls: dict[str, str]) -> tuple[int, socket.socket]:
    """A new network namespace (its fd) and a route netlink socket inside it. Runs on the netns thread:
    unshare changes only the calling thread's namespace, which goes back to the host's before returning."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    try:
        for name, value in sysctls.items():  # /proc/sys/net is the opener's namespace's
            with open(f"/proc/sys/net/{name}", "w") as f:
                f.write(value)
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)  # NETLINK_ROUTE
        except BaseException:
            os.close(fd)
            raise
    finally:
        setns(HOST_NETNS)
    return fd, sock


class HostNetwork:
    """The pool, the gateway, the nftables table and the prepared namespaces of one server instance."""

    def __init__(self, instance: str, cidr: str, netns_thread: Executor, cidr6: str | None = None) -> None:
        try:
            self.pool = ipaddress.IPv4Network(cidr)
        except ValueError as e:
            raise NetworkError(f"--network-cidr {cidr!r} is not an IPv4 network: {e}") from None
        if self.pool.num_addresses < 4 or not self.pool.is_private:
            raise NetworkError(
                f"--network-cidr {cidr}: give a private IPv4 range of at least 4 addresses (e.g. {DEFAULT_CIDR})"
            )
        self.pool6: ipaddress.IPv6Network | None = None
        if cidr6:
            try:
                self.pool6 = ipaddress.IPv6Network(cidr6)
            except ValueError as e:
                raise NetworkError(f"--network-cidr6 {cidr6!r} is not an IPv6 network: {e}") from None
            if self.pool6.num_addresses < self.pool.num_addresses or not self.pool6.is_private:
                raise NetworkError(
                    f"--network-cidr6 {cidr6}: give a private (unique-local) IPv6 range with room for the IPv4 pool"
                )
        self.gateway = str(self.pool.network_address + 1)
        self._first = int(self.pool.network_address) + 2
        self._last = int(self.pool.broadcast_address) - 1
        tag = instance.lstrip("i")[:5]
        self.prefix = f"sx{tag}"  # host ends of the sandboxes' veths
        self.gw_dev = f"sg{tag}"
        self.table = f"sandboxd_{instance}"
        self._netns_thread = netns_thread
        self._lock = threading.Lock()  # the route socket and the address book
        self._used: set[int] = set()
        self._forgetting: set[str] = set()  # released, their conntrack entries not yet deleted (still used)
        self._sweeping = threading.Lock()  # held by a sweep of them
        self._sweep_timer: threading.Timer | None = None
        self._ready: set[int] = set()  # addresses of namespaces prepared but not given to a sandbox
        self._next = self._first
        self._spare: Prepared | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._preparing = False  # the spare task is past its delay, making a namespace
        self._closed = False
        self._policy_lock = threading.Lock()
        # the policy in force for each sandbox (by address) that has one other than the default: what the
        # table holds for it (its chain, its @intercept / @tunnel / @noip6 elements) follows from it
        self._applied: dict[str, Egress] = {}
        from pyroute2 import IPRoute  # imported here: a server without networking never loads it

        logging.getLogger("pyroute2").setLevel(max(logging.INFO, log.getEffectiveLevel()))  # not every message

        self._ipr = IPRoute()
        self._nft = Nft()
        self._check_pool()
        self._gateway_up()
        if self.pool6 is not None:
            _enable_forwarding6()

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
        self._check_routes(names, socket.AF_INET, self.pool, "--network-cidr")
        if self.pool6 is not None:
            self._check_routes(names, socket.AF_INET6, self.pool6, "--network-cidr6")

    def v6(self, address: str) -> str:
        """The sandbox's IPv6 address ("" without IPv6): the same place in the IPv6 pool as in the IPv4 one."""
        if self.pool6 is None or not address:
            return ""
        n = int(ipaddress.IPv4Address(address)) - int(self.pool.network_address)
        return str(self.pool6.network_address + n)

    def _check_routes(
        self, names: dict[int, str], family: int, pool: ipaddress.IPv4Network | ipaddress.IPv6Network, option: str
    ) -> None:
        for route in self._ipr.get_routes(family=family, table=254):
            dst = route.get_attr("RTA_DST")
            if route["dst_len"] == 0 or dst is None or dst.startswith("fe80"):
                continue
            ifname = names.get(route.get_attr("RTA_OIF"))
            net = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
            if not self._ours(ifname) and net.overlaps(pool):
                raise NetworkError(
                    f"the sandbox network {pool} overlaps the host's route to {net} (dev {ifname}; another "
                    f"sandboxd server on this host?): choose a free range with {option}"
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
        guard = []
        if _forwarding_was_off(FORWARD_ORIG):
            guard.append('meta nfproto ipv4 iifname != "sx*" oifname != "sx*" drop')
        if self.pool6 is not None and _forwarding_was_off(FORWARD6_ORIG):
            guard.append('meta nfproto ipv6 iifname != "sx*" oifname != "sx*" drop')
        blocked6 = f"{self.pool6}, {', '.join(BLOCKED_V6)}" if self.pool6 is not None else ""
        v6_pre = f'iifname "{p}*" meta nfproto ipv6 drop' if self.pool6 is None else "# IPv6: the fib check below"
        v6_in = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept" if self.pool6 is not None else ""
        v6_out = (
            f"ip6 daddr {{ {blocked6} }} reject with icmpx admin-prohibited\n"
            "    ip6 saddr @noip6 reject with icmpx admin-prohibited\n"
            "    ip6 saddr vmap @egress6"
            if self.pool6 is not None
            else ""
        )
        v6_nat = f'ip6 saddr {self.pool6} oifname != "sx*" masquerade' if self.pool6 is not None else ""
        lines = [
            f"table inet {t} {{}}",
            f"delete table inet {t}",
            f"""table inet {t} {{
  map egress {{ type ipv4_addr : verdict; }}
  map egress6 {{ type ipv6_addr : verdict; }}
  set intercept {{ type ipv4_addr; }}
  set tunnel {{ type ipv4_addr; }}
  set noip6 {{ type ipv6_addr; }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    {v6_pre}
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
    {v6_in}
    reject with icmpx admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{p}*" jump from_sandbox_out
    oifname "{p}*" ct state established,related accept
    oifname "{p}*" drop
    {chr(10).join("    " + g for g in guard).strip()}
  }}
  chain from_sandbox_out {{
    oifname "sx*" reject with icmpx admin-prohibited
    ip daddr {{ {pool}, {", ".join(BLOCKED_V4)} }} reject with icmpx admin-prohibited
    ip saddr @tunnel reject with icmpx admin-prohibited
    ip saddr vmap @egress
    {v6_out}
  }}
  chain proxied {{
    type filter hook output priority filter - 10; policy accept;
    meta mark {PROXY_MARK:#x} fib daddr type local reject with icmpx admin-prohibited
    meta mark {PROXY_MARK:#x} ip daddr {{ {pool}, {", ".join(BLOCKED_V4)} }} reject with icmpx admin-prohibited
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != "sx*" masquerade
    {v6_nat}
  }}
}}""",
        ]
        with self._policy_lock:
            self._applied.clear()
            applied = {}
            for address, egress in sandboxes:
                lines += self._policy_lines(address, egress, Egress())
                if not egress.default:
                    applied[address] = egress
            try:
                self._nft.run("\n".join(lines))
            except NftError as e:
                raise NetworkError(f"installing the sandbox firewall (nftables table {t}) failed: {e}") from e
            self._applied = applied

    def _chain(self, address: str) -> str:
        return "p_" + address.replace(".", "_")

    def _policy_lines(self, address: str, egress: Egress, old: Egress) -> list[str]:
        """The nft commands that turn the sandbox's policy from `old` into `egress`: a chain of its own while
        it denies anything (jumped to from @egress and @egress6), its address in @intercept when its TCP to
        ports 80 and 443 goes to the egress proxy, in @tunnel when all of its TCP does, and its IPv6 address
        in @noip6 in both cases (the proxy speaks IPv4: programs fall back to it at once, rejected)."""
        t, chain = self.table, self._chain(address)
        address6 = self.v6(address)
        keys = [("egress", address), *([("egress6", address6)] if address6 else [])]
        lines: list[str] = []
        if egress.open and not old.open:
            lines += [f"delete element inet {t} {m} {{ {k} }}" for m, k in keys]
            lines.append(f"delete chain inet {t} {chain}")
        elif not egress.open:
            lines += [f"add chain inet {t} {chain}", f"flush chain inet {t} {chain}"]
            for verdict, cidrs in (("accept", egress.allow), ("reject with icmpx admin-prohibited", egress.deny)):
                for family, six in (("ip", False), ("ip6", True)):
                    picked = ", ".join(c for c in cidrs if (":" in c) == six)
                    if picked:
                        lines.append(f"add rule inet {t} {chain} {family} daddr {{ {picked} }} {verdict}")
            if old.open:
                lines += [f"add element inet {t} {m} {{ {k} : jump {chain} }}" for m, k in keys]
        for name, key, member in (
            ("intercept", address, lambda e: e.intercept),
            ("tunnel", address, lambda e: e.tunnel),
            ("noip6", address6, lambda e: e.intercept or e.tunnel),
        ):
            if key and member(egress) != member(old):
                lines.append(f"{'add' if member(egress) else 'delete'} element inet {t} {name} {{ {key} }}")
        return lines

    def set_egress(self, address: str, egress: Egress, cut: bool = True) -> None:
        """Make `egress` the sandbox's policy, in one transaction. Every packet meets the policy in force
        (no shortcut for established connections), and the conntrack entries of the sandbox's connections
        are deleted, so a connection the new policy denies is cut at once."""
        with self._policy_lock:
            lines = self._policy_lines(address, egress, self._applied.get(address, Egress()))
            if not lines:
                return
            try:
                self._nft.run("\n".join(lines))
            except NftError as e:
                raise NetworkError(f"updating the sandbox's firewall failed: {e}") from e
            if egress.default:
                self._applied.pop(address, None)
            else:
                self._applied[address] = egress
        if cut and not egress.default:
            self.forget_connections(address)  # (a conntrack dump: ~15 ms even when there is nothing)

    # -- namespaces and addresses ------------------------------------------------------------------
    def _ifname(self, n: int) -> str:
        """The host end of the veth of the sandbox with address number `n` (unique among live sandboxes)."""
        return f"{self.prefix}{n - int(self.pool.network_address):x}"

    def _allocate(self) -> str:
        try:
            return self._allocate_once()
        except AddressPoolExhausted:
            if not self._forgetting:
                raise
        self.sweep_forgotten()  # addresses of sandboxes that just ended come back now
        return self._allocate_once()

    def _allocate_once(self) -> str:
        """A free address, marked used and ready (prepared, no sandbox yet) at once: close() must never see
        it used but not ready, or it would keep the table and the gateway for a sandbox that does not exist."""
        with self._lock:
            size = self._last - self._first + 1
            for i in range(size):
                n = self._first + (self._next - self._first + i) % size
                # Round robin; and not while the last holder's link exists (its namespace is still going:
                # a socket it left may hold it for a few seconds).
                if n not in self._used and not os.path.exists(f"/sys/class/net/{self._ifname(n)}"):
                    self._used.add(n)
                    self._ready.add(n)  # (until take() gives it to a sandbox)
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
        """The sandbox is gone (its namespace with it): its policy goes now; its conntrack entries go in
        the next sweep (one dump per family for every sandbox that ended within SWEEP_DELAY, not one per
        sandbox: ~15 ms each), and only then is the address free again."""
        try:
            self.set_egress(address, Egress())
        except NetworkError as e:
            log.warning("removing the policy of %s failed: %s", address, e)
        with self._lock:
            self._forgetting.add(address)
            if self._sweep_timer is None:
                self._sweep_timer = threading.Timer(SWEEP_DELAY, self.sweep_forgotten)
                self._sweep_timer.daemon = True
                self._sweep_timer.start()

    def sweep_forgotten(self) -> None:
        """Delete the conntrack entries of the sandboxes released since the last sweep; free their addresses.
        One sweep at a time: close() sweeps last, after the timer's sweep in flight (whose addresses would
        otherwise still look used to it, and keep the table and the gateway for sandboxes that are gone)."""
        with self._sweeping:
            with self._lock:
                gone, self._forgetting = self._forgetting, set()
                self._sweep_timer = None
            if not gone:
                return
            self._forget({*gone, *(self.v6(a) for a in gone)} - {""})
            with self._lock:
                for address in gone:
                    self._used.discard(int(ipaddress.IPv4Address(address)))

    def _families(self) -> list[int]:
        return [socket.AF_INET, socket.AF_INET6] if self.pool6 is not None else [socket.AF_INET]

    def forget_connections(self, address: str) -> None:
        """Delete the conntrack entries of the sandbox's connections (both families)."""
        self._forget({address, self.v6(address)} - {""})

    def _forget(self, sources: set[str]) -> None:
        """Conntrack entries with the mark of sandbox connections (a kernel-side filter) whose original source
        is one of `sources` are deleted. (pyroute2's kernel-side filter on the source misses IPv6 entries.)
        ~15 ms a family, in a worker thread."""
        from pyroute2 import Conntrack

        for family in self._families():
            try:
                with Conntrack(nfgen_family=family) as ct:
                    for entry in list(ct.dump_entries(mark=CT_MARK)):
                        if entry.tuple_orig.saddr in sources:
                            with contextlib.suppress(OSError):  # (gone meanwhile)
                                ct.delete(entry)
            except OSError as e:
                log.warning("could not delete conntrack entries of %s: %s", sorted(sources), e)

    def forget_all_but(self, keep: set[str]) -> None:
        """At start: conntrack entries of sandboxes not re-adopted (a crash left them)."""
        from pyroute2 import Conntrack

        kept = {*keep, *(self.v6(k) for k in keep)}
        for family in self._families():
            try:
                with Conntrack(nfgen_family=family) as ct:
                    for entry in list(ct.dump_entries(mark=CT_MARK)):
                        src = entry.tuple_orig.saddr
                        if not src or src in kept:
                            continue
                        ip = ipaddress.ip_address(src)
                        if ip in (self.pool if ip.version == 4 else self.pool6 or self.pool):
                            with contextlib.suppress(OSError):
                                ct.delete(entry)
            except OSError as e:
                log.warning("could not clean conntrack: %s", e)

    def _prepare_sync(self, fd: int, sock: socket.socket) -> Prepared:
        from pyroute2 import IPRoute

        address = self._allocate()
        n = int(ipaddress.IPv4Address(address))
        ifname = self._ifname(n)
        address6 = self.v6(address)
        prepared = Prepared(fd=fd, address=address, ifname=ifname, address6=address6)
        inner = None
        try:
            inner = IPRoute(use_socket=sock)
            with self._lock:
                if self._ipr.link_lookup(ifname=ifname):  # its last sandbox's namespace is still being removed
                    raise NetworkError(f"interface {ifname} of a sandbox that just ended still exists")
                self._ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                idx = self._ipr.link_lookup(ifname=ifname)[0]
                if address6:  # the host end is the sandbox's IPv6 router: fe80::1 and nothing else
                    _sysctls6(ifname, {"accept_ra": "0", "autoconf": "0", "accept_dad": "0", "addr_gen_mode": "1"})
                else:
                    _no_ipv6(ifname)  # the host end has no address at all, not even a link-local one
                self._ipr.link("set", index=idx, state="up")
                self._ipr.route("add", dst=f"{address}/32", oif=idx, scope="link")
                if address6:
                    self._ipr.addr("add", index=idx, address=GATEWAY6, prefixlen=64, family=socket.AF_INET6)
                    self._ipr.route("add", dst=f"{address6}/128", oif=idx, family=socket.AF_INET6)
            eth0 = inner.link_lookup(ifname="eth0")[0]
            inner.link("set", index=1, state="up")  # lo
            inner.addr("add", index=eth0, address=address, prefixlen=32)
            inner.link("set", index=eth0, state="up")
            inner.route("add", dst=f"{self.gateway}/32", oif=eth0, scope="link")
            inner.route("add", gateway=self.gateway, oif=eth0)
            if address6:
                inner.addr("add", index=eth0, address=address6, prefixlen=128, family=socket.AF_INET6)
                inner.route("add", dst="::/0", gateway=GATEWAY6, oif=eth0, family=socket.AF_INET6)
            if self._closed:  # a spare still being made when the server stopped: nothing may stay of it
                raise NetworkError("the server is stopping")
        except BaseException:
            self.give_back(prepared)  # the namespace goes, and the veth with it
            raise
        finally:
            if inner is not None:
                inner.close()
            else:
                sock.close()
        return prepared

    async def _prepare(self) -> Prepared:
        loop = asyncio.get_running_loop()
        sysctls = NETNS_SYSCTLS_V6 if self.pool6 is not None else NETNS_SYSCTLS
        fd, sock = await loop.run_in_executor(self._netns_thread, _new_netns, sysctls)
        try:
            return await asyncio.to_thread(self._prepare_sync, fd, sock)
        except NetworkError:
            raise
        except Exception as e:
            raise NetworkError(f"setting up the sandbox's network failed: {e}") from e

    async def take(self) -> Prepared:
        """A ready namespace: the one kept prepared if there is one, else one made now. The caller calls
        `refill()` once its sandbox is made: the next is prepared then, not while it competes with the
        create (for the CPU and the GIL: ~8 ms of a create)."""
        task = self._spare_task
        if self._spare is None and task is not None and not task.done():
            if self._preparing:
                await asyncio.shield(task)  # one is being made: wait for it rather than make two
            else:
                task.cancel()  # still waiting to start: this create makes its own now
        spare, self._spare = self._spare, None
        if spare is None:
            spare = await self._prepare()
        with self._lock:
            self._ready.discard(int(ipaddress.IPv4Address(spare.address)))
        return spare

    def refill(self) -> None:
        """Prepare the next namespace in the background (if none is ready or being made)."""
        if self._spare is None and (self._spare_task is None or self._spare_task.done()):
            self._spare_task = asyncio.get_running_loop().create_task(self._refill())

    async def _refill(self) -> None:
        await asyncio.sleep(REFILL_DELAY)  # the new sandbox's first command goes first
        if self._spare is not None:
            return
        self._preparing = True
        try:
            self._spare = await self._prepare()
        except Exception as e:
            log.warning("preparing a sandbox network ahead failed: %s", e)
        finally:
            self._preparing = False

    def give_back(self, prepared: Prepared) -> None:
        """A create failed before a sandbox joined the namespace."""
        prepared.close()
        with self._lock:
            self._used.discard(int(ipaddress.IPv4Address(prepared.address)))
            self._ready.discard(int(ipaddress.IPv4Address(prepared.address)))

    def close(self) -> None:
        """The server stops. The spare goes; the table and the gateway stay while sandboxes are kept
        running (their policies hold, and the next server run takes them over)."""
        self._closed = True
        if self._spare_task is not None:
            self._spare_task.cancel()
        if self._spare is not None:
            self.give_back(self._spare)
            self._spare = None
        with self._lock:
            timer, self._sweep_timer = self._sweep_timer, None
        if timer is not None:
            timer.cancel()
        _off_loop(self.sweep_forgotten)
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


def _sysctls6(ifname: str, values: dict[str, str]) -> None:
    for name, value in values.items():
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/{name}").write_text(value + "\n")


def _enable_forwarding6() -> None:
    """IPv6 forwarding for the sandboxes. Forwarding makes Linux ignore router advertisements on interfaces
    with accept_ra=1, which would cost a host its IPv6 route: those get accept_ra=2 (accept them anyway)
    first. The setting from before is kept, as for IPv4."""
    conf = Path("/proc/sys/net/ipv6/conf")
    current = _remember(FORWARD6_ORIG, conf / "all" / "forwarding")
    if current == "1":
        return
    for iface in conf.iterdir():
        if iface.name in ("all", "default", "lo") or iface.name.startswith("sx"):
            continue
        try:
            if (iface / "accept_ra").read_text().strip() == "1":
                (iface / "accept_ra").write_text("2\n")
        except OSError:
            continue
    (conf / "all" / "forwarding").write_text("1\n")


def _no_ipv6(ifname: str) -> None:
    _sysctls6(ifname, {"disable_ipv6": "1"})


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
    if _remember(FORWARD_ORIG, path) != "1":
        path.write_text("1\n")


def _remember(orig: Path, setting: Path) -> str:
    """The setting's value now; the first sandboxd to change it keeps the value from before in `orig`."""
    current = setting.read_text().strip()
    if not orig.exists():
        orig.parent.mkdir(parents=True, exist_ok=True)
        orig.write_text(current + "\n")
    return current


def _forwarding_was_off(orig: Path = FORWARD_ORIG) -> bool:
    try:
        return orig.read_text().strip() == "0"
    except OSError:
        return False
