"""The default backend: Linux namespaces + overlayfs + cgroups + seccomp, driven by `sbxhelper`.

One sandbox costs one idle process (its PID 1, `sandbox-init`), a few namespaces, an overlay mount
that exists only inside the sandbox's own mount namespace, and cgroup directories. There is no shim,
no monitor and no per-sandbox daemon on the host. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import math
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sandboxd.fdio import syncfs
from sandboxd.runtime import cgroups, criu_images, identity, network, pids, quota, tcp_conns, terminals, views
from sandboxd.runtime.base import (
    Checkpoint,
    Egress,
    ExecSpec,
    Keep,
    Runtime,
    RuntimeError_,
    SandboxHandle,
    SandboxSpec,
    SnapshotImages,
    Stats,
)
from sandboxd.runtime.native import compiled_filter, helper_path, init_mount, sealed_copy
from sandboxd.runtime.terminals import Terminals
from sandboxd.templates.uids import UID_SHIFT

log = logging.getLogger(__name__)

CLOSE_WAIT = 30.0  # s, at most, that close() waits for destroys under way (a destroy gives up after 10)
HELPER_WAIT = 10.0  # s, at most, that a cancelled create waits for its helper before cleaning up


_libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


DETACH_WAIT = 10.0  # s, at most, for a stopped sandbox's disk image to be let go of by the kernel
NS_PINS = "ns"  # in a checkpointed sandbox's state dir: files its UTS and network namespaces are bound onto
NS_GET_NSTYPE = 0xB703
CLONE_NEWUTS, CLONE_NEWNET = 0x04000000, 0x40000000
MS_BIND = 4096


def _pin_namespaces(state_dir: Path, uts_fd: int, netns_fd: int) -> None:
    """Bind the namespaces onto files of the state dir (mounts of the host's mount namespace: they outlive us)."""
    pins = state_dir / NS_PINS
    pins.mkdir(mode=0o700, exist_ok=True)
    for name, fd in (("uts", uts_fd), ("net", netns_fd)):
        target = pins / name
        target.touch(mode=0o400)
        source = f"/proc/self/fd/{fd}".encode()
        if _libc.mount(source, str(target).encode(), None, MS_BIND, None) != 0:
            err = ctypes.get_errno()
            _unpin_namespaces(state_dir)
            raise RuntimeError_(f"pinning the {name} namespace of {state_dir.name} failed: {os.strerror(err)}")


def _unpin_namespaces(state_dir: Path) -> None:
    pins = state_dir / NS_PINS
    for name in ("uts", "net"):
        while _libc.umount2(str(pins / name).encode(), MNT_DETACH) == 0:  # (once each; twice after a crash mid-pin)
            pass
    shutil.rmtree(pins, ignore_errors=True)


def _wait_detached(image: Path) -> None:
    if not image.is_file():
        return
    deadline = time.monotonic() + DETACH_WAIT
    while quota.loop_device_of(image) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError_(
                f"{image} is still attached to a loop device {DETACH_WAIT:.0f} s after its sandbox ended"
            )
        time.sleep(0.005)


def _copy_tree(src: Path, dest: Path) -> None:
    """`src`'s contents into the new directory `dest`: owners, modes, times, xattrs (overlayfs's opaque
    marks), device nodes (its whiteouts) as they are; shared blocks where the filesystem can."""
    dest.mkdir()
    res = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError_(f"copying {src} failed: {res.stderr.strip()[-500:]}")


def env_memfd(env: dict[str, str]) -> int:
    """The environment as `K=V\\0` records in a sealed memfd (read by `sbxhelper exec --env-fd`)."""
    parts = []
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ValueError(
                f"invalid environment variable {k!r}: names must be non-empty without '=' or NUL, values without NUL"
            )
        parts.append(f"{k}={v}\0".encode(errors="surrogateescape"))
    fd = os.memfd_create("env", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        data = memoryview(b"".join(parts))
        while data:
            data = data[os.write(fd, data) :]
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _socket_in_netns(pid: int, start: int) -> socket.socket:
    """A TCP socket that belongs to the network namespace of the sandbox whose init is `pid` started at
    `start` (runs in the netns thread). setns goes through a checked pidfd, not /proc/<pid>/ns/net: a
    recycled PID cannot hand us another process's namespace."""
    fd = pids.open_checked(pid, start=start)
    try:
        network.setns(fd)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            network.setns(network.HOST_NETNS)
    finally:
        os.close(fd)


STAGED_IMAGES = "snapshot-images"  # in a sandbox's state dir while it is restored from a snapshot
HANDSHAKE_WAIT = 60.0  # s: CRIU writing a snapshot's processes, at most


def _wait_told(fd: int, proc: subprocess.Popen[bytes]) -> bool:
    """True once CRIU's post-dump action said "dumped" on the FIFO `fd`; False if CRIU ended without."""
    deadline = time.monotonic() + HANDSHAKE_WAIT
    got = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            with contextlib.suppress(BlockingIOError):
                got += os.read(fd, 16)
            if got == b"dumped\n":
                return True
    return False


def _answer_go(path: Path, answer: bytes) -> None:
    """The answer to CRIU's post-dump action, waiting on its end of the FIFO (ENXIO: not open yet)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                return  # (it gave up: CRIU undoes the dump)
            time.sleep(0.005)
    try:
        os.write(fd, answer)
    finally:
        os.close(fd)


def _criu_errors(log: Path, stderr: bytes, limit: int = 5) -> str:
    """What went wrong, for a message: the helper's own words, and CRIU's first errors from its log."""
    lines = [stderr.decode(errors="replace").strip()]
    with contextlib.suppress(OSError):
        with open(log, errors="replace") as f:
            lines += [line.strip() for line in f if "Error" in line][:limit]
    return "; ".join(line for line in lines if line) or "no reason given"


class NamespaceRuntime(Runtime):
    keeps_processes = True
    name = "namespaces"

    def __init__(
        self,
        state_dir: Path,
        favor_dynmods: bool = True,
        uid_base: int | None = None,
        network_cidr: str | None = None,
        network_cidr6: str | None = "auto",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.on_destroyed = []
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.disks = quota.Disks(self.state_dir / "images")  # formatted disk images, one per size
        helper_file = helper_path(self.state_dir / "bin")
        self._helper_fd = sealed_copy(helper_file)
        # init's program, one read-only copy for all sandboxes (a detached tmpfs this fd holds: init_mount)
        self._init_fd = init_mount(helper_file)
        self.init_mount = f"/proc/{os.getpid()}/fd/{self._init_fd}"
        self.helper = f"/proc/{os.getpid()}/fd/{self._helper_fd}"
        self._filter_fd = compiled_filter(self.helper)
        self.filter = f"/proc/{os.getpid()}/fd/{self._filter_fd}"  # every create, exec and broker loads it
        # setns() changes only the calling thread's network namespace: one thread does it, and switches back.
        self._netns_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandboxd-netns")
        self.layout = cgroups.detect()
        if favor_dynmods:
            cgroups.favor_dynamic_modifications(self.layout)
        self.instance = cgroups.instance_name(self.state_dir)
        self.cpus = cgroups.host_cpus(self.layout)
        self._on_cpu: Counter[int] = Counter()  # sandboxes whose cpuset holds each CPU
        self._cpus_of: dict[str, list[int]] = {}
        self._meminfo: dict[str, str] = {}  # the meminfo last written into each sandbox
        self._destroys = threading.Condition()
        self._destroying = 0  # destroys running in threads
        self._host_ram = views.host_ram()
        self._view_lock = threading.Lock()
        self._server_cgroup = cgroups.ServerCgroup(self.layout, self.instance)
        self.ids = identity.UidAllocator(
            first=uid_base if uid_base is not None else identity.default_first(self.instance)
        )
        self.ids.check_host()
        if "memory" not in self.layout.v1 and "memory" not in self.layout.v2_controllers:
            raise RuntimeError_(
                "no memory cgroup controller found: sandboxd needs cgroup v1 memory or cgroup v2 with the "
                "memory controller enabled"
            )
        # Sandbox networking (runtime/network.py); None: sandboxes have their loopback only.
        self.net: network.HostNetwork | None = None
        self._adopted_egress: dict[str, Egress] = {}
        if network_cidr:
            if network_cidr6 == "auto":  # IPv6 too when the host has it
                network_cidr6 = network.default_cidr6(self.instance) if network.host_has_ipv6() else None
            self.net = network.HostNetwork(self.instance, network_cidr, self._netns_thread, cidr6=network_cidr6 or None)
            try:
                if not self.net.installed():  # a previous run's table stays until sweep() re-installs it
                    self.net.install([])
            except BaseException:
                self.net.close()
                raise

    async def create(
        self,
        spec: SandboxSpec,
        restore: Checkpoint | None = None,
        inherit: Sequence[tuple[int, str]] = (),
        volumes: Sequence[Path] = (),
        from_images: SnapshotImages | None = None,
        terminals: Terminals | None = None,
    ) -> SandboxHandle:
        """A new sandbox (with `from_images`: the processes of a snapshot, restored into it); or, with `restore`,
        the one `checkpoint` wrote (its processes and memory again, in the namespaces it held;
        `spec.resume_uid_base` is its uid range). `inherit`: (fd, CRIU's name of a file of
        the checkpoint, as "pipe:[INODE]"): the restored processes get our fd instead of that file (the other
        end of the pipes to their keepers, which stayed outside the checkpoint: envd/kept.py), or "tty[RDEV:DEV]"
        (a new slave of `terminals`, runtime/terminals.py, which becomes its /dev/pts). `volumes`: the host
        directories of the volumes the checkpoint had mounted (`checkpoint`'s `volumes`, in its order)."""
        sdir = self.sandboxes_dir / spec.sandbox_id
        resuming = spec.resume_uid_base is not None
        if restore is not None and not resuming:
            raise ValueError("a restore boots a sandbox again: spec.resume_uid_base must be its uid range")
        if resuming:  # what a boot makes anew (a crash mid-stop may have left the last one's)
            shutil.rmtree(sdir / views.VIEW_DIR, ignore_errors=True)
            await asyncio.to_thread(_wait_detached, sdir / quota.IMAGE_NAME)
        for name in ("lower", "merged"):
            (sdir / name).mkdir(parents=True, exist_ok=True)
        base = spec.resume_uid_base if spec.resume_uid_base is not None else self.ids.allocate()
        cg = self._cgroups(spec.sandbox_id)
        net: network.Prepared | None = None
        # The network namespace (ready, or made now) while the disk and cgroups are prepared; a restore has its
        # own again, unless a host reboot took them (it gets new ones, as a new sandbox from a snapshot does).
        new_ns = restore is None or not restore.namespaces_held
        net_task = asyncio.ensure_future(self.net.take()) if self.net is not None and new_ns else None
        disk_args: list[str] = []
        try:
            if spec.limits.disk_mb:
                # Its own disk (runtime/quota.py): upper and work are in an image the helper mounts.
                try:
                    disk_args = await asyncio.to_thread(self.disks.prepare, sdir, spec.limits.disk_mb)
                except (OSError, quota.DiskError) as e:
                    raise RuntimeError_(f"sandbox {spec.sandbox_id}: making its disk failed: {e}") from e
                # (the helper gives the image's upper dir to this sandbox's root once it is mounted)
            else:
                upper, work = sdir / "upper", sdir / "work"
                for d in (upper, work):
                    d.mkdir(exist_ok=True)
                if not resuming:  # The overlay's root directory takes the upper dir's owner: sandbox root.
                    os.chown(upper, base, base)
                    os.chmod(upper, 0o755)
            staged: Path | None = None
            if from_images is not None:  # its own copy, for its uid range (runtime/criu_images.py)
                staged = sdir / STAGED_IMAGES
                shutil.rmtree(staged, ignore_errors=True)
                try:
                    await asyncio.to_thread(
                        criu_images.stage, from_images.images, staged, from_images.uid_base, base, identity.RANGE
                    )
                except (OSError, criu_images.ImageError) as e:
                    raise RuntimeError_(f"sandbox {spec.sandbox_id}: its snapshot's images: {e}") from e
            cpus = self._pick_cpus(spec.sandbox_id, spec.limits.cpu_count)
            cg.create(spec.limits.memory_mb, spec.limits.cpu_count, spec.limits.pids, cpus)
            view = views.stage(sdir, self._memory_total(spec.limits.memory_mb), cpus or self.cpus)
            if net_task is not None:
                net = await net_task
            argv = [
                self.helper,
                "create",
                *(arg for layer in spec.layers for arg in ("--lower", str(layer))),
                "--state-dir",
                str(sdir),
                "--hostname",
                spec.hostname,
                "--seccomp",
                self.filter,
                "--view",
                str(view),
                "--shift",
                str(base),
                "--range",
                str(identity.RANGE),
                "--idmap-from",
                str(UID_SHIFT),
                "--init-mount",
                self.init_mount,
            ]
            for path in cg.paths:
                argv += ["--cgroup", path]
            if restore is not None and not new_ns:  # its namespaces as it left them (the resolver in its files)
                me = os.getpid()
                argv += ["--netns", f"/proc/{me}/fd/{restore.netns_fd}", "--uts", f"/proc/{me}/fd/{restore.uts_fd}"]
            elif net is not None and self.net is not None:
                argv += ["--netns", f"/proc/{os.getpid()}/fd/{net.fd}", "--resolv", f"nameserver {self.net.gateway}\n"]
            # CRIU's images: a checkpoint's; or a snapshot's, staged (in a UTS namespace of its own, its hostname)
            images = restore.images if restore is not None else staged
            criu = restore.criu if restore is not None else from_images.criu if from_images is not None else None
            if images is not None and criu is not None:
                argv += ["--restore", str(images), "--criu", str(criu)]
                for fd, key in inherit:
                    argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
                for source in volumes:
                    argv += ["--volume", str(source)]
                if terminals is not None and terminals.devpts is not None:
                    argv += ["--devpts-fd", str(terminals.devpts)]
            argv += disk_args
            if resuming:
                argv += ["--resume", "1"]
            for src, dst in spec.binds:
                argv += ["--ro-copy", f"{src}:{dst}"]
            # Popen uses vfork: the event loop is not held up by copying the server's page tables, as a
            # fork() would (uvloop's subprocess forks). The helper's wait happens in a thread.
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                pass_fds=[fd for fd, _ in inherit] + ([terminals.devpts] if terminals and terminals.devpts else []),
                env={},  # init's environment is readable inside the sandbox: nothing of the server's
            )
            helper = asyncio.ensure_future(asyncio.to_thread(proc.communicate))
            try:
                out, err = await asyncio.shield(helper)
            except asyncio.CancelledError:
                # (a pool refill cancelled at shutdown) the helper runs on regardless: wait for it, so that
                # the init it may still fork is in the cgroups when the cleanup below empties them
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(helper), HELPER_WAIT)
                raise
            finally:
                if self.net is not None and new_ns:
                    self.net.refill()  # the next sandbox's namespace, now that this one's helper is done
            if proc.returncode != 0:
                reason = err.decode(errors="replace").strip()
                if staged is not None:
                    reason = _criu_errors(staged / "restore.log", err)
                raise RuntimeError_(f"creating sandbox {spec.sandbox_id} failed: {reason}")
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            pid = int(out.split()[0])
            start = pids.start_time(pid)
            if start is None:
                raise RuntimeError_(f"sandbox {spec.sandbox_id}: init process {pid} died at start")
        except BaseException:
            cg.destroy()
            if not resuming:  # a stopped sandbox's files and uid range stay for the next try
                shutil.rmtree(sdir, ignore_errors=True)
                self.ids.release(base)
            self._release_cpus(spec.sandbox_id)
            if net_task is not None and net is None:
                net_task.cancel()
                with contextlib.suppress(BaseException):
                    net = await net_task
            if net is not None and self.net is not None:
                self.net.give_back(net)
            raise
        if net is not None:
            net.close()  # the sandbox holds its namespace now: it goes with the sandbox's last process
        if restore is not None:
            restore.release()  # the restored sandbox holds its namespaces again
            restored = replace(restore.handle, init_pid=pid, init_start_time=start, cgroups=cg.paths)
            if net is not None:
                restored = replace(restored, address=net.address, address6=net.address6)
            return restored
        return SandboxHandle(
            sandbox_id=spec.sandbox_id,
            backend=self.name,
            init_pid=pid,
            init_start_time=start,
            state_dir=sdir,
            cgroups=cg.paths,
            uid_base=base,
            address=net.address if net is not None else "",
            address6=net.address6 if net is not None else "",
        )

    def exec_argv(
        self, handle: SandboxHandle, spec: ExecSpec, report_fd: int | None = None, env_fd: int | None = None
    ) -> list[str]:
        argv = [
            self.helper,
            "exec",
            "--pid",
            str(handle.init_pid),
            "--pid-start",
            str(handle.init_start_time),
            "--uid",
            str(spec.uid),
            "--gid",
            str(spec.gid),
            "--cwd",
            spec.cwd,
            "--seccomp",
            self.filter,
        ]
        for g in spec.groups:
            argv += ["--group", str(g)]
        for path in handle.cgroups:
            argv += ["--cgroup", path]
        if spec.pty:
            argv.append("--pty")
        if report_fd is not None:
            argv += ["--report-fd", str(report_fd)]
        if env_fd is not None:
            argv += ["--env-fd", str(env_fd)]
        return [*argv, "--", *spec.argv]

    def spawn_exec(
        self,
        handle: SandboxHandle,
        spec: ExecSpec,
        stdio: tuple[int, int, int],
        report_fd: int | None = None,
        keep: Keep | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `spec` in the sandbox. The helper runs with an empty environment: the command's comes on a
        sealed memfd that it reads only once inside the sandbox, as the user (sbxhelper.c, read_env)."""
        env_fd = env_memfd(spec.env)
        try:
            fds = [env_fd] if report_fd is None else [env_fd, report_fd]
            # Popen uses vfork + exec of the small helper: well under a millisecond.
            argv = self.exec_argv(handle, spec, report_fd=report_fd, env_fd=env_fd)
            if keep is not None:
                fds.append(keep.session_fd)
                argv[2:2] = ["--keep", str(keep.dir), "--session-fd", str(keep.session_fd)]
                argv[2:2] = ["--keep-bytes", str(keep.log_bytes)]
                if keep.pty is not None:
                    fds += keep.pty
                    argv[2:2] = ["--pty-master-fd", str(keep.pty[0]), "--pty-slave-fd", str(keep.pty[1])]
                if keep.adopt is not None:
                    fds += [fd for fd in keep.adopt_fds if fd >= 0]
                    adopt, ends = ":".join(map(str, keep.adopt)), ":".join(map(str, keep.adopt_fds))
                    argv[2:2] = ["--adopt", adopt, "--adopt-fds", ends]
            return subprocess.Popen(
                argv,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                pass_fds=fds,
                env={},
                close_fds=True,
            )
        finally:
            os.close(env_fd)

    def open_pty(self, handle: SandboxHandle) -> tuple[int, int]:
        return terminals.open_in_root(str(self.root_path(handle)))

    async def connect_tcp(self, handle: SandboxHandle, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(
                self._netns_thread, _socket_in_netns, handle.init_pid, handle.init_start_time
            )
        except pids.ProcessChanged:
            raise ConnectionRefusedError(f"sandbox {handle.sandbox_id} is gone") from None
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock

    def broker_argv(self, handle: SandboxHandle, uid: int, gid: int, groups: tuple[int, ...]) -> list[str]:
        argv = [self.helper, "broker", "--pid", str(handle.init_pid), "--pid-start", str(handle.init_start_time)]
        argv += ["--seccomp", self.filter]
        argv += ["--uid", str(uid), "--gid", str(gid)]
        for g in groups:
            argv += ["--group", str(g)]
        for path in handle.cgroups:
            argv += ["--cgroup", path]
        return argv

    async def attach_volume(self, handle: SandboxHandle, source: Path, path: str) -> None:
        argv = [
            self.helper,
            "attach",
            "--pid",
            str(handle.init_pid),
            "--pid-start",
            str(handle.init_start_time),
            "--src",
            str(source),
            "--dst",
            path,
            "--idmap-from",
            str(UID_SHIFT),
            "--shift",
            str(handle.uid_base),
            "--range",
            str(identity.RANGE),
        ]
        res = await asyncio.to_thread(subprocess.run, argv, capture_output=True, env={})
        if res.returncode != 0:
            reason = res.stderr.decode(errors="replace").strip()
            raise RuntimeError_(f"sandbox {handle.sandbox_id}: mounting a volume at {path} failed: {reason}")

    def is_alive(self, handle: SandboxHandle) -> bool:
        return pids.start_time(handle.init_pid) == handle.init_start_time

    def _cgroups(self, sandbox_id: str) -> cgroups.SandboxCgroups:
        return cgroups.SandboxCgroups(self.layout, self.instance, sandbox_id)

    async def destroy(self, handle: SandboxHandle, keep_upper: Path | None = None) -> None:
        # One thread does the whole destroy and gives the sandbox's uid range and address back: a caller
        # cancelled meanwhile (a request, the reaper at shutdown) cannot leave them held; close() waits.
        await asyncio.to_thread(self._destroy_and_release, handle, keep_upper)
        self._forget_running(handle.sandbox_id)
        for hook in self.on_destroyed:
            try:
                hook(handle.sandbox_id)
            except Exception:
                log.exception("after destroying sandbox %s", handle.sandbox_id)

    async def set_egress(self, handle: SandboxHandle, egress: Egress, cut: bool = True) -> None:
        if not handle.address or self.net is None:
            if egress.default:
                return
            raise RuntimeError_("this sandbox has no network (the server runs without networking)")
        await asyncio.to_thread(self.net.set_egress, handle.address, egress, cut)
        handle.egress = egress.to_json()

    def adopt(self, handle: SandboxHandle) -> None:
        self.ids.claim(handle.uid_base)
        for stale in handle.state_dir.glob(".snapshot-*"):  # a snapshot's handshake a crash cut short
            shutil.rmtree(stale, ignore_errors=True)
        if handle.address and self.net is not None:
            self.net.claim(handle.address)
            self._adopted_egress[handle.address] = Egress.from_json(handle.egress)
        text = self._cgroups(handle.sandbox_id).read("cpuset", "cpuset.cpus")
        cpus = cgroups.parse_cpu_list(text) if text else []
        if cpus and len(cpus) < len(self.cpus):
            self._cpus_of[handle.sandbox_id] = cpus
            self._on_cpu.update(cpus)

    # -- the sandbox's CPUs and its view of them and of its memory (runtime/views.py) --------------
    def _pick_cpus(self, sandbox_id: str, cpu_count: float) -> list[int] | None:
        """The CPUs for a new sandbox: as many as its CPU limit rounded up, those the fewest sandboxes
        hold (lowest first); None when that is every CPU of the host (no cpuset restriction)."""
        n = max(1, math.ceil(cpu_count))
        if n >= len(self.cpus):
            return None
        chosen = sorted(sorted(self.cpus, key=lambda c: (self._on_cpu[c], c))[:n])
        self._cpus_of[sandbox_id] = chosen
        self._on_cpu.update(chosen)
        return chosen

    def _release_cpus(self, sandbox_id: str) -> None:
        self._on_cpu.subtract(self._cpus_of.pop(sandbox_id, []))

    def _memory_total(self, memory_mb: int) -> int:
        """What the sandbox's meminfo calls its RAM: its limit, or the host's RAM if that is less."""
        limit = memory_mb * 1024 * 1024
        return min(limit, self._host_ram) if self._host_ram else limit

    def refresh_view(self, handle: SandboxHandle) -> None:
        # Samples run in worker threads and may overlap: reading and writing under one lock, the last
        # write always carries the newest reading.
        with self._view_lock:
            cg = self._cgroups(handle.sandbox_id)
            if "memory" in cg.dirs:
                usage, limit = cg.read("memory", "memory.usage_in_bytes"), cg.read("memory", "memory.limit_in_bytes")
                stat_text = cg.read("memory", "memory.stat")
            else:
                usage, limit = cg.read("unified", "memory.current"), cg.read("unified", "memory.max")
                stat_text = cg.read("unified", "memory.stat")
            if not usage or not limit or not limit.strip().isdigit():
                return  # gone, or no limit to show
            total = self._memory_total(int(limit) // (1024 * 1024))
            text = views.meminfo(total, int(usage), views.memory_stat(stat_text or ""))
            if self._meminfo.get(handle.sandbox_id) == text:
                return
            # through /proc/<init>/root: only while that PID is this sandbox's init, checked on both sides
            if self.is_alive(handle) and views.refresh(self.root_path(handle), text) and self.is_alive(handle):
                self._meminfo[handle.sandbox_id] = text

    async def stop(self, handle: SandboxHandle) -> None:
        await asyncio.to_thread(self._stop_and_release, handle)
        self._forget_running(handle.sandbox_id)

    def _end_processes(self, handle: SandboxHandle) -> None:
        """Its processes and cgroups go; its mounts lived only in its mount namespaces, gone with them; the state
        dir (upper and work dirs, or its disk image) stays, but for what a boot makes anew. Its own disk is let
        go of by the kernel (unmounted, its loop device detached, which the kernel does after the last process)
        before this returns: a boot before would mount the image twice."""
        self._cgroups(handle.sandbox_id).destroy()
        shutil.rmtree(handle.state_dir / views.VIEW_DIR, ignore_errors=True)
        _wait_detached(handle.state_dir / quota.IMAGE_NAME)

    def _forget_running(self, sandbox_id: str) -> None:
        """What only a running sandbox has here: its CPUs and its memory view's last figures."""
        self._release_cpus(sandbox_id)
        self._meminfo.pop(sandbox_id, None)

    def _stop_and_release(self, handle: SandboxHandle) -> None:
        with self._destroys:
            self._destroying += 1
        try:
            self._end_processes(handle)
            # Its writable layer was a volatile overlay (no syncs while it ran): on disk now, so that a boot
            # from it after a host crash finds it whole (sbxhelper create --resume).
            image = handle.state_dir / quota.IMAGE_NAME
            target = image if image.is_file() else handle.state_dir / "upper"
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if target is image:
                    os.fsync(fd)
                else:
                    syncfs(fd)
            finally:
                os.close(fd)
            if handle.address and self.net is not None:
                self.net.release(handle.address)
        finally:
            with self._destroys:
                self._destroying -= 1
                self._destroys.notify_all()

    def hold(self, handle: SandboxHandle) -> None:
        self.ids.claim(handle.uid_base)

    async def checkpoint(
        self,
        handle: SandboxHandle,
        images: Path,
        criu: Path,
        volumes: Sequence[str] = (),
        external: Collection[str] = (),
    ) -> Checkpoint:
        """Write the sandbox's processes (everything under its init: memory, files, pipes, sockets) into
        `images` with CRIU and end them; its files, uid range, address and its UTS and network namespaces
        stay (held by the returned Checkpoint, and pinned in its state dir) for `create(spec, restore=...)`, and its
        cgroups with the keepers of its commands."""
        uts = os.open(f"/proc/{handle.init_pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        try:
            netns = os.open(f"/proc/{handle.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(uts)
            raise
        sdir = handle.state_dir
        held = Checkpoint(handle, images, criu, uts, netns, on_release=lambda: _unpin_namespaces(sdir))
        try:
            if pids.start_time(handle.init_pid) != handle.init_start_time:
                raise RuntimeError_(f"sandbox {handle.sandbox_id} is not running")
            tcp = await asyncio.to_thread(self._tcp_not_carried, handle, False)
            if tcp is not None:  # (one end elsewhere: it would come back talking to nothing)
                raise RuntimeError_(f"sandbox {handle.sandbox_id} has {tcp}, which a checkpoint cannot carry")
            # Pinned by files of its state dir too, from before the dump: a server that dies from here on leaves
            # them held for the next one (held_checkpoint), which restores the sandbox with its memory.
            await asyncio.to_thread(_pin_namespaces, sdir, uts, netns)
            argv = self._checkpoint_argv(handle, images, criu, volumes, external)
            res = await asyncio.to_thread(subprocess.run, argv, capture_output=True, env={}, check=False)
            if res.returncode != 0:
                raise RuntimeError_(
                    f"checkpointing sandbox {handle.sandbox_id} failed: {_criu_errors(images / 'dump.log', res.stderr)}"
                )
            await asyncio.to_thread(self._after_checkpoint, handle)
        except BaseException:
            held.release()
            raise
        return held

    def _checkpoint_argv(
        self, handle: SandboxHandle, images: Path, criu: Path, volumes: Sequence[str], external: Collection[str]
    ) -> list[str]:
        """`sbxhelper checkpoint` of the sandbox into `images`; its volumes (mounted from outside) are external
        mounts CRIU leaves to the restore, which binds them again; so are the terminals named in `external`
        ("tty[RDEV:DEV]", whose masters are outside: runtime/terminals.py)."""
        argv = [self.helper, "checkpoint", "--pid", str(handle.init_pid), "--pid-start", str(handle.init_start_time)]
        argv += ["--shift", str(handle.uid_base), "--criu", str(criu), "--images", str(images)]
        for path in volumes:
            argv += ["--external-mount", path]
        for name in external:
            if name.startswith("tty[") and name.endswith("]"):
                argv += ["--external-tty", name[4:-1]]
        return argv

    async def restore(
        self,
        spec: SandboxSpec,
        held: Checkpoint,
        inherit: Sequence[tuple[int, str]] = (),
        volumes: Sequence[Path] = (),
        terminals: Terminals | None = None,
    ) -> SandboxHandle:
        return await self.create(spec, restore=held, inherit=inherit, volumes=volumes, terminals=terminals)

    async def snapshot(
        self,
        handle: SandboxHandle,
        images: Path,
        criu: Path,
        at_dump: Callable[[], Awaitable[None]],
        carried: Collection[str] = (),
        volumes: Sequence[str] = (),
    ) -> None:
        """CRIU writes everything under the sandbox's init into `images` and leaves it running. Once all is written,
        while the processes are still stopped, CRIU's post-dump action (sbxhelper, `--handshake`) tells us and
        waits: `at_dump` runs then (the server copies the sandbox's files), and its failure undoes the dump."""
        held = self._pipes_to_outside(handle, {int(n[6:-1]) for n in carried if n.startswith("pipe:[")})
        if held:
            raise RuntimeError_(
                f"processes {', '.join(map(str, held[:10]))} of sandbox {handle.sandbox_id} hold pipes to processes "
                "outside it that a snapshot cannot carry into new sandboxes (only those to the keepers of commands "
                "run through envd are). End them, or give them their own output (`nohup cmd > file 2>&1 &`)"
            )
        tcp = await asyncio.to_thread(self._tcp_not_carried, handle, True)
        if tcp is not None:  # (a new sandbox has an address of its own, and none of the peers outside)
            raise RuntimeError_(
                f"sandbox {handle.sandbox_id} has {tcp}, which a snapshot cannot carry into new sandboxes: close "
                "them, or take a filesystem snapshot"
            )
        # The handshake's FIFOs (CRIU runs its action script with no descriptor of ours: sbxhelper.c), in a
        # directory of root's only; the helper's script opens them as the sandbox's uid, with its capabilities.
        hs = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=handle.state_dir))
        os.mkfifo(hs / "told", 0o600)
        os.mkfifo(hs / "go", 0o600)
        told = os.open(hs / "told", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        argv = [*self._checkpoint_argv(handle, images, criu, volumes, carried), "--leave-running", "1"]
        argv += ["--handshake", str(hs)]
        try:
            me = f"{os.getpid()}:{pids.start_time(os.getpid())}"  # (CRIU's action gives up once we are gone)
            proc = subprocess.Popen(  # noqa: ASYNC220 (vfork, as create's)
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={"SBX_SERVER": me},
            )
            try:
                if await asyncio.to_thread(_wait_told, told, proc):
                    answer = b"no\n"
                    try:
                        await at_dump()
                        answer = b"go\n"
                    finally:
                        await asyncio.to_thread(_answer_go, hs / "go", answer)
            finally:
                _, err = await asyncio.to_thread(proc.communicate)
        finally:
            os.close(told)
            shutil.rmtree(hs, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError_(
                f"snapshotting sandbox {handle.sandbox_id} failed: {_criu_errors(images / 'dump.log', err)}"
            )

    def _tree(self, handle: SandboxHandle) -> tuple[set[int], set[int]]:
        """(the processes under the sandbox's init: what CRIU dumps, the others of its cgroups: its keepers)."""
        procs = self._cgroups(handle.sandbox_id).procs()
        children: dict[int, list[int]] = {}
        for pid in procs:
            parent = pids.parent_of(pid)
            if parent is not None:
                children.setdefault(parent, []).append(pid)
        tree, todo = set(), [handle.init_pid]
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.add(pid)
                todo += children.get(pid, [])
        return tree, procs - tree

    def _pipes_to_outside(self, handle: SandboxHandle, carried: set[int]) -> list[int]:
        """The processes under the sandbox's init holding a pipe that a process outside that tree holds too (the
        keepers of commands; the server), other than the `carried` ones."""
        tree, others = self._tree(handle)
        outside: set[int] = set()
        for pid in [*others, os.getpid()]:
            outside |= pids.pipes_of(pid)
        outside -= carried
        return sorted(pid for pid in tree if pids.pipes_of(pid) & outside)

    def _tcp_not_carried(self, handle: SandboxHandle, loopback_only: bool) -> str | None:
        """Why the sandbox's TCP connections cannot all be carried by a checkpoint (runtime/tcp_conns.py), or
        None."""
        conns = tcp_conns.connections(handle.init_pid)
        if not conns:
            return None
        tree, _ = self._tree(handle)
        held: set[int] = set()
        for pid in tree:
            held |= pids.sockets_of(pid)
        bad = tcp_conns.not_carried(conns, held, loopback_only)
        if not bad:
            return None
        shown = ", ".join(f"{tcp_conns.show(c.local)} -> {tcp_conns.show(c.remote)}" for c in bad[:5])
        where = (
            "not on loopback, or with an end outside the sandbox"
            if loopback_only
            else "with an end outside the sandbox"
        )
        return f"{len(bad)} TCP connection(s) {where} ({shown})"

    async def create_from(
        self,
        spec: SandboxSpec,
        snapshot: SnapshotImages,
        inherit: Sequence[tuple[int, str]] = (),
        volumes: Sequence[Path] = (),
        terminals: Terminals | None = None,
    ) -> SandboxHandle:
        return await self.create(spec, from_images=snapshot, inherit=inherit, volumes=volumes, terminals=terminals)

    def drop_checkpoint(self, handle: SandboxHandle) -> None:
        _unpin_namespaces(handle.state_dir)

    def held_checkpoint(self, handle: SandboxHandle, images: Path, criu: Path) -> Checkpoint | None:
        if not (images / "inventory.img").is_file():  # (CRIU writes it last: the images are whole)
            return None
        fds: list[int] = []
        try:
            for name, kind in (("uts", CLONE_NEWUTS), ("net", CLONE_NEWNET)):
                fds.append(os.open(handle.state_dir / NS_PINS / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
                if fcntl.ioctl(fds[-1], NS_GET_NSTYPE) != kind:  # (a plain file: ENOTTY)
                    raise OSError(f"{name} is not pinned")
        except OSError:  # (a host reboot): a restore makes it new namespaces
            for fd in fds:
                os.close(fd)
            _unpin_namespaces(handle.state_dir)
            fds = [-1, -1]
        try:
            self._end_strays(handle)  # (a crash may have come before the strays of the dump were ended)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        sdir = handle.state_dir
        return Checkpoint(handle, images, criu, fds[0], fds[1], on_release=lambda: _unpin_namespaces(sdir))

    def host_pids(self, handle: SandboxHandle) -> dict[int, int]:
        found: dict[int, int] = {}
        for pid in self._cgroups(handle.sandbox_id).procs():
            inside = pids.ns_pid(pid)
            if inside is not None:
                found[inside] = pid
        return found

    def _after_checkpoint(self, handle: SandboxHandle) -> None:
        """The dumped tree ends (CRIU kills it), and whatever else of the sandbox is in its mount namespace (file
        brokers, volume attaches): its disk is let go of. Its cgroups stay, with the keepers of its commands
        (envd/kept.py: they outlive the checkpoint, in the host's mount namespace); a restore joins them."""
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(handle.init_pid)
            try:
                select.select([pidfd], [], [], DETACH_WAIT)
            finally:
                os.close(pidfd)
        self._end_strays(handle)
        self._forget_running(handle.sandbox_id)

    def _end_strays(self, handle: SandboxHandle) -> None:
        """End what is left of a checkpointed sandbox in its mount namespace (file brokers, volume attaches, a
        command's helper that stayed its parent), so that its disk is let go of; its keepers, in the host's
        mount namespace, stay."""
        ours = os.stat("/proc/self/ns/mnt").st_ino
        marker = f"/{handle.sandbox_id}"
        for pid in self._cgroups(handle.sandbox_id).procs():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/mnt").st_ino != ours:
                    pids.kill_member(pid, marker)
        shutil.rmtree(handle.state_dir / views.VIEW_DIR, ignore_errors=True)
        _wait_detached(handle.state_dir / quota.IMAGE_NAME)

    async def copy_upper(self, handle: SandboxHandle, dest: Path) -> None:
        await asyncio.to_thread(self._copy_upper_sync, handle, dest)

    def _copy_upper_sync(self, handle: SandboxHandle, dest: Path) -> None:
        with self.upper_dir(handle) as upper:
            _copy_tree(upper, dest)

    @contextlib.contextmanager
    def upper_dir(self, handle: SandboxHandle) -> Iterator[Path]:
        image = handle.state_dir / quota.IMAGE_NAME
        if not image.is_file():
            yield handle.state_dir / "upper"
            return
        # Its own disk: mounted only in its mount namespace. The same loop device mounted here is the same
        # filesystem (what the sandbox wrote is there, synced or not).
        device = quota.loop_device_of(image)
        if device is None:
            raise RuntimeError_(f"sandbox {handle.sandbox_id}: its disk is not attached (is it running?)")
        mnt = Path(tempfile.mkdtemp(prefix=".upper-", dir=handle.state_dir))
        try:
            # (the filesystem is mounted read-write in the sandbox: a read-only mount of it is refused; mount(2)
            # itself: mount(8) would probe the device first)
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            if _libc.mount(device.encode(), str(mnt).encode(), quota.FS_TYPE.encode(), flags, None) != 0:
                err = ctypes.get_errno()
                raise RuntimeError_(f"sandbox {handle.sandbox_id}: mounting its disk here failed: {os.strerror(err)}")
            try:
                yield mnt / "upper"
            finally:
                if _libc.umount2(str(mnt).encode(), 0) != 0:
                    err = ctypes.get_errno()
                    log.error("unmounting %s failed: %s", mnt, os.strerror(err))
        finally:
            mnt.rmdir()

    def _destroy_and_release(self, handle: SandboxHandle, keep_upper: Path | None) -> None:
        with self._destroys:
            self._destroying += 1
        try:
            self._destroy_sync(handle.sandbox_id, keep_upper)
            self.ids.release(handle.uid_base)  # only now: no process of the sandbox is left
            if handle.address and self.net is not None:  # its namespace is gone: its policy and address next
                self.net.release(handle.address)
        finally:
            with self._destroys:
                self._destroying -= 1
                self._destroys.notify_all()

    def _destroy_sync(self, sandbox_id: str, keep_upper: Path | None = None) -> None:
        cg = self._cgroups(sandbox_id)
        cg.destroy()  # raises if a process survives: the directory stays for the next sweep
        if keep_upper is not None:  # no process is left, so no mount of the overlay either
            upper = self.sandboxes_dir / sandbox_id / "upper"
            if not upper.is_dir():
                raise RuntimeError_(f"sandbox {sandbox_id} has no upper dir to keep (it has its own disk)")
            try:
                os.rename(upper, keep_upper)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                subprocess.run(["cp", "-a", str(upper), str(keep_upper)], check=True)
        # The overlay (and the disk image's loop mount) lived only in the sandbox's mount namespace,
        # gone with its last process; the loop device then detached itself. This removes the image.
        _unpin_namespaces(self.sandboxes_dir / sandbox_id)  # (a checkpoint's, if it was written to disk)
        shutil.rmtree(self.sandboxes_dir / sandbox_id, ignore_errors=True)

    def freeze(self, handle: SandboxHandle, frozen: bool) -> None:
        cg = self._cgroups(handle.sandbox_id)
        if "freezer" in cg.dirs:
            cgroups._write(cg.dirs["freezer"] / "freezer.state", "FROZEN" if frozen else "THAWED")
        elif "unified" in cg.dirs:
            cgroups._write(cg.dirs["unified"] / "cgroup.freeze", "1" if frozen else "0")

    def oom_kills(self, handle: SandboxHandle) -> int | None:
        cg = self._cgroups(handle.sandbox_id)
        text = cg.read("memory", "memory.oom_control") or cg.read("unified", "memory.events")
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def stats(self, handle: SandboxHandle) -> Stats:
        cg = self._cgroups(handle.sandbox_id)

        def num(ctrl: str, name: str, default: int = 0) -> int:
            v = cg.read(ctrl, name)
            try:
                return int(v.split()[0]) if v else default
            except ValueError:
                return default

        if "memory" in cg.dirs:
            mem, limit = num("memory", "memory.usage_in_bytes"), num("memory", "memory.limit_in_bytes")
        else:
            mem, limit = num("unified", "memory.current"), num("unified", "memory.max")
        if "cpuacct" in cg.dirs:
            cpu = num("cpuacct", "cpuacct.usage")
        else:
            cpu = 0
            for line in (cg.read("unified", "cpu.stat") or "").splitlines():
                if line.startswith("usage_usec"):
                    cpu = int(line.split()[1]) * 1000
        pids = num("pids", "pids.current") if "pids" in cg.dirs else num("unified", "pids.current")
        try:  # the sandbox's own disk, as `df /` shows it inside (overlayfs reports its upper filesystem)
            disk_used, disk_total = quota.usage(self.root_path(handle))
        except OSError:
            disk_used = disk_total = 0
        return Stats(
            memory_bytes=mem,
            memory_limit_bytes=limit,
            cpu_usage_ns=cpu,
            pids=pids,
            oom_kills=self.oom_kills(handle) or 0,
            disk_used_bytes=disk_used,
            disk_total_bytes=disk_total,
        )

    def root_path(self, handle: SandboxHandle) -> Path:
        return Path(f"/proc/{handle.init_pid}/root")

    def set_host_limits(self, memory_cap_mb: int, total_pids: int, server_memory_mb: int) -> None:
        """Kernel caps on all sandboxes together, and the server's own memory cgroup."""
        cgroups.limit_instance(self.layout, self.instance, memory_cap_mb * 1024 * 1024, total_pids)
        self._server_cgroup.enter(server_memory_mb * 1024 * 1024)

    def close(self) -> None:
        with self._destroys:  # destroys under way (their callers may have been cancelled) end first
            self._destroys.wait_for(lambda: self._destroying == 0, timeout=CLOSE_WAIT)
        if self.net is not None:
            self.net.close()
        self.disks.close()
        self._server_cgroup.leave()
        cgroups.remove_instance(self.layout, self.instance)

    def _unmount_leftover_views(self) -> None:
        """A crash while a sandbox's disk was mounted here (upper_dir: a snapshot, a diff) left the mount."""
        prefix = str(self.sandboxes_dir) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in points:
            if point.startswith(prefix) and "/.upper-" in point:
                if _libc.umount2(point.encode(), MNT_DETACH) != 0:
                    log.warning("unmounting leftover %s failed: %s", point, os.strerror(ctypes.get_errno()))
                    continue
                with contextlib.suppress(OSError):
                    os.rmdir(point)

    async def sweep(self, keep: set[str]) -> list[str]:
        await asyncio.to_thread(self._unmount_leftover_views)
        leftovers = cgroups.leftover_ids(self.layout, self.instance)
        leftovers.update(p.name for p in self.sandboxes_dir.iterdir() if p.is_dir())
        removed = []
        for sandbox_id in sorted(leftovers - keep):
            try:
                await asyncio.to_thread(self._destroy_sync, sandbox_id)
            except cgroups.CgroupError as e:  # left for the next sweep; the server still starts
                log.error("could not clean up leftover sandbox %s: %s", sandbox_id, e)
                continue
            removed.append(sandbox_id)
        if self.net is not None:
            # The table again, with the policies of the sandboxes taken over, in one transaction (they
            # were enforced by the previous run's table until now); the connections of the others go.
            adopted, self._adopted_egress = self._adopted_egress, {}
            await asyncio.to_thread(self.net.install, adopted.items())
            await asyncio.to_thread(self.net.forget_all_but, set(adopted))
        return removed
