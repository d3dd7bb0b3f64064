"""A sandbox's network policy: E2B's fields (`allow_internet_access`, `network.allowOut` / `denyOut` /
`dnsServers`), checked, and what they mean for the kernel, the DNS resolver and the egress proxy.

Entries are IPv4 addresses, CIDRs, or host names (`api.example.com` names that host only; `*.example.com`
names every host under example.com, not example.com itself). Precedence is E2B's: what `allowOut`
names is allowed even when `denyOut` also covers it; `denyOut: ["0.0.0.0/0"]` with an allow list is an
allow list. `allow_internet_access: false` is `denyOut: ["0.0.0.0/0"]`.

- Addresses and CIDRs are enforced by nftables, for every protocol (runtime/network.py).
- Names are enforced where a name is visible: by the DNS resolver (a name the policy denies does not
  resolve) and by the egress proxy, which sees HTTP's `Host` and TLS's SNI on ports 80 and 443 and
  decides by the name the client asked for, then connects to that name's own address (so resolving a
  name elsewhere, or connecting to an allowed name's address directly, gains nothing).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from sandboxd.network.socks import ProxyConfig
from sandboxd.runtime.base import Egress

ALL_TRAFFIC = "0.0.0.0/0"
ALL_TRAFFIC6 = "::/0"  # what "all traffic" also means for a sandbox with IPv6
MAX_RULE_HOSTS = 64
MAX_RULES_PER_HOST = 16
MAX_HEADERS = 32  # per rule
MAX_HEADER_VALUE = 8192
IDENTITY = re.compile(r"\$\{e2b\.identity\.tokens\.([^{}]*)\}")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")  # an HTTP header name
MAX_ENTRIES = 256  # per list
MAX_DNS_SERVERS = 10
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class PolicyError(ValueError):
    """A network field is malformed (the message names the field and the entry)."""


def _name(entry: str, field: str) -> str:
    name = entry.lower().rstrip(".")
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise PolicyError(
            f"network.{field}: {entry!r} is neither an IPv4 address, a CIDR nor a host name "
            "(e.g. 1.2.3.4, 10.0.0.0/8, api.example.com, *.example.com)"
        )
    return name


def _entries(value: Any, field: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(CIDRs, names) of an allowOut / denyOut list."""
    if value is None:
        return (), ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"network.{field} must be a list of strings")
    if len(value) > MAX_ENTRIES:
        raise PolicyError(f"network.{field} has {len(value)} entries; at most {MAX_ENTRIES} are allowed")
    cidrs: list[str] = []
    names: list[str] = []
    for entry in value:
        entry = entry.strip()
        if not entry or len(entry) > 253:
            raise PolicyError(f"network.{field}: an entry is empty or longer than 253 characters")
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            names.append(_name(entry, field))
            continue
        if str(net) not in cidrs:
            cidrs.append(str(net))
    return tuple(cidrs), tuple(dict.fromkeys(names))


def _rules(value: Any, tokens: set[str]) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """`network.rules` checked: (host, headers to set) in order; the headers of a host's rules merged."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_RULE_HOSTS:
        raise PolicyError(f"network.rules must be an object of at most {MAX_RULE_HOSTS} hosts")
    out = []
    for host, rules in value.items():
        if not isinstance(host, str) or not host.strip() or host.strip() == "*":
            raise PolicyError("network.rules: a host is empty, or a bare '*' (use *.example.com)")
        host = host.strip()
        try:
            net = ipaddress.ip_network(host, strict=False)
            if net.version != 4:
                raise PolicyError(f"network.rules: {host!r} is IPv6; sandboxes have IPv4 only")
            key = str(net)
        except ValueError:
            key = _name(host, "rules")
        if not isinstance(rules, list) or len(rules) > MAX_RULES_PER_HOST:
            raise PolicyError(f"network.rules[{host!r}] must be a list of at most {MAX_RULES_PER_HOST} rules")
        headers: dict[str, str] = {}
        for rule in rules:
            transform = (rule or {}).get("transform") if isinstance(rule, dict) else None
            if rule is not None and not isinstance(rule, dict):
                raise PolicyError(f"network.rules[{host!r}]: a rule must be an object")
            given = (transform or {}).get("headers") or {}
            if not isinstance(given, dict) or len(given) > MAX_HEADERS:
                raise PolicyError(f"network.rules[{host!r}]: headers must be an object of at most {MAX_HEADERS}")
            for k, v in given.items():
                if not isinstance(k, str) or not _TOKEN.match(k):
                    raise PolicyError(f"network.rules[{host!r}]: {k!r} is not an HTTP header name")
                if not isinstance(v, str) or len(v) > MAX_HEADER_VALUE or any(c in v for c in "\r\n\0"):
                    raise PolicyError(
                        f"network.rules[{host!r}].{k}: a header value is a string of at most {MAX_HEADER_VALUE} "
                        "characters without CR, LF or NUL"
                    )
                for used in IDENTITY.findall(v):
                    if used not in tokens:
                        raise PolicyError(
                            f"network.rules[{host!r}].{k}: workload identity token {used!r} is not one of the "
                            f"sandbox's iam.tokens ({', '.join(sorted(tokens)) or 'none'})"
                        )
                headers[k] = v
        out.append((key, tuple(headers.items())))
    return tuple(out)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    name = name.lower().rstrip(".")
    for p in patterns:
        if p.startswith("*."):
            if name.endswith(p[1:]) and len(name) > len(p) - 1:
                return True
        elif name == p:
            return True
    return False


@dataclass(frozen=True)
class NetworkPolicy:
    allow_cidrs: tuple[str, ...] = ()
    deny_cidrs: tuple[str, ...] = ()
    allow_names: tuple[str, ...] = ()
    deny_names: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] | None = None  # where the resolver sends this sandbox's queries
    allow_out: tuple[str, ...] = ()  # the lists as given (what GET reports)
    deny_out: tuple[str, ...] = ()
    egress_proxy: ProxyConfig | None = None  # where its allowed TCP goes (SOCKS5), instead of out directly
    rules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (host or CIDR, headers to set)

    @classmethod
    def from_api(
        cls, network: dict[str, Any] | None, allow_internet_access: bool | None = None, tokens: set[str] | None = None
    ) -> NetworkPolicy:
        """`tokens`: the sandbox's workload identity token names, the only ones its rules may name."""
        network = network or {}
        if not isinstance(network, dict):
            raise PolicyError("network must be an object")
        allow_cidrs, allow_names = _entries(network.get("allowOut"), "allowOut")
        deny_cidrs, deny_names = _entries(network.get("denyOut"), "denyOut")
        if allow_internet_access is False and ALL_TRAFFIC not in deny_cidrs:
            deny_cidrs = (*deny_cidrs, ALL_TRAFFIC)
        if ALL_TRAFFIC in deny_cidrs and ALL_TRAFFIC6 not in deny_cidrs:  # all means both families
            deny_cidrs = (*deny_cidrs, ALL_TRAFFIC6)
        dns = network.get("dnsServers")
        dns_servers: tuple[str, ...] | None = None
        if dns is not None:
            if not isinstance(dns, list) or len(dns) > MAX_DNS_SERVERS:
                raise PolicyError(f"network.dnsServers must be a list of at most {MAX_DNS_SERVERS} IPv4 addresses")
            try:
                dns_servers = tuple(str(ipaddress.IPv4Address(d)) for d in dns)
            except (ValueError, TypeError):
                raise PolicyError(f"network.dnsServers: {dns!r} holds something that is not an IPv4 address") from None
        given = {k: tuple(e.strip() for e in network.get(k) or ()) for k in ("allowOut", "denyOut")}
        rules = _rules(network.get("rules"), tokens or set())
        proxy = None
        if network.get("egressProxy") is not None:
            try:
                proxy = ProxyConfig.from_api(network["egressProxy"])
            except ValueError as e:
                raise PolicyError(str(e)) from None
        return cls(
            allow_cidrs,
            deny_cidrs,
            allow_names,
            deny_names,
            dns_servers,
            given["allowOut"],
            given["denyOut"],
            proxy,
            rules,
        )

    @property
    def denies_all(self) -> bool:
        return ALL_TRAFFIC in self.deny_cidrs

    @property
    def has_names(self) -> bool:
        return bool(self.allow_names or self.deny_names)

    def egress(self) -> Egress:
        """The kernel's part: addresses and CIDRs (and the sandbox's own DNS servers, which it may always
        reach when it names hosts, as on E2B)."""
        allow = self.allow_cidrs
        if self.dns_servers and self.has_names:
            allow = (*allow, *(f"{d}/32" for d in self.dns_servers))
        return Egress(
            allow=allow,
            deny=self.deny_cidrs,
            intercept=self.has_names or bool(self.rules),
            tunnel=self.egress_proxy is not None,
        )

    def headers_for(self, name: str | None, address: str) -> dict[str, str] | None:
        """The headers the rules set on a request to host `name` at `address` (None: no rule matches).
        As E2B's API: the exact name's rules, else the longest matching wildcard's; never merged. (Rules
        by address or CIDR, which the Python SDK mentions, come last: the longest prefix.)"""
        exact = wildcard = cidr = None
        best_w = best_c = -1
        ip = ipaddress.IPv4Address(address)
        for key, headers in self.rules:
            if "/" in key:
                net = ipaddress.IPv4Network(key)
                if ip in net and net.prefixlen > best_c:
                    cidr, best_c = headers, net.prefixlen
            elif name is not None and key.startswith("*."):
                if matches(name, (key,)) and len(key) > best_w:
                    wildcard, best_w = headers, len(key)
            elif name is not None and key == name.lower().rstrip("."):
                exact = headers
        chosen = exact if exact is not None else wildcard if wildcard is not None else cidr
        return None if chosen is None else dict(chosen)

    def name_allowed(self, name: str) -> bool:
        """May the sandbox reach host `name` (resolve it, and talk to it through the egress proxy)?"""
        if matches(name, self.allow_names):
            return True
        if matches(name, self.deny_names):
            return False
        return not self.denies_all

    def allows(self, name: str | None, address: str) -> bool:
        """May the sandbox connect to `address`, asked for as host `name` (None: not known)? E2B's
        precedence: an allow (by name, or by address) beats a deny (by name, or by address). The egress
        proxy decides with this; for addresses alone it is the kernel's verdict."""
        if name is not None and matches(name, self.allow_names):
            return True
        ip = ipaddress.ip_address(address)

        def covered(cidrs: tuple[str, ...]) -> bool:
            return any(ip in ipaddress.ip_network(c) for c in cidrs if (":" in c) == (ip.version == 6))

        if covered(self.allow_cidrs):
            return True
        if name is not None and matches(name, self.deny_names):
            return False
        return not covered(self.deny_cidrs)

    def to_api(self) -> dict[str, Any]:
        """As E2B reports it (`network` of GET /sandboxes/{id})."""
        out: dict[str, Any] = {}
        if self.allow_out:
            out["allowOut"] = list(self.allow_out)
        if self.deny_out:
            out["denyOut"] = list(self.deny_out)
        if self.dns_servers is not None:
            out["dnsServers"] = list(self.dns_servers)
        if self.egress_proxy is not None:
            out["egressProxy"] = self.egress_proxy.to_api()
        if self.rules:
            out["rules"] = {key: [{"transform": {"headers": dict(headers)}}] for key, headers in self.rules}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "allow_cidrs": list(self.allow_cidrs),
            "deny_cidrs": list(self.deny_cidrs),
            "allow_names": list(self.allow_names),
            "deny_names": list(self.deny_names),
            "dns_servers": None if self.dns_servers is None else list(self.dns_servers),
            "allow_out": list(self.allow_out),
            "deny_out": list(self.deny_out),
            "egress_proxy": None if self.egress_proxy is None else self.egress_proxy.to_json(),
            "rules": [[key, [list(h) for h in headers]] for key, headers in self.rules],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> NetworkPolicy:
        data = data or {}
        dns = data.get("dns_servers")
        return cls(
            tuple(data.get("allow_cidrs", ())),
            tuple(data.get("deny_cidrs", ())),
            tuple(data.get("allow_names", ())),
            tuple(data.get("deny_names", ())),
            None if dns is None else tuple(dns),
            tuple(data.get("allow_out", ())),
            tuple(data.get("deny_out", ())),
            None if data.get("egress_proxy") is None else ProxyConfig.from_api(data["egress_proxy"]),
            tuple((key, tuple((k, v) for k, v in headers)) for key, headers in data.get("rules", ())),
        )
