"""Crash safety under load: SIGKILL the server at random moments while sandboxes are created, killed,
paused, resumed and written to, restart it, and check that nothing is lost and nothing leaks.

After every restart:
- every sandbox the clients know to exist (its create answered, no kill sent) is listed, resumable and
  runs a command; every listed sandbox works (no half-made one is listed);
- a sandbox whose kill was in flight is either fully there or fully gone;
- what is on the host (state dirs, cgroup dirs, loop devices of disk images) belongs to a listed
  sandbox or to the one pooled sandbox, and no host mount names the data dir;
- no upload's temporary file is left in any sandbox.
A final clean stop with --destroy-on-exit leaves nothing at all.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from e2b import Sandbox

from sandboxd.runtime import cgroups

from conftest import Server, loop_devices_under, start_server

ROUNDS = 6
SANDBOXES = 20
WORKERS = 4
# (pauses with memory go to disk at once: crashes come mid-dump, mid-restore and while sandboxes are on disk)
SERVER_ARGS = ("--pool-size", "1", "--prewarm", "base", "--checkpoint-after", "0")


def _env(srv: Server) -> dict[str, object]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url, "request_timeout": 15}


def _listed(srv: Server) -> dict[str, str]:
    with srv.api() as api:
        r = api.get("/v2/sandboxes", params={"state": "running,paused", "limit": 100})
        r.raise_for_status()
        return {s["sandboxID"]: s["state"] for s in r.json()}


def _instance_cgroups(data: Path) -> set[str]:
    """Sandbox cgroup dirs of the server with this data dir."""
    instance = cgroups.instance_name(data)
    found: set[str] = set()
    for inst in Path("/sys/fs/cgroup").glob(f"*/sandboxd/{instance}"):
        found.update(p.name for p in inst.iterdir() if p.is_dir())
    return found


class Load:
    """Workers doing random operations until stopped; records what the clients know for sure."""

    def __init__(self, srv: Server, live: set[str], rng: random.Random) -> None:
        self.srv, self.live, self.rng = srv, live, rng
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.doubtful: set[str] = set()  # a kill was in flight: may or may not have happened
        self.uploaded: set[str] = set()
        self.stopped: set[str] = set()  # paused to their files (their processes ended) at least once
        self.ops = 0

    def run(self) -> None:
        while not self.stop.is_set():
            op = self.rng.choice(["create", "kill", "upload", "upload", "pause", "snapshot", "fork"])
            try:
                getattr(self, op)()
                with self.lock:
                    self.ops += 1
            except Exception:
                if not self.stop.is_set():
                    time.sleep(0.01)

    def _pick(self) -> str | None:
        with self.lock:
            choices = sorted(self.live - self.doubtful)
        return self.rng.choice(choices) if choices else None

    def create(self) -> None:
        s = Sandbox.create(template="base", timeout=600, **_env(self.srv))  # type: ignore[arg-type]
        with self.lock:
            self.live.add(s.sandbox_id)

    def kill(self) -> None:
        with self.lock:
            if len(self.live) <= SANDBOXES // 2:
                return
        sid = self._pick()
        if sid is None:
            return
        with self.lock:
            self.doubtful.add(sid)
        with self.srv.api() as api:
            r = api.delete(f"/sandboxes/{sid}")
        if r.status_code in (204, 404):
            with self.lock:
                self.live.discard(sid)
                self.doubtful.discard(sid)

    def upload(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        s = Sandbox.connect(sid, **_env(self.srv))  # type: ignore[arg-type]
        with self.lock:
            self.uploaded.add(sid)
        s.files.write(f"/home/user/up-{self.rng.randrange(1000)}.bin", os.urandom(self.rng.choice([1, 2, 4]) << 20))

    def pause(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        memory = self.rng.choice([True, False])
        if not memory:
            with self.lock:
                self.stopped.add(sid)
        with self.srv.api() as api:  # frozen in memory (then written to disk), or stopped with its files kept
            api.post(f"/sandboxes/{sid}/pause", json={"memory": memory})
            time.sleep(self.rng.uniform(0, 0.3))
            api.post(f"/sandboxes/{sid}/connect", json={"timeout": 600})

    def snapshot(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        with self.srv.api() as api:  # (with memory: refused for a sandbox whose sleeper runs under its keeper)
            api.post(f"/sandboxes/{sid}/snapshots", json={"memory": self.rng.choice([True, False])})

    def fork(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        with self.srv.api() as api:  # (refused likewise for one with a sleeper: those the load made fork)
            r = api.post(f"/sandboxes/{sid}/fork", json={"count": self.rng.choice([1, 2]), "timeout": 600})
        if r.status_code == 201:
            with self.lock:
                self.live.update(m["sandbox"]["sandboxID"] for m in r.json() if "sandbox" in m)


def _delete_snapshots(srv: Server) -> None:
    """The snapshots of this server's sandboxes (named after them)."""
    with srv.api() as api:
        mine = set(_listed(srv)) | {e["sandboxID"] for e in api.get("/v2/sandboxes", params={"state": "killed"}).json()}
        for snap in api.get("/snapshots").json():
            if any(f"snapshot-{sid}-" in name for sid in mine for name in snap["names"]):
                api.delete(f"/templates/{snap['snapshotID']}")


def _check(srv: Server, data: Path, load: Load, sleepers: dict[str, int]) -> int:
    listed = _listed(srv)
    known = load.live - load.doubtful
    assert known <= set(listed), f"sandboxes lost by the crash: {sorted(known - set(listed))}"
    for sid in load.doubtful:  # a kill in flight: all there (then it is live again) or all gone
        if sid in listed:
            load.live.add(sid)
        else:
            load.live.discard(sid)
            assert not (data / "sandboxes" / sid).exists(), f"{sid}: half killed (state dir left)"
            assert sid not in _instance_cgroups(data), f"{sid}: half killed (cgroups left)"
    load.doubtful.clear()

    def works(sid: str) -> None:
        s = Sandbox.connect(sid, timeout=600, **_env(srv))  # type: ignore[arg-type]  # resumes a paused one
        assert s.commands.run("echo ok").stdout == "ok\n", sid
        if sid in sleepers and sid not in load.stopped:  # its process outlived every crash (envd/kept.py)
            assert sleepers[sid] in [p.pid for p in s.commands.list()], f"{sid}: its running process was lost"
        if sid in load.uploaded:
            left = s.commands.run("ls -a /home/user").stdout.split()
            assert not [n for n in left if n.startswith(".sandboxd-upload-")], (sid, left)

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(works, sorted(listed)))
    load.live.update(listed)  # creates whose answer the crash swallowed are real sandboxes too

    # The host: only listed sandboxes and the pooled one have state, cgroups and disks; no snapshot's images or
    # handshake is left in them.
    dirs = {p.name for p in (data / "sandboxes").iterdir()}
    for d in dirs:
        left = [p.name for p in (data / "sandboxes" / d).iterdir() if p.name.startswith((".snapshot-", "snapshot-"))]
        assert not left, f"{d}: a snapshot's leftovers: {left}"
    extra = dirs - set(listed)
    assert len(extra) <= 1, f"state dirs of no listed sandbox (a half-made one?): {sorted(extra)}"
    cgroups = _instance_cgroups(data)
    assert cgroups <= dirs, f"cgroups without a sandbox: {sorted(cgroups - dirs)}"
    assert len(loop_devices_under(data)) <= len(dirs)
    with open("/proc/mounts") as f:
        assert str(data) not in f.read(), "a host mount names the data dir"
    return len(listed)


def test_sigkill_at_random_moments_under_load(tmp_path: Path) -> None:
    seed = int(os.environ.get("SANDBOXD_CRASH_SEED", time.time()))
    rng = random.Random(seed)
    data = tmp_path / "data"
    srv = start_server(data, *SERVER_ARGS, keep=True)
    port = int(srv.url.rsplit(":", 1)[1])
    live: set[str] = set()
    handles = []
    sleepers: dict[str, int] = {}
    stopped: set[str] = set()
    ops = 0
    try:
        with ThreadPoolExecutor(4) as ex:
            made = list(ex.map(lambda _: Sandbox.create(template="base", timeout=600, **_env(srv)), range(SANDBOXES)))
        for s in made:
            live.add(s.sandbox_id)
            handles.append(s.commands.run("sleep 100000", background=True))  # open streams at the crash
            sleepers[s.sandbox_id] = handles[-1].pid
        for rnd in range(ROUNDS):
            load = Load(srv, live, rng)
            load.stopped = stopped
            workers = [threading.Thread(target=load.run, daemon=True) for _ in range(WORKERS)]
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.2, 1.5))
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(timeout=30)
            load.stop.set()
            for w in workers:
                w.join(timeout=60)
            srv = start_server(data, *SERVER_ARGS, port=port, keep=True)
            try:
                checked = _check(srv, data, load, sleepers)
            except AssertionError as e:
                raise AssertionError(f"round {rnd} (seed {seed}, {load.ops} operations done): {e}") from None
            live = load.live
            ops += load.ops
            print(f"round {rnd}: {load.ops} operations, crash, {checked} sandboxes checked after the restart")
        assert ops >= ROUNDS * 5, f"the load did too little to mean anything ({ops} operations)"
    finally:
        with contextlib.suppress(Exception):
            srv.stop()
        final = start_server(data, port=port)  # destroys everything at its exit
        _delete_snapshots(final)  # (in the shared templates dir; a crash may have swallowed their IDs)
        assert final.stop() == 0
    assert not list((data / "sandboxes").iterdir()), "a clean stop after the crashes left sandboxes behind"
    assert not loop_devices_under(data)
    assert not _instance_cgroups(data)


def test_an_upload_cut_by_a_crash_leaves_no_temporary_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, "--prewarm", "", keep=True)
    port = int(srv.url.rsplit(":", 1)[1])
    sbx = Sandbox.create(template="base", timeout=600, **_env(srv))  # type: ignore[arg-type]
    hold = threading.Event()

    def body():
        yield b"x" * (1 << 20)
        hold.wait(30)  # the rest never comes: the server dies first
        yield b"y"

    def upload() -> None:
        with contextlib.suppress(Exception):
            httpx.post(
                srv.url + "/files",
                params={"path": "/home/user/big.bin", "username": "user"},
                headers={
                    "E2b-Sandbox-Id": sbx.sandbox_id,
                    "X-Access-Token": sbx._envd_access_token,
                    "Content-Type": "application/octet-stream",
                },
                content=body(),
                timeout=60,
            )

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    tmp_names: list[str] = []
    for _ in range(200):
        tmp_names = [
            n for n in sbx.commands.run("ls -a /home/user").stdout.split() if n.startswith(".sandboxd-upload-")
        ]
        if tmp_names:
            break
        time.sleep(0.05)
    assert tmp_names, "the upload's temporary file never appeared"
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(timeout=30)
    hold.set()
    t.join(30)
    srv = start_server(data, port=port)
    try:
        again = Sandbox.connect(sbx.sandbox_id, **_env(srv))  # type: ignore[arg-type]
        left = again.commands.run("ls -a /home/user").stdout.split()
        assert not [n for n in left if n.startswith(".sandboxd-upload-")], left
        assert "big.bin" not in left  # and no partial file under the target name either
        assert "removed 1 temporary file" in srv.log()
    finally:
        assert srv.stop() == 0


def test_a_pause_cut_by_a_crash_does_not_leave_a_frozen_running_sandbox(tmp_path: Path) -> None:
    # The crash came after the freezer froze the sandbox and before the record said "paused".
    from conftest import cgroup_dir

    data = tmp_path / "data"
    srv = start_server(data, "--prewarm", "", keep=True)
    port = int(srv.url.rsplit(":", 1)[1])
    sbx = Sandbox.create(template="base", timeout=600, **_env(srv))  # type: ignore[arg-type]
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(timeout=30)
    freezer = cgroup_dir("freezer", sbx.sandbox_id) / "freezer.state"
    unified = cgroup_dir("unified", sbx.sandbox_id) / "cgroup.freeze"
    target, value = (freezer, "FROZEN") if freezer.exists() else (unified, "1")
    target.write_text(value)
    srv = start_server(data, port=port)
    try:
        again = Sandbox.connect(sbx.sandbox_id, **_env(srv))  # type: ignore[arg-type]
        assert again.commands.run("echo thawed", timeout=20).stdout == "thawed\n"
    finally:
        assert srv.stop() == 0


JOINER = r"""
import os, random, sys, time
paths = sys.argv[1:]
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    pid = os.fork()
    if pid == 0:  # a "helper": joins, then starts its "init" in there
        try:
            for p in paths:
                with open(p + "/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
        except OSError:
            os._exit(3)  # the cgroup is gone: nothing can join any more
        child = os.fork()
        if child == 0:
            time.sleep(1000)
            os._exit(0)
        print(os.getpid(), child, flush=True)
        time.sleep(1000)
        os._exit(0)
    _, status = os.waitpid(pid, 0)  # killed by the destroy (or could not join)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3:
        break
    time.sleep(random.uniform(0, 0.002))  # the next one comes a moment after
"""


def _cgroup_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def test_processes_joining_during_the_sweep_do_not_survive_it() -> None:
    """A helper left running by a server that died mid-create joins the sandbox's cgroups at any moment,
    also while the next server's sweep destroys them. No destroy may end with a process inside. (Each
    round races the destroy against one process after another joining, each a moment after the last
    was killed, as a left-over helper and its init would.)"""
    layout = cgroups.detect()
    instance = "itest" + os.urandom(4).hex()
    try:
        for rnd in range(ROUNDS * 8):
            cg = cgroups.SandboxCgroups(layout, instance, f"joinrace{rnd}")
            cg.create(64, 1.0, 64)
            joiner = subprocess.Popen([sys.executable, "-c", JOINER, *cg.paths], stdout=subprocess.PIPE, text=True)
            try:
                assert joiner.stdout is not None
                first = joiner.stdout.readline()  # one has joined: destroy now, while more keep coming
                assert first.strip(), "the joiner could not join the test cgroup"
                cg.destroy()
                assert not any(p.exists() for p in cg.dirs.values()), f"round {rnd}: the cgroups are still there"
                assert joiner.wait(timeout=30) == 0, "the joiner did not stop after the cgroups were removed"
                joined = [int(x) for x in (first + joiner.stdout.read()).split()]
                survivors = [p for p in joined if f"/joinrace{rnd}\n" in _cgroup_of(p)]
                assert not survivors, f"round {rnd}: processes {survivors} survived the destroy in its cgroup"
            finally:
                if joiner.poll() is None:
                    joiner.kill()
                    joiner.wait()
                with contextlib.suppress(cgroups.CgroupError):
                    cg.destroy(timeout=2)
    finally:
        cgroups.remove_instance(layout, instance)
