"""The runtime interface: what every isolation backend (namespaces today; gVisor, microVMs later) provides.

A backend turns a `SandboxSpec` into a running, isolated Linux environment and runs processes in it.
Everything above this layer (envd, the control plane) talks only to these types.
"""

from __future__ import annotations

import abc
import contextlib
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxd.runtime.terminals import Terminals


class RuntimeError_(Exception):
    """A backend failed to create, enter or destroy a sandbox."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 512
    cpu_count: float = 1.0
    pids: int = 512
    disk_mb: int = 0  # the sandbox's own disk of this size (runtime/quota.py); 0: no disk quota


@dataclass(frozen=True)
class Egress:
    """What one sandbox may reach, in the kernel's terms: CIDRs allowed (these win) and denied. Empty:
    everything but what is blocked for every sandbox. Built from E2B's network fields by
    `sandboxd.network.policy`."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    intercept: bool = False  # its TCP to ports 80 and 443 goes to the egress proxy (its policy names hosts)
    tunnel: bool = False  # all its TCP goes to the egress proxy (to a SOCKS5 proxy); nothing else leaves

    @property
    def open(self) -> bool:
        """Nothing denied: the allow list changes nothing either (allow only wins over a deny)."""
        return not self.deny

    @property
    def default(self) -> bool:
        """What every sandbox starts with: nothing denied, nothing sent to the egress proxy."""
        return self.open and not self.intercept and not self.tunnel

    def to_json(self) -> dict[str, Any]:
        return {"allow": list(self.allow), "deny": list(self.deny), "intercept": self.intercept, "tunnel": self.tunnel}

    @classmethod
    def from_json(cls, data: dict | None) -> Egress:
        data = data or {}
        return cls(
            allow=tuple(data.get("allow", ())),
            deny=tuple(data.get("deny", ())),
            intercept=bool(data.get("intercept")),
            tunnel=bool(data.get("tunnel")),
        )


@dataclass(frozen=True)
class SandboxSpec:
    sandbox_id: str
    layers: tuple[Path, ...]  # the template's root filesystem: its layers, topmost first (overlay lower dirs)
    hostname: str
    limits: Limits = field(default_factory=Limits)
    binds: tuple[tuple[str, str], ...] = ()  # (host dir, path inside), mounted read-only
    # A sandbox stopped with its files kept (Runtime.stop) boots again: its uid range (still held) and
    # its writable layer (or disk) are used as they are, and kept if the boot fails.
    resume_uid_base: int | None = None


@dataclass
class SandboxHandle:
    """What a backend needs to find a sandbox again, also after a server restart (persisted as JSON)."""

    sandbox_id: str
    backend: str
    init_pid: int
    init_start_time: int
    state_dir: Path
    cgroups: list[str]
    # Host uid/gid of the sandbox's uid/gid 0: each sandbox has a range of its own. Handles recorded
    # before per-sandbox ranges existed all used 100000.
    uid_base: int = 100000
    address: str = ""  # the sandbox's IPv4 address ("": no network but its loopback)
    address6: str = ""  # its IPv6 address ("": none)
    egress: dict = field(default_factory=dict)  # its egress policy (Egress.to_json)


@dataclass(frozen=True)
class ExecSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    pty: bool = False


@dataclass(frozen=True)
class Keep:
    """A command kept by its own keeper (envd/kept.py): its record dir and the keeper's end of a session."""

    dir: Path
    session_fd: int
    log_bytes: int = 1 << 20  # how much of its output the keeper logs (the newest)
    pty: tuple[int, int] | None = None  # a terminal's (master, slave): the keeper relays the master
    # A command that runs already (restored from a snapshot): (its PID in the sandbox, on the host, its start
    # time), and the keeper's ends of its stdout, stderr and stdin pipes (-1: none); the keeper starts nothing.
    adopt: tuple[int, int, int] | None = None
    adopt_fds: tuple[int, int, int] = (-1, -1, -1)


@dataclass
class Checkpoint:
    """A sandbox written by `Runtime.checkpoint`: its images, and its UTS and network namespaces, held
    (open) until a restore takes them or `release`."""

    handle: SandboxHandle
    images: Path
    criu: Path
    uts_fd: int
    netns_fd: int
    on_release: Callable[[], None] | None = None  # what else holds them (NamespaceRuntime: files pinning them)

    @property
    def namespaces_held(self) -> bool:
        """False after a host reboot (-1, -1): the restore makes it new ones."""
        return self.uts_fd >= 0 and self.netns_fd >= 0

    def release(self) -> None:
        for fd in (self.uts_fd, self.netns_fd):
            if fd >= 0:
                os.close(fd)
        self.uts_fd = self.netns_fd = -1
        if self.on_release is not None:
            self.on_release()
            self.on_release = None


@dataclass(frozen=True)
class SnapshotImages:
    """A snapshot's processes, as `Runtime.snapshot` wrote them, for `Runtime.create_from`."""

    images: Path
    uid_base: int  # of the sandbox it was taken of
    criu: Path


@dataclass
class Stats:
    memory_bytes: int
    memory_limit_bytes: int
    cpu_usage_ns: int
    pids: int
    oom_kills: int
    disk_used_bytes: int = 0
    disk_total_bytes: int = 0


class Runtime(abc.ABC):
    name: str
    # spawn_exec(keep_dir=...) runs the command under a keeper that outlives the server (envd/kept.py)
    keeps_processes: bool = False
    # called with a sandbox's ID once destroy() has removed it (the template store drops its hold)
    on_destroyed: list[Callable[[str], None]]

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> SandboxHandle: ...

    @abc.abstractmethod
    def spawn_exec(
        self,
        handle: SandboxHandle,
        spec: ExecSpec,
        stdio: tuple[int, int, int],
        report_fd: int | None = None,
        keep: Keep | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `spec` in the sandbox with these stdin/stdout/stderr; the process's exit status is the
        command's. The command's environment must reach nothing but the command. With `report_fd`, the
        process writes `c <pid in sandbox>` and `h <host pid>` lines to that fd. With `keep` (only where
        `keeps_processes`), the process is the command's keeper: see envd/kept.py."""

    @abc.abstractmethod
    def freeze(self, handle: SandboxHandle, frozen: bool) -> None:
        """Stop (or restart) every process of the sandbox, keeping its memory (pause/resume)."""

    async def connect_tcp(self, handle: SandboxHandle, port: int) -> socket.socket:
        """A TCP connection to `port` on the sandbox's own loopback (its services, e.g. the interpreter)."""
        raise NotImplementedError(f"the {self.name} backend cannot reach sandbox ports")

    def broker_argv(self, handle: SandboxHandle, uid: int, gid: int, groups: tuple[int, ...]) -> list[str]:
        """The host command of a file broker for this sandbox and user (see runtime/broker.py)."""
        raise NotImplementedError(f"the {self.name} backend has no file broker")

    def open_pty(self, handle: SandboxHandle) -> tuple[int, int]:
        """A (master, slave) terminal pair for a process in the sandbox. Backends with their own devpts
        override this so that the terminal is the sandbox's own (`tty` shows /dev/pts/N inside)."""
        import os

        return os.openpty()

    async def set_egress(self, handle: SandboxHandle, egress: Egress, cut: bool = True) -> None:
        """Make `egress` what the sandbox may reach (atomically). With `cut`, connections it denies are cut
        at once (a sandbox that has never run anything has none: its create skips that)."""
        if not egress.default:
            raise RuntimeError_(f"the {self.name} backend has no network policy")

    def set_host_limits(self, memory_cap_mb: int, total_pids: int, server_memory_mb: int) -> None:
        """Kernel-enforced caps on all sandboxes of this server together, and on the server itself."""
        return None

    def oom_kills(self, handle: SandboxHandle) -> int | None:
        """Processes the OOM killer has killed in the sandbox so far (cheap: read on every exec)."""
        return None

    def refresh_view(self, handle: SandboxHandle) -> None:
        """Show the sandbox its memory use now where it looks (its /proc/meminfo); called at each metrics
        sample, from a worker thread. Backends whose sandboxes see their own kernel need nothing."""
        return None

    def adopt(self, handle: SandboxHandle) -> None:
        """A live sandbox of a previous server run is taken over: claim what it holds (its uid range)."""
        return None

    @abc.abstractmethod
    def is_alive(self, handle: SandboxHandle) -> bool: ...

    @abc.abstractmethod
    async def destroy(self, handle: SandboxHandle, keep_upper: Path | None = None) -> None:
        """End the sandbox and remove what it held. With `keep_upper`, what it changed in its root filesystem
        (the overlay's upper dir, owned by its host uids) is moved there first (a template build's layer)."""

    async def stop(self, handle: SandboxHandle) -> None:
        """End every process of the sandbox, keeping its files (its writable layer or disk) and its uid range
        for a later `create` with `resume_uid_base` (a filesystem-only pause). Its address goes."""
        raise RuntimeError_(f"the {self.name} backend cannot stop a sandbox and keep its files")

    async def attach_volume(self, handle: SandboxHandle, source: Path, path: str) -> None:
        """Mount the host directory `source` (a volume's files, owned by the template uid range) read-write
        at `path` inside the running sandbox, its owners mapped to the sandbox's; directories on the way
        are made. The sandbox cannot unmount it."""
        raise RuntimeError_(f"the {self.name} backend cannot mount volumes")

    async def copy_upper(self, handle: SandboxHandle, dest: Path) -> None:
        """Copy what the sandbox changed in its root filesystem (its overlay upper dir: owned by its host
        uids, whiteouts and opaque dirs as overlayfs made them) into the new directory `dest`. The caller
        keeps the sandbox frozen meanwhile."""
        raise RuntimeError_(f"the {self.name} backend cannot copy a sandbox's files")

    def upper_dir(self, handle: SandboxHandle) -> contextlib.AbstractContextManager[Path]:
        """A host path to what the sandbox changed in its root filesystem (its overlay upper dir), valid
        inside the `with` (blocking: call from a thread)."""
        raise RuntimeError_(f"the {self.name} backend cannot show a sandbox's files")

    async def checkpoint(
        self,
        handle: SandboxHandle,
        images: Path,
        criu: Path,
        volumes: Sequence[str] = (),
        external: Collection[str] = (),
    ) -> Checkpoint:
        """Write the sandbox's processes into `images` (CRIU) and end them; `volumes`: where volumes are mounted
        in it (given again, in that order, to `restore`); `external`: CRIU's names of terminals of theirs whose
        masters are outside ("tty[RDEV:DEV]": the restore gives new ones); see NamespaceRuntime."""
        raise NotImplementedError(f"the {self.name} runtime cannot checkpoint a sandbox")

    async def restore(
        self,
        spec: SandboxSpec,
        held: Checkpoint,
        inherit: Sequence[tuple[int, str]] = (),
        volumes: Sequence[Path] = (),
        terminals: Terminals | None = None,
    ) -> SandboxHandle:
        """The sandbox `checkpoint` wrote, running again (`spec.resume_uid_base`: its uid range); `volumes`: the
        host directories of the volumes, in the order `checkpoint` was given their paths; `terminals`: where the
        new terminals in `inherit` come from (runtime/terminals.py)."""
        raise NotImplementedError(f"the {self.name} runtime cannot restore a sandbox")

    async def snapshot(
        self,
        handle: SandboxHandle,
        images: Path,
        criu: Path,
        at_dump: Callable[[], Awaitable[None]],
        carried: Collection[str] = (),
        volumes: Sequence[str] = (),
    ) -> None:
        """Write the sandbox's processes into `images` (CRIU), leaving them running; `at_dump` is awaited while
        they are stopped, everything written (for the sandbox's files to be copied at the same instant); if it
        raises, the dump is undone. `carried`: CRIU's names of pipes and terminals to outside that new sandboxes
        get anew (other pipes refuse the snapshot); `volumes`: as `checkpoint`'s. See NamespaceRuntime."""
        raise NotImplementedError(f"the {self.name} runtime cannot snapshot a sandbox's memory")

    async def create_from(
        self,
        spec: SandboxSpec,
        snapshot: SnapshotImages,
        inherit: Sequence[tuple[int, str]] = (),
        volumes: Sequence[Path] = (),
        terminals: Terminals | None = None,
    ) -> SandboxHandle:
        """A new sandbox running the processes of a snapshot (its files: `spec.layers`); `inherit`, `volumes`,
        `terminals` as `restore`'s."""
        raise NotImplementedError(f"the {self.name} runtime cannot start a sandbox from a snapshot's memory")

    def held_checkpoint(self, handle: SandboxHandle, images: Path, criu: Path) -> Checkpoint | None:
        """After a server restart: the checkpoint a previous run wrote of the sandbox, if it is whole and its
        namespaces are still held (None after a host reboot, or a crash before the images were complete)."""
        return None

    def drop_checkpoint(self, handle: SandboxHandle) -> None:
        """Let go of what a previous run's checkpoint of the sandbox holds (the sandbox boots from its files)."""
        return None

    def host_pids(self, handle: SandboxHandle) -> dict[int, int]:
        """The sandbox's processes: their PID inside it -> on the host."""
        raise NotImplementedError

    def hold(self, handle: SandboxHandle) -> None:
        """A stopped sandbox of a previous server run: claim its uid range (it boots again later)."""
        return None

    @abc.abstractmethod
    def stats(self, handle: SandboxHandle) -> Stats: ...

    @abc.abstractmethod
    def root_path(self, handle: SandboxHandle) -> Path:
        """Host path of the sandbox's `/` (valid while it runs)."""

    @abc.abstractmethod
    def close(self) -> None:
        """The server is stopping and no sandbox of this runtime is left: remove shared leftovers."""

    @abc.abstractmethod
    async def sweep(self, keep: set[str]) -> list[str]:
        """Destroy every leftover of this backend whose sandbox ID is not in `keep`; return their IDs."""
