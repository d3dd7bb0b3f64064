"""What a sandbox's /proc/meminfo, /proc/cpuinfo and /sys/devices/system/cpu/online show: its own limits.

Programs size themselves from these files: `free`, `top`, psutil and the JVM read meminfo; `os.cpu_count()`
(glibc's get_nprocs) reads cpu/online; `lscpu` and many build tools read cpuinfo. Left alone they show the
host (24 GiB, every CPU), and a program that trusts them overcommits the sandbox and is OOM-killed.

How
    At create the runtime writes the three files into `<state>/view/`; `sbxhelper create --view DIR`
    copies them into a small tmpfs of the sandbox's mount namespace and binds them over the kernel's
    (sbxhelper.c, mount_views). The CPUs are those of the sandbox's cpuset (cgroups.py), so that `nproc`,
    Python's `os.process_cpu_count()` and node's `os.availableParallelism()` (all from the affinity
    mask) agree with cpuinfo and cpu/online. Memory is the sandbox's limit; its usage is refreshed by the
    server's metrics sampler (every core/metrics.INTERVAL seconds, written only when it changed) through
    `/proc/<init>/root/proc/meminfo`, a path the sandbox cannot change (its mounts are locked to it).

Not covered: `sysinfo(2)` (the kernel answers it without a file; node's os.totalmem() reads meminfo and
is covered), and the per-CPU lines of /proc/stat, whose counters change every tick (node's
`os.cpus().length` still counts the host's CPUs). lxcfs covers more, at the price of a FUSE daemon every
sandbox's /proc depends on; these three files cover what programs size themselves by.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

VIEW_DIR = "view"  # in the sandbox's state dir
MAX_VIEW = 64 * 1024  # bytes: larger is not ours (the helper copies at most 1 MiB)

# memory.stat keys: (cgroup v1 hierarchical total, cgroup v2)
_STAT_KEYS = {
    "cache": ("total_cache", "file"),
    "rss": ("total_rss", "anon"),
    "shmem": ("total_shmem", "shmem"),
    "mapped": ("total_mapped_file", "file_mapped"),
    "dirty": ("total_dirty", "file_dirty"),
    "writeback": ("total_writeback", "file_writeback"),
    "active_anon": ("total_active_anon", "active_anon"),
    "inactive_anon": ("total_inactive_anon", "inactive_anon"),
    "active_file": ("total_active_file", "active_file"),
    "inactive_file": ("total_inactive_file", "inactive_file"),
    "unevictable": ("total_unevictable", "unevictable"),
    "slab_reclaimable": ("", "slab_reclaimable"),
    "slab_unreclaimable": ("", "slab_unreclaimable"),
    "kernel_stack": ("", "kernel_stack"),
    "pagetables": ("", "pagetables"),
}


def memory_stat(text: str) -> dict[str, int]:
    """memory.stat (v1 or v2) as the keys of _STAT_KEYS, in bytes (missing: 0)."""
    raw: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            raw[key] = int(value)
    v1 = "total_cache" in raw
    return {name: raw.get(keys[0] if v1 else keys[1], 0) for name, keys in _STAT_KEYS.items()}


def meminfo(limit: int, usage: int, st: dict[str, int]) -> str:
    """/proc/meminfo for a sandbox: `limit` bytes of RAM (no swap), `usage` of them used (page cache
    included, as the cgroup counts it); the rest from its memory.stat."""
    usage = min(max(usage, 0), limit)
    free = limit - usage
    cache = min(st.get("cache", 0), usage)
    reclaimable = st.get("active_file", 0) + st.get("inactive_file", 0)
    available = min(limit, free + max(0, reclaimable - st.get("shmem", 0)) + st.get("slab_reclaimable", 0))
    slab = st.get("slab_reclaimable", 0) + st.get("slab_unreclaimable", 0)
    kib = [
        ("MemTotal", limit),
        ("MemFree", free),
        ("MemAvailable", available),
        ("Buffers", 0),
        ("Cached", cache),
        ("SwapCached", 0),
        ("Active", st.get("active_anon", 0) + st.get("active_file", 0)),
        ("Inactive", st.get("inactive_anon", 0) + st.get("inactive_file", 0)),
        ("Active(anon)", st.get("active_anon", 0)),
        ("Inactive(anon)", st.get("inactive_anon", 0)),
        ("Active(file)", st.get("active_file", 0)),
        ("Inactive(file)", st.get("inactive_file", 0)),
        ("Unevictable", st.get("unevictable", 0)),
        ("Mlocked", 0),
        ("SwapTotal", 0),
        ("SwapFree", 0),
        ("Dirty", st.get("dirty", 0)),
        ("Writeback", st.get("writeback", 0)),
        ("AnonPages", st.get("rss", 0)),
        ("Mapped", st.get("mapped", 0)),
        ("Shmem", st.get("shmem", 0)),
        ("KReclaimable", st.get("slab_reclaimable", 0)),
        ("Slab", slab),
        ("SReclaimable", st.get("slab_reclaimable", 0)),
        ("SUnreclaim", st.get("slab_unreclaimable", 0)),
        ("KernelStack", st.get("kernel_stack", 0)),
        ("PageTables", st.get("pagetables", 0)),
        ("CommitLimit", limit),
        ("Committed_AS", usage),
    ]
    # The kernel's layout: the label padded to 16 columns, the value right-aligned in 8, then " kB".
    lines = [f"{name + ':':<16}{value // 1024:>8} kB" for name, value in kib]
    lines += [f"{name + ':':<16}{0:>8}" for name in ("HugePages_Total", "HugePages_Free", "HugePages_Rsvd")]
    lines += [f"{'HugePages_Surp:':<16}{0:>8}", f"{'Hugepagesize:':<16}{2048:>8} kB"]
    return "\n".join(lines) + "\n"


def host_ram() -> int:
    """The host's RAM in bytes (MemTotal of its /proc/meminfo), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0


def cpuinfo(host: str, cpus: list[int]) -> str:
    """The host's /proc/cpuinfo cut to the sandbox's CPUs, numbered from 0 as the sandbox counts them."""
    blocks = [b for b in host.strip("\n").split("\n\n") if b.strip()]
    by_cpu: dict[int, list[str]] = {}
    for block in blocks:
        lines = block.splitlines()
        for line in lines:
            key, _, value = line.partition(":")
            if key.strip() == "processor" and value.strip().isdigit():
                by_cpu[int(value)] = lines
                break
    out = []
    for n, cpu in enumerate(c for c in cpus if c in by_cpu):
        lines = [
            f"processor\t: {n}" if ln.split(":")[0].strip() == "processor" else _cores(ln, len(cpus))
            for ln in by_cpu[cpu]
        ]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n\n" if out else host


def _cores(line: str, count: int) -> str:
    key = line.split(":")[0].strip()
    if key in ("siblings", "cpu cores"):
        return f"{line.split(':')[0]}: {count}"
    return line


def cpu_list(count: int) -> str:
    """/sys/devices/system/cpu/online for `count` CPUs."""
    return "0\n" if count <= 1 else f"0-{count - 1}\n"


def stage(state_dir: Path, limit: int, cpus: list[int]) -> Path:
    """Write a new sandbox's view files (nothing used yet); return the dir for `sbxhelper --view`."""
    d = state_dir / VIEW_DIR
    os.mkdir(d, 0o755)
    for name, text in _initial(limit, tuple(cpus)):
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)
    return d


@functools.lru_cache(maxsize=64)
def _initial(limit: int, cpus: tuple[int, ...]) -> tuple[tuple[str, bytes], ...]:
    """The files of a new sandbox with this memory limit and these CPUs (the same for most sandboxes:
    made once, not on every create)."""
    try:
        host_cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        host_cpuinfo = ""
    return (
        ("meminfo", meminfo(limit, 0, {}).encode()),
        ("cpuinfo", cpuinfo(host_cpuinfo, list(cpus)).encode()),
        ("cpu-online", cpu_list(len(cpus)).encode()),
    )


def refresh(root: Path, text: str) -> bool:
    """Write a running sandbox's meminfo through `root` (/proc/<init>/root). False if the file there is not
    the one the helper made (the init is gone and its PID reused, or an older sandbox without views)."""
    try:
        fd = os.open(root / "proc" / "meminfo", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        # ours: a regular file of host root's, read-only to all (procfs's own meminfo is 0444 too, but
        # refuses writes: the write below would fail on it, and on anything else that is not ours)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o444 or st.st_size > MAX_VIEW:
            return False
        data = text.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))  # the same length nearly always: a reader never sees a short file
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
