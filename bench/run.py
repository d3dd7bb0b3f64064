"""sandboxd against the kernel floor: create latency, exec round trip and idle memory per sandbox.

Run as root:  /opt/sandboxd/venv/bin/python bench/run.py [--n N]

It starts its own `sandboxd serve` on a free 127.0.0.1 port with a fresh data dir (the default warm pool),
drives it with the official `e2b` SDK, then does the create phase again on a second server started with
`--pool-size 0`, then measures the same operations done with bare `unshare`/`nsenter` on the same template
rootfs. It prints one table, the project's targets with PASS/MISS (it never fails on a miss), and writes
everything to bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import files
import fleet
import interp
import lifecycle
import net
import noisy
import templates

from sandboxd.templates.store import TemplateStore

VENV_BIN = Path("/opt/sandboxd/venv/bin")
TEMPLATES = Path("/var/lib/sandboxd/templates")
TEMPLATE = "base"
# the floor's root: the Debian root filesystem at the bottom of the template's layers (sandboxd stacks
# the layers with overlayfs, which the floor does not)
ROOTFS = TemplateStore(TEMPLATES).get(TEMPLATE).layers[-1]
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMORY = CGROUP_ROOT / "memory" / "sandboxd"  # sandboxes: <instance>/<sandbox id>
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

NS_FLAGS = ["-m", "-u", "-i", "-n", "-p"]  # mount, uts, ipc, net, pid
OP_TIMEOUT = 30.0  # s, any single operation (API call, subprocess, holder start)
SERVER_START_TIMEOUT = 30.0
SETTLE = 1.0  # s, before each MemAvailable reading
POOL_SIZE = 2  # `sandboxd serve`'s default --pool-size
POOL_WAIT = 2.0  # s, at most, for the warm pool to have a sandbox ready before a paced create
NOISE_KIB = 2048  # MemAvailable drift after a teardown that makes a window's drop untrustworthy
ZOMBIE_WAIT = 10.0  # s, for the host's PID 1 to reap killed sandbox-inits
CREATE_WARMUPS = 1
EXEC_WARMUPS = 5
EXEC_FACTOR = 5  # exec samples = N * EXEC_FACTOR
TARGETS_MS = {"create": 30.0, "exec": 5.0}  # p50 targets from the project's issue


class DeadlineExceeded(Exception):
    pass


class Deadline:
    """A global wall-clock budget: every loop checks it, every op is capped by it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise DeadlineExceeded

    def op_timeout(self) -> float:
        """OP_TIMEOUT, but never much past the global deadline."""
        return max(1.0, min(OP_TIMEOUT, self.left()))


# -- /proc and cgroup helpers -------------------------------------------------------------------


def meminfo_kib(key: str = "MemAvailable") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/meminfo")


def _first_number(path: str, prefix: str) -> int:
    """The number after `prefix` in a `Key: value kB` file; 0 if the file or the line is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages count once, split among the processes mapping them."""
    return _first_number(f"/proc/{pid}/smaps_rollup", "Pss:")


def rss_kib(pid: int) -> int:
    return _first_number(f"/proc/{pid}/status", "VmRSS:")


def proc_comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, kernel start time) of `pid`, None if gone. The start time tells a process from a PID reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of a live `pid`; None if gone or a zombie."""
    st = proc_state(pid)
    return None if st is None or st[0] in ("Z", "X") else st[1]


def sandbox_init_procs() -> dict[tuple[int, int], bool]:
    """Every `sandbox-init` on the host, zombies included: (pid, start time) -> is a zombie."""
    found: dict[tuple[int, int], bool] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and proc_comm(int(entry)) == "sandbox-init":
            st = proc_state(int(entry))
            if st is not None:
                found[(int(entry), st[1])] = st[0] in ("Z", "X")
    return found


def proc_cgroup_text(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read()
    except OSError:
        return ""


def sandboxd_entries() -> set[str]:
    """Directories directly under /sys/fs/cgroup/memory/sandboxd/ (one per server instance)."""
    try:
        return {p.name for p in CGROUP_MEMORY.iterdir() if p.is_dir()}
    except OSError:
        return set()


def memory_cgroup(sandbox_id: str) -> Path | None:
    for p in (CGROUP_MEMORY / sandbox_id, *CGROUP_MEMORY.glob(f"*/{sandbox_id}")):
        if p.is_dir():
            return p
    return None


def _only_init(procs: list[int]) -> bool:
    return bool(procs) and all(proc_comm(pid) == "sandbox-init" for pid in procs)


def sandbox_cgroup_dirs(sandbox_id: str) -> list[Path]:
    """Every controller's directory of one sandbox that still exists (v1 controllers and the v2 mount)."""
    found = {*CGROUP_ROOT.glob(f"*/sandboxd/{sandbox_id}"), *CGROUP_ROOT.glob(f"*/sandboxd/*/{sandbox_id}")}
    return sorted(p for p in found if p.is_dir())


def cgroup_procs(cgroup: Path | None) -> list[int]:
    if cgroup is None:
        return []
    try:
        return [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def cgroup_memory_usage(cgroup: Path | None) -> int:
    if cgroup is None:
        return 0
    try:
        return int((cgroup / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return 0


def sandboxes_outside(instances: set[str]) -> set[str]:
    """Live sandboxes (cgroups with processes) of every other server on this host, as `instance/id`."""
    return {
        f"{p.parent.name}/{p.name}"
        for p in CGROUP_MEMORY.glob("*/*")
        if p.is_dir() and p.parent.name not in instances and cgroup_procs(p)
    }


# -- statistics ---------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "p50": None, "p95": None, "samples": []}
    return {
        "n": len(xs),
        "p50": statistics.median(xs),
        "p95": percentile(xs, 95),
        "min": min(xs),
        "max": max(xs),
        "samples": [round(x, 4) for x in xs],
    }


def timed_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


# -- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# No proxies: every request of this bench goes to 127.0.0.1.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server:
    """One `sandboxd serve` of ours, with its own data dir (hence its own cgroup instance) and sandbox
    network (a /24 of 10.214/16, so that it never meets another server's). Names its sandboxes look up
    are forwarded to the host's loopback (nothing leaves the machine), unless `extra_args` say `--dns`."""

    count = 0

    def __init__(self, workdir: Path, extra_args: list[str], templates_dir: Path = TEMPLATES) -> None:
        self.workdir = workdir
        self.templates_dir = templates_dir
        Server.count += 1
        net_args = ["--network-cidr", f"10.214.{Server.count}.0/24"]
        if "--dns" not in extra_args:
            net_args += ["--dns", "127.0.0.1"]
        self.extra_args = [*net_args, *extra_args]
        self.log_path = workdir / "server.log"
        self.url = ""
        self.api_key = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [
            str(VENV_BIN / "sandboxd"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            self.url.rsplit(":", 1)[1],
            "--data-dir",
            str(self.workdir / "data"),
            "--templates-dir",
            str(self.templates_dir),
            "--log-level",
            "warning",
            *self.extra_args,
        ]
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C on the terminal reaches only the bench, which then stops the server in order.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        end = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if not self.api_key:
                m = re.search(r"API key(?: \(new\))?: (e2b_\S+)", self.log_path.read_text(errors="replace"))
                if m:
                    self.api_key = m.group(1)
            if self.api_key and self._healthy():
                # The SDK reads these on every call; the servers are used one after the other.
                urls = {k: self.url for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_VOLUME_API_URL")}
                os.environ.update(urls, E2B_API_KEY=self.api_key)
                return
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd not ready after {SERVER_START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with _HTTP.open(f"{self.url}/health", timeout=2) as r:
                return bool(r.status == 204)
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the server destroys its sandboxes and its pool), wait; SIGKILL only if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=OP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Client:
    """The SDK side of one server: every sandbox it created, so that none outlives the run."""

    server: Server
    live: dict[str, Any] = field(default_factory=dict)
    ever: set[str] = field(default_factory=set)
    vanished: set[str] = field(default_factory=set)  # already gone when we killed them
    instances: set[str] = field(default_factory=set)  # the server's cgroup instance dir(s)

    def create(self, dl: Deadline, **kwargs: Any) -> Any:
        from e2b import Sandbox

        s = Sandbox.create(
            template=TEMPLATE, timeout=max(60, int(dl.left()) + 120), request_timeout=dl.op_timeout(), **kwargs
        )
        self.live[s.sandbox_id] = s
        self.ever.add(s.sandbox_id)
        if not self.instances:
            # A server has one instance dir: look it up once (the first create is a warm-up), so that the
            # timed creates do not also time this glob over the cgroup tree.
            cg = memory_cgroup(s.sandbox_id)
            if cg is not None and cg.parent != CGROUP_MEMORY:
                self.instances.add(cg.parent.name)
        return s

    def kill(self, s: Any) -> None:
        self.live.pop(s.sandbox_id, None)
        if not s.kill(request_timeout=OP_TIMEOUT):
            self.vanished.add(s.sandbox_id)

    def kill_all(self) -> list[str]:
        errors = []
        for s in list(self.live.values()):
            try:
                self.kill(s)
            except Exception as e:
                errors.append(f"killing {s.sandbox_id}: {e!r}")
        return errors

    def pooled(self) -> int:
        """Sandboxes the server holds ready (never handed out, made), seen through its cgroup instance dir.

        Ready: the cgroup holds only the sandbox's init (the bench's template runs no service), i.e. the
        create helper has exited. Not merely "has processes": a sandbox still being made (a refill in
        flight, its helper still in the cgroup), or one just killed that the server is still destroying,
        would end the wait too early, and the timed create would race that work instead of showing the
        steady state."""
        return sum(
            1
            for inst in self.instances
            for p in (CGROUP_MEMORY / inst).glob("*")
            if p.is_dir() and p.name not in self.ever and _only_init(cgroup_procs(p))
        )

    def wait_for_pool(self, want: int = POOL_SIZE) -> bool:
        """Until the pool is full again (the default pool holds POOL_SIZE per template), so that the
        timed create neither waits for nor competes with a refill: the steady state of a pooled server."""
        end = time.monotonic() + POOL_WAIT
        while self.pooled() < want:
            if time.monotonic() > end:
                return False
            time.sleep(0.005)
        return True


# -- idle memory windows ------------------------------------------------------------------------


@dataclass
class MemWindow:
    """MemAvailable before a batch, with it idle, and after it is gone; flags other servers' sandboxes moving.

    MemAvailable is host-wide: anything else running moves it. The value is flagged `noisy` when another
    server's sandboxes came or went meanwhile, or when MemAvailable did not come back to its baseline after
    the teardown (drift beyond NOISE_KIB or a quarter of the drop).
    """

    ours: set[str]  # our servers' cgroup instances
    avail0: int = 0
    avail1: int = 0
    others0: set[str] = field(default_factory=set)
    disturbed: bool = False

    def begin(self) -> None:
        time.sleep(SETTLE)
        self.others0 = sandboxes_outside(self.ours)
        self.avail0 = meminfo_kib()

    def loaded(self) -> None:
        time.sleep(SETTLE)
        self.avail1 = meminfo_kib()
        self.disturbed |= sandboxes_outside(self.ours) != self.others0

    def end(self, count: int) -> dict[str, Any]:
        time.sleep(SETTLE)
        avail2 = meminfo_kib()
        self.disturbed |= sandboxes_outside(self.ours) != self.others0
        drop, drift = self.avail0 - self.avail1, self.avail0 - avail2
        return {
            "memavailable_drop_mib": drop / 1024 / count,
            "memavailable_drift_after_teardown_mib_total": drift / 1024,
            "disturbed_by_other_sandboxes": self.disturbed,
            "noisy": self.disturbed or abs(drift) > max(NOISE_KIB, abs(drop) / 4),
        }


# -- sandboxd measurements ----------------------------------------------------------------------


def run_true(s: Any, dl: Deadline) -> None:
    r = s.commands.run("true", timeout=dl.op_timeout())
    if r.exit_code != 0:
        raise RuntimeError(f"`true` exited with {r.exit_code}")


def sbx_create(n: int, dl: Deadline, client: Client, out: dict[str, Any], paced: bool) -> None:
    """Create -> first `true` -> kill, one at a time; the kill is not timed.

    paced: before each create, wait (untimed, up to POOL_WAIT) until the server's warm pool is full again,
    so the samples show the steady state of a pooled server rather than a burst that drains the pool.
    """
    for i in range(CREATE_WARMUPS + n):
        dl.check()
        pool_ready = client.wait_for_pool() if paced and client.instances else None
        t0 = time.perf_counter()
        s = client.create(dl)
        t1 = time.perf_counter()
        run_true(s, dl)
        t2 = time.perf_counter()
        client.kill(s)
        if i >= CREATE_WARMUPS:
            out["create_call"].append((t1 - t0) * 1000)
            out["create_first_cmd"].append((t2 - t0) * 1000)
            if pool_ready is not None:
                out["pool_ready"].append(pool_ready)


# Network options a create may carry (applied when the pooled sandbox is handed out: docs/architecture.md).
CREATE_POLICIES = {
    "no policy": None,
    "deny list (nftables chain)": {"deny_out": ["203.0.113.0/24"]},
    "allow list by name (+ proxy)": {"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"]},
    "rules (+ sandbox CA install)": {
        "allow_out": ["web.lab.test"],
        "rules": {"web.lab.test": [{"transform": {"headers": {"X-Key": "k"}}}]},
    },
}


def net_create(n: int, dl: Deadline, client: Client, out: dict[str, list[float]]) -> None:
    """Pooled create -> first command with each network option, interleaved (paced like sbx_create)."""
    for i in range(CREATE_WARMUPS + n):
        for name, network in CREATE_POLICIES.items():
            dl.check()
            client.wait_for_pool()
            t0 = time.perf_counter()
            s = client.create(dl, network=network) if network else client.create(dl)
            run_true(s, dl)
            t1 = time.perf_counter()
            client.kill(s)
            if i >= CREATE_WARMUPS:
                out.setdefault(name, []).append((t1 - t0) * 1000)


def sbx_exec(n: int, dl: Deadline, client: Client, out: list[float]) -> None:
    s = client.create(dl)
    try:
        for _ in range(EXEC_WARMUPS):
            dl.check()
            run_true(s, dl)
        for _ in range(n * EXEC_FACTOR):
            dl.check()
            out.append(timed_ms(lambda: run_true(s, dl)))
    finally:
        client.kill(s)


def sbx_idle_memory(n: int, dl: Deadline, client: Client) -> dict[str, Any]:
    """N sandboxes created and left idle. The warm pool is full before and after, so the difference is N."""
    server_pid = client.server.proc.pid if client.server.proc else 0
    window = MemWindow(client.instances)
    window.begin()
    pooled0 = client.pooled()
    self_rss0, server_pss0 = rss_kib(os.getpid()), pss_kib(server_pid)
    batch = []
    try:
        for _ in range(n):
            dl.check()
            batch.append(client.create(dl))
    except DeadlineExceeded:
        if not batch:
            raise
    window.loaded()
    self_rss1, server_pss1 = rss_kib(os.getpid()), pss_kib(server_pid)
    pss = rss = procs = usage = alive = 0
    for s in batch:
        cg = memory_cgroup(s.sandbox_id)
        pids = cgroup_procs(cg)
        alive += 1 if pids else 0
        procs += len(pids)
        pss += sum(pss_kib(p) for p in pids)
        rss += sum(rss_kib(p) for p in pids)
        usage += cgroup_memory_usage(cg)
    k, a = len(batch), max(alive, 1)
    window.disturbed |= alive < k  # some died or were killed behind our back: the MemAvailable drop is void
    result: dict[str, Any] = {
        "count": k,
        "alive_at_measurement": alive,
        "pool_ready_before_and_after": [pooled0, client.pooled()],
        "pss_mib": pss / 1024 / a,  # per sandbox still alive
        "rss_mib": rss / 1024 / a,
        "processes_per_sandbox": procs / a,
        "cgroup_memory_usage_mib": usage / 2**20 / a,
        "server_pss_growth_mib": (server_pss1 - server_pss0) / 1024 / k,
        "bench_client_rss_growth_mib": (self_rss1 - self_rss0) / 1024 / k,
    }
    for s in batch:
        client.kill(s)
    return result | window.end(k)


# -- the floor: bare unshare / nsenter on the same rootfs ---------------------------------------


@dataclass
class Holder:
    """`unshare ... --kill-child sleep infinity`: the unshare parent and its `sleep` child (PID 1 of its namespace)."""

    proc: subprocess.Popen[bytes]
    child: int | None = None
    child_start: int | None = None


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"`{name}` not found")
    return path


def floor_oneshot(n: int, dl: Deadline, out: list[float]) -> None:
    argv = [tool("unshare"), *NS_FLAGS, "-f", f"--root={ROOTFS}", "/bin/true"]
    for i in range(CREATE_WARMUPS + n):
        dl.check()
        ms = timed_ms(lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, check=True, timeout=dl.op_timeout()))
        if i >= CREATE_WARMUPS:
            out.append(ms)


def start_holder(dl: Deadline, holders: list[Holder]) -> float:
    """Start a holder; return ms until its child has exec'd `sleep` (the namespaces exist and are held)."""
    argv = [tool("unshare"), *NS_FLAGS, "--kill-child", f"--root={ROOTFS}", "sleep", "infinity"]
    end = time.monotonic() + dl.op_timeout()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h = Holder(proc)
    holders.append(h)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    while True:
        with contextlib.suppress(OSError):
            with open(children) as f:
                kids = f.read().split()
            if kids and proc_comm(int(kids[0])) == "sleep":
                elapsed = (time.perf_counter() - t0) * 1000
                h.child, h.child_start = int(kids[0]), proc_start_time(int(kids[0]))
                return elapsed
        if proc.poll() is not None:
            raise RuntimeError(f"holder exited with {proc.returncode}")
        if time.monotonic() > end:
            raise RuntimeError("holder did not start in time")
        time.sleep(0.0001)


def nsenter_argv(h: Holder, cmd: list[str]) -> list[str]:
    assert h.child is not None
    return [tool("nsenter"), "-t", str(h.child), *NS_FLAGS, "-r", "-w", *cmd]


def floor_exec_once(argv: list[str], dl: Deadline) -> float:
    return timed_ms(lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, check=True, timeout=dl.op_timeout()))


def stop_holder(h: Holder) -> None:
    if h.child is not None and proc_start_time(h.child) == h.child_start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.child, signal.SIGKILL)
    if h.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            h.proc.kill()  # --kill-child takes the child with it
    h.proc.wait(timeout=10)


def floor_holders(n: int, dl: Deadline, holders: list[Holder], out: dict[str, Any]) -> None:
    """N holders: start latency (+ a first nsenter), idle memory; then exec round trips into the first one."""
    window = MemWindow(set())
    window.begin()
    try:
        for _ in range(n):
            dl.check()
            out["holder_start"].append(start_holder(dl, holders))
            first = floor_exec_once(nsenter_argv(holders[-1], ["/bin/true"]), dl)
            out["holder_start_first_cmd"].append(out["holder_start"][-1] + first)
    except DeadlineExceeded:
        if not holders:
            raise
    window.loaded()
    pids = [pid for h in holders for pid in (h.proc.pid, h.child) if pid is not None]
    k = len(holders)
    out["memory"] = {
        "count": k,
        "pss_mib": sum(pss_kib(p) for p in pids) / 1024 / k,
        "rss_mib": sum(rss_kib(p) for p in pids) / 1024 / k,
        "sleep_only_pss_mib": sum(pss_kib(h.child) for h in holders if h.child) / 1024 / k,
        "processes_per_holder": 2,
    }
    h0 = holders[0]
    for key, cmd in (("exec", ["/bin/true"]), ("exec_bash", ["/bin/bash", "-l", "-c", "true"])):
        argv = nsenter_argv(h0, cmd)
        for _ in range(EXEC_WARMUPS):
            dl.check()
            floor_exec_once(argv, dl)
        for _ in range(n * EXEC_FACTOR):
            dl.check()
            out[key].append(floor_exec_once(argv, dl))
    for h in holders:
        stop_holder(h)
    out["memory"] |= window.end(k)  # the drift after teardown


# -- leftovers ----------------------------------------------------------------------------------


def check_leftovers(
    clients: list[Client], holders: list[Holder], entries_before: set[str], inits_before: set[tuple[int, int]]
) -> dict[str, Any]:
    """What this run left behind. Killed `sandbox-init`s stay zombies until the host's PID 1 reaps them: wait a bit."""
    ours = {sid for c in clients for sid in c.ever}
    instances = {i for c in clients for i in c.instances}
    end = time.monotonic() + ZOMBIE_WAIT
    while True:
        new_inits = {k: z for k, z in sandbox_init_procs().items() if k not in inits_before}
        zombies = sorted(pid for (pid, _), z in new_inits.items() if z)
        if not zombies or time.monotonic() > end:
            break
        time.sleep(0.1)
    new_entries = sandboxd_entries() - entries_before
    workdirs = {str(c.server.workdir.resolve()) + "/" for c in clients}
    return {
        "loop_devices": loop_devices_under(workdirs),  # sandbox disk images still attached
        "sandboxes_created": len(ours),
        "cgroup_dirs": [str(p) for sid in sorted(ours) for p in sandbox_cgroup_dirs(sid)],
        "sandbox_init": sorted(
            pid for (pid, _), z in new_inits.items() if not z and any(i in proc_cgroup_text(pid) for i in instances)
        ),
        "sandbox_init_zombies_unreaped": zombies,  # new since the start; no longer attributable once dead
        "holders": sorted(
            pid
            for h in holders
            for pid, start in ((h.proc.pid, None), (h.child, h.child_start))
            if pid is not None and (h.proc.poll() is None if start is None else proc_start_time(pid) == start)
        ),
        "vanished_before_kill": sorted(sid for c in clients for sid in c.vanished),
        "our_new_sandboxd_entries": sorted(new_entries & instances),
        "foreign_new_sandboxd_entries": sorted(new_entries - instances),  # another server started meanwhile
    }


def loop_devices_under(prefixes: set[str]) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if any(backing.read_text().startswith(p) for p in prefixes):
                found.append(backing.parent.parent.name)
    return sorted(found)


def remove_cgroup_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        for _ in range(100):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)  # the last exiting task may still be detaching


def clean_up_our_cgroups(clients: list[Client], left: dict[str, Any]) -> None:
    """After the servers are gone: kill what is left in *our* sandboxes' cgroups (last resort, normally nothing)
    and remove our servers' (then empty) instance directories, which sandboxd leaves behind on shutdown."""
    dirs = [Path(d) for d in left["cgroup_dirs"]]
    pids = set(left["sandbox_init"])
    for d in dirs:
        pids.update(cgroup_procs(d))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    remove_cgroup_dirs(dirs)
    instances = {i for c in clients for i in c.instances}
    remove_cgroup_dirs(sorted(p for i in instances for p in CGROUP_ROOT.glob(f"*/sandboxd/{i}") if p.is_dir()))


# -- report -------------------------------------------------------------------------------------


def build_rows(
    sbx: dict[str, Any], cold: dict[str, Any], noquota: dict[str, Any], floor: dict[str, Any]
) -> list[dict[str, Any]]:
    def row(name: str, unit: str, s: dict[str, Any], f: dict[str, Any], floor_op: str) -> dict[str, Any]:
        ratio = s["p50"] / f["p50"] if s.get("p50") is not None and f.get("p50") else None
        return {"metric": name, "unit": unit, "sandboxd": s, "floor": f, "floor_op": floor_op, "ratio_p50": ratio}

    def mem(d: dict[str, Any] | None, key: str) -> dict[str, Any]:
        if not d:
            return {"p50": None, "p95": None, "n": 0}
        noisy = bool(d.get("noisy")) and key == "memavailable_drop_mib"
        return {"p50": d[key], "p95": None, "n": d["count"], "noisy": noisy}

    ns = " ".join(NS_FLAGS)
    oneshot = f"unshare {ns} -f --root=ROOTFS /bin/true"
    holder = f"unshare {ns} --kill-child --root=ROOTFS sleep infinity, until sleep runs"
    per_holder = "per idle holder (unshare + sleep)"
    sm, fm = sbx.get("memory"), floor.get("memory")
    return [
        row("create → 1st cmd, pool", "ms", summary(sbx["create_first_cmd"]), summary(floor["oneshot"]), oneshot),
        row("create → 1st cmd, no pool", "ms", summary(cold["create_first_cmd"]), summary(floor["oneshot"]), oneshot),
        row("create call, pool", "ms", summary(sbx["create_call"]), summary(floor["holder_start"]), holder),
        row("create call, no pool", "ms", summary(cold["create_call"]), summary(floor["holder_start"]), holder),
        row(
            "exec `true` round trip",
            "ms",
            summary(sbx["exec"]),
            summary(floor["exec"]),
            f"nsenter -t HOLDER {ns} -r -w /bin/true",
        ),
        row(
            "exec, floor runs SDK's cmd",
            "ms",
            summary(sbx["exec"]),
            summary(floor["exec_bash"]),
            f"nsenter -t HOLDER {ns} -r -w /bin/bash -l -c true (what commands.run starts)",
        ),
        row(
            "idle mem: MemAvailable drop",
            "MiB",
            mem(sm, "memavailable_drop_mib"),
            mem(fm, "memavailable_drop_mib"),
            per_holder,
        ),
        row("idle mem: PSS of processes", "MiB", mem(sm, "pss_mib"), mem(fm, "pss_mib"), per_holder),
        # the rows above run with each sandbox's own 10 GiB disk (the default); this one without
        row(
            "create → 1st cmd, no pool, no quota, not kept",
            "ms",
            summary(noquota["create_first_cmd"]),
            summary(floor["oneshot"]),
            oneshot,
        ),
        # what the command's keeper (processes that outlive the server: envd/kept.py) costs an exec
        row(
            "exec, kept (floor: not kept)",
            "ms",
            summary(sbx["exec"]),
            summary(noquota["exec"]),
            "the same exec on a server with --max-kept-processes 0",
        ),
    ]


def print_file_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sandboxd files vs a local HTTP transfer of the same bytes (same run, same disk)")
    for col in ("metric", "sandboxd", "floor (local HTTP)", "ratio", "note"):
        table.add_column(col, justify="left" if col in ("metric", "note") else "right")
    for row in files.rows(res):
        table.add_row(*row)
    Console().print(table)
    up, down = res["up_mbs"] / res["http_up_mbs"], res["down_mbs"] / res["http_down_mbs"]
    for name, value in (("upload", up), ("download", down)):
        print(f"  {name}: {value:.0%} of the local HTTP floor, target >= 50 %  {'PASS' if value >= 0.5 else 'MISS'}")


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}x" if v >= 1 else f"{v:.2f}x"


def print_report(rows: list[dict[str, Any]], targets: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 132
    table = Table(title=f"sandboxd vs floor — N={meta['n']}, template {TEMPLATE}, {meta['host']}")
    table.add_column("metric")
    for col in ("sandboxd p50", "sandboxd p95", "floor p50", "floor p95", "ratio (p50)"):
        table.add_column(col, justify="right")
    for r in rows:
        s, f = r["sandboxd"], r["floor"]
        table.add_row(
            f"{r['metric']} ({r['unit']})",
            fmt(s.get("p50")) + ("*" if s.get("noisy") else ""),
            fmt(s.get("p95")),
            fmt(f.get("p50")) + ("*" if f.get("noisy") else ""),
            fmt(f.get("p95")),
            fmt_ratio(r["ratio_p50"]),
        )
    console.print(table)
    if any(r["sandboxd"].get("noisy") or r["floor"].get("noisy") for r in rows):
        console.print(
            "[yellow]* noisy: MemAvailable did not return to its baseline after teardown, or other servers' sandboxes "
            "came or went meanwhile (see drift in the JSON); PSS is not affected[/]"
        )
    console.print(f"pool: {meta['pool_note']}", highlight=False, markup=False)
    console.print("floor ops (ROOTFS = the template rootfs, HOLDER = an idle holder's sleep):")
    seen = set()
    for r in rows:
        if r["floor_op"] not in seen:
            seen.add(r["floor_op"])
            console.print(f"  {r['metric']}: {r['floor_op']}", highlight=False, markup=False)
    console.print("targets (project issue):")
    for t in targets:
        mark = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]"}.get(t["status"], t["status"])
        console.print(f"  {t['name']}: p50 {fmt(t['value'])} ms, target ≤ {t['target']:.0f} ms  {mark}")
    if meta["partial"]:
        console.print(f"[yellow]partial results: {meta['partial']}[/]")
    console.print(f"cleanup: {meta['cleanup_summary']}", highlight=False, markup=False)
    console.print(f"results: {RESULTS}", highlight=False, markup=False)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _SkipRest(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="sandboxes / holders per phase (default %(default)s)")
    parser.add_argument("--deadline", type=float, default=600, help="global time budget in s (default %(default)s)")
    parser.add_argument(
        "--suite",
        choices=["all", "sandboxes", "files", "interp", "noisy", "net", "templates", "lifecycle", "fleet"],
        default="all",
        help="what to measure (default %(default)s)",
    )
    parser.add_argument("--file-mib", type=int, default=1024, help="size of the big-file transfer (default 1024)")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")
    if os.geteuid() != 0:
        print("run as root (sandboxd needs it)", file=sys.stderr)
        return 2
    os.environ.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")

    n = args.n
    dl = Deadline(args.deadline)
    entries_before = sandboxd_entries()
    inits_before = set(sandbox_init_procs())
    workdir = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    servers = [
        Server(workdir / "pool", []),
        Server(workdir / "nopool", ["--pool-size", "0"]),
        Server(workdir / "files", []),
        Server(workdir / "interp", ["--prewarm", interp.TEMPLATE]),
        Server(workdir / "interp-nopool", ["--pool-size", "0"]),
        # The disk quota (runtime/quota.py) and kept processes (envd/kept.py) are on by default: this one
        # shows what they cost a create, and the keeper an exec.
        Server(workdir / "nopool-noquota", ["--pool-size", "0", "--disk-mb", "0", "--max-kept-processes", "0"]),
        Server(workdir / "noisy", []),
        Server(workdir / "net", ["--dns", net.DNS, "--egress-ca-file", str(workdir / "lab" / "ca.pem")]),
        # template builds get a templates dir of their own (the built-in templates linked in): a cold build
        Server(workdir / "tpl", ["--dns", net.DNS], templates_dir=workdir / "templates"),
        Server(workdir / "tpl-nopool", ["--dns", net.DNS, "--pool-size", "0"], templates_dir=workdir / "templates"),
        Server(workdir / "life", []),
        Server(workdir / "life-disk", ["--pool-size", "0", "--checkpoint-after", "0"]),  # pauses go to disk at once
        Server(workdir / "fleet-auto", [*fleet.COMMON_ARGS, *fleet.AUTOSCALED_ARGS]),
        Server(workdir / "fleet-fixed", [*fleet.COMMON_ARGS, *fleet.FIXED_ARGS]),
    ]
    clients = [Client(s) for s in servers]
    holders: list[Holder] = []
    sbx: dict[str, Any] = {"create_call": [], "create_first_cmd": [], "pool_ready": [], "exec": [], "memory": None}
    cold: dict[str, Any] = {"create_call": [], "create_first_cmd": [], "pool_ready": []}
    noquota: dict[str, Any] = {"create_call": [], "create_first_cmd": [], "pool_ready": [], "exec": []}
    floor: dict[str, Any] = {
        "oneshot": [],
        "holder_start": [],
        "holder_start_first_cmd": [],
        "exec": [],
        "exec_bash": [],
        "memory": None,
    }
    partial: list[str] = []
    errors: list[str] = []
    status = 0
    file_results: dict[str, Any] = {}
    interp_results: dict[str, Any] = {}
    noisy_results: dict[str, Any] = {}
    net_results: dict[str, Any] = {}
    template_results: dict[str, Any] = {}
    lifecycle_results: dict[str, Any] = {}
    fleet_results: dict[str, Any] = {}

    def phase(name: str, fn: Callable[[], object]) -> bool:
        if dl.left() <= 0:
            partial.append(f"{name}: skipped (deadline)")
            return False
        print(f"· {name} …", file=sys.stderr, flush=True)
        try:
            fn()
            return True
        except DeadlineExceeded:
            partial.append(f"{name}: cut short by the {args.deadline:.0f} s deadline")
        except Exception as e:
            errors.append(f"{name}: {e!r}")
        return False

    with sigterm_as_interrupt():
        try:
            warm, nopool, files_client, interp_warm, interp_cold, nopool_noquota, noisy_client, net_client = clients[:8]
            tpl_warm, tpl_cold, life_client, disk_client, fleet_auto, fleet_fixed = clients[8:]
            for key, fleet_client in (("autoscaled", fleet_auto), ("fixed", fleet_fixed)):
                if args.suite in ("all", "fleet") and phase(
                    f"start sandboxd (fleet, {key})", fleet_client.server.start
                ):
                    phase(
                        f"fleet: a burst of creates, {key} pool",
                        lambda c=fleet_client, k=key: fleet_results.update(
                            {k: fleet.run_fleet(c, dl, trained=k == "autoscaled")}
                        ),
                    )
                    errors.extend((fleet_results.get(key) or {}).pop("errors", []))
                errors.extend(fleet_client.kill_all())
                fleet_client.server.stop()
            if args.suite in ("all", "lifecycle") and phase("start sandboxd (lifecycle)", life_client.server.start):

                def lifecycle_floors() -> dict[str, Callable[[], float]]:
                    one: list[float] = []
                    holder_list: list[Holder] = []
                    start_holder(dl, holder_list)
                    bash = nsenter_argv(holder_list[0], ["/bin/bash", "-l", "-c", "true"])

                    def create_once() -> float:
                        one.clear()
                        floor_oneshot(1, dl, one)
                        return one[-1]

                    lifecycle_holders.extend(holder_list)
                    return {"create": create_once, "exec_bash": lambda: floor_exec_once(bash, dl)}

                lifecycle_holders: list[Holder] = []
                try:
                    phase(
                        "lifecycle: pause, resume, snapshots",
                        lambda: lifecycle_results.update(
                            lifecycle.run_lifecycle(life_client, dl, n, workdir / "life", lifecycle_floors())
                        ),
                    )
                finally:
                    for h in lifecycle_holders:
                        stop_holder(h)
                errors.extend(lifecycle_results.pop("errors", []))
            errors.extend(life_client.kill_all())
            life_client.server.stop()
            if args.suite in ("all", "lifecycle") and phase("start sandboxd (pause to disk)", disk_client.server.start):
                phase(
                    "lifecycle: pause to disk and resume",
                    lambda: lifecycle_results.update(lifecycle.run_disk_pause(disk_client, dl, n)),
                )
                errors.extend(lifecycle_results.pop("errors", []))
            errors.extend(disk_client.kill_all())
            disk_client.server.stop()
            if args.suite in ("all", "templates"):
                TemplateStore(TEMPLATES).link_into(workdir / "templates", ("base", "code-interpreter-v1"))
                lab = net.Lab(workdir / "lab").start()
                try:
                    template_results.update(
                        templates.run_templates(tpl_warm, tpl_cold, dl, workdir / "tpl-work", workdir / "lab", phase)
                    )
                    errors.extend(template_results.pop("errors"))
                finally:
                    lab.stop()
            if args.suite in ("all", "net"):
                lab = net.Lab(workdir / "lab").start()  # before the server, which trusts its CA
                try:
                    if phase("start sandboxd (net)", net_client.server.start):
                        creates: dict[str, list[float]] = {}
                        phase("network: create with network options", lambda: net_create(n, dl, net_client, creates))
                        net_results["create"] = {k: summary(v) for k, v in creates.items()}
                        phase(
                            "network: egress and ports",
                            lambda: net_results.update(net.run_net(net_client, dl, lab)),
                        )
                    errors.extend(net_client.kill_all())
                    net_client.server.stop()
                finally:
                    lab.stop()
            if args.suite in ("all", "noisy") and phase("start sandboxd (noisy)", noisy_client.server.start):
                phase(
                    "noisy neighbours",
                    lambda: noisy_results.update(noisy.run_noisy(n, dl, noisy_client, run_true)),
                )
            errors.extend(noisy_client.kill_all())
            noisy_client.server.stop()
            if args.suite in ("all", "files") and phase("start sandboxd (files)", files_client.server.start):
                phase(
                    "files: transfers and round trips",
                    lambda: file_results.update(
                        files.run_files(
                            files_client.server.proc.pid, workdir / "files-work", args.file_mib, n * 3, dl.left
                        )
                    ),
                )
            files_client.server.stop()
            if args.suite in ("all", "interp"):
                interp_results.update(
                    interp.run_interp(n, dl, interp_warm, interp_cold, workdir / "interp-work", phase)
                )
                errors.extend(interp_results.pop("errors"))
                interp.finish(interp_results)
            if args.suite in ("files", "interp", "noisy", "net", "templates", "lifecycle", "fleet"):
                raise _SkipRest
            if phase("start sandboxd (default pool)", warm.server.start):
                phase("sandboxd create, pool", lambda: sbx_create(n, dl, warm, sbx, paced=True))
                phase("sandboxd exec", lambda: sbx_exec(n, dl, warm, sbx["exec"]))
                phase("sandboxd idle memory", lambda: sbx.update(memory=sbx_idle_memory(n, dl, warm)))
            errors.extend(warm.kill_all())
            warm.server.stop()
            if phase("start sandboxd --pool-size 0", nopool.server.start):
                phase("sandboxd create, no pool", lambda: sbx_create(n, dl, nopool, cold, paced=False))
            errors.extend(nopool.kill_all())
            nopool.server.stop()
            if phase("start sandboxd --pool-size 0 --disk-mb 0 --max-kept-processes 0", nopool_noquota.server.start):
                phase(
                    "sandboxd create, no pool, no disk quota",
                    lambda: sbx_create(n, dl, nopool_noquota, noquota, paced=False),
                )
                phase("sandboxd exec, no kept processes", lambda: sbx_exec(n, dl, nopool_noquota, noquota["exec"]))
            errors.extend(nopool_noquota.kill_all())
            nopool_noquota.server.stop()
            phase("floor create (one-shot)", lambda: floor_oneshot(n, dl, floor["oneshot"]))
            phase("floor holders", lambda: floor_holders(n, dl, holders, floor))
        except _SkipRest:
            pass
        except KeyboardInterrupt:
            errors.append("interrupted")
            status = 130
        finally:
            for h in holders:
                try:
                    stop_holder(h)
                except Exception as e:
                    errors.append(f"stopping holder {h.proc.pid}: {e!r}")
            for c in clients:
                errors.extend(c.kill_all())
                c.server.stop()
            left = check_leftovers(clients, holders, entries_before, inits_before)
            if left["cgroup_dirs"] or left["sandbox_init"]:
                errors.append(f"the servers left sandboxes behind, force-cleaned: {left}")
            clean_up_our_cgroups(clients, left)
            left = check_leftovers(clients, holders, entries_before, inits_before)
            shutil.rmtree(workdir, ignore_errors=True)

    leftover_count = sum(
        len(left[k]) for k in ("cgroup_dirs", "sandbox_init", "holders", "our_new_sandboxd_entries", "loop_devices")
    )
    notes = [
        f"{left['sandboxes_created']} sandboxes and {len(holders)} holders created",
        "nothing left behind" if not leftover_count else f"LEFT BEHIND: {left}",
    ]
    if left["sandbox_init_zombies_unreaped"]:
        notes.append(f"{len(left['sandbox_init_zombies_unreaped'])} dead sandbox-init not yet reaped by PID 1")
    if left["vanished_before_kill"]:
        errors.append(f"{len(left['vanished_before_kill'])} sandboxes were already gone when the bench killed them")
    if left["foreign_new_sandboxd_entries"]:
        notes.append(f"other servers started meanwhile: {left['foreign_new_sandboxd_entries']}")

    rows = build_rows(sbx, cold, noquota, floor)
    targets = []
    for name, key, idx in (
        ("create → 1st cmd, pool", "create", 0),
        ("create → 1st cmd, no pool", "create", 1),
        ("exec", "exec", 4),
    ):
        value = rows[idx]["sandboxd"].get("p50")
        verdict = "n/a" if value is None else ("PASS" if value <= TARGETS_MS[key] else "MISS")
        targets.append({"name": name, "target": TARGETS_MS[key], "value": value, "status": verdict})
    ready = sbx["pool_ready"]
    pool_note = (
        f"paced creates found a pooled sandbox ready {sum(ready)}/{len(ready)} times "
        f"(waited up to {POOL_WAIT:.0f} s, untimed, before each); 'no pool' = a 2nd server with --pool-size 0"
    )
    meta = {
        "n": n,
        "host": f"{platform.node()} {platform.release()}, {os.cpu_count()} CPUs",
        "partial": "; ".join(partial),
        "cleanup_summary": "; ".join(notes),
        "pool_note": pool_note,
    }
    results = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n": n,
        "host": {"node": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()},
        "template": TEMPLATE,
        "rootfs": str(ROOTFS),
        "warmups": {"create": CREATE_WARMUPS, "exec": EXEC_WARMUPS},
        "rows": rows,
        "targets": targets,
        "extra": {
            "pool_ready_before_paced_create": ready,
            "sandboxd_memory": sbx["memory"],
            "floor_memory": floor["memory"],
            "floor_holder_start_first_cmd_ms": summary(floor["holder_start_first_cmd"]),
        },
        "files": file_results,
        "interp": interp_results,
        "noisy": noisy_results,
        "net": net_results,
        "templates": template_results,
        "lifecycle": lifecycle_results,
        "fleet": fleet_results,
        "partial": partial,
        "errors": errors,
        "leftovers": left,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if args.suite not in ("files", "interp", "noisy", "net", "templates", "lifecycle", "fleet"):
        print_report(rows, targets, meta)
    if fleet_results:
        fleet.print_report(fleet_results)
        if args.suite == "fleet":
            print(
                f"partial results: {meta['partial'] or 'none'}\ncleanup: {meta['cleanup_summary']}\nresults: {RESULTS}"
            )
    if lifecycle_results:
        lifecycle.print_report(lifecycle_results)
        if args.suite == "lifecycle":
            print(
                f"partial results: {meta['partial'] or 'none'}\ncleanup: {meta['cleanup_summary']}\nresults: {RESULTS}"
            )
    if template_results:
        templates.print_report(template_results)
        if args.suite == "templates":
            print(
                f"partial results: {meta['partial'] or 'none'}\ncleanup: {meta['cleanup_summary']}\nresults: {RESULTS}"
            )
    if net_results:
        net.print_report(net_results)
        if args.suite == "net":
            print(
                f"partial results: {meta['partial'] or 'none'}\ncleanup: {meta['cleanup_summary']}\nresults: {RESULTS}"
            )
    if noisy_results:
        noisy.print_report(noisy_results)
        if args.suite == "noisy":
            print(f"cleanup: {meta['cleanup_summary']}\nresults: {RESULTS}")
    if interp_results.get("rows"):
        interp.print_report(interp_results)
        if args.suite == "interp":
            print(
                f"partial results: {meta['partial'] or 'none'}\ncleanup: {meta['cleanup_summary']}\nresults: {RESULTS}"
            )
    if file_results.get("up_mbs"):
        print_file_report(file_results)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if leftover_count:
        status = status or 1
    return status or (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
