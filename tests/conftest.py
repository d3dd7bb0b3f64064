"""Test harness: starts the real `sandboxd serve` and points the official e2b SDK at it.

Nothing is mocked: every test talks HTTP to a real server that makes real sandboxes. The server uses a
throw-away data directory, and the cached templates in /var/lib/sandboxd/templates (built by
scripts/setup.sh), so a second run does not rebuild them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from netlab import DNS as LAB_DNS
from netlab import Lab

TEMPLATES_DIR = Path(os.environ.get("SANDBOXD_TEMPLATES_DIR", "/var/lib/sandboxd/templates"))
BUILTIN_TEMPLATES = ("base", "code-interpreter-v1")


def template_layers(name: str, templates: Path = TEMPLATES_DIR) -> tuple[Path, ...]:
    """A template's root filesystem as overlay lower dirs, topmost first."""
    from sandboxd.templates.store import TemplateStore

    return TemplateStore(templates).get(name).layers


def template_file(name: str, path: str) -> Path:
    """Where on the host the file `path` of a template is: in the topmost of its layers that has it."""
    for layer in template_layers(name):
        candidate = layer / path.lstrip("/")
        if candidate.exists() or candidate.is_symlink():
            return candidate
    raise FileNotFoundError(f"template {name} has no {path}")


SANDBOXD = str(Path(sys.executable).with_name("sandboxd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    api_key: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-KEY": self.api_key}, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


_cidrs: dict[Path, str] = {}


def network_cidr(data_dir: Path) -> str:
    """A /24 of its own for the server of each data dir (a restarted server keeps its sandboxes' range):
    servers that run at the same time must not share one."""
    if data_dir not in _cidrs:
        n = (os.getpid() + len(_cidrs)) % 250 + 1
        _cidrs[data_dir] = f"10.213.{n}.0/24"
    return _cidrs[data_dir]


def start_server(
    data_dir: Path, *extra: str, port: int | None = None, keep: bool = False, templates_dir: Path | None = None
) -> Server:
    """A real `sandboxd serve` on a free port. Unless `keep`, it destroys its sandboxes when stopped
    (`--destroy-on-exit`), so that the tests can check that nothing is left behind."""
    port = port or free_port()
    if not keep:
        extra = ("--destroy-on-exit", *extra)
    if "--no-network" not in extra and "--network-cidr" not in extra:
        extra = ("--network-cidr", network_cidr(data_dir), *extra)
    if "--no-network" not in extra and "--dns" not in extra:
        extra = ("--dns", LAB_DNS, *extra)  # names resolve in the tests' lab, never outside this machine
    log_path = data_dir.with_suffix(".log")
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [
            SANDBOXD,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--templates-dir",
            str(templates_dir or TEMPLATES_DIR),
            *extra,
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sandboxd exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 204:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"sandboxd did not become healthy:\n{log_path.read_text()}")
        time.sleep(0.05)
    text = log_path.read_text()
    keys = re.findall(r"API key[^:]*: (e2b_[0-9a-f]{40})", text)
    assert keys, text
    return Server(url=url, api_key=keys[-1], data_dir=data_dir, proc=proc, log_path=log_path)


@contextlib.contextmanager
def keeping_server(data_dir: Path, *extra: str) -> Iterator[tuple[Server, int]]:
    """A server that keeps its sandboxes when it stops (for tests that crash or restart it) and its port.
    However the test ends, that server ends stopped, and what it kept is destroyed by one more server of
    the same data dir (a test failing before its crash, or with a second keeping server of its own stopped, must not
    leave sandboxes and a server behind)."""
    srv = start_server(data_dir, *extra, keep=True)
    port = int(srv.url.rsplit(":", 1)[1])
    try:
        yield srv, port
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
        if any((data_dir / "sandboxes").iterdir()):
            assert start_server(data_dir, port=port).stop() == 0


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The tests' stand-in internet (tests/netlab.py), for the whole session."""
    lab = Lab().start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="session")
def server(lab: Lab) -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.exit("the tests start real sandboxes and must run as root", returncode=2)
    if not (TEMPLATES_DIR / "base" / "current" / "template.json").exists():
        pytest.exit(f"no base template in {TEMPLATES_DIR}: run scripts/setup.sh first", returncode=2)
    before = {p.name for p in Path("/sys/fs/cgroup").glob("*/sandboxd/*") if p.is_dir()}
    net_before = network_leftovers()
    tmp = Path(tempfile.mkdtemp(prefix="sandboxd-test-"))
    srv = start_server(tmp / "data", "--egress-ca-file", str(lab.ca_pem))
    env = {
        "E2B_API_URL": srv.url,
        "E2B_SANDBOX_URL": srv.url,
        "E2B_API_KEY": srv.api_key,
        "E2B_VOLUME_API_URL": srv.url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("E2B_DEBUG", None)
    try:
        yield srv
    finally:
        code = srv.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert code == 0, f"server exited with {code}:\n{srv.log()}"
        # A clean shutdown destroys every sandbox: nothing may be left behind, not even empty cgroups.
        leftovers = list((srv.data_dir / "sandboxes").iterdir())
        assert not leftovers, leftovers
        assert not loop_devices_under(srv.data_dir), "sandbox disk images still attached to loop devices"
        instances = {p.name for p in Path("/sys/fs/cgroup").glob("*/sandboxd/*") if p.is_dir()}
        assert not instances - before, instances - before
        # every server of the session has stopped: none left its table, gateway or a sandbox's link
        deadline = time.monotonic() + 15
        while (left := network_leftovers() - net_before) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"network leftovers of the session's servers: {sorted(left)}"
        shutil.rmtree(tmp, ignore_errors=True)


def network_leftovers() -> set[str]:
    """sandboxd's nftables tables and host links (gateways sg*, sandbox links sx*) on this host."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    tables = {line.split()[-1] for line in out.splitlines() if "sandboxd_" in line}
    links = {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(("sg", "sx"))}
    return tables | links


@pytest.fixture
def sandbox(server: Server):
    from e2b import Sandbox

    sbx = Sandbox.create(template="base", timeout=120)
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture
async def async_sandbox(server: Server):
    from e2b import AsyncSandbox

    sbx = await AsyncSandbox.create(template="base", timeout=120)
    try:
        yield sbx
    finally:
        await sbx.kill()


def cgroup_dir(ctrl: str, sandbox_id: str) -> Path:
    """A sandbox's cgroup directory for one controller (`sandboxd/<server instance>/<id>`)."""
    found = list(Path(f"/sys/fs/cgroup/{ctrl}/sandboxd").glob(f"*/{sandbox_id}"))
    return found[0] if found else Path(f"/sys/fs/cgroup/{ctrl}/sandboxd/none/{sandbox_id}")


def cgroup_dirs(sandbox_id: str) -> list[Path]:
    return list(Path("/sys/fs/cgroup").glob(f"*/sandboxd/*/{sandbox_id}"))


def loop_devices_under(directory: Path) -> list[str]:
    """Loop devices whose backing file is under `directory` (sandbox disk images; the kernel's view)."""
    prefix = str(Path(directory).resolve()) + "/"
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().startswith(prefix):
                found.append(backing.parent.parent.name)
        except OSError:
            pass
    return found


@contextlib.contextmanager
def upper_on_host(server: Server, sandbox_id: str) -> Iterator[Path]:
    """A host path to a sandbox's overlay upper dir, for tests that look at what it wrote.

    With its own disk (src/sandboxd/runtime/quota.py), the upper dir is in an image mounted only in the
    sandbox's mount namespace: mount the same loop device (so the same filesystem) here for a moment.
    """
    state = server.data_dir / "sandboxes" / sandbox_id
    loops = loop_devices_under(state)
    if not loops:
        yield state / "upper"
        return
    mnt = Path(tempfile.mkdtemp(prefix="sandboxd-test-upper-"))
    subprocess.run(["mount", "-o", "nosuid,nodev,noexec", f"/dev/{loops[0]}", str(mnt)], check=True)
    try:
        yield mnt / "upper"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def held_top_layer(sandbox_id: str) -> str:
    """The topmost layer a sandbox stands on, as its hold in the template store says (templates/store.py)."""
    hold = json.loads((TEMPLATES_DIR / ".holds" / sandbox_id).read_text())
    return str(hold["lowers"][0])


def host_pids_of(server: Server, sandbox_id: str) -> set[int]:
    """Host PIDs of every process in a sandbox (from its cgroup)."""
    pids: set[int] = set()
    for ctrl in ("memory", "pids", "unified"):
        p = cgroup_dir(ctrl, sandbox_id) / "cgroup.procs"
        if p.exists():
            pids.update(int(x) for x in p.read_text().split())
    return pids


def run_as(sbx: Any, cmd: str, user: str = "root", timeout: float = 60) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command in a sandbox, whatever its exit code."""
    from e2b import CommandExitException

    try:
        r = sbx.commands.run(cmd, user=user, timeout=timeout)
        return r.exit_code, r.stdout, r.stderr
    except CommandExitException as e:
        return e.exit_code, e.stdout, e.stderr


def read_until(handle: Any, text: str, seconds: float = 20) -> str:
    """Output of a command handle (a Start or Connect stream) until `text` appears in its stdout."""
    seen = ""
    deadline = time.monotonic() + seconds
    for stdout, _, _ in handle:
        seen += stdout or ""
        if text in seen or time.monotonic() > deadline:
            break
    return seen


# A service on port 8080 that streams "tick N" lines (chunked HTTP) to each connection: a client through the port
# proxy holds a connection whose other end (the server's) is outside the sandbox.
TICK_SERVICE = """
import socket, threading, time
srv = socket.create_server(("0.0.0.0", 8080))
def serve(c):
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
    n = 0
    while True:
        n += 1
        line = b"tick %d\\n" % n
        c.sendall(b"%x\\r\\n%s\\r\\n" % (len(line), line))
        time.sleep(0.05)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# Both ends of a TCP connection in one process of a sandbox, on loopback; one line per round trip: its count.
TCP_PAIR = """
import socket, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
n = 0
while True:
    n += 1
    c.sendall(b"x"); assert s.recv(1) == b"x"
    print(n, flush=True)
    time.sleep(0.05)
"""


def start_ticker(sbx: Any) -> None:
    """TICK_SERVICE running in the sandbox, listening."""
    sbx.files.write("/tmp/ticker.py", TICK_SERVICE)
    sbx.commands.run("nohup python3 /tmp/ticker.py >/dev/null 2>&1 &")
    wait_for_port(sbx, 8080)


def wait_for_port(sbx: Any, port: int, seconds: float = 20) -> None:
    """Until something in the sandbox listens on TCP `port` (asked inside it)."""
    probe = f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 1).close()'"
    deadline = time.monotonic() + seconds
    while run_as(sbx, probe)[0] != 0:
        assert time.monotonic() < deadline, f"nothing listens on port {port} in the sandbox"
        time.sleep(0.1)


def ticks_through_port(srv: Server, sandbox_id: str) -> Any:
    """A streaming GET of TICK_SERVICE through the server's port proxy (a context manager: the httpx response)."""
    import httpx

    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8080"}
    return httpx.stream("GET", f"{srv.url}/", headers=headers, timeout=60)


class PtyOutput:
    """A terminal's output (a pty.create or pty.connect handle), gathered by a thread while the test goes on."""

    def __init__(self, handle: Any) -> None:
        import threading

        self.data = bytearray()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(handle,), daemon=True)
        self._thread.start()

    def _read(self, handle: Any) -> None:
        try:
            handle.wait(on_pty=self.data.extend)
        except Exception:  # (its exit code, or the stream's end)
            pass
        finally:
            self.done.set()

    def until(self, needle: bytes, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while needle not in self.data and time.monotonic() < deadline and not self.done.is_set():
            time.sleep(0.05)
        assert needle in self.data, bytes(self.data)[-800:]


def run_python(sbx: Any, code: str, user: str = "root", timeout: float = 60) -> str:
    """Run a Python script (dedented) in a sandbox; its stdout, stripped. Fails the test if it fails."""
    import textwrap

    sbx.files.write("/tmp/attack.py", textwrap.dedent(code))
    status, out, err = run_as(sbx, "python3 /tmp/attack.py", user=user, timeout=timeout)
    assert status == 0, err
    return out.strip()


# What the tests' server gives each sandbox (its defaults): what the sandbox's views must show.
MEMORY_MB = 512
CPUS = 1.0


def host_cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def expected_cpus() -> int:
    """The CPUs a sandbox of the tests' server sees: its limit rounded up, at most the host's."""
    return min(host_cpu_count(), max(1, math.ceil(CPUS)))


def sandbox_meminfo(sbx: Any) -> dict[str, int]:
    """A sandbox's /proc/meminfo, key -> number (kB for sizes)."""
    out = sbx.commands.run("cat /proc/meminfo").stdout
    return {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}


@contextlib.contextmanager
def builder_server(root: Path, *extra: str) -> Iterator[Server]:
    """A server with a templates dir of its own (the cached built-in templates linked in: the layers a
    test builds never mix with the shared cache), which the SDK talks to (E2B_* set, then restored).
    `server.templates` is that dir."""
    from sandboxd.templates.store import TemplateStore

    templates = root / "templates"
    TemplateStore(TEMPLATES_DIR).link_into(templates, BUILTIN_TEMPLATES)
    srv = start_server(root / "data", "--ready-timeout", "5", *extra, templates_dir=templates)
    srv.templates = templates  # type: ignore[attr-defined]
    old = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_VOLUME_API_URL")}
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.api_key, E2B_VOLUME_API_URL=srv.url)
    try:
        yield srv
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        srv.stop()


def keys_cli(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """`sandboxd keys ...` against the server, with its own key."""
    argv = [SANDBOXD, "keys", *args[:1], "--url", srv.url, "--api-key", srv.api_key, *args[1:]]
    return subprocess.run(argv, capture_output=True, timeout=60, text=True)


def team_key(srv: Server, team: str) -> str:
    """A new API key of `team`, made by the CLI."""
    done = keys_cli(srv, "create", "--team", team, "--name", f"{team} tests")
    assert done.returncode == 0, done.stderr
    assert "not shown again" in done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """A real PostgreSQL for the session (tests/pg.py); each test makes its own database (`pg.database()`)."""
    from pg import postgres

    with postgres() as server:
        yield server


def terminal_echo(url: str, api_key: str, sandbox_id: str, marker: str) -> None:
    """The dashboard's terminal of a sandbox (a WebSocket at `url`, a server or a replica): `echo MARKER-$((6*7))`
    typed, `MARKER-42` read back."""
    from websockets.sync.client import connect

    with connect(url.replace("http://", "ws://") + f"/dashboard/terminal/{sandbox_id}", open_timeout=20) as ws:
        ws.send(json.dumps({"apiKey": api_key, "cols": 80, "rows": 24}))
        assert ws.recv(timeout=30) == "ready"
        ws.send(f"echo {marker}-$((6*7))\n".encode())
        seen = b""
        while f"{marker}-42".encode() not in seen:
            chunk = ws.recv(timeout=30)
            seen += chunk if isinstance(chunk, bytes) else chunk.encode()


def wait_for_holders(database: str, template: str, holders: int | None = None, seconds: float = 15) -> None:
    """Until the nodes' leases in the cluster's state say `holders` of them (at least one, when None) hold
    `template` (a node tells at its next beat what it holds)."""
    import psycopg

    deadline = time.monotonic() + seconds
    while True:
        with psycopg.connect(database) as db:
            told = [json.loads(c).get("templates", []) for (c,) in db.execute("SELECT capacity FROM nodes")]
        count = sum(template in t for t in told)
        if count == holders if holders is not None else count >= 1:
            return
        assert time.monotonic() < deadline, told
        time.sleep(0.25)


def own_node(tmp_path: Path, name: str, *args: str, port: int | None = None) -> Server:
    """A server (a cluster node: `args`) with a data dir and a templates dir of its own, `<name>-templates` (the
    cached built-in templates linked in), as nodes on different machines have; started again on its dirs if they
    are there."""
    from sandboxd.templates.store import TemplateStore

    templates = tmp_path / f"{name}-templates"
    if not templates.exists():
        TemplateStore(TEMPLATES_DIR).link_into(templates, BUILTIN_TEMPLATES)
    return start_server(tmp_path / name, *args, templates_dir=templates, **({"port": port} if port else {}))


def sdk_env(monkeypatch: pytest.MonkeyPatch, srv: Server) -> None:
    """The official SDKs' environment pointed at `srv` (what Template.build reads: it takes no URL arguments)."""
    # (E2B_VOLUME_API_URL too: the SDKs' volume content API ignores E2B_API_URL, and would go to api.e2b.app)
    env = {
        "E2B_API_URL": srv.url,
        "E2B_SANDBOX_URL": srv.url,
        "E2B_API_KEY": srv.api_key,
        "E2B_VOLUME_API_URL": srv.url,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def node_holding(nodes: list[Server], templates_of: Any, name: str) -> tuple[Server, Server]:
    """(the node whose templates dir, `templates_of(node)`, names the template `name`; another node)."""
    holder = next(n for n in nodes if (templates_of(n) / ".names" / name).exists())
    return holder, next(n for n in nodes if n is not holder)


def _shared_templates() -> set[str]:
    """The templates in the session's shared templates dir that no setup made (a test's build or snapshot there)."""
    from sandboxd.templates.store import TemplateStore

    if not TEMPLATES_DIR.is_dir():
        return set()
    store = TemplateStore(TEMPLATES_DIR)
    homes = [p.name for p in TEMPLATES_DIR.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return {ident for ident in homes if not store.is_builtin(ident)}


@pytest.fixture(scope="session", autouse=True)
def shared_templates_untouched() -> Iterator[None]:
    """What tests build or snapshot goes to their own templates dirs (builder_server, link_into): the shared one,
    which every later run uses, ends the session with the templates it began with."""
    before = _shared_templates()
    yield
    left = _shared_templates() - before
    assert not left, f"tests left templates in the shared {TEMPLATES_DIR}: {sorted(left)}"
