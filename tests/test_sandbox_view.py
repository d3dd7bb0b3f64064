"""Inside a sandbox, free, /proc/meminfo, nproc, /proc/cpuinfo and the CPU count show its own limits."""

from __future__ import annotations

import json
import time
from pathlib import Path

from e2b import Sandbox

from conftest import MEMORY_MB, cgroup_dir, expected_cpus, host_cpu_count, sandbox_meminfo, start_server


def test_free_and_meminfo_show_the_memory_limit(sandbox: Sandbox) -> None:
    info = sandbox_meminfo(sandbox)
    assert info["MemTotal"] == MEMORY_MB * 1024, info
    assert info["SwapTotal"] == 0
    assert 0 < info["MemAvailable"] <= info["MemTotal"]
    total = sandbox.commands.run("free -m | awk '/^Mem:/ {print $2}'").stdout.strip()
    assert total == str(MEMORY_MB)
    # psutil-style readers and `free` parse it: every line is `Key: value [kB]`
    assert sandbox.commands.run("free -b >/dev/null && vmstat -s >/dev/null && echo ok").stdout == "ok\n"


def test_meminfo_follows_what_the_sandbox_uses(sandbox: Sandbox) -> None:
    before = sandbox_meminfo(sandbox)
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
        after = sandbox_meminfo(sandbox)
        for _ in range(40):
            if before["MemAvailable"] - after["MemAvailable"] >= 180 * 1024:
                break
            time.sleep(0.25)
            sandbox.get_metrics()
            after = sandbox_meminfo(sandbox)
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


def test_the_host_keeps_its_own_view(sandbox: Sandbox) -> None:
    host = Path("/proc/meminfo").read_text()
    assert f"MemTotal:         {MEMORY_MB * 1024} kB" not in host
    assert sandbox_meminfo(sandbox)["MemTotal"] == MEMORY_MB * 1024


def test_a_limit_of_more_cpus_than_the_host_has_shows_the_host(tmp_path: Path) -> None:
    """No cpuset then (every CPU), and the views show the host's CPUs; memory still the limit."""
    srv = start_server(tmp_path / "data", "--cpus", str(host_cpu_count() + 2), "--memory-mb", "300", "--pool-size", "0")
    try:
        sbx = Sandbox.create(template="base", timeout=60, api_key=srv.api_key, api_url=srv.url, sandbox_url=srv.url)
        n = str(host_cpu_count())
        assert sbx.commands.run("nproc; getconf _NPROCESSORS_ONLN; grep -c '^processor' /proc/cpuinfo").stdout == (
            f"{n}\n{n}\n{n}\n"
        )
        assert sandbox_meminfo(sbx)["MemTotal"] == 300 * 1024
        own = cgroup_dir("cpuset", sbx.sandbox_id)
        assert (own / "cpuset.cpus").read_text() == (own.parent / "cpuset.cpus").read_text()
    finally:
        assert srv.stop() == 0
