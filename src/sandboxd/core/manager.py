"""Sandbox lifecycle over a runtime backend: create, time out, pause, resume, kill, re-adopt.

The manager owns the truth about which sandboxes exist (in memory, mirrored to SQLite) and admits new
ones against the host-wide limits. The API layer calls it; the envd layer asks it for a sandbox and
attaches per-sandbox state (`Sandbox.ext`). The warm pool (pool.py) and the reaper of expired and dead
sandboxes (reaper.py) are its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import string
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sandboxd.core import endings, pausing, startup, workload_identity
from sandboxd.core import volume_mounts as volume_mounts_
from sandboxd.core.autoscaler import Autoscaler, default_budget_mb
from sandboxd.core.errors import BadRequest, Conflict, LimitReached, NotFound, SandboxdError
from sandboxd.core.events import Event, Events
from sandboxd.core.health import HealthMonitor
from sandboxd.core.limits import HostLimits
from sandboxd.core.metrics import MetricsSampler
from sandboxd.core.networking import SandboxNetworks, parse_ingress, parse_policy
from sandboxd.core.pool import Pooled, PoolLimits, WarmPool
from sandboxd.core.reaper import Reaper
from sandboxd.core.sandbox_logs import SandboxLogs
from sandboxd.core.teams import DEFAULT_TEAM
from sandboxd.core.tenant_limits import TenantLimits
from sandboxd.core.users import DEFAULT_PATH, lookup_user
from sandboxd.network.policy import NetworkPolicy
from sandboxd.runtime.base import (
    Checkpoint,
    ExecSpec,
    Limits,
    Runtime,
    RuntimeError_,
    SandboxHandle,
    SandboxSpec,
    SnapshotImages,
)
from sandboxd.runtime.network import AddressPoolExhausted
from sandboxd.runtime.quota import DEFAULT_DISK_MB, MIN_DISK_MB
from sandboxd.runtime.terminals import Terminals
from sandboxd.state.records import SandboxRecord
from sandboxd.state.sql import State
from sandboxd.templates.store import Template, TemplateError, TemplateStore
from sandboxd.volumes.store import VolumeStore

log = logging.getLogger("sandboxd.core")

POOL_SETTING = "pool:"  # + template name: its pool's limits (JSON), in the state DB's settings
MAX_POOL = 1024  # idle sandboxes one template's pool may keep at most

ID_ALPHABET = string.ascii_lowercase + string.digits
# What the envd layer implements; the SDK switches features on by this version (file metadata, for one,
# needs 0.6.2).
ENVD_VERSION = "0.6.4"


def new_sandbox_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(20))


DEFAULT_MEMORY_MB = 512
MIN_MEMORY_MB = 64
META_MEMORY, META_CPUS = "sandboxd.memory_mb", "sandboxd.cpus"  # per-create resources, in metadata
# Seconds without a request to the sandbox or CPU use of its processes after which it is paused (with
# autoPause; to its files with autoPauseMemory: false) or killed, before its end time (core/reaper.py).
META_IDLE = "sandboxd.idle_timeout"


@dataclass(frozen=True)
class Resources:
    memory_mb: int
    cpu_count: float


@dataclass
class Settings:
    default_timeout: int = 300
    max_timeout: int = 24 * 3600
    memory_mb: int | None = None  # None: the template's default, else DEFAULT_MEMORY_MB
    cpu_count: float = 1.0
    pids: int = 512
    # The sandbox's own disk (runtime/quota.py), MiB. None: the template's, else DEFAULT_DISK_MB (10 GiB);
    # 0: no disk quota (the writable layer shares the data dir's filesystem).
    disk_mb: int | None = None
    # The most a create may ask for (`diskSizeMB`); None: no more than the template's default.
    max_disk_mb: int | None = None
    # The most memory one create may ask for (metadata sandboxd.memory_mb).
    max_memory_mb: int = 16384
    # Sandboxes kept created and idle per recently used template, so that create only hands one out: at least
    # pool_size, up to pool_max as demand asks (core/autoscaler.py); a template's own limits: PUT /pools/{template}.
    pool_size: int = 2
    pool_max: int | None = None  # None: 4 x pool_size (core/pool.py, GROWTH)
    pool_cooldown: float = 60.0  # s without a pool miss before a pool shrinks a step
    # idle pooled sandboxes' memory limits together at most (None: a quarter of the host's commitment limit)
    pool_memory_mb: int | None = None
    health_interval: float = 10.0  # s between the health monitor's rounds (core/health.py; 0: none)
    # How long a template's ready command may take to succeed (at create, and at a build's finalize).
    ready_timeout: float = startup.READY_TIMEOUT
    # Template builds that run at once (more wait their turn).
    max_builds: int = 2
    # Seconds an ended sandbox stays listed (state=killed) and explained (core/endings.py).
    ended_retention: int = 3600
    # Templates whose pool is filled at start, before anyone asks (the others: after their first use).
    prewarm: tuple[str, ...] = ("base", "code-interpreter-v1")
    # What all sandboxes together may take of the host (None: defaults for this host).
    host: HostLimits | None = None
    # What one sandbox may cost the server (output buffers, streams, watches, requests).
    tenant: TenantLimits = field(default_factory=TenantLimits)
    # `--domain`: sandboxes' ports are reached as https://{port}-{id}.DOMAIN (routing/hosts.py).
    domain: str | None = None
    # CRIU (scripts/build-criu.sh), for pauses to disk; None: pauses stay in memory (core/pausing.py).
    criu: Path | None = None
    # Seconds a sandbox stays paused in memory before it is written to disk (None: never).
    checkpoint_after: float | None = None


class Sandbox:
    """A live sandbox: its record, its runtime handle, and what other layers attach to it."""

    def __init__(self, record: SandboxRecord, handle: SandboxHandle) -> None:
        self.record = record
        self.handle = handle
        self.killed = asyncio.Event()
        self.ext: dict[str, Any] = {}
        self.on_kill: list[Callable[[], None]] = []
        self.service: subprocess.Popen[bytes] | None = None  # the template's service, if it has one
        self.last_active = time.time()  # a request for it, or CPU use of its processes (idle timeout)
        self.idle_mark = 0  # its CPU time (ns) when it was last seen active (core/reaper.py)
        self.policy = NetworkPolicy.from_json(record.network)
        self.domain: str | None = None  # the server's --domain (the SDK's get_host() names it)
        self.paused_at = 0.0  # when it was paused (in memory: core/pausing.py writes it to disk later)
        self.checkpoint: Checkpoint | None = None  # its processes, written to disk (pause_mode "disk")

    @property
    def id(self) -> str:
        return self.record.sandbox_id

    @property
    def running(self) -> bool:
        return self.record.state == "running" and not self.killed.is_set()


class TemplateCatalog(Protocol):
    """A cluster's catalog of templates (cluster/catalog.py): which template a name means, which build a tag means."""

    def name(self, name: str, proposed: str) -> str: ...

    def known(self, name: str) -> str | None: ...

    def tagged(self, ident: str, tags: list[str], build: str) -> None: ...

    def untagged(self, ident: str, tags: list[str]) -> None: ...


class SandboxManager:
    def __init__(self, runtime: Runtime, templates: TemplateStore, db: State, settings: Settings | None = None):
        self.runtime = runtime
        self.templates = templates
        # A node of a cluster: fetches a template it lacks from a node that holds it (cluster/layers.py)
        self.fetch_template: Callable[[str], Awaitable[None]] | None = None
        # and names templates (builds', snapshots') and tells their tags as the cluster's catalog says
        self.catalog: TemplateCatalog | None = None
        runtime.on_destroyed.append(templates.release)  # (the hold each create records: _hold_template)
        self.db = db
        self.settings = settings or Settings()
        self.sandboxes: dict[str, Sandbox] = {}
        self.reaper = Reaper(self)
        self.pool = WarmPool(
            self.settings.pool_size, runtime, templates, self._make_pooled, self._fits, self.settings.pool_max
        )
        self.host_limits = self.settings.host or HostLimits.for_host()
        budget = self.settings.pool_memory_mb
        self.autoscaler = Autoscaler(
            self.pool,
            self._pool_memory_mb,
            default_budget_mb(self.host_limits.max_committed_memory_mb) if budget is None else budget,
            self.settings.pool_cooldown,
        )
        self.metrics = MetricsSampler(self)
        self.health = HealthMonitor(self, self.settings.health_interval)
        self.events = Events()  # creates, pauses, resumes, ends, builds: for the exporter (core/events.py)
        self.logs = SandboxLogs(self.events)  # each sandbox's log (core/sandbox_logs.py)
        self._creating: list[int] = []  # memory (MiB) of sandboxes being created right now
        self._build_memory: dict[str, int] = {}  # template builds' sandboxes (also in _creating)
        self.net = SandboxNetworks(runtime, db)  # addresses, policies, what the egress proxy fills in
        self._pausing: dict[str, asyncio.Lock] = {}  # one pause or resume of a sandbox at a time
        self._background: set[asyncio.Task[None]] = set()  # resumes at start (--pause-on-exit)
        # sandboxes being ended (their processes are going): what will be kept of them (core/endings.py)
        self._ending: dict[str, dict[str, Any]] = {}
        # called when a sandbox paused to its files has booted again (upper layers tidy up after it)
        self.after_boot_again: list[Callable[[Sandbox], Awaitable[Any]]] = []
        # called when a paused sandbox runs again, from memory or from disk (envd/uploads.py tidies up after it)
        self.after_resume: list[Callable[[Sandbox], Awaitable[Any]]] = []
        # called (under its pause lock) before a sandbox is paused to its files (a cluster keeps an image of them)
        self.before_files_pause: list[Callable[[Sandbox], Awaitable[Any]]] = []
        # called (under its pause lock) before a sandbox paused in memory is written to disk (likewise, with memory)
        self.before_disk_pause: list[Callable[[Sandbox], Awaitable[Any]]] = []
        # what other layers attach to a sandbox from outside, taken through a pause to disk (core/pausing.py)
        self.checkpoint_parts: list[pausing.CheckpointPart] = []
        # sandboxes from a snapshot with memory, made but not registered yet: what the parts attach to them then
        self._carried: dict[str, list[tuple[pausing.CheckpointPart, Any]]] = {}
        self.volumes: VolumeStore | None = None  # set by the server (volumes/store.py)
        self.creating_with: Counter[str] = Counter()  # volume ID -> creates under way that mount it

    # -- start / stop ----------------------------------------------------------------------------
    async def start(self) -> None:
        adopted: set[str] = set()
        for rec in self.db.all():
            handle = SandboxHandle(**{**rec.handle, "state_dir": Path(rec.handle["state_dir"])})
            await asyncio.to_thread(pausing.sweep_discarded, handle.state_dir)
            # A sandbox whose kill had begun is finished off (by the sweep below), even if its init has
            # not died yet: a kill is never undone by a crash.
            on_disk = rec.state == "paused" and rec.pause_mode == pausing.DISK
            if rec.state == "paused" and rec.pause_mode == pausing.FULL and not self.runtime.is_alive(handle):
                on_disk = True  # (the crash came while it was written to disk: its images may be whole)
            held = None
            if on_disk and self.settings.criu is not None:
                images = handle.state_dir / pausing.IMAGES
                try:
                    held = await asyncio.to_thread(self.runtime.held_checkpoint, handle, images, self.settings.criu)
                except RuntimeError_ as e:
                    log.warning("sandbox %s: its checkpoint cannot be used: %s", rec.sandbox_id, e)
            if held is not None and not held.namespaces_held and pausing.read_parts(handle.state_dir) is None:
                held.release()  # (a reboot, and what its parts attached was not written down)
                held = None
            if held is not None:  # its processes on disk: it resumes with its memory
                rec.pause_mode = pausing.DISK
                self.db.put(rec)
                if held.namespaces_held:
                    self.runtime.adopt(handle)
                else:  # (a host reboot: the restore makes it new namespaces, a new address)
                    self.runtime.hold(handle)
                    handle = held.handle = replace(handle, init_pid=0, address="", address6="")
                sandbox = Sandbox(rec, handle)
                sandbox.checkpoint = held
                self._register(sandbox)
                adopted.add(rec.sandbox_id)
                continue
            if on_disk:
                # Its checkpoint is not whole (or what its parts attached was not written down before a host
                # reboot). Its files are whole: it resumes from them, as after a filesystem pause.
                log.warning("sandbox %s, paused to disk, resumes from its files", rec.sandbox_id)
                shutil.rmtree(handle.state_dir / pausing.IMAGES, ignore_errors=True)
                (handle.state_dir / pausing.PARTS).unlink(missing_ok=True)
                self.runtime.drop_checkpoint(handle)
                rec.pause_mode = pausing.FILESYSTEM
                self.db.put(rec)
            if rec.state == "paused" and rec.pause_mode == pausing.FILESYSTEM:  # stopped, its files kept
                # A crash may have cut its pause short, or a boot from its files (whose processes the record
                # does not know yet): whatever of it runs ends, by its cgroups, and its files are synced.
                await self.runtime.stop(handle)
                self.runtime.hold(handle)
                self._register(Sandbox(rec, replace(handle, init_pid=0, address="", address6="")))
                adopted.add(rec.sandbox_id)
            elif rec.state != "killing" and self.runtime.is_alive(handle):
                self.runtime.adopt(handle)
                # A crash during pause or resume may have left the freezer and the record apart.
                await asyncio.to_thread(self.runtime.freeze, handle, rec.state == "paused")
                self._register(Sandbox(rec, handle))
                adopted.add(rec.sandbox_id)
            else:
                end = endings.killed("a request before the server stopped") if rec.state == "killing" else None
                self.db.end(rec.sandbox_id, time.time(), endings.body(rec, end or endings.host_restart(), None))
        removed = await self.runtime.sweep(adopted)
        for sandbox_id in removed:
            self.templates.release(sandbox_id)
        if adopted:
            log.info("re-adopted %d sandbox(es) from the previous run", len(adopted))
        if removed:
            log.info("cleaned up %d leftover sandbox(es): %s", len(removed), ", ".join(removed))
        self.reaper.start()
        self.metrics.start()
        for name, raw in self.db.settings_under(POOL_SETTING).items():
            self.pool.limits[name] = PoolLimits(**json.loads(raw))
        self.autoscaler.start()
        self.health.start()
        for sandbox_id in adopted:
            sandbox = self.sandboxes[sandbox_id]
            if sandbox.record.resume_at_start and sandbox.record.state == "paused":
                task = asyncio.create_task(self._resume_at_start(sandbox_id, sandbox.record.resume_at_start))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        built = set(self.templates.names())
        for name in self.settings.prewarm:
            if name in built:
                self.pool.schedule_refill(name, delay=0)

    def begin_shutdown(self) -> None:
        """No more pool refills: the server is stopping."""
        self.pool.close()

    async def stop(self, destroy: bool = True, to_disk: bool = False) -> None:
        """Stop: the sandboxes are destroyed, or left for the next start (`to_disk`: written to disk first)."""
        self.pool.close()
        await self.autoscaler.stop()
        await self.health.stop()
        await self.metrics.stop()
        self.reaper.stop()
        await self.pool.stop()
        if to_disk and not destroy:
            await self._to_disk_at_exit()
        if destroy:
            ids = list(self.sandboxes)
            end = endings.killed("the server's shutdown (--destroy-on-exit)")
            results = await asyncio.gather(*(self.kill(sid, end) for sid in ids), return_exceptions=True)
            for sid, result in zip(ids, results, strict=True):
                if isinstance(result, BaseException):  # its address (and so the server's table) stays held
                    log.error("destroying sandbox %s at shutdown failed: %r", sid, result)
        self.runtime.close()  # removes only what no kept sandbox still uses

    async def _to_disk_at_exit(self) -> None:
        """`--pause-on-exit`: every sandbox whose processes run (or are paused in memory) is written to disk, to
        outlive a host reboot with its memory; those that ran resume at the next start, with the time they had
        left. One that cannot go to disk is left as it was (running, or paused in memory), as without it."""
        if self.settings.criu is None:
            log.warning("--pause-on-exit: this server has no CRIU; the sandboxes are left running")
            return
        gate = asyncio.Semaphore(2)  # (CRIU is CPU- and disk-bound: a few at once)

        async def one(sandbox: Sandbox) -> None:
            async with gate:
                running = sandbox.record.state == "running"
                left = max(1, int(sandbox.record.end_at - time.time()))
                try:
                    await self.pause(sandbox.id, to_disk=True)
                except (SandboxdError, RuntimeError_) as e:
                    log.warning("sandbox %s is not written to disk at shutdown: %s", sandbox.id, e)
                    if running and pausing.in_memory(sandbox):  # (it ran: it runs on, as without --pause-on-exit)
                        await asyncio.to_thread(self.runtime.freeze, sandbox.handle, False)
                        sandbox.record.state, sandbox.record.pause_mode = "running", ""
                        self.db.put(sandbox.record)
                    return
                if running:
                    sandbox.record.resume_at_start = left
                    self.db.put(sandbox.record)

        todo = [s for s in self.sandboxes.values() if not pausing.without_processes(s) and not s.killed.is_set()]
        if todo:
            log.info("writing %d sandbox(es) to disk before stopping (--pause-on-exit)", len(todo))
            await asyncio.gather(*(one(s) for s in todo))

    async def _resume_at_start(self, sandbox_id: str, timeout: int) -> None:
        """A sandbox the last shutdown wrote to disk while it ran: running again, with the time it had left."""
        try:
            await self.connect(sandbox_id, min(timeout, self.settings.max_timeout))
            log.info("sandbox %s, written to disk at the last shutdown, runs again", sandbox_id)
        except Exception as e:
            log.warning("sandbox %s, written to disk at the last shutdown, stays paused: %s", sandbox_id, e)

    # -- making sandboxes --------------------------------------------------------------------------
    def _spec(self, sandbox_id: str, template: Template, disk_mb: int, res: Resources) -> SandboxSpec:
        s = self.settings
        limits = Limits(memory_mb=res.memory_mb, cpu_count=res.cpu_count, pids=s.pids, disk_mb=disk_mb)
        return SandboxSpec(
            sandbox_id=sandbox_id, layers=template.layers, hostname=sandbox_id, limits=limits, binds=template.binds
        )

    def _cpu_count(self, template: Template) -> float:
        """The template's CPUs (its build's cpuCount), else the server's default; never more than the host's."""
        return min(float(template.cpu_count or self.settings.cpu_count), float(os.cpu_count() or 1))

    def _memory_mb(self, template: Template) -> int:
        return self.settings.memory_mb or template.memory_mb or DEFAULT_MEMORY_MB

    def _resources(self, template: Template, metadata: dict[str, str]) -> Resources:
        """The template's memory and CPUs, or what a create asks for in the reserved metadata keys
        `sandboxd.memory_mb` / `sandboxd.cpus` (the official SDKs pass metadata through), within the
        server's maxima."""
        memory, cpus = self._memory_mb(template), self._cpu_count(template)
        raw_memory, raw_cpus = metadata.get(META_MEMORY), metadata.get(META_CPUS)
        if raw_memory is not None:
            if not raw_memory.isdigit() or not MIN_MEMORY_MB <= int(raw_memory):
                raise BadRequest(f"metadata {META_MEMORY} must be a whole number of MiB, at least {MIN_MEMORY_MB}")
            memory = int(raw_memory)
            if memory > self.settings.max_memory_mb:
                raise BadRequest(
                    f"metadata {META_MEMORY}: at most {self.settings.max_memory_mb} MiB per sandbox on this server "
                    f"(--max-sandbox-memory-mb), {memory} asked"
                )
        if raw_cpus is not None:
            try:
                cpus = float(raw_cpus)
            except ValueError:
                cpus = 0.0
            if not cpus > 0 or cpus != cpus:
                raise BadRequest(f"metadata {META_CPUS} must be a number of CPUs above 0, got {raw_cpus[:32]!r}")
            host = float(os.cpu_count() or 1)
            if cpus > host:
                raise BadRequest(f"metadata {META_CPUS}: at most {host:g} CPUs (this host's), {cpus:g} asked")
        return Resources(memory, cpus)

    def _disk_mb(self, template: Template) -> int:
        """The template's default disk size (0: no disk quota)."""
        if self.settings.disk_mb is not None:
            return self.settings.disk_mb
        return template.disk_mb or DEFAULT_DISK_MB

    def _check_disk_mb(self, template: Template, disk_mb: Any) -> int:
        default = self._disk_mb(template)
        if disk_mb is None:
            return default
        if not isinstance(disk_mb, int) or isinstance(disk_mb, bool):
            raise BadRequest(f"diskSizeMB must be a whole number of MiB, got {disk_mb!r}")
        if default == 0:
            raise BadRequest("this server runs without disk quotas (--disk-mb 0): diskSizeMB cannot be set")
        limit = self.settings.max_disk_mb or default
        if not MIN_DISK_MB <= disk_mb <= limit:
            raise BadRequest(
                f"diskSizeMB must be between {MIN_DISK_MB} and {limit} MiB, got {disk_mb} "
                "(the server's --max-disk-mb raises the maximum)"
            )
        return disk_mb

    async def _new(
        self, sandbox_id: str, template: Template, disk_mb: int, res: Resources | None = None
    ) -> tuple[SandboxHandle, subprocess.Popen[bytes] | None]:
        """Create a sandbox and start its template's service (the code interpreter, say)."""
        res = res or self._resources(template, {})
        return await self.boot(self._spec(sandbox_id, template, disk_mb, res), template)

    async def boot(self, spec: SandboxSpec, template: Template) -> tuple[SandboxHandle, subprocess.Popen[bytes] | None]:
        """Start a sandbox from `spec` (new, or one whose files were kept: core/pausing.py), then its
        template's start command or service."""
        memory_mb = spec.limits.memory_mb
        images = template.memory_images if spec.resume_uid_base is None else None
        self._creating.append(memory_mb)  # counted against the host-wide limits while it is made
        try:
            if images is not None and template.memory_uid_base is not None:  # a snapshot with memory: its processes
                if self.settings.criu is None:
                    raise SandboxdError(
                        f"template '{template.name}' is a snapshot with memory, and this server has no CRIU "
                        "(sandboxd serve --criu) to start its processes"
                    )
                snapshot = SnapshotImages(images, template.memory_uid_base, self.settings.criu)
                inherit: list[tuple[int, str]] = []
                terminals = Terminals()
                pending: list[tuple[pausing.CheckpointPart, Any]] = []
                try:  # what the parts carry (envd: the kept commands' new pipes)
                    inherit, pending = pausing.carried_restore(self.checkpoint_parts, template.memory_parts, terminals)
                    volumes = await pausing.volume_sources(self, list(template.memory_volume_mounts))
                    handle = await self.runtime.create_from(spec, snapshot, inherit, volumes, terminals)
                except BaseException as e:
                    for part, held in pending:  # (nothing to attach them to)
                        part.drop_snapshot_restore(held)
                    if isinstance(e, RuntimeError_):
                        raise SandboxdError(
                            f"snapshot '{template.name}': no sandbox could start from it: {e}"
                        ) from None
                    raise
                finally:
                    for fd, _ in inherit:
                        os.close(fd)
                    terminals.close()
                self._hold_template(spec, handle)
                if pending:
                    self._carried[spec.sandbox_id] = pending
                return handle, None  # (its service, if any, runs restored)
            handle = await self.runtime.create(spec)
        except AddressPoolExhausted as e:
            raise LimitReached(str(e)) from None
        finally:
            self._creating.remove(memory_mb)
        self._hold_template(spec, handle)
        if template.start_cmd or template.ready_cmd:
            try:
                who = startup.identity(
                    self.runtime, handle, template.default_user, template.env, template.default_workdir
                )
                service = await startup.start_service(
                    self.runtime, handle, who, template.start_cmd, template.ready_cmd, self.settings.ready_timeout
                )
            except startup.StartError as e:
                await self.runtime.destroy(handle)
                raise SandboxdError(f"template '{template.name}': its sandbox did not start: {e}") from None
            except BaseException:
                await self.runtime.destroy(handle)
                raise
            return handle, service
        if not template.service:
            return handle, None
        try:
            user = lookup_user(str(self.runtime.root_path(handle)), template.service_user, handle.uid_base)
            if user is None:
                raise BadRequest(f"template '{template.name}': its service user '{template.service_user}' is unknown")
            env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, **template.service_env}
            log_file = "/tmp/.sandboxd-service.log"
            argv = ["/bin/sh", "-c", f'exec "$@" >>{log_file} 2>&1', "sh", *template.service]
            run = ExecSpec(argv=argv, env=env, cwd=user.home, uid=user.uid, gid=user.gid, groups=user.groups)
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                service = self.runtime.spawn_exec(handle, run, (devnull, devnull, devnull))
            finally:
                os.close(devnull)
        except BaseException:
            await self.runtime.destroy(handle)
            raise
        return handle, service

    def _hold_template(self, spec: SandboxSpec, handle: SandboxHandle) -> None:
        """Keep the sandbox's template layers from any prune while its state dir exists (no process of the
        sandbox holds a host file: the store's holds say what is in use; one goes with its state dir)."""
        try:
            self.templates.hold(spec.sandbox_id, spec.layers, handle.state_dir)
        except OSError as e:
            log.warning("recording that sandbox %s uses its template failed: %s", spec.sandbox_id, e)

    async def build_sandbox(self, spec: SandboxSpec) -> SandboxHandle:
        """A sandbox for one step of a template build (core/builds.py): counted against the host-wide
        limits while it lives, networked with the default policy, not in the sandbox list."""
        await self._admit(spec.limits.memory_mb)
        sandbox_id = new_sandbox_id()
        spec = replace(spec, sandbox_id=sandbox_id, hostname=sandbox_id)
        self._creating.append(spec.limits.memory_mb)
        try:
            handle = await self.runtime.create(spec)
        except AddressPoolExhausted as e:
            self._creating.remove(spec.limits.memory_mb)
            raise LimitReached(str(e)) from None
        except BaseException:
            self._creating.remove(spec.limits.memory_mb)
            raise
        self._hold_template(spec, handle)
        self._build_memory[handle.sandbox_id] = spec.limits.memory_mb
        if handle.address:
            self.net.add_builder(handle.address)
        return handle

    def build_sandbox_gone(self, handle: SandboxHandle) -> None:
        if handle.address:
            self.net.remove_builder(handle.address)
        with contextlib.suppress(ValueError):
            self._creating.remove(self._build_memory.pop(handle.sandbox_id, -1))

    # -- host-wide limits ------------------------------------------------------------------------
    def committed(self) -> tuple[int, int, int]:
        """(sandboxes, memory MiB, PIDs) given to sandboxes now: running, paused, pooled and being made."""
        count = len(self.sandboxes) + len(self._creating)
        memory = sum(s.record.memory_mb for s in self.sandboxes.values()) + sum(self._creating)
        for name, idle in self.pool.idle().items():
            count += idle
            memory += idle * self._pool_memory_mb(name)
        return count, memory, count * self.settings.pids

    def set_pool_limits(self, name: str, limits: PoolLimits | None) -> PoolLimits:
        """A template's pool keeps min to max idle sandboxes from now on (None: the server's defaults again), kept
        in the state DB; its pool starts filling at once."""
        try:
            self.templates.get(name)
        except TemplateError as e:
            raise NotFound(str(e)) from None
        if limits is None:
            self.pool.limits.pop(name, None)
            self.db.delete_setting(POOL_SETTING + name)
        else:
            if not 0 <= limits.min <= limits.max <= MAX_POOL:
                raise BadRequest(f"a pool's limits must be 0 <= min <= max <= {MAX_POOL}, got {limits.to_json()}")
            self.pool.limits[name] = limits
            self.db.set_setting(POOL_SETTING + name, json.dumps(limits.to_json()))
        self.pool.set_target(name, self.pool.target_of(name))
        return self.pool.limits_of(name)

    def _pool_memory_mb(self, name: str) -> int:
        try:
            return self._memory_mb(self.templates.get(name))
        except TemplateError:
            return self.settings.memory_mb or DEFAULT_MEMORY_MB

    def _over_limit(self, memory_mb: int) -> str | None:
        """Why one more sandbox of `memory_mb` does not fit, or None."""
        h = self.host_limits
        count, memory, pids = self.committed()
        if count + 1 > h.max_sandboxes:
            return (
                f"this server's limit of {h.max_sandboxes} sandboxes is reached ({count} running, paused or "
                "pooled): kill sandboxes you no longer need, or raise --max-sandboxes"
            )
        if memory + memory_mb > h.max_committed_memory_mb:
            return (
                f"this server's memory budget is committed: {memory} of {h.max_committed_memory_mb} MiB given to "
                f"sandboxes, {memory_mb} MiB more asked: kill sandboxes you no longer need, ask for less memory, "
                "or raise --max-memory-mb"
            )
        if pids + self.settings.pids > h.max_total_pids:
            return (
                f"this server's process budget is committed: {pids} of {h.max_total_pids} PIDs given to "
                "sandboxes: kill sandboxes you no longer need, lower --pids, or raise --max-total-pids"
            )
        return None

    async def _admit(self, memory_mb: int, template_name: str = "") -> None:
        """Refuse (429) a sandbox of `memory_mb` that would go over a host-wide limit. Idle pooled sandboxes
        (of templates other than its own) give way first: a pool never stops a user from creating a sandbox."""
        while (reason := self._over_limit(memory_mb)) is not None:
            if not await self.pool.evict_other_than(template_name):
                raise LimitReached(reason)

    def _fits(self, template: Template) -> bool:
        return self._over_limit(self._memory_mb(template)) is None

    async def _make_pooled(self, template: Template) -> Pooled:
        sandbox_id = new_sandbox_id()
        handle, service = await self._new(sandbox_id, template, self._disk_mb(template))
        if template.memory_images is None:
            return Pooled(sandbox_id, handle, template.digest, service)
        # A snapshot's processes: frozen at once, until a create hands the sandbox out (core/pool.py)
        await self._freeze_pooled(sandbox_id, handle, True)
        return Pooled(sandbox_id, handle, template.digest, service, drop=lambda: self._drop_carried(sandbox_id))

    async def _freeze_pooled(self, sandbox_id: str, handle: SandboxHandle, frozen: bool) -> None:
        """Freeze (or thaw) a pooled sandbox of a snapshot; if that fails, it goes, with what it carries."""
        try:
            await asyncio.to_thread(self.runtime.freeze, handle, frozen)
        except BaseException:
            self._drop_carried(sandbox_id)
            await self.runtime.destroy(handle)
            raise

    def _drop_carried(self, sandbox_id: str) -> None:
        for part, held in self._carried.pop(sandbox_id, []):
            part.drop_snapshot_restore(held)

    async def ensure_template(self, name: str) -> None:
        """On a node of a cluster: the template `name` fetched from another node if only others hold it."""
        if self.fetch_template is not None:
            await self.fetch_template(name)

    # -- lifecycle -------------------------------------------------------------------------------
    async def create(
        self,
        template_id: str,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        env_vars: dict[str, str] | None = None,
        auto_pause: bool = False,
        auto_pause_memory: bool = True,
        disk_mb: int | None = None,
        network: dict[str, Any] | None = None,
        allow_internet_access: bool | None = None,
        auto_resume: bool = False,
        iam: dict[str, Any] | None = None,
        volume_mounts: list[dict[str, Any]] | None = None,
        policy_of: Sandbox | None = None,
        recorded_as: tuple[str, str] | None = None,
        pool: bool = True,
        team: str = DEFAULT_TEAM,
        same_as: SandboxRecord | None = None,
        memory: bool = True,
    ) -> Sandbox:
        """A new sandbox. `policy_of`: a sandbox whose network policy it gets (a fork's source: core/snapshots.py);
        `same_as`: the record of a sandbox it takes the place of (its ID, tokens and policy: cluster/moving.py);
        `recorded_as`: the (template ID, alias) its record names instead of the template's (a fork's); `pool`:
        False for a template that goes right after (a fork's snapshot): none pooled, none taken; `team`: the team
        of the key that asked (core/teams.py), the only one (with the operator) that sees it; `memory`: False boots
        a snapshot with memory from its files alone (a moved sandbox whose processes could not be restored)."""
        with self.events.timed("create") as event:
            timeout = self._check_timeout(self.settings.default_timeout if timeout is None else timeout, positive=True)
            _check_str_map("metadata", metadata)
            _check_str_map("envVars", env_vars)
            tokens = workload_identity.check_tokens(iam)
            if tokens and self.net.identity is None:
                raise BadRequest("iam: this server issues no workload identity tokens")
            if policy_of is not None or same_as is not None:
                theirs = same_as or policy_of.record  # type: ignore[union-attr]
                policy = NetworkPolicy.from_json(theirs.network)
                allow_internet_access = theirs.allow_internet_access
            else:
                policy = parse_policy(network, allow_internet_access, set(tokens), team)
            public, mask = parse_ingress(network)
            if auto_resume and not auto_pause:
                raise BadRequest(
                    "autoResume needs autoPause (a sandbox that is killed at its timeout cannot be resumed)"
                )
            idle = (metadata or {}).get(META_IDLE)
            if idle is not None and (not idle.isdigit() or not 1 <= int(idle) <= self.settings.max_timeout):
                raise BadRequest(
                    f"metadata {META_IDLE} must be a whole number of seconds from 1 to {self.settings.max_timeout}"
                )
            mounts = volume_mounts_.check(self, volume_mounts)
            claimed = Counter(m["volumeID"] for m in mounts)  # deleting these volumes is refused meanwhile
            self.creating_with.update(claimed)
            try:
                await self.ensure_template(template_id)
                try:
                    template = self.templates.get(template_id)
                except TemplateError as e:
                    raise NotFound(str(e)) from None
                if not memory:
                    template = replace(template, memory_uid_base=None)
                event.template = recorded_as[0] if recorded_as else template.name
                if template.memory_images is not None and template.memory_volume_mounts:
                    # a snapshot whose processes had volumes mounted: the same volumes, where they were
                    theirs = [{"name": m["volumeID"], "path": m["path"]} for m in template.memory_volume_mounts]
                    if mounts and [(m["path"], m["volumeID"]) for m in mounts] != [
                        (m["path"], m["volumeID"]) for m in template.memory_volume_mounts
                    ]:
                        raise BadRequest(
                            f"snapshot '{template.name}' has volumes mounted by its processes: a sandbox from it "
                            "mounts the same ones, where they were (give no volumeMounts)"
                        )
                    self.creating_with.subtract(claimed)
                    mounts = volume_mounts_.check(self, theirs)
                    claimed = Counter(m["volumeID"] for m in mounts)
                    self.creating_with.update(claimed)
                disk_mb = self._check_disk_mb(template, disk_mb)
                res = self._resources(template, metadata or {})
                # Pooled sandboxes have the template's default disk and resources: others are made fresh.
                default = disk_mb == self._disk_mb(template) and res == self._resources(template, {})
                pooled = self.pool.take(template.name, template.digest) if default and pool else None
                event.mode = "new" if pooled is None else "pool"
                if pooled is not None:
                    sandbox_id, handle, service = pooled.sandbox_id, pooled.handle, pooled.service
                    if template.memory_images is not None:  # (a snapshot's processes, frozen since their restore)
                        await self._freeze_pooled(sandbox_id, handle, False)
                else:
                    await self._admit(res.memory_mb, template.name)  # what it asks for, not the template's default
                    sandbox_id = same_as.sandbox_id if same_as is not None else new_sandbox_id()
                    handle, service = await self._new(sandbox_id, template, disk_mb, res)
                if pool:
                    self.pool.schedule_refill(template.name)
                try:  # pooled or not, a sandbox starts with the default policy: its own now
                    ca, ca_vars = await self.net.apply_new(handle, policy)
                    if template.memory_images is None:  # (a snapshot's processes have theirs mounted again already)
                        await volume_mounts_.attach(self, handle, mounts)
                except BaseException:
                    self._drop_carried(sandbox_id)
                    await self.runtime.destroy(handle)
                    raise
                env_vars = {**template.env, **ca_vars, **(env_vars or {})}
                now = time.time()
                rec = SandboxRecord(
                    sandbox_id=sandbox_id,
                    template_id=recorded_as[0] if recorded_as else template.name,
                    alias=recorded_as[1] if recorded_as else template.name,
                    client_id="sandboxd",
                    envd_token=secrets.token_urlsafe(24),
                    started_at=now,
                    end_at=now + timeout,
                    state="running",
                    team=team,
                    metadata=dict(metadata or {}),
                    idle_timeout=int(idle) if idle is not None else 0,
                    env_vars=dict(env_vars or {}),
                    cpu_count=max(1, int(res.cpu_count)),
                    memory_mb=res.memory_mb,
                    disk_mb=disk_mb,
                    auto_pause=auto_pause,
                    auto_pause_memory=auto_pause_memory,
                    default_user=template.default_user,
                    default_workdir=template.default_workdir,
                    handle={**asdict(handle), "state_dir": str(handle.state_dir)},
                    layers=[str(p) for p in template.layers],
                    network=policy.to_json(),
                    allow_internet_access=allow_internet_access is not False,
                    traffic_token=None if public else secrets.token_urlsafe(24),
                    mask_request_host=mask,
                    auto_resume=auto_resume,
                    iam_tokens=tokens,
                    volume_mounts=mounts,
                )
                if same_as is not None:  # (a sandbox moved from a lost node: the same to its clients)
                    rec.envd_token, rec.traffic_token = same_as.envd_token, same_as.traffic_token
                    rec.started_at, rec.iam_tokens = same_as.started_at, same_as.iam_tokens
                sandbox = Sandbox(rec, handle)
                sandbox.service = service
                if ca is not None:
                    sandbox.ext["egress_ca"] = ca
                if rec.idle_timeout:
                    await self._mark_active(sandbox)
                self._register(sandbox)
                self.db.put(rec)
                carried = self._carried.pop(sandbox_id, [])
                if carried:  # (a snapshot's processes: the parts attach what they carry, envd its kept commands)
                    host_pids = await asyncio.to_thread(self.runtime.host_pids, handle)
                    await pausing.attach_carried(sandbox, carried, host_pids)
                self.reaper.wake()
                event.sandbox_id = sandbox_id
                return sandbox
            finally:
                self.creating_with.subtract(claimed)
                self.creating_with = +self.creating_with

    async def _mark_active(self, sandbox: Sandbox) -> None:
        """Active now: its idle timeout counts from here, and from its CPU time now (core/reaper.py)."""
        sandbox.last_active = time.time()
        with contextlib.suppress(Exception):
            sandbox.idle_mark = (await asyncio.to_thread(self.runtime.stats, sandbox.handle)).cpu_usage_ns

    def _register(self, sandbox: Sandbox) -> None:
        sandbox.domain = self.settings.domain
        self.sandboxes[sandbox.id] = sandbox
        self.net.add(sandbox)

    async def update_network(
        self, sandbox_id: str, network: dict[str, Any], allow_internet_access: bool | None
    ) -> None:
        """Replace the sandbox's egress policy (all of it: what the update leaves out is cleared)."""
        sandbox = self.get(sandbox_id)
        await self.net.update(sandbox, network, allow_internet_access)
        self.db.put(sandbox.record)

    def volume_users(self, volume_id: str) -> list[str]:
        return volume_mounts_.users(self, volume_id)

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise NotFound(self.gone_message(sandbox_id))
        return sandbox

    def gone_message(self, sandbox_id: str) -> str:
        """Why there is no such sandbox: it ended (how and when), or it never was (core/endings.py)."""
        ended = self._ending.get(sandbox_id) or (self.db.ended(sandbox_id) if len(sandbox_id) <= 64 else None)
        if ended is None:
            return f"sandbox '{sandbox_id}' not found"
        return f"sandbox '{sandbox_id}' not found: {endings.explain(ended)}"

    def ended(self) -> list[dict[str, Any]]:
        """Ended sandboxes, latest first, with those whose processes are still going (core/endings.py)."""
        ending = sorted(self._ending.values(), key=lambda e: -e["endedAtUnix"])
        return ending + [e for e in self.db.all_ended() if e["sandboxID"] not in self._ending]

    def find(self, sandbox_id: str) -> Sandbox | None:
        return self.sandboxes.get(sandbox_id)

    def team_of(self, sandbox_id: str) -> str | None:
        """The team of the sandbox (alive, or ended and still remembered); None for one unknown."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            return sandbox.record.team
        ended = self._ending.get(sandbox_id) or (self.db.ended(sandbox_id) if len(sandbox_id) <= 64 else None)
        return None if ended is None else str(ended.get("team") or DEFAULT_TEAM)

    async def kill(self, sandbox_id: str, end: endings.End | None = None) -> bool:
        """End the sandbox, recording why (`end`; by default: killed by an API request)."""
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return False
        end = end or endings.killed("an API request")
        sandbox.killed.set()
        self.net.remove(sandbox)
        sandbox.record.state = "killing"  # recorded first: a crash from here on never brings it back
        self.db.put(sandbox.record)
        # said from now on (it is gone from the listing): why and when it ended, while its processes go
        ended = self._ending[sandbox_id] = endings.body(sandbox.record, end, self.metrics.latest(sandbox_id))
        self.events.emit(Event("end", sandbox.record.template_id, end.kind, sandbox_id=sandbox_id, detail=end.message))
        self.metrics.forget(sandbox_id)
        if sandbox.checkpoint is not None:
            await self.drop_checkpoint(sandbox)
        for cb in sandbox.on_kill:
            try:
                cb()
            except Exception:
                log.exception("kill hook failed for %s", sandbox_id)
        try:
            await self.runtime.destroy(sandbox.handle)
        finally:
            self.db.end(sandbox_id, ended["endedAtUnix"], ended)
            self._ending.pop(sandbox_id, None)
            self.templates.release(sandbox_id)  # (held since its create: it may have no files any more)
            self._pausing.pop(sandbox_id, None)
            if sandbox.service is not None:
                sandbox.service.poll()  # its helper exited with the sandbox: collect it
        return True

    def set_timeout(self, sandbox_id: str, timeout: int) -> None:
        sandbox = self.get(sandbox_id)
        timeout = self._check_timeout(timeout)
        sandbox.record.end_at = time.time() + timeout
        self.db.put(sandbox.record)
        self.reaper.wake()

    async def drop_checkpoint(self, sandbox: Sandbox) -> None:
        """The sandbox's processes written to disk are let go of (it is killed, or it boots from its files)."""
        held, sandbox.checkpoint = sandbox.checkpoint, None
        if held is not None:
            held.release()
        for part in self.checkpoint_parts:
            try:
                await part.ended(sandbox)
            except Exception:
                log.exception("sandbox %s: ending what was attached to its checkpoint", sandbox.id)
        pausing.discard_images(sandbox.handle.state_dir)
        (sandbox.handle.state_dir / pausing.PARTS).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _timed(self, kind: str, sandbox: Sandbox, mode: str) -> Iterator[None]:
        """A pause or a resume of `sandbox` as an event (core/events.py); a pause in memory is mode "memory"."""
        with self.events.timed(kind, sandbox.record.template_id, "memory" if mode == pausing.FULL else mode) as ev:
            ev.sandbox_id = sandbox.id
            yield

    def pause_lock(self, sandbox_id: str) -> asyncio.Lock:
        """Held while the sandbox is paused, resumed or snapshotted: one of those at a time."""
        return self._pausing.setdefault(sandbox_id, asyncio.Lock())

    async def pause(self, sandbox_id: str, memory: bool = True, to_disk: bool = False) -> None:
        """Pause: frozen in memory, or (`memory` False) stopped with its files kept (core/pausing.py).
        `to_disk`: written to disk now (also one paused in memory already); if it cannot be, it stays paused in
        memory and the Conflict says why."""
        sandbox = self.get(sandbox_id)
        if sandbox.record.state == "paused" and not (to_disk and pausing.in_memory(sandbox)):
            raise Conflict(f"sandbox '{sandbox_id}' is already paused")
        lock = self.pause_lock(sandbox_id)
        if lock.locked():
            raise Conflict(f"sandbox '{sandbox_id}' is being paused or resumed")
        async with lock:
            if not memory:
                with self._timed("pause", sandbox, pausing.FILESYSTEM):
                    await pausing.run_hooks(self.before_files_pause, sandbox, "before pausing it to its files")
                    await pausing.stop(self, sandbox)
                return
            if sandbox.record.state != "paused":
                with self._timed("pause", sandbox, "memory"):
                    await asyncio.to_thread(self.runtime.freeze, sandbox.handle, True)
                sandbox.record.state, sandbox.record.pause_mode = "paused", pausing.FULL
                sandbox.paused_at = time.time()
                self.db.put(sandbox.record)
            if to_disk and pausing.in_memory(sandbox):  # (not killed meanwhile)
                try:
                    with self._timed("pause", sandbox, pausing.DISK):
                        await pausing.to_disk(self, sandbox)
                    return
                except (SandboxdError, RuntimeError_) as e:
                    self.reaper.wake()  # (it tries again later, as for any pause)
                    raise Conflict(f"sandbox '{sandbox_id}' is paused in memory, not on disk: {e}") from None
        if self.settings.checkpoint_after is not None:
            self.reaper.wake()  # (it writes paused sandboxes to disk when their time comes)

    async def pause_to_disk(self, sandbox_id: str) -> None:
        """Write a sandbox paused in memory to disk (core/pausing.py)."""
        sandbox = self.get(sandbox_id)
        async with self.pause_lock(sandbox_id):
            if pausing.in_memory(sandbox):  # (not resumed meanwhile)
                with self._timed("pause", sandbox, pausing.DISK):
                    await pausing.to_disk(self, sandbox)

    async def connect(self, sandbox_id: str, timeout: int | None, memory: bool = True) -> tuple[Sandbox, bool]:
        """Resume if paused (thawed; or booted again from its files when it was paused to them or `memory`
        is False); extend (never shorten) the end time. Returns (sandbox, resumed)."""
        sandbox = self.get(sandbox_id)
        timeout = self._check_timeout(self.settings.default_timeout if timeout is None else timeout, positive=True)
        resumed = False
        sandbox.last_active = time.time()
        if sandbox.record.state == "paused":
            async with self.pause_lock(sandbox_id):
                if sandbox.record.state == "paused":  # (not resumed by the request before this one)
                    mode = sandbox.record.pause_mode
                    if not memory and mode != pausing.FILESYSTEM:  # `on_resume="reboot"`: from its files
                        if mode == pausing.DISK:
                            await self.drop_checkpoint(sandbox)
                        await pausing.stop(self, sandbox)
                        mode = pausing.FILESYSTEM
                    with self._timed("resume", sandbox, mode):
                        if mode == pausing.FILESYSTEM:
                            await pausing.boot_again(self, sandbox)
                        elif mode == pausing.DISK:
                            await pausing.from_disk(self, sandbox)
                        else:
                            await asyncio.to_thread(self.runtime.freeze, sandbox.handle, False)
            sandbox.record.state, sandbox.record.pause_mode = "running", ""
            sandbox.record.resume_at_start = 0
            await pausing.run_hooks(self.after_resume, sandbox, "after its resume")
            if sandbox.record.idle_timeout:
                await self._mark_active(sandbox)
            sandbox.record.end_at = time.time() + timeout
            resumed = True
        else:
            sandbox.record.end_at = max(sandbox.record.end_at, time.time() + timeout)
        self.db.put(sandbox.record)
        self.reaper.wake()
        return sandbox, resumed

    def _check_timeout(self, timeout: Any, positive: bool = False) -> int:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
            raise BadRequest(f"timeout must be a whole number of seconds >= 0, got {timeout!r}")
        if positive and timeout == 0:
            # as E2B: a sandbox (or a resume) with no time to live is refused rather than made dead
            raise BadRequest("Timeout must be greater than 0")
        if timeout > self.settings.max_timeout:
            raise BadRequest(f"timeout {timeout} s is above the maximum of {self.settings.max_timeout} s")
        return timeout


def _check_str_map(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequest(f"{name} must be an object of string keys and string values")
