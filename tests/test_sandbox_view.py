"""Inside a sandbox, free, /proc/meminfo, nproc, /proc/cpuinfo and the CPU count show its own limits."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from e2b import Sandbox

from conftest import cgroup_dir, run_as, start_server

MEMORY_MB = 512  # the server's default memory limit per sandbox (tests' server: defaults)
CPUS = 1.0  # and its CPU limit


def host_cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def expected_cpus() -> int:
    return min(host_cpu_count(), max(1, math.ceil(CPUS)))


def meminfo(sbx: Sandbox) -> dict[str, int]:
    out = sbx.commands.run("cat /proc/meminfo").stdout
    return {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}


def test_free_and_meminfo_show_the_memory_limit(sandbox: Sandbox) -> None:
    info = meminfo(sandbox)
    assert info["MemTotal"] == MEMORY_MB * 1024, info
    assert info["SwapTotal"] == 0
    assert 0 < info["MemAvailable"] <= info["MemTotal"]
    total = sandbox.commands.run("free -m | awk '/^Mem:/ {print $2}'").stdout.strip()
    assert total == str(MEMORY_MB)
    # psutil-style readers and `free` parse it: every line is `Key: value [kB]`
    assert sandbox.commands.run("free -b >/dev/null && vmstat -s >/dev/null && echo ok").stdout == "ok\n"


def test_meminfo_follows_what_the_sandbox_uses(sandbox: Sandbox) -> None:
    before = meminfo(sandbox)
    hold = sandbox.commands.run(
        'python3 -c \'import time; b = bytearray(200 << 20); b[::4096] = b"x" * len(b[::4096]); '
        'open("/tmp/held", "w").close(); time.sleep(60)\'',
        background=True,
    )
    try:
        held = ""
        for _ in range(200):
            held = sandbox.commands.run("test -e /tmp/held && echo held || sleep 0.05").stdout
            if held:
                break
        assert held == "held\n", "the 200 MiB were not allocated"
        # a metrics sample refreshes the view: asking for metrics takes one unless the last is under 1 s
        # old (it may predate the allocation), and the sampler takes one every 5 s; bounded wait
        sandbox.get_metrics()
        after = meminfo(sandbox)
        for _ in range(40):
            if before["MemAvailable"] - after["MemAvailable"] >= 180 * 1024:
                break
            time.sleep(0.25)
            sandbox.get_metrics()
            after = meminfo(sandbox)
        assert after["MemTotal"] == before["MemTotal"]
        assert before["MemAvailable"] - after["MemAvailable"] >= 180 * 1024, (before, after)
        used = int(sandbox.commands.run("free -m | awk '/^Mem:/ {print $3}'").stdout)
        assert used >= 190, used
    finally:
        hold.kill()


def test_cpu_count_everywhere_programs_look(sandbox: Sandbox) -> None:
    n = expected_cpus()
    script = (
        "import os, json; "
        "print(json.dumps([os.cpu_count(), len(os.sched_getaffinity(0)), "
        "open('/proc/cpuinfo').read().count('processor\\t:'), open('/sys/devices/system/cpu/online').read().strip()]))"
    )
    cpu_count, affinity, cpuinfo, online = json.loads(sandbox.commands.run(f'python3 -c "{script}"').stdout)
    assert sandbox.commands.run("nproc").stdout.strip() == str(n)
    assert (cpu_count, affinity, cpuinfo) == (n, n, n)
    assert online == ("0" if n == 1 else f"0-{n - 1}")
    assert sandbox.commands.run("getconf _NPROCESSORS_ONLN").stdout.strip() == str(n)


def test_the_cpu_count_is_enforced_by_a_cpuset(sandbox: Sandbox) -> None:
    """Not only shown: the sandbox's processes run on its CPUs, and widening the affinity mask (which
    any process may ask for) does not take them anywhere else."""
    if host_cpu_count() <= expected_cpus():
        return  # the sandbox gets the whole host: nothing to restrict
    cpuset = (cgroup_dir("cpuset", sandbox.sandbox_id) / "cpuset.cpus").read_text().strip()
    assert cpuset.isdigit(), cpuset  # one CPU, as its limit rounded up
    out = sandbox.commands.run(
        'python3 -c \'import os; os.sched_setaffinity(0, range(os.sysconf("SC_NPROCESSORS_CONF"))); '
        "print(sorted(os.sched_getaffinity(0)))' 2>&1 || true"
    ).stdout
    assert out.strip() in ("[0]", f"[{cpuset}]") or "Invalid argument" in out, out


def test_the_views_cannot_be_changed_from_inside(sandbox: Sandbox) -> None:
    for path in ("/proc/meminfo", "/proc/cpuinfo", "/sys/devices/system/cpu/online"):
        _, out, err = run_as(
            sandbox,
            f"echo 'MemTotal: 1 kB' > {path}; chmod 666 {path}; chown root {path}; umount {path}; "
            f"umount -l {path}; mount --bind /etc/hostname {path}; head -c 200 {path}",
        )
        assert "MemTotal: 1 kB" not in out, (path, out, err)
    info = meminfo(sandbox)
    assert info["MemTotal"] == MEMORY_MB * 1024
    assert "nosuid" in sandbox.commands.run("grep ' /proc/meminfo ' /proc/self/mountinfo").stdout


def test_the_host_keeps_its_own_view(sandbox: Sandbox) -> None:
    host = Path("/proc/meminfo").read_text()
    assert f"MemTotal:         {MEMORY_MB * 1024} kB" not in host
    assert meminfo(sandbox)["MemTotal"] == MEMORY_MB * 1024


def test_a_limit_of_more_cpus_than_the_host_has_shows_the_host(tmp_path: Path) -> None:
    """No cpuset then (every CPU), and the views show the host's CPUs; memory still the limit."""
    srv = start_server(tmp_path / "data", "--cpus", str(host_cpu_count() + 2), "--memory-mb", "300", "--pool-size", "0")
    try:
        sbx = Sandbox.create(template="base", timeout=60, api_key=srv.api_key, api_url=srv.url, sandbox_url=srv.url)
        n = str(host_cpu_count())
        assert sbx.commands.run("nproc; getconf _NPROCESSORS_ONLN; grep -c '^processor' /proc/cpuinfo").stdout == (
            f"{n}\n{n}\n{n}\n"
        )
        assert meminfo(sbx)["MemTotal"] == 300 * 1024
        own = cgroup_dir("cpuset", sbx.sandbox_id)
        assert (own / "cpuset.cpus").read_text() == (own.parent / "cpuset.cpus").read_text()
    finally:
        assert srv.stop() == 0
