"""Noisy neighbours suite of the benchmark: a sandbox's exec round trip, quiet and beside 3 detached `yes`.

One sandbox (the neighbour) runs `commands.run("true")` with nothing else going on ("quiet"), then 3 other
sandboxes each start `commands.run("yes", background=True)` and disconnect their handle (nobody reads the
output), and the neighbour runs the same number of samples again ("noisy"); 5 such rounds, N x 5 samples per
phase in all. Target from the hardening issue: the noisy p50
within 20 % of the quiet p50. Also reported: the server process's CPU time (utime + stime from /proc) per second
of wall time in each phase, which shows whether the server keeps reading the output nobody reads. Called by
run.py (`--suite noisy`); see bench/README.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

NOISY = 3  # sandboxes running a detached `yes`
ROUNDS = 5  # alternations of quiet and noisy samples
WARMUPS = 5
FACTOR = 5  # samples = N * FACTOR
SETTLE = 1.0  # s after the noisy processes started (and their handles disconnected), before sampling
TARGET_RATIO = 1.2  # noisy p50 / quiet p50
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _samples(s: Any, n: int, dl: Any, run_true: Any) -> list[float]:
    """Round trips in ms of n `true`s."""
    out = []
    for _ in range(n):
        dl.check()
        t0 = time.perf_counter()
        run_true(s, dl)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run_noisy(n: int, dl: Any, client: Any, run_true: Any) -> dict[str, Any]:
    """client: run.py's Client of a started server (default settings).

    ROUNDS rounds of (quiet samples, noisy samples): the host's own load drifts (other work on the machine), and
    alternating spreads that drift over both phases. Each noisy phase starts fresh `yes` processes and kills
    them after, with an end event (the kill is not timed)."""
    pid = client.server.proc.pid
    out: dict[str, Any] = {"n": n, "noisy_sandboxes": NOISY, "rounds": ROUNDS, "quiet": [], "noisy": []}
    cpu: dict[str, list[float]] = {"quiet": [], "noisy": [], "idle_noisy": []}
    per_round = max(1, n * FACTOR // ROUNDS)
    neighbour = client.create(dl)
    noisy = [client.create(dl) for _ in range(NOISY)]
    for _ in range(WARMUPS):
        dl.check()
        run_true(neighbour, dl)

    def phase(name: str) -> None:
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        out[name] += _samples(neighbour, per_round, dl, run_true)
        cpu[name].append((cpu_seconds(pid) - cpu0) / (time.monotonic() - t0))

    for _ in range(ROUNDS):
        phase("quiet")
        pids = []
        for s in noisy:
            handle = s.commands.run("yes", background=True, timeout=0, request_timeout=dl.op_timeout())
            handle.disconnect()
            pids.append((s, handle.pid))
        time.sleep(SETTLE)
        idle0, t_idle = cpu_seconds(pid), time.monotonic()
        time.sleep(SETTLE)  # nobody asks anything: what the detached output alone costs the server
        cpu["idle_noisy"].append((cpu_seconds(pid) - idle0) / (time.monotonic() - t_idle))
        phase("noisy")
        for s, yes_pid in pids:
            s.commands.kill(yes_pid, request_timeout=dl.op_timeout())
    for s in [*noisy, neighbour]:
        client.kill(s)
    for name, values in cpu.items():
        out[f"{name}_server_cpu_per_s"] = statistics.mean(values)
    q, z = statistics.median(out["quiet"]), statistics.median(out["noisy"])
    out.update(quiet_p50_ms=q, noisy_p50_ms=z, ratio=z / q if q else None)
    out["status"] = "n/a" if out["ratio"] is None else ("PASS" if out["ratio"] <= TARGET_RATIO else "MISS")
    return out


def print_report(res: dict[str, Any]) -> None:
    if "ratio" not in res:
        print("noisy neighbours: no result", file=sys.stderr)
        return
    print(
        f"noisy neighbours ({len(res['quiet'])} `commands.run('true')` per phase in {res['rounds']} rounds, "
        f"{NOISY} sandboxes running detached `yes`):\n"
        f"  quiet p50   {res['quiet_p50_ms']:.2f} ms   (server CPU {res['quiet_server_cpu_per_s'] * 100:.0f} %)\n"
        f"  noisy p50   {res['noisy_p50_ms']:.2f} ms   (server CPU {res['noisy_server_cpu_per_s'] * 100:.0f} %; "
        f"with no request at all: {res['idle_noisy_server_cpu_per_s'] * 100:.0f} %)\n"
        f"  ratio       {res['ratio']:.2f}   target <= {TARGET_RATIO:.1f}: {res['status']}"
    )
