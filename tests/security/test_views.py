"""Attacks on a sandbox's view of its limits (runtime/views.py, sbxhelper.c mount_views) and on its cpuset:
the files bound over /proc and /sys cannot be changed, unmounted or covered from inside, and the CPUs a
sandbox is given cannot be widened."""

from __future__ import annotations

from e2b import Sandbox

from conftest import MEMORY_MB, cgroup_dir, expected_cpus, host_cpu_count, run_as, sandbox_meminfo


def test_the_views_cannot_be_changed_from_inside(sandbox: Sandbox) -> None:
    for path in ("/proc/meminfo", "/proc/cpuinfo", "/sys/devices/system/cpu/online"):
        _, out, err = run_as(
            sandbox,
            f"echo 'MemTotal: 1 kB' > {path}; chmod 666 {path}; chown root {path}; umount {path}; "
            f"umount -l {path}; mount --bind /etc/hostname {path}; head -c 200 {path}",
        )
        assert "MemTotal: 1 kB" not in out, (path, out, err)
    info = sandbox_meminfo(sandbox)
    assert info["MemTotal"] == MEMORY_MB * 1024
    assert "nosuid" in sandbox.commands.run("grep ' /proc/meminfo ' /proc/self/mountinfo").stdout


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
