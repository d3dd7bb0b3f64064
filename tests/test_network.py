"""Sandbox networking with the official SDK: NAT to the (stand-in) internet, DNS, the egress policy by
address, CIDR and name, live updates. The internet is tests/netlab.py's namespace; nothing leaves the
machine. The attacks on the network are in tests/security/test_network_escape.py."""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2b import Sandbox
from netlab import DNS, HOST_SIDE, SOCKS, SOCKS_PASSWORD, SOCKS_USER, WEB, WEB2, WEB6, Lab

from sandboxd.runtime.cgroups import instance_name
from sandboxd.runtime.network import CT_MARK, default_cidr6

from conftest import Server, network_cidr, network_leftovers, start_server

LAB = {"dns_servers": [DNS]}


def curl(sbx: Sandbox, args: str, timeout: float = 8) -> tuple[int, str, str]:
    r = sbx.commands.run(f"curl -sS -m 4 {args}", timeout=timeout)
    return r.exit_code, r.stdout, r.stderr


def run(sbx: Sandbox, cmd: str, timeout: float = 10) -> tuple[int, str, str]:
    from e2b import CommandExitException

    try:
        r = sbx.commands.run(cmd, timeout=timeout)
        return r.exit_code, r.stdout, r.stderr
    except CommandExitException as e:
        return e.exit_code, e.stdout, e.stderr


def fetch(sbx: Sandbox, url: str, *extra: str) -> tuple[int, dict | str]:
    """(exit code, the lab's JSON echo, or what curl and the proxy said) of one request from inside the
    sandbox. A request the egress proxy refuses fails (HTTP 403, exit code 22) with the proxy's reason."""
    code, out, err = run(sbx, f"curl -sS -m 4 --fail-with-body --cacert /tmp/lab-ca.pem {' '.join(extra)} {url}")
    if code == 0:
        try:
            return 0, json.loads(out)
        except ValueError:
            return 0, out
    return code, out + err


@pytest.fixture
def make(server: Server, lab: Lab):
    made: list[Sandbox] = []

    def _make(**kwargs) -> Sandbox:
        sbx = Sandbox.create(template="base", timeout=120, **kwargs)
        made.append(sbx)
        sbx.files.write("/tmp/lab-ca.pem", lab.ca_pem.read_text())
        return sbx

    yield _make
    for sbx in made:
        sbx.kill()


def test_internet_by_default_through_nat(make) -> None:
    sbx = make()
    code, echo = fetch(sbx, f"http://{WEB}/hello")
    assert code == 0, echo
    assert isinstance(echo, dict) and echo["path"] == "/hello"
    assert echo["client"] == HOST_SIDE, "the lab sees the host's address (masquerade), not the sandbox's"
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.allow_internet_access is not False


def test_resolv_conf_names_the_gateway_and_names_resolve(make) -> None:
    sbx = make(network=LAB)
    _, conf, _ = run(sbx, "cat /etc/resolv.conf")
    gateway = conf.split()[1]
    _, route, _ = run(sbx, "ip route show default")
    assert f"via {gateway}" in route
    code, echo = fetch(sbx, "http://web.lab.test/x")
    assert code == 0, echo
    assert isinstance(echo, dict) and echo["host"] == "web.lab.test" and echo["server"] == WEB
    code, echo = fetch(sbx, "https://web.lab.test/tls")
    assert code == 0, echo
    assert isinstance(echo, dict) and echo["tls"] is True
    # the sandbox's root may point resolv.conf elsewhere (E2B's docs tell users to)
    assert run(sbx, f"sudo sh -c 'echo nameserver {DNS} > /etc/resolv.conf'")[0] == 0
    assert fetch(sbx, "http://web.lab.test/")[0] == 0


def test_internet_off(make) -> None:
    sbx = make(allow_internet_access=False, network=LAB)
    code, err = fetch(sbx, f"http://{WEB}/")
    assert code != 0, err
    code, _ = fetch(sbx, "http://web.lab.test/")
    assert code != 0
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.allow_internet_access is False


def test_deny_by_address_and_cidr(make) -> None:
    sbx = make(network={"deny_out": [WEB2]})
    assert fetch(sbx, f"http://{WEB}/")[0] == 0
    assert fetch(sbx, f"http://{WEB2}/")[0] != 0
    sbx2 = make(network={"deny_out": ["198.18.0.0/28"]})
    assert fetch(sbx2, f"http://{WEB}/")[0] != 0
    assert fetch(sbx2, f"http://{WEB2}/")[0] != 0
    info = Sandbox.get_info(sbx2.sandbox_id)
    assert info.network and info.network.get("deny_out") == ["198.18.0.0/28"]


def test_allow_list_mode(make) -> None:
    sbx = make(network={"allow_out": [WEB], "deny_out": ["0.0.0.0/0"]})
    assert fetch(sbx, f"http://{WEB}/")[0] == 0
    assert fetch(sbx, f"https://{WEB}/")[0] == 0
    assert fetch(sbx, f"http://{WEB2}/")[0] != 0
    # not only HTTP: any TCP port and UDP meet the same rules
    assert run(sbx, f"timeout 3 bash -c 'echo > /dev/tcp/{WEB2}/443'")[0] != 0


def test_allow_by_name_only(make) -> None:
    sbx = make(network={"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"], **LAB})
    code, echo = fetch(sbx, "http://web.lab.test/ok")
    assert code == 0, echo
    code, echo = fetch(sbx, "https://web.lab.test/ok")
    assert code == 0, echo
    # a name that is not allowed does not resolve ...
    code, err = fetch(sbx, "http://other.lab.test/")
    assert code != 0 and "resolve" in str(err).lower(), err
    # ... nor pass when the sandbox resolves it itself, over HTTP or TLS
    code, out = fetch(sbx, "http://other.lab.test/", f"--resolve other.lab.test:80:{WEB2}")
    assert code == 22 and "not allowed" in str(out), out
    assert fetch(sbx, "https://other.lab.test/", f"--resolve other.lab.test:443:{WEB2}")[0] != 0
    # the allowed name's address, connected to directly, is not the name
    code, out = fetch(sbx, f"http://{WEB}/")
    assert code == 22 and "not allowed" in str(out), out
    assert fetch(sbx, f"https://{WEB}/", "-k")[0] != 0
    # and an allowed name cannot carry traffic to another address: the proxy connects to its own
    code, echo = fetch(sbx, "http://web.lab.test/", f"--resolve web.lab.test:80:{WEB2}")
    assert code == 0 and isinstance(echo, dict) and echo["server"] == WEB, echo
    # other protocols are IP-policed: denied
    assert run(sbx, f"timeout 3 bash -c 'echo > /dev/tcp/{WEB}/22'")[0] != 0


def test_wildcard_names(make) -> None:
    sbx = make(network={"allow_out": ["*.lab.test"], "deny_out": ["0.0.0.0/0"], **LAB})
    assert fetch(sbx, "http://web.lab.test/")[0] == 0
    assert fetch(sbx, "https://deep.sub.lab.test/")[0] == 0
    # `*.lab.test` names hosts under lab.test, not lab.test itself
    code, out = fetch(sbx, "http://lab.test/", f"--resolve lab.test:80:{WEB}")
    assert code == 22 and "not allowed" in str(out), out


def test_deny_by_name(make) -> None:
    sbx = make(network={"deny_out": ["other.lab.test"], **LAB})
    assert fetch(sbx, "http://web.lab.test/")[0] == 0
    assert fetch(sbx, "http://other.lab.test/")[0] != 0
    code, out = fetch(sbx, "http://other.lab.test/", f"--resolve other.lab.test:80:{WEB2}")
    assert code == 22 and "not allowed" in str(out), out
    # the address itself is not denied
    assert fetch(sbx, f"http://{WEB2}/")[0] == 0


def test_live_update_adds_and_removes_access_and_cuts_connections(make) -> None:
    sbx = make(network=LAB)
    # a long-lived connection: a keep-alive HTTP client making a request every 0.2 s
    script = f"""
import http.client, time, sys
c = http.client.HTTPConnection("{WEB2}", 80, timeout=2)
for i in range(150):
    try:
        c.request("GET", "/tick"); c.getresponse().read(); print("ok", flush=True)
    except Exception as e:
        print("fail", type(e).__name__, flush=True); break
    time.sleep(0.2)
"""
    sbx.files.write("/tmp/tick.py", script)
    handle = sbx.commands.run("python3 /tmp/tick.py > /tmp/tick.log 2>&1", background=True)
    time.sleep(1.0)
    assert fetch(sbx, f"http://{WEB2}/")[0] == 0
    sbx.update_network({"deny_out": [WEB2]})
    assert fetch(sbx, f"http://{WEB2}/")[0] != 0, "a new connection is denied at once"
    assert fetch(sbx, f"http://{WEB}/")[0] == 0
    deadline = time.monotonic() + 10
    while "fail" not in sbx.files.read("/tmp/tick.log") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "fail" in sbx.files.read("/tmp/tick.log"), "the existing connection is cut"
    handle.kill()
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.network and info.network.get("deny_out") == [WEB2]
    # the update replaces everything: no deny list, access is back, nothing restarted
    sbx.update_network({})
    assert fetch(sbx, f"http://{WEB2}/")[0] == 0
    sbx.update_network({"allow_internet_access": False})
    assert fetch(sbx, f"http://{WEB}/")[0] != 0
    sbx.update_network({"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"], **LAB})
    assert fetch(sbx, "http://web.lab.test/")[0] == 0
    assert fetch(sbx, f"http://{WEB2}/")[0] != 0


def test_bad_policies_are_refused_with_reasons(server: Server, lab: Lab) -> None:
    from e2b import InvalidArgumentException, SandboxException

    for network, word in (
        ({"allow_out": ["not a host!"]}, "allowOut"),
        ({"deny_out": ["2001:db8::/129"]}, "denyOut"),
        ({"deny_out": [f"10.0.0.{i}" for i in range(300)]}, "at most"),
        ({"dns_servers": ["dns.example"]}, "dnsServers"),
    ):
        with pytest.raises((InvalidArgumentException, SandboxException)) as exc:
            Sandbox.create(template="base", timeout=30, network=network)
        assert word in str(exc.value), exc.value


def _instance_state(data_dir: Path) -> tuple[set[str], str]:
    """(this server's sandbox links on the host, its nftables table as text)."""
    instance = instance_name(data_dir)
    links = {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith("sx" + instance.lstrip("i")[:5])}
    table = subprocess.run(["nft", "list", "table", "inet", f"sandboxd_{instance}"], capture_output=True, text=True)
    return links, table.stdout


def _conntrack_sources(cidr: str) -> set[str]:
    """Source addresses in `cidr` of conntrack entries of sandbox connections (marked by the table)."""
    net = ipaddress.ip_network(cidr)
    family = "ipv6" if net.version == 6 else "ipv4"
    out = subprocess.run(["conntrack", "-L", "-f", family, "-m", str(CT_MARK)], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("src="):
                if ipaddress.ip_address(word[4:]) in net:
                    found.add(word[4:])
                break
    return found


def test_no_leaks_after_200_cycles_and_a_sigkill(lab: Lab, tmp_path: Path) -> None:
    """Links, policy chains and set elements, conntrack entries and addresses come back after each
    sandbox; a SIGKILLed server's successor keeps the kept sandboxes' policies and cleans the rest."""
    data = tmp_path / "data"
    srv = start_server(
        data, "--pool-size", "1", "--pool-max", "1", "--prewarm", "base", keep=True
    )  # (a fixed pool: what is left is counted)
    try:
        _cycles_then_sigkill(srv, data, tmp_path)
    finally:
        if srv.proc.poll() is None:  # an assertion before the SIGKILL: this server must not outlive the test
            srv.stop()
            start_server(data).stop()  # (destroys what it kept)


def _cycles_then_sigkill(srv: Server, data: Path, tmp_path: Path) -> None:
    env = {"api_url": srv.url, "sandbox_url": srv.url, "api_key": srv.api_key}
    cidr = network_cidr(data)
    policies = [None, {"deny_out": [WEB2]}, {"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"]}]
    for i in range(200):
        sbx = Sandbox.create(template="base", timeout=60, network=policies[i % 3], **env)
        if i % 25 == 0:  # some connections, through NAT (both families) and through the egress proxy
            assert sbx.commands.run("curl -sS -m 4 -o /dev/null http://web.lab.test/").exit_code == 0
            if i % 3 == 0:  # (no policy: IPv6 out too, when the host has it)
                sbx.commands.run(f"curl -sS -m 4 -o /dev/null -g 'http://[{WEB6}]/' || true")
        sbx.kill()
    deadline = time.monotonic() + 15
    while True:
        links, table = _instance_state(data)
        # what is left: the pooled sandbox's link and the namespace prepared for the next create
        if len(links) <= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(links) <= 2, links
    assert "chain p_" not in table and "jump p_" not in table, table
    assert "elements" not in table, table  # @egress and @intercept are empty
    cidr6 = default_cidr6(instance_name(data))
    assert not _conntrack_sources(cidr) and not _conntrack_sources(cidr6), "conntrack entries of killed sandboxes"

    kept = [
        Sandbox.create(template="base", timeout=600, network={"deny_out": [WEB2]}, **env),
        Sandbox.create(
            template="base", timeout=600, network={"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"]}, **env
        ),
        Sandbox.create(template="base", timeout=600, allow_internet_access=False, **env),
    ]
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(timeout=30)
    srv = start_server(data, port=int(srv.url.rsplit(":", 1)[1]))  # destroys everything at its exit
    try:
        env["api_key"] = srv.api_key
        a, b, c = (Sandbox.connect(s.sandbox_id, **env) for s in kept)
        assert fetch(a, f"http://{WEB}/")[0] == 0 and fetch(a, f"http://{WEB2}/")[0] != 0
        assert fetch(b, "http://web.lab.test/")[0] == 0 and fetch(b, f"http://{WEB2}/")[0] != 0
        assert fetch(c, f"http://{WEB}/")[0] != 0
        fresh = Sandbox.create(template="base", timeout=60, **env)
        assert fetch(fresh, f"http://{WEB2}/")[0] == 0
    finally:
        assert srv.stop() == 0
    deadline = time.monotonic() + 15
    while (leftovers := network_leftovers() & {f"sandboxd_{instance_name(data)}", *_instance_state(data)[0]}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not leftovers, leftovers
    assert not _conntrack_sources(cidr) and not _conntrack_sources(cidr6)


# -- the sandbox's own SOCKS5 egress proxy (network.egressProxy) -------------------------------------


def test_egress_through_a_socks5_proxy(make, lab: Lab) -> None:
    before = len(lab.socks_seen())
    sbx = make(network={"egress_proxy": {"address": f"{SOCKS}:1080"}, **LAB})
    code, echo = fetch(sbx, f"http://{WEB}/via-socks")
    assert code == 0, echo
    assert isinstance(echo, dict) and echo["client"] != HOST_SIDE, "it came through the proxy, not NAT"
    assert f"{WEB}:80" in lab.socks_seen()[before:]
    # any TCP port goes through it; other protocols do not leave at all (fail closed)
    assert run(sbx, f"timeout 3 bash -c 'echo > /dev/tcp/{WEB}/443'")[0] == 0
    udp = f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'udp-via-tunnel', ('{WEB}', 9999))"
    send = f'python3 -c "import socket; {udp}"'
    run(sbx, send)
    assert "udp-via-tunnel" not in lab.udp_seen(wait_for="never", timeout=1.0)
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.network and info.network.get("egress_proxy", {}).get("address") == f"{SOCKS}:1080"


def test_socks5_proxy_with_credentials_and_names(make, lab: Lab) -> None:
    proxy = {"address": f"{SOCKS}:1081", "username": SOCKS_USER, "password": SOCKS_PASSWORD}
    sbx = make(network={"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"], "egress_proxy": proxy, **LAB})
    before = len(lab.socks_seen())
    code, echo = fetch(sbx, "http://web.lab.test/by-name")
    assert code == 0, echo
    assert "web.lab.test:80" in lab.socks_seen()[before:], "an allowed name is asked of the proxy by name"
    # filtering comes first: what the policy denies never reaches the proxy
    assert fetch(sbx, f"http://{WEB2}/")[0] != 0
    assert not [t for t in lab.socks_seen()[before:] if t.startswith(WEB2)]
    info = Sandbox.get_info(sbx.sandbox_id)
    shown = info.network.get("egress_proxy") if info.network else None
    assert shown == {"address": f"{SOCKS}:1081", "username": SOCKS_USER}, "the password is never returned"
    # the password is the host's: the sandbox never sees it
    assert SOCKS_PASSWORD not in run(sbx, "sudo cat /proc/*/environ /etc/resolv.conf 2>/dev/null | strings")[1]
    bad = make(network={"egress_proxy": {**proxy, "password": "wrong"}, **LAB})
    assert fetch(bad, f"http://{WEB}/")[0] != 0


def test_socks5_proxy_fails_closed_and_updates_live(make, lab: Lab) -> None:
    sbx = make(network={"egress_proxy": {"address": f"{SOCKS}:1099"}, **LAB})  # nothing listens there
    seen = lab.requests_seen()
    assert fetch(sbx, f"http://{WEB}/must-not-arrive")[0] != 0
    assert "must-not-arrive" not in lab.requests_seen()[len(seen) :], "no way around a dead proxy"
    sbx.update_network({"egress_proxy": {"address": f"{SOCKS}:1080"}, **LAB})
    before = len(lab.socks_seen())
    assert fetch(sbx, f"http://{WEB}/")[0] == 0
    assert lab.socks_seen()[before:]
    sbx.update_network(LAB)  # the update replaces all: no proxy, out directly again
    code, echo = fetch(sbx, f"http://{WEB}/")
    assert code == 0 and isinstance(echo, dict) and echo["client"] == HOST_SIDE


# -- rules: credentials injected at the egress, never inside the sandbox -----------------------------

SECRET = "sk-live-" + "7f3a9c1e5b2d4086a1c3e5f7091b2d4f"


def _digest(value: str) -> str:
    import hashlib

    return hashlib.sha256(value.encode()).hexdigest()


def _memory_holds(server: Server, sandbox_id: str, needle: bytes) -> list[int]:
    """PIDs of the sandbox's processes whose memory (every readable mapping) contains `needle`, read from
    the host: what any process in the sandbox could ever have seen."""
    import re as _re

    from conftest import host_pids_of

    found = []
    for pid in host_pids_of(server, sandbox_id):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                for line in maps.splitlines():
                    m = _re.match(r"([0-9a-f]+)-([0-9a-f]+) (r)", line)
                    if not m or "[vvar]" in line or "[vsyscall]" in line:
                        continue
                    start, end = int(m.group(1), 16), int(m.group(2), 16)
                    try:
                        mem.seek(start)
                        if needle in mem.read(end - start):
                            found.append(pid)
                            break
                    except OSError:
                        continue
        except OSError:
            continue
    return found


def test_rules_set_headers_over_http_and_https_and_the_secret_stays_out(make, server: Server) -> None:
    rules = {"api.lab.test": [{"transform": {"headers": {"Authorization": f"Bearer {SECRET}", "X-Team": "blue"}}}]}
    network = {"allow_out": ["api.lab.test", "web.lab.test"], "deny_out": ["0.0.0.0/0"], "rules": rules, **LAB}
    sbx = make(network=network)
    want = _digest(f"Bearer {SECRET}")
    # HTTPS, trusted through the system store (no --cacert): the sandbox's CA signed what it sees
    code, out, err = run(sbx, "curl -sS -m 5 https://api.lab.test/hash-auth")
    assert code == 0, err
    got = json.loads(out)
    assert got["Authorization"] == want and got["X-Team"] == _digest("blue") and got["tls"] is True
    # plain HTTP; and the client's own Authorization is replaced, not doubled
    code, out, err = run(sbx, "curl -sS -m 5 -H 'Authorization: Bearer mine' http://api.lab.test/hash-auth")
    assert code == 0 and json.loads(out)["Authorization"] == want, (out, err)
    # kept-alive: every request gets the headers; a request for another host on it is refused (421)
    py = (
        "import http.client, json; c = http.client.HTTPSConnection('api.lab.test', timeout=5); "
        "get = lambda: c.request('GET', '/hash-auth') or json.loads(c.getresponse().read())['Authorization']; "
        "[print(get()) for _ in range(3)]; "
        "c.request('GET', '/', headers={'Host': 'web.lab.test'}); print(c.getresponse().status)"
    )
    code, out, err = run(sbx, f'python3 -c "{py}"')
    assert out.split() == [want, want, want, "421"], (out, err)
    # Node (NODE_EXTRA_CA_CERTS) trusts it too
    js = "fetch('https://api.lab.test/hash-auth').then(r => r.json()).then(j => console.log(j.Authorization))"
    code, out, err = run(sbx, f'node -e "{js}"')
    assert out.strip() == want, (out, err)
    # a host without rules is not intercepted: its own certificate (the lab's CA), no headers added
    code, echo = fetch(sbx, "https://web.lab.test/")
    assert code == 0 and isinstance(echo, dict) and "Authorization" not in echo["headers"], echo
    # the secret is on the host only: not in the sandbox's files, environment or memory
    sbx.commands.run(
        "python3 -c \"import urllib.request, time; urllib.request.urlopen('https://api.lab.test/hash-auth').read(); "
        'time.sleep(60)"',
        background=True,
    )
    time.sleep(1.0)
    code, out, _ = run(sbx, f"sudo grep -rlsF '{SECRET}' / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev", 60)
    assert out.strip() == "", out
    assert _memory_holds(server, sbx.sandbox_id, b"urllib.request.urlopen"), "the scan sees the sandbox's memory"
    assert not _memory_holds(server, sbx.sandbox_id, SECRET.encode())
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.network and "api.lab.test" in (info.network.get("rules") or {})


def test_rules_need_the_host_allowed_and_refuse_workload_identity(make) -> None:
    from e2b import InvalidArgumentException, SandboxException

    rules = {"api.lab.test": [{"transform": {"headers": {"Authorization": f"Bearer {SECRET}"}}}]}
    sbx = make(network={"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"], "rules": rules, **LAB})
    assert fetch(sbx, "http://api.lab.test/hash-auth")[0] != 0, "a rule alone does not allow the host"
    with pytest.raises((InvalidArgumentException, SandboxException)) as exc:
        bad = {"api.lab.test": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.identity.tokens.aws}"}}}]}
        Sandbox.create(template="base", timeout=30, network={"rules": bad})  # no iam.tokens registered
    assert "workload identity token 'aws'" in str(exc.value)
    with pytest.raises((InvalidArgumentException, SandboxException)) as exc:
        Sandbox.create(
            template="base",
            timeout=30,
            network={"rules": {"api.lab.test": [{"transform": {"headers": {"X": "a\r\nb"}}}]}},
        )
    assert "CR" in str(exc.value)


def test_rules_added_by_a_live_update(make) -> None:
    sbx = make(network={"allow_out": ["api.lab.test"], "deny_out": ["0.0.0.0/0"], **LAB})
    code, out, _ = run(sbx, "curl -sS -m 5 --cacert /tmp/lab-ca.pem https://api.lab.test/hash-auth")
    assert code == 0 and json.loads(out)["Authorization"] == _digest("")
    rules = {"api.lab.test": [{"transform": {"headers": {"X-Api-Key": SECRET}}}]}
    sbx.update_network({"allow_out": ["api.lab.test"], "deny_out": ["0.0.0.0/0"], "rules": rules, **LAB})
    code, out, err = run(sbx, "curl -sS -m 5 https://api.lab.test/hash-auth")
    assert code == 0 and json.loads(out)["X-Api-Key"] == _digest(SECRET), (out, err)


def test_rule_precedence_exact_then_longest_wildcard_never_merged(make) -> None:
    rules = {
        "*.lab.test": [{"transform": {"headers": {"X-Team": "wide", "X-Api-Key": "wide-key"}}}],
        "*.sub.lab.test": [{"transform": {"headers": {"X-Team": "narrow"}}}],
        "api.lab.test": [{"transform": {"headers": {"Authorization": "exact"}}}],
    }
    sbx = make(network={"allow_out": ["*.lab.test"], "deny_out": ["0.0.0.0/0"], "rules": rules, **LAB})
    got = json.loads(run(sbx, "curl -sS -m 5 http://api.lab.test/hash-auth")[1])
    assert (got["Authorization"], got["X-Team"], got["X-Api-Key"]) == (_digest("exact"), _digest(""), _digest(""))
    got = json.loads(run(sbx, "curl -sS -m 5 http://deep.sub.lab.test/hash-auth")[1])
    assert (got["X-Team"], got["X-Api-Key"]) == (_digest("narrow"), _digest(""))
    got = json.loads(run(sbx, "curl -sS -m 5 http://web.lab.test/hash-auth")[1])
    assert (got["X-Team"], got["X-Api-Key"]) == (_digest("wide"), _digest("wide-key"))


def test_secrets_api_and_rules_that_name_a_secret(make, server: Server) -> None:
    """E2B's Secret API: values go in and never come out; `Secret.fill(name)` in a rule is replaced by
    the current value at the egress proxy, request by request."""
    from e2b import Secret, SecretException

    name = f"lab-key-{time.monotonic_ns()}"
    info = Secret.create(name, SECRET, metadata={"team": "blue"})
    try:
        assert (info.name, info.version, info.metadata) == (name, 1, {"team": "blue"})
        assert Secret.exists(name) and Secret.get_info(info.secret_id).name == name
        with server.api() as api:  # no read surface returns the value
            assert SECRET not in api.get(f"/secrets/{name}").text and SECRET not in api.get("/secrets").text
        with pytest.raises(SecretException):
            Secret.create(name, "again")  # names are unique
        rules = {"api.lab.test": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(name)}"}}}]}
        sbx = make(network={"allow_out": ["api.lab.test"], "deny_out": ["0.0.0.0/0"], "rules": rules, **LAB})
        hashed = "curl -sS -m 5 https://api.lab.test/hash-auth"
        assert json.loads(run(sbx, hashed)[1])["Authorization"] == _digest(f"Bearer {SECRET}")
        assert Secret.update(name, "rotated").version == 2
        assert json.loads(run(sbx, hashed)[1])["Authorization"] == _digest("Bearer rotated"), "the current value"
        assert Secret.destroy(name) and not Secret.exists(name)
        _, out, _ = run(sbx, hashed + " -w ' %{http_code}'")
        assert out.endswith(" 502") and name in out, out
    finally:
        Secret.destroy(name)


def test_secrets_are_listed_by_page_and_checked(server: Server) -> None:
    from e2b import Secret, SecretException

    names = [f"page-{i}-{time.monotonic_ns()}" for i in range(3)]
    for n in names:
        Secret.create(n, "v")
    try:
        seen = []
        pages = Secret.list(limit=2)
        while pages.has_next:
            seen += [s.name for s in pages.next_items()]
        assert set(names) <= set(seen)
        from e2b import InvalidArgumentException

        for bad in ("", "a{b}", "tab\there"):  # the SDK refuses them; the server too (below, sent raw)
            with pytest.raises((InvalidArgumentException, SecretException)):
                Secret.create(bad, "v")
        with server.api() as api:
            r = api.post("/secrets", json={"name": "a{b}", "value": "v"})
            assert r.status_code == 400 and "placeholder" in r.json()["message"], r.text
        with pytest.raises(SecretException):
            Secret.create(f"x-{time.monotonic_ns()}", "line\nbreak")
    finally:
        for n in names:
            Secret.destroy(n)


def test_workload_identity_tokens_minted_at_the_egress(make, server: Server, lab: Lab) -> None:
    """`iam.tokens` + `${e2b.identity.tokens.NAME}` in a rule (the SDK's transform callable): the proxy mints
    an ES256 JWT-SVID per request, verifiable with the server's published keys."""
    import base64

    import httpx
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from e2b import Secret

    def b64(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    iam = {"tokens": {"lab": Secret.iam_token(audience="https://api.lab.test", token_type="JWT-SVID")}}
    rules = {
        "api.lab.test": [{"transform": lambda ctx: {"headers": {"Authorization": f"Bearer {ctx.iam.tokens['lab']}"}}}]
    }
    network = {"allow_out": ["api.lab.test"], "deny_out": ["0.0.0.0/0"], "rules": rules, **LAB}
    sbx = Sandbox.create(template="base", timeout=120, iam=iam, network=network)
    try:
        for _ in range(2):
            assert run(sbx, "curl -sS -m 5 -o /dev/null -w '%{http_code}' https://api.lab.test/log-auth")[1] == "204"
        tokens = [line.removeprefix("Bearer ") for line in (lab.dir / "auth.log").read_text().splitlines()[-2:]]
        assert tokens[0] != tokens[1], "a token per request"
        jwks = httpx.get(server.url + "/.well-known/jwks.json").json()  # public: no API key
        key = jwks["keys"][0]
        public = ec.EllipticCurvePublicNumbers(
            int.from_bytes(b64(key["x"]), "big"), int.from_bytes(b64(key["y"]), "big"), ec.SECP256R1()
        ).public_key()
        head, body, sig = tokens[-1].split(".")
        raw = b64(sig)
        signature = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public.verify(signature, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if forged
        claims = json.loads(b64(body))
        assert json.loads(b64(head))["kid"] == key["kid"]
        assert claims["aud"] == ["https://api.lab.test"] and claims["sub"].endswith(sbx.sandbox_id)
        assert claims["exp"] - claims["iat"] == 300
        assert claims["iss"] == httpx.get(server.url + "/.well-known/openid-configuration").json()["issuer"]
        # a rule may only name the sandbox's own tokens
        from e2b import InvalidArgumentException, SandboxException

        bad = {"api.lab.test": [{"transform": {"headers": {"X": "${e2b.identity.tokens.other}"}}}]}
        with pytest.raises((InvalidArgumentException, SandboxException)) as exc:
            sbx.update_network({"allow_out": ["api.lab.test"], "rules": bad})
        assert "iam.tokens" in str(exc.value)
    finally:
        sbx.kill()


# -- IPv6 (the host has it, so sandboxes do: a unique-local /64 per server, NAT66) ----------------------


def _has_ipv6(sbx: Sandbox) -> bool:
    return "inet6" in run(sbx, "ip -6 addr show dev eth0 scope global")[1]


def test_ipv6_through_nat66_under_the_same_policy(make) -> None:
    from netlab import HOST_SIDE6

    sbx = make(network=LAB)
    if not _has_ipv6(sbx):
        pytest.skip("this host has no IPv6 default route: sandboxes get IPv4 only")
    code, echo = fetch(sbx, f"http://[{WEB6}]/six")
    assert code == 0, echo
    assert isinstance(echo, dict) and echo["client"] == HOST_SIDE6, "masqueraded to the host's address"
    assert fetch(sbx, "http://web6.lab.test/")[0] == 0, "AAAA answers come through the resolver"
    # "all traffic" is both families; an IPv6 CIDR is enforced like an IPv4 one
    off = make(allow_internet_access=False, network=LAB)
    assert fetch(off, f"http://[{WEB6}]/")[0] != 0
    denied = make(network={"deny_out": ["2001:db8:5b::/64"], **LAB})
    assert fetch(denied, f"http://[{WEB6}]/")[0] != 0 and fetch(denied, f"http://{WEB}/")[0] == 0
    only = make(network={"allow_out": [f"{WEB6}/128"], "deny_out": ["0.0.0.0/0"], **LAB})
    assert fetch(only, f"http://[{WEB6}]/")[0] == 0 and fetch(only, f"http://{WEB}/")[0] != 0
    # a sandbox whose web traffic the proxy polices (by name) has no IPv6 out: it falls back to IPv4
    named = make(network={"allow_out": ["web.lab.test", "web6.lab.test"], "deny_out": ["0.0.0.0/0"], **LAB})
    assert fetch(named, f"http://[{WEB6}]/")[0] != 0
    assert fetch(named, "http://web.lab.test/")[0] == 0
    sbx.update_network({"deny_out": [WEB6], **LAB})  # a live update covers IPv6 too
    assert fetch(sbx, f"http://[{WEB6}]/")[0] != 0


def test_a_pool_that_overlaps_the_hosts_networks_is_refused(lab: Lab, tmp_path: Path) -> None:
    """The lab's link is one of the host's networks now (198.18.255.0/30, 2001:db8:5b::/64 routed)."""
    for args, option in (
        (["--network-cidr", "198.18.255.0/24"], "--network-cidr"),
        (["--network-cidr6", "2001:db8:5b::/64"], "--network-cidr6"),
    ):
        with pytest.raises(RuntimeError) as exc:
            start_server(tmp_path / f"data{option}", *args)
        assert "overlaps" in str(exc.value) and f"choose a free range with {option}" in str(exc.value), exc.value
