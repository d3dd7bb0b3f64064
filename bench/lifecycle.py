"""Lifecycle suite of the benchmark: pause and resume (frozen in memory; to the files and booted again),
idle and with a process holding 100 MB of memory, a filesystem snapshot of a sandbox with 7 MB written,
and a create from that snapshot; pause to disk and resume from it through the API (a server run with
`--checkpoint-after 0`), idle, with 100 MB and an idle code interpreter; checkpoint and restore with CRIU at
the runtime's level (idle, 100 MB and 1 GB of dirty memory). Each beside its floor, measured in the same run,
and the published figure of the fastest open peer (CubeSandbox: resume 42 ms, snapshot 46 ms with 7 MB
dirty, create from a snapshot 64 ms; its snapshots hold memory, these hold files); and volumes: a pooled
create with one mounted beside the same create without, a 1 MiB write and read through the volume content
API; an idle code-interpreter sandbox paused (frozen) and resumed to a `run_code` that reads a kernel
variable:

- resume (frozen) -> first command: freezing and thawing a cgroup of our own holding one process, plus
  `nsenter ... bash -l -c true` (what the SDK's command starts) in a holder;
- resume (from files) -> first command and create from a snapshot -> first command: `unshare ... --root`
  + /bin/true (the create floor of run.py);
- snapshot: `cp -a --reflink=auto` of the same 7 MB on the same filesystem, then `sync -f` (a snapshot's
  layer is on disk before the call returns).

Called by run.py; see bench/README.md.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIRTY_MB = 7
HELD_MB = 100  # memory a process holds in the "100 MB in memory" rows
PACE = 2.0  # s between creates from the snapshot: its pool has refilled by then
PEERS = {"resume_ms": 42.0, "snapshot_ms": 46.0, "from_snapshot_ms": 64.0}  # CubeSandbox, published
FREEZER = Path("/sys/fs/cgroup/freezer")


def _ms(t0: float) -> float:
    return (time.monotonic() - t0) * 1000


def run_lifecycle(
    client: Any, dl: Any, n: int, data_dir: Path, floors: dict[str, Callable[[], float]]
) -> dict[str, Any]:
    """client: run.Client of a running server (its data dir `data_dir`); floors: name -> one timed floor op
    in ms (run.py's create and exec floors)."""
    from e2b import Sandbox

    out: dict[str, Any] = {"errors": []}
    n = max(3, min(n, 15))
    pause, resume, fs_pause, fs_resume, snap, from_snap, from_snap_nopool = [], [], [], [], [], [], []
    for _ in range(n):
        dl.check()
        s = client.create(dl)
        s.commands.run("true")
        t0 = time.monotonic()
        s.pause()
        pause.append(_ms(t0))
        t0 = time.monotonic()
        again = Sandbox.connect(s.sandbox_id)
        again.commands.run("true")
        resume.append(_ms(t0))
        t0 = time.monotonic()
        s.pause(mode="filesystem")
        fs_pause.append(_ms(t0))
        t0 = time.monotonic()
        again = Sandbox.connect(s.sandbox_id)
        again.commands.run("true")
        fs_resume.append(_ms(t0))
        client.kill(s)
    # the same with 100 MB of memory in use by a process of the sandbox (dirty: written, not file-backed)
    hold = f"python3 -c 'import os, time; b = os.urandom({HELD_MB} << 20); time.sleep(3600)'"
    held_pause, held_resume, held_fs_pause, held_fs_resume = [], [], [], []
    for _ in range(max(3, n // 2)):
        dl.check()
        s = client.create(dl)
        s.commands.run(f"{hold} >/dev/null 2>&1 &")
        s.commands.run("sleep 1.5")  # it has made its 100 MB
        t0 = time.monotonic()
        s.pause()
        held_pause.append(_ms(t0))
        t0 = time.monotonic()
        Sandbox.connect(s.sandbox_id).commands.run("true")
        held_resume.append(_ms(t0))
        t0 = time.monotonic()
        s.pause(mode="filesystem")
        held_fs_pause.append(_ms(t0))
        t0 = time.monotonic()
        Sandbox.connect(s.sandbox_id).commands.run("true")
        held_fs_resume.append(_ms(t0))
        client.kill(s)
    out.update(
        held_pause_ms=held_pause,
        held_resume_ms=held_resume,
        held_fs_pause_ms=held_fs_pause,
        held_fs_resume_ms=held_fs_resume,
    )
    src = client.create(dl)
    src.commands.run(f"head -c {DIRTY_MB}M /dev/urandom > /home/user/dirty.bin")
    snapshot_ids = []
    try:
        for i in range(n):
            dl.check()
            src.commands.run(f"echo {i} > /home/user/round")
            t0 = time.monotonic()
            info = src.create_snapshot(mode="filesystem")
            snap.append(_ms(t0))
            snapshot_ids.append(info.snapshot_id)
        target = snapshot_ids[-1]
        for i in range(n + 1):
            dl.check()
            if i:
                time.sleep(PACE)
            t0 = time.monotonic()
            child = Sandbox.create(template=target, timeout=60)
            child.commands.run("true")
            (from_snap if i else from_snap_nopool).append(_ms(t0))
            if child.commands.run("cat /home/user/round").stdout.strip() != str(n - 1):
                out["errors"].append("a sandbox from the snapshot does not have the snapshot's files")
            child.kill()
    finally:
        client.kill(src)
        _delete_snapshots(snapshot_ids, out["errors"])
    out.update(
        pause_ms=pause,
        resume_ms=resume,
        fs_pause_ms=fs_pause,
        fs_resume_ms=fs_resume,
        snapshot_ms=snap,
        from_snapshot_ms=from_snap,
        from_snapshot_first_ms=from_snap_nopool,
    )
    out.update(_volumes(client, dl, min(n, 8)))
    checkpoints = _checkpoints(dl, min(n, 5), data_dir)
    out["errors"] += checkpoints.pop("checkpoint_errors")
    out.update(checkpoints)
    out.update(_interp_pause(dl, min(n, 8)))
    memory = _memory_snapshots(client, dl, min(n, 8))
    out["errors"] += memory.pop("errors")
    out.update(memory)
    out["floor_freeze_exec_ms"] = [_freeze_thaw_ms() + floors["exec_bash"]() for _ in range(n)]
    out["floor_create_ms"] = [floors["create"]() for _ in range(n)]
    out["floor_copy_ms"] = [_copy_ms(data_dir) for _ in range(n)]
    return out


def run_disk_pause(client: Any, dl: Any, n: int) -> dict[str, Any]:
    """Pause to disk through the API (a server run with `--checkpoint-after 0`: the reaper writes a paused
    sandbox out at once): from `pause()` until `get_info` says `pausedTo: disk`; then `connect` (a restore)
    until a first command returned. An idle base sandbox, and one with a process of its user holding 100 MB
    (a kept command: its keeper is suspended and its pipes swapped across the restore)."""
    import json
    import urllib.request

    from e2b import Sandbox

    out: dict[str, Any] = {"errors": []}
    n = max(3, min(n, 10))
    hold = (
        f'python3 -c "import os, time; n = {HELD_MB} << 20; b = bytearray(n)\n'
        "for i in range(0, n, 1 << 20): b[i : i + (1 << 20)] = os.urandom(1 << 20)\n"
        "print('ready', flush=True); time.sleep(3600)\""
    )

    def paused_to() -> str:
        req = urllib.request.Request(
            f"{os.environ['E2B_API_URL']}/sandboxes/{s.sandbox_id}", headers={"X-API-Key": os.environ["E2B_API_KEY"]}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(json.load(r).get("pausedTo", ""))

    for key, held in (("disk_idle", False), ("disk_100", True)):
        for _ in range(n):
            dl.check()
            s = client.create(dl)
            try:
                if held:
                    s.commands.run(f"{hold} > /tmp/held.log", background=True)
                    deadline = time.monotonic() + 60
                    while "ready" not in s.commands.run("cat /tmp/held.log").stdout:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the 100 MB holder did not start")
                        time.sleep(0.05)
                else:
                    s.commands.run("true")
                t0 = time.monotonic()
                s.pause()
                while paused_to() != "disk":
                    if _ms(t0) > 30_000:
                        raise RuntimeError("a paused sandbox was not written to disk within 30 s")
                    time.sleep(0.002)
                out.setdefault(f"{key}_pause_ms", []).append(_ms(t0))
                t0 = time.monotonic()
                again = Sandbox.connect(s.sandbox_id)
                again.commands.run("true")
                out.setdefault(f"{key}_resume_ms", []).append(_ms(t0))
            except RuntimeError as e:
                out["errors"].append(f"pause to disk ({key}): {e}")
            finally:
                client.kill(s)
    # An idle code interpreter (its server and warm Python kernel, on unix sockets): until `run_code` has
    # the kernel's variable back.
    from e2b_code_interpreter import Sandbox as CodeSandbox

    for _ in range(n):
        dl.check()
        s = CodeSandbox.create(template="code-interpreter-v1", timeout=300)
        try:
            s.run_code("kept = 41 + 1")
            t0 = time.monotonic()
            s.pause()
            while paused_to() != "disk":
                if _ms(t0) > 30_000:
                    raise RuntimeError("a paused code interpreter was not written to disk within 30 s")
                time.sleep(0.002)
            out.setdefault("disk_interp_pause_ms", []).append(_ms(t0))
            t0 = time.monotonic()
            again = CodeSandbox.connect(s.sandbox_id)
            if again.run_code("kept").text != "42":
                raise RuntimeError("the kernel lost its state across a pause to disk")
            out.setdefault("disk_interp_resume_ms", []).append(_ms(t0))
        except RuntimeError as e:
            out["errors"].append(f"pause to disk (code interpreter): {e}")
        finally:
            s.kill()
    return out


def _volumes(client: Any, dl: Any, n: int) -> dict[str, Any]:
    """A pooled create with a volume mounted beside one without (alternated, the pool refilled before
    each), and 1 MiB written and read back through the volume content API."""
    from e2b import Sandbox, Volume

    with_vol, without, write, read = [], [], [], []
    vol = Volume.create(f"bench-{os.getpid()}-{time.monotonic_ns()}")
    try:
        for _ in range(n):
            for timings, mounts in ((with_vol, {"/data": vol}), (without, None)):
                dl.check()
                time.sleep(PACE)
                t0 = time.monotonic()
                s = Sandbox.create(template="base", timeout=60, volume_mounts=mounts)
                s.commands.run("true")
                timings.append(_ms(t0))
                s.kill()
        payload = os.urandom(1 << 20)
        for _ in range(n):
            t0 = time.monotonic()
            vol.write_file("/bench.bin", payload)
            write.append(_ms(t0))
            t0 = time.monotonic()
            if vol.read_file("/bench.bin", format="bytes") != payload:
                raise RuntimeError("the volume gave back other bytes than written")
            read.append(_ms(t0))
    finally:
        Volume.destroy(vol.volume_id)
    return {"volume_create_ms": with_vol, "plain_create_ms": without, "volume_write_ms": write, "volume_read_ms": read}


def _interp_pause(dl: Any, n: int) -> dict[str, Any]:
    """An idle code-interpreter sandbox (its Jupyter server and warm kernels: ~250 MiB) paused (frozen) and
    resumed, then a `run_code` that needs its state: the kernel's variable must still be there."""
    from e2b_code_interpreter import Sandbox as CodeSandbox

    pause, resume = [], []
    s = CodeSandbox.create(template="code-interpreter-v1", timeout=300)
    try:
        s.run_code("kept = 41 + 1")
        for _ in range(n):
            dl.check()
            t0 = time.monotonic()
            s.pause()
            pause.append(_ms(t0))
            t0 = time.monotonic()
            again = CodeSandbox.connect(s.sandbox_id)
            if again.run_code("kept").text != "42":
                raise RuntimeError("the kernel lost its state across a pause")
            resume.append(_ms(t0))
    finally:
        s.kill()
    return {"interp_pause_ms": pause, "interp_resume_ms": resume}


def _checkpoints(dl: Any, n: int, data_dir: Path) -> dict[str, Any]:
    """Checkpoint and restore with CRIU at the runtime's level (the API's pause does not use them yet:
    docs/architecture.md, Checkpoints): a base sandbox idle, holding 100 MB and holding 1 GB of dirty memory in
    a process of its user; restore until its tree runs again. Beside them, the freezer's pause and resume of the
    same sandbox (what the API's pause does today: nothing leaves memory)."""
    import asyncio
    import dataclasses
    import glob
    import secrets

    from sandboxd.runtime.base import ExecSpec, Limits, SandboxSpec
    from sandboxd.runtime.namespaces import NamespaceRuntime
    from sandboxd.templates.store import TemplateStore

    crius = sorted(glob.glob("/var/lib/sandboxd/tools/criu-*/criu"))
    if not crius:
        return {"checkpoint_errors": ["no CRIU in /var/lib/sandboxd/tools (scripts/build-criu.sh)"]}
    out: dict[str, list[float]] = {}
    errors: list[str] = []

    async def one(rt: NamespaceRuntime, held_mb: int, key: str) -> None:
        spec = SandboxSpec(
            sandbox_id="bckpt" + secrets.token_hex(6),
            layers=TemplateStore(Path("/var/lib/sandboxd/templates")).get("base").layers,
            hostname="bench",
            limits=Limits(memory_mb=held_mb + 512, disk_mb=1024),
        )
        handle = await rt.create(spec)
        try:
            if held_mb:
                code = (  # filled a MiB at a time: no second copy of it on the way (its memory limit)
                    f"import os, time; n = {held_mb} << 20; b = bytearray(n)\n"
                    "for i in range(0, n, 1 << 20): b[i : i + (1 << 20)] = os.urandom(1 << 20)\n"
                    "open('/tmp/ready', 'w'); time.sleep(3600)"
                )
                run = ExecSpec(
                    ["/bin/sh", "-c", f'python3 -c "{code}" >/dev/null 2>&1 &'],
                    {"PATH": "/usr/bin:/bin"},
                    "/",
                    1000,
                    1000,
                )
                devnull = os.open(os.devnull, os.O_RDWR)
                try:
                    code = rt.spawn_exec(handle, run, (devnull, devnull, devnull)).wait(60)
                finally:
                    os.close(devnull)
                deadline = time.monotonic() + 60
                while not _exists(f"/proc/{handle.init_pid}/root/tmp/ready"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the {held_mb} MB holder did not start (its shell exited with {code})")
                    await asyncio.sleep(0.05)
            t0 = time.monotonic()
            rt.freeze(handle, True)
            out.setdefault(f"{key}_freeze_ms", []).append(_ms(t0))
            t0 = time.monotonic()
            rt.freeze(handle, False)
            out.setdefault(f"{key}_thaw_ms", []).append(_ms(t0))
            t0 = time.monotonic()
            held = await rt.checkpoint(handle, handle.state_dir / "checkpoint", Path(crius[-1]))
            out.setdefault(f"{key}_checkpoint_ms", []).append(_ms(t0))
            t0 = time.monotonic()
            handle = await rt.create(dataclasses.replace(spec, resume_uid_base=handle.uid_base), restore=held)
            out.setdefault(f"{key}_restore_ms", []).append(_ms(t0))
        finally:
            await rt.destroy(handle)

    async def body() -> None:
        rt = NamespaceRuntime(Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=data_dir)), network_cidr=None)
        try:
            for held_mb, key, rounds in ((0, "ckpt_idle", n), (HELD_MB, "ckpt_100", n), (1024, "ckpt_1g", 1)):
                for _ in range(rounds):
                    dl.check()
                    try:
                        await one(rt, held_mb, key)
                    except RuntimeError as e:  # (counted, and the suite goes on)
                        errors.append(f"checkpoint, {held_mb} MB: {e}")
        finally:
            rt.close()

    asyncio.run(body())
    return {**out, "checkpoint_errors": errors}


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _freeze_thaw_ms() -> float:
    """Freeze and thaw a v1 freezer cgroup of our own holding one sleeping process (until FROZEN is seen)."""
    cg = FREEZER / f"sandboxd-bench-{os.getpid()}"
    cg.mkdir()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        (cg / "cgroup.procs").write_text(str(proc.pid))
        t0 = time.monotonic()
        (cg / "freezer.state").write_text("FROZEN")
        while (cg / "freezer.state").read_text().strip() != "FROZEN":
            time.sleep(0.0005)
        (cg / "freezer.state").write_text("THAWED")
        return _ms(t0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cg.rmdir()


def _copy_ms(data_dir: Path) -> float:
    """cp -a --reflink=auto of DIRTY_MB of random bytes on the data dir's filesystem, synced."""
    work = Path(tempfile.mkdtemp(prefix="bench-copy-", dir=data_dir))
    try:
        (work / "src").mkdir()
        (work / "src" / "dirty.bin").write_bytes(os.urandom(DIRTY_MB << 20))
        subprocess.run(["sync", "-f", str(work)], check=True)  # the source is on disk, as a sandbox's may be
        t0 = time.monotonic()
        subprocess.run(["cp", "-a", "--reflink=auto", str(work / "src"), str(work / "dst")], check=True)
        subprocess.run(["sync", "-f", str(work / "dst")], check=True)  # on disk before it counts, as a layer
        return _ms(t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _memory_snapshots(client: Any, dl: Any, n: int) -> dict[str, Any]:
    """Snapshots with memory of a base sandbox whose process holds DIRTY_MB of written memory (and as much in
    files): the snapshot, a create from it to a first command (its process restored), and forks of 1 and 10
    children to each child's first command."""
    from e2b import Sandbox

    out: dict[str, Any] = {"errors": []}
    hold = (
        f'python3 -c "import os, time; b = bytearray(os.urandom({DIRTY_MB} << 20)); '
        "open('/tmp/held', 'w').write('ready'); time.sleep(3600)\" > /dev/null 2>&1 &"
    )
    src = client.create(dl)
    idents: list[str] = []
    try:
        src.commands.run(f"head -c {DIRTY_MB}M /dev/urandom > /home/user/dirty.bin; nohup {hold}")
        deadline = time.monotonic() + 30
        while src.commands.run("cat /tmp/held 2>/dev/null || true").stdout != "ready":
            if time.monotonic() > deadline:
                raise RuntimeError("the memory holder did not start")
            time.sleep(0.05)
        for _ in range(n):
            dl.check()
            t0 = time.monotonic()
            idents.append(src.create_snapshot().snapshot_id)
            out.setdefault("mem_snapshot_ms", []).append(_ms(t0))
        for i in range(n + 1):  # the first a restore; then (paced) hand-outs of pooled restores
            dl.check()
            if i:
                time.sleep(PACE)
            t0 = time.monotonic()
            child = Sandbox.create(template=idents[-1], timeout=60)
            child.commands.run("true")
            out.setdefault("mem_from_snapshot_ms" if i else "mem_from_snapshot_first_ms", []).append(_ms(t0))
            if "python3" not in child.commands.run("ps -eo comm").stdout:
                out["errors"].append("a sandbox from a snapshot with memory does not run the snapshot's process")
            child.kill()
        for count, key in ((1, "fork1_ms"), (10, "fork10_ms")):
            for _ in range(max(1, n // 2)):
                dl.check()
                t0 = time.monotonic()
                made = src.fork(count=count, timeout=60)
                forks = [f for f in made if isinstance(f, Sandbox)]
                for f in forks:
                    f.commands.run("true")
                out.setdefault(key, []).append(_ms(t0))
                if len(forks) != count:
                    out["errors"].append(f"fork of {count}: {[m for m in made if not isinstance(m, Sandbox)]}")
                for f in forks:
                    f.kill()
    except Exception as e:  # (the other rows stand)
        out["errors"].append(f"snapshots with memory: {e!r}")
    finally:
        client.kill(src)
        _delete_snapshots(idents, out["errors"])
    return out


def _delete_snapshots(idents: list[str], errors: list[str]) -> None:
    from e2b import Sandbox

    for ident in idents:
        try:
            Sandbox.delete_snapshot(ident)
        except Exception as e:
            errors.append(f"deleting snapshot {ident}: {e!r}")


def print_report(r: dict[str, Any]) -> None:
    print("\nlifecycle (median ms; floor measured in the same run; peer: CubeSandbox's published figure)")
    rows = [
        ("pause (frozen in memory)", "pause_ms", "floor_freeze_exec_ms", None),
        ("resume (frozen) -> first cmd", "resume_ms", "floor_freeze_exec_ms", "resume_ms"),
        ("pause to the files", "fs_pause_ms", None, None),
        ("resume (from files) -> first cmd", "fs_resume_ms", "floor_create_ms", None),
        (f"pause, {HELD_MB} MB in memory (frozen; aim <= 100)", "held_pause_ms", "floor_freeze_exec_ms", None),
        (
            f"resume, {HELD_MB} MB (frozen) -> first cmd (aim <= 40)",
            "held_resume_ms",
            "floor_freeze_exec_ms",
            "resume_ms",
        ),
        (f"pause to the files, {HELD_MB} MB in memory", "held_fs_pause_ms", None, None),
        (f"resume from files, {HELD_MB} MB dropped -> first cmd", "held_fs_resume_ms", "floor_create_ms", None),
        (f"snapshot of files ({DIRTY_MB} MB written)", "snapshot_ms", "floor_copy_ms", "snapshot_ms"),
        ("create from snapshot -> first cmd, pool", "from_snapshot_ms", "floor_create_ms", "from_snapshot_ms"),
        ("create from snapshot -> first cmd, first", "from_snapshot_first_ms", "floor_create_ms", "from_snapshot_ms"),
        ("pause, code interpreter (frozen)", "interp_pause_ms", "floor_freeze_exec_ms", None),
        ("resume, code interpreter -> run_code (frozen)", "interp_resume_ms", "floor_freeze_exec_ms", "resume_ms"),
        (
            f"snapshot with memory ({DIRTY_MB} MB dirty + {DIRTY_MB} MB files)",
            "mem_snapshot_ms",
            "floor_copy_ms",
            "snapshot_ms",
        ),
        (
            "create from memory snapshot -> first cmd, pool (aim <= 30)",
            "mem_from_snapshot_ms",
            "floor_create_ms",
            "from_snapshot_ms",
        ),
        (
            "create from memory snapshot -> first cmd, first (a restore)",
            "mem_from_snapshot_first_ms",
            "floor_create_ms",
            "from_snapshot_ms",
        ),
        ("fork, 1 child -> its first cmd", "fork1_ms", "floor_create_ms", None),
        ("fork, 10 children -> their first cmds (aim <= 200)", "fork10_ms", "floor_create_ms", None),
        ("create + volume -> first cmd, pool (floor: w/o)", "volume_create_ms", "plain_create_ms", None),
        ("volume: write 1 MiB through the content API", "volume_write_ms", None, None),
        ("volume: read 1 MiB through the content API", "volume_read_ms", None, None),
        ("pause to disk (API, until on disk), idle", "disk_idle_pause_ms", "pause_ms", None),
        ("resume from disk -> first cmd, idle", "disk_idle_resume_ms", "resume_ms", "resume_ms"),
        (f"pause to disk, {HELD_MB} MB in memory (aim <= 100)", "disk_100_pause_ms", "held_pause_ms", None),
        (
            f"resume from disk, {HELD_MB} MB -> first cmd (aim <= 40)",
            "disk_100_resume_ms",
            "held_resume_ms",
            "resume_ms",
        ),
        ("pause to disk, code interpreter", "disk_interp_pause_ms", "interp_pause_ms", None),
        ("resume from disk, code interpreter -> run_code", "disk_interp_resume_ms", "interp_resume_ms", "resume_ms"),
        ("checkpoint (runtime, CRIU), idle (floor: freeze)", "ckpt_idle_checkpoint_ms", "ckpt_idle_freeze_ms", None),
        ("restore (runtime, CRIU), idle (floor: thaw)", "ckpt_idle_restore_ms", "ckpt_idle_thaw_ms", "resume_ms"),
        (f"checkpoint, {HELD_MB} MB dirty (aim <= 100)", "ckpt_100_checkpoint_ms", "ckpt_100_freeze_ms", None),
        (f"restore, {HELD_MB} MB dirty (aim <= 40)", "ckpt_100_restore_ms", "ckpt_100_thaw_ms", "resume_ms"),
        ("checkpoint, 1 GB dirty", "ckpt_1g_checkpoint_ms", "ckpt_1g_freeze_ms", None),
        ("restore, 1 GB dirty", "ckpt_1g_restore_ms", "ckpt_1g_thaw_ms", None),
    ]
    for label, key, floor_key, peer_key in rows:
        if key not in r:
            continue
        ours = _med(r[key])
        # nearest rank (as run.py percentile): with few samples the largest, never below the median
        p95 = sorted(r[key])[max(0, math.ceil(0.95 * len(r[key])) - 1)] if r[key] else float("nan")
        line = f"  {label:50} p50 {ours:8.2f}  p95 {p95:8.2f}"
        if floor_key:
            floor = _med(r.get(floor_key, []))
            line += f"   floor {floor:7.2f} x{ours / floor:.2f}" if floor else ""
        if peer_key:
            peer = PEERS[peer_key]
            line += f"   peer {peer:5.0f} x{ours / peer:.2f} ({'PASS' if ours <= peer else 'MISS'})"
        print(line)
