"""Code interpreter suite of the benchmark: `run_code("1+1")` round trip and create -> first result.

sandboxd through the official `e2b-code-interpreter` SDK (template code-interpreter-v1), on a server with the
warm pool ("pool") and on one started with `--pool-size 0` ("no pool"), beside the floor measured in the same
run: a local `jupyter_client` round trip to an ipykernel, no sandbox, no HTTP. The floor runs in a subprocess of
the host's /usr/bin/python3 (the same Python 3.11 as the template's) with the template's own site-packages on its
path, so it is the same jupyter_client / ipykernel / pyzmq as inside the sandbox. Called by run.py; see
bench/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandboxd.templates.store import TemplateStore

TEMPLATE = "code-interpreter-v1"
# the template's Python packages: in the topmost of its layers that has them
SITE = next(
    (
        layer / "opt/sandboxd/site"
        for layer in TemplateStore(Path("/var/lib/sandboxd/templates")).get(TEMPLATE).layers
        if (layer / "opt/sandboxd/site").is_dir()
    ),
    Path("/nonexistent/opt/sandboxd/site"),
)
FLOOR_PYTHON = "/usr/bin/python3"
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory/sandboxd")  # sandboxes: <instance>/<sandbox id>
CODE, EXPECTED = "1+1", "2"
RT_WARMUPS = 5
RT_FACTOR = 5  # round trip samples = N * RT_FACTOR
CREATE_WARMUPS = 1
POOL_PACE = 4.0  # s since the previous create, untimed, before a pooled create: the pool has refilled by then
SETTLE = 1.0  # s, before reading the idle memory
GONE_WAIT = 10.0  # s, at most, for a killed sandbox's processes to exit (its kernels shut down for ~1.5 s)
TARGET_RT_DIFF_MS = 2.0  # run_code p50 - floor p50
TARGET_FIRST_RESULT_MS = 1000.0  # create -> first result p50
TARGET_FIRST_RESULT_POOL_MS = 50.0  # the same from the warm pool (fidelity issue)
TARGET_IDLE_PSS_MIB = 60.0  # a code-interpreter sandbox, idle, kernels started lazily (fidelity issue)

# Runs under FLOOR_PYTHON with SITE on PYTHONPATH. argv[1]: JSON parameters. Prints one JSON line.
FLOOR_SCRIPT = r'''
import json, os, sys, time
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

p = json.loads(sys.argv[1])
end = time.monotonic() + p["budget"]
kdir = os.path.join(p["dir"], "kernels", "python3")
os.makedirs(kdir, exist_ok=True)
with open(os.path.join(kdir, "kernel.json"), "w") as f:  # a plain ipykernel on this Python
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "python3", "language": "python"}, f)
specs = KernelSpecManager(kernel_dirs=[os.path.dirname(kdir)])
out = {"rt": [], "start_first_result": [], "partial": False, "kernel_pss_mib": None,
       "python": sys.version.split()[0]}


def start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[19])


def start():
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    km.start_kernel()
    pid = km.provisioner.process.pid
    with open(p["pidfile"], "a") as f:  # for the parent's last-resort cleanup
        f.write(f"{pid} {start_time(pid)}\n")
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc, pid


def run(kc):
    """execute, until the result and `idle` are on iopub (what sandboxd's interpreter waits for)."""
    msg_id = kc.execute(p["code"], store_history=True, allow_stdin=False, stop_on_error=True)
    text, idle = None, False
    while not idle:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "execute_result":
            text = msg["content"]["data"].get("text/plain")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    if text != p["expected"]:
        raise RuntimeError(f"{p['code']!r} gave {text!r}")
    return msg_id


def drain(kc, msg_id):
    while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
        pass


def stop(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def ms(t0):
    return (time.perf_counter() - t0) * 1000


km, kc, pid = start()
try:
    for i in range(p["rt_warmups"] + p["rt_n"]):
        if time.monotonic() > end:
            out["partial"] = True
            break
        t0 = time.perf_counter()
        msg_id = run(kc)
        t = ms(t0)
        drain(kc, msg_id)
        if i >= p["rt_warmups"]:
            out["rt"].append(t)
    time.sleep(p["settle"])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        out["kernel_pss_mib"] = next(int(x.split()[1]) for x in f if x.startswith("Pss:")) / 1024
finally:
    stop(km, kc)
for i in range(p["start_warmups"] + p["start_n"]):
    if time.monotonic() > end:
        out["partial"] = True
        break
    t0 = time.perf_counter()
    km, kc, pid = start()
    try:
        msg_id = run(kc)
        t = ms(t0)
        drain(kc, msg_id)
    finally:
        stop(km, kc)
    if i >= p["start_warmups"]:
        out["start_first_result"].append(t)
print(json.dumps(out), flush=True)
'''


# -- helpers ------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "p50": None, "p95": None, "samples": []}
    s = sorted(xs)
    return {
        "n": len(s),
        "p50": statistics.median(s),
        "p95": s[max(0, -(-95 * len(s) // 100) - 1)],  # nearest rank, like run.py
        "min": s[0],
        "max": s[-1],
        "samples": [round(x, 4) for x in xs],
    }


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(x.split()[1]) for x in f if x.startswith("Pss:")), 0)
    except OSError:
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _memory_cgroup(sandbox_id: str) -> Path | None:
    return next((p for p in CGROUP_MEMORY.glob(f"*/{sandbox_id}") if p.is_dir()), None)


def _cgroup_procs(cgroup: Path | None) -> list[int]:
    try:
        return [int(x) for x in (cgroup / "cgroup.procs").read_text().split()] if cgroup else []
    except (OSError, ValueError):
        return []


def _start_time(pid: int) -> int | None:
    """Kernel start time of a live `pid`, None if gone or a zombie (tells a process from a PID reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def _wait_empty(cgroups: list[Path], limit: float = GONE_WAIT) -> bool:
    """Until no process is left in these cgroups: a kill (or a server's SIGTERM) returns before they are gone."""
    end = time.monotonic() + limit
    while any(_cgroup_procs(cg) for cg in cgroups):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _live_sandbox_inits(instances: set[str]) -> list[int]:
    """`sandbox-init`s, not yet zombies, of these server instances (seen in /proc/PID/cgroup, also once the
    server has removed the cgroup: a dying PID-namespace init waits there for its namespace to be reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not instances:
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "sandbox-init":
                    continue
            with open(f"/proc/{entry}/cgroup") as f:
                text = f.read()
        except OSError:
            continue
        if _start_time(int(entry)) is not None and any(i in text for i in instances):
            found.append(int(entry))
    return found


def _stop_server(client: Any, out: dict[str, Any]) -> None:
    """Kill our sandboxes, stop the server, then wait (bounded) until its sandboxes, the pool's too, have exited:
    the server exits first, and run.py's leftover check would count a sandbox-init still tearing down."""
    out["errors"].extend(client.kill_all())
    client.server.stop()
    end = time.monotonic() + GONE_WAIT
    while left := _live_sandbox_inits(client.instances):
        if time.monotonic() > end:
            out["errors"].append(f"{len(left)} sandbox-init of {client.server.url} alive {GONE_WAIT:.0f} s after it")
            break
        time.sleep(0.05)


# -- sandboxd -----------------------------------------------------------------------------------


def _create(client: Any, dl: Any) -> Any:
    """Create through the code-interpreter SDK, tracked by run.py's Client so that run.py's cleanup sees it."""
    from e2b_code_interpreter import Sandbox

    s = Sandbox.create(template=TEMPLATE, timeout=max(60, int(dl.left()) + 120), request_timeout=dl.op_timeout())
    client.live[s.sandbox_id] = s
    client.ever.add(s.sandbox_id)
    cg = _memory_cgroup(s.sandbox_id)
    if cg is not None:
        client.instances.add(cg.parent.name)
    return s


def _one_plus_one(s: Any, dl: Any) -> None:
    e = s.run_code(CODE, timeout=dl.op_timeout(), request_timeout=dl.op_timeout())
    if e.error is not None or e.text != EXPECTED:
        raise RuntimeError(f"run_code({CODE!r}) gave {e.text!r}, error {e.error}")


def sbx_round_trips(n: int, dl: Any, client: Any, out: dict[str, Any]) -> None:
    """run_code("1+1") on one warm sandbox; then the idle memory of that sandbox (its kernels are running).

    The samples start POOL_PACE s after the create (untimed): the pool refill that the create triggered starts a
    sandbox and its kernels (~0.5 CPU-second, measured), which would otherwise land on the first samples.
    """
    s = _create(client, dl)
    try:
        time.sleep(max(0.0, min(POOL_PACE, dl.left())))
        for _ in range(RT_WARMUPS):
            dl.check()
            _one_plus_one(s, dl)
        for _ in range(n * RT_FACTOR):
            dl.check()
            t0 = time.perf_counter()
            _one_plus_one(s, dl)
            out["rt"].append((time.perf_counter() - t0) * 1000)
        time.sleep(SETTLE)
        pids = _cgroup_procs(_memory_cgroup(s.sandbox_id))
        procs = {pid: (_cmdline(pid)[:120], _pss_kib(pid) / 1024) for pid in pids}
        kernel = [pss for cmd, pss in procs.values() if "sandboxd_interpreter.python_kernel" in cmd]
        out["memory"] = {
            "pss_mib": sum(pss for _, pss in procs.values()),
            "python_kernel_pss_mib": kernel[0] if len(kernel) == 1 else None,
            "processes": [{"cmd": cmd, "pss_mib": round(pss, 2)} for cmd, pss in procs.values()],
        }
    finally:
        client.kill(s)


def sbx_create(n: int, dl: Any, client: Any, out: list[float], paced: bool, last: list[float]) -> None:
    """Create -> run_code("1+1") returned -> kill (untimed), one at a time.

    paced: before each create, wait (untimed) until POOL_PACE s have passed since the previous create (`last`),
    so that the pool has refilled and the pooled sandbox's kernels have started: the steady state of a server
    that is not hammered.
    """
    for i in range(CREATE_WARMUPS + n):
        dl.check()
        if paced:
            wait = POOL_PACE - (time.monotonic() - last[0])
            time.sleep(max(0.0, min(wait, dl.left())))
            dl.check()
        last[0] = time.monotonic()
        t0 = time.perf_counter()
        s = _create(client, dl)
        _one_plus_one(s, dl)
        t = (time.perf_counter() - t0) * 1000
        cg = _memory_cgroup(s.sandbox_id)
        client.kill(s)
        _wait_empty([cg] if cg else [])  # untimed: its teardown would land on the next sample
        if i >= CREATE_WARMUPS:
            out.append(t)


# -- the floor ----------------------------------------------------------------------------------


def floor(n: int, dl: Any, workdir: Path, out: dict[str, Any]) -> None:
    """The floor script in a subprocess; every kernel it started is killed afterwards if still alive."""
    if not (SITE / "jupyter_client").is_dir():
        raise RuntimeError(f"no jupyter_client in {SITE} (build the {TEMPLATE} template)")
    workdir.mkdir(parents=True, exist_ok=True)
    script, pidfile, err = workdir / "floor.py", workdir / "kernels.pids", workdir / "floor.err"
    script.write_text(FLOOR_SCRIPT)
    (workdir / "tmp").mkdir(exist_ok=True)
    budget = max(1.0, dl.left() - 15)
    params = {
        "code": CODE,
        "expected": EXPECTED,
        "rt_n": n * RT_FACTOR,
        "rt_warmups": RT_WARMUPS,
        "start_n": n,
        "start_warmups": CREATE_WARMUPS,
        "settle": SETTLE,
        "budget": budget,
        "dir": str(workdir),
        "pidfile": str(pidfile),
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "PYTHONPATH": str(SITE),
        "PYTHONNOUSERSITE": "1",
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        "JUPYTER_CONFIG_DIR": str(workdir / "config"),
        "JUPYTER_DATA_DIR": str(workdir / "data"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "IPYTHONDIR": str(workdir / "ipython"),
        "TMPDIR": str(workdir / "tmp"),  # the kernels' connection files: gone with the workdir even after a kill
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # as in the sandbox
    }
    with open(err, "wb") as errf:
        proc = subprocess.Popen(
            [FLOOR_PYTHON, str(script), json.dumps(params)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errf,
            start_new_session=True,
        )
    try:
        stdout, _ = proc.communicate(timeout=budget + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise RuntimeError("the floor script did not finish in time") from None
    finally:
        out["floor_kernels_killed"] = _kill_leftover_kernels(pidfile)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if proc.returncode != 0:
        tail = err.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"the floor script exited with {proc.returncode}: {' | '.join(tail)}")
    res = json.loads(stdout.decode().strip().splitlines()[-1])
    out["floor_rt"], out["floor_start"] = res["rt"], res["start_first_result"]
    out["floor_kernel_pss_mib"], out["floor_python"] = res["kernel_pss_mib"], res["python"]
    if res["partial"]:
        out["partial"].append("floor: cut short by the deadline")


def _kill_leftover_kernels(pidfile: Path) -> int:
    killed = 0
    with contextlib.suppress(OSError):
        for line in pidfile.read_text().splitlines():
            pid, start = (int(x) for x in line.split())
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
    return killed


# -- the suite ----------------------------------------------------------------------------------


def run_interp(
    n: int, dl: Any, warm: Any, cold: Any, workdir: Path, phase: Callable[[str, Callable[[], object]], bool]
) -> dict[str, Any]:
    """warm: a Client of a server with the default pool; cold: one started with --pool-size 0 (run.py's)."""
    out: dict[str, Any] = {
        "n": n,
        "template": TEMPLATE,
        "rt": [],
        "create_pool": [],
        "create_nopool": [],
        "memory": None,
        "floor_rt": [],
        "floor_start": [],
        "floor_kernel_pss_mib": None,
        "partial": [],
        "errors": [],
    }
    last = [time.monotonic()]  # of the previous create (the round trips' sandbox comes from the pool too)
    try:
        if phase("start sandboxd (interp)", warm.server.start):
            last[0] = time.monotonic()
            phase("interp: run_code round trips", lambda: sbx_round_trips(n, dl, warm, out))
            phase("interp: create → 1st result, pool", lambda: sbx_create(n, dl, warm, out["create_pool"], True, last))
    finally:
        _stop_server(warm, out)
    try:
        if phase("start sandboxd --pool-size 0 (interp)", cold.server.start):
            phase(
                "interp: create → 1st result, no pool",
                lambda: sbx_create(n, dl, cold, out["create_nopool"], False, last),
            )
    finally:
        _stop_server(cold, out)
    phase("interp floor: local jupyter_client", lambda: floor(n, dl, workdir / "floor", out))
    return out


# -- report -------------------------------------------------------------------------------------


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    def row(name: str, unit: str, s: dict[str, Any], f: dict[str, Any], floor_op: str) -> dict[str, Any]:
        diff = s["p50"] - f["p50"] if s.get("p50") is not None and f.get("p50") is not None else None
        ratio = s["p50"] / f["p50"] if s.get("p50") is not None and f.get("p50") else None
        return {
            "metric": name,
            "unit": unit,
            "sandboxd": s,
            "floor": f,
            "floor_op": floor_op,
            "diff_p50": diff,
            "ratio_p50": ratio,
        }

    def one(v: float | None) -> dict[str, Any]:
        return {"p50": v, "p95": None, "n": 0 if v is None else 1}

    mem = res.get("memory") or {}
    start = _stats(res["floor_start"])
    kernel = "an idle ipykernel (one process), after the round trips"
    return [
        row(
            "run_code('1+1') round trip",
            "ms",
            _stats(res["rt"]),
            _stats(res["floor_rt"]),
            "jupyter_client execute('1+1') until execute_result and status idle on iopub",
        ),
        row("create → 1st result, pool", "ms", _stats(res["create_pool"]), start, "start kernel → 1st result"),
        row("create → 1st result, no pool", "ms", _stats(res["create_nopool"]), start, "start kernel → 1st result"),
        row("idle mem: PSS, whole sandbox", "MiB", one(mem.get("pss_mib")), one(res["floor_kernel_pss_mib"]), kernel),
        row(
            "idle mem: PSS, its Python kernel",
            "MiB",
            one(mem.get("python_kernel_pss_mib")),
            one(res["floor_kernel_pss_mib"]),
            kernel,
        ),
    ]


def targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def verdict(value: float | None, limit: float) -> str:
        return "n/a" if value is None else "PASS" if value <= limit else "MISS"

    rt = table[0]["diff_p50"]
    found = [{"name": "run_code p50 - floor p50", "target": TARGET_RT_DIFF_MS, "value": rt}]
    for r in table[1:3]:
        found.append(
            {"name": f"{r['metric']}, p50", "target": TARGET_FIRST_RESULT_MS, "value": r["sandboxd"].get("p50")}
        )
    pooled = table[1]["sandboxd"].get("p50")
    found.append({"name": f"{table[1]['metric']}, p50", "target": TARGET_FIRST_RESULT_POOL_MS, "value": pooled})
    idle = next((r for r in table if r["metric"].startswith("idle mem: PSS, whole")), None)
    if idle is not None:
        pss = idle["sandboxd"].get("p50")
        found.append({"name": "idle sandbox PSS", "target": TARGET_IDLE_PSS_MIB, "value": pss, "unit": "MiB"})
    return [t | {"status": verdict(t["value"], t["target"])} for t in found]


def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, digits: int = 2) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    def fmt_ratio(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}x" if v >= 1 else f"{v:.2f}x"

    console = Console()
    if not console.is_terminal:
        console.width = 132
    table = Table(title=f"sandboxd code interpreter vs local jupyter_client — N={res['n']}, template {TEMPLATE}")
    table.add_column("metric")
    for col in ("sandboxd p50", "sandboxd p95", "floor p50", "floor p95", "diff (p50)", "ratio (p50)"):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        s, f = r["sandboxd"], r["floor"]
        table.add_row(
            f"{r['metric']} ({r['unit']})",
            fmt(s.get("p50")),
            fmt(s.get("p95")),
            fmt(f.get("p50")),
            fmt(f.get("p95")),
            "—" if r["diff_p50"] is None else f"{r['diff_p50']:+.2f}",
            fmt_ratio(r["ratio_p50"]),
        )
    console.print(table)
    n_rt, n_c = len(res["rt"]), len(res["create_pool"])
    console.print(
        f"samples: {n_rt} round trips after {RT_WARMUPS} warm-ups on one sandbox; {n_c} creates per variant after "
        f"{CREATE_WARMUPS} warm-up, each a new sandbox; pool: ≥ {POOL_PACE:.0f} s untimed since the previous create; "
        f"no pool: a 2nd server with --pool-size 0",
        highlight=False,
        markup=False,
    )
    console.print(f"floor: {FLOOR_PYTHON} (Python {res.get('floor_python', '?')}) with the template's site-packages:")
    seen = set()
    for r in res["rows"]:
        if r["floor_op"] not in seen:
            seen.add(r["floor_op"])
            console.print(f"  {r['metric']}: {r['floor_op']}", highlight=False, markup=False)
    mem = res.get("memory") or {}
    if mem.get("processes"):
        parts = [f"{_label(p['cmd'])} {p['pss_mib']:.1f}" for p in mem["processes"]]
        console.print(f"idle sandbox, PSS in MiB: {'; '.join(parts)}", highlight=False, markup=False)
    console.print("targets (project issue):")
    for t in res["targets"]:
        mark = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]"}.get(t["status"], t["status"])
        value = fmt(t["value"])
        unit = t.get("unit", "ms")
        console.print(f"  {t['name']}: {value} {unit}, target ≤ {t['target']:.0f} {unit}  {mark}")
    if res["partial"]:
        console.print(f"[yellow]partial results: {'; '.join(res['partial'])}[/]")
    if res.get("floor_kernels_killed"):
        console.print(f"[yellow]floor: {res['floor_kernels_killed']} kernels had to be killed after the script[/]")


def _label(cmd: str) -> str:
    """A short name for a sandbox process: the module for `python -m`, else the program."""
    argv = cmd.split() or ["?"]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if argv[0].startswith("/proc/"):
        return "exec helper"  # sandboxd's helper, run from a file descriptor
    return " ".join([argv[0].rsplit("/", 1)[-1], *argv[1:2]])


def finish(res: dict[str, Any]) -> dict[str, Any]:
    """Rows and targets for the JSON and the table."""
    res["rows"] = rows(res)
    res["targets"] = targets(res["rows"])
    return res


if __name__ == "__main__":
    sys.exit("run it through run.py:  /opt/sandboxd/venv/bin/python bench/run.py --suite interp")
