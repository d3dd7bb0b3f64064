"""Template builds: E2B's template API made real. Each step runs in a sandbox of this server's own
runtime (with networking, so package managers work) whose changes become a content-addressed layer
(templates/layers.py); a step whose layer exists is not run again. Builds of one template run one
after another, builds of different templates side by side. A failed build leaves no version behind
and says which step failed, its command, its exit status and its last lines of output.

    <templates>/<id>/builds/<buildID>.json     a build's status, reason and log (kept after it ends)
    <templates>/<id>/files/<hash>              an uploaded COPY archive (+ <hash>.json: its real sha256)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxd.core import startup
from sandboxd.core.errors import BadRequest, Forbidden, NotFound
from sandboxd.core.events import CANCELLED, FAILED, Event
from sandboxd.runtime.base import Limits, SandboxHandle, SandboxSpec
from sandboxd.templates import images
from sandboxd.templates.builtin import names as builtin_names
from sandboxd.templates.context import ContextError, CopyTarget, copy_stream
from sandboxd.templates.layers import LayerStore, drop_per_sandbox_files, layer_key
from sandboxd.templates.recipe import DEFAULT_IMAGE, BuildState, Recipe, Step
from sandboxd.templates.store import TemplateError, TemplateStore, new_template_id, write_json

if TYPE_CHECKING:
    from sandboxd.core.manager import SandboxManager

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}(/[a-z0-9][a-z0-9._-]{0,99})?$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STEP_TIMEOUT = 3600.0
MAX_LOG_ENTRIES = 20_000
MAX_LOG_BYTES = 4 << 20
MAX_UPLOAD = 4 << 30  # one COPY archive, as uploaded
MAX_UNPACKED = 16 << 30  # what one COPY step may unpack
BUILD_MEMORY_MB = 2048
BUILDER = 1  # bump when a step's result would differ for the same inputs
TAIL_LINES = 20
WAITING_TTL = 24 * 3600  # s a requested build may wait for its start
# Run as root in an image's first build sandbox: SDK commands run as `user` by default, as on E2B.
PROVISION = (
    'found=; while IFS=: read -r n rest; do [ "$n" = user ] && found=1; done < /etc/passwd; '
    'if [ -z "$found" ]; then '
    "sh=/bin/sh; [ -x /bin/bash ] && sh=/bin/bash; "
    "if command -v useradd >/dev/null 2>&1; then useradd -m -u 1000 -U -s $sh user || useradd -m -s $sh user; "
    "elif command -v adduser >/dev/null 2>&1; then adduser -D -u 1000 user; "
    "else echo 'user:x:1000:1000::/home/user:/bin/sh' >> /etc/passwd && echo 'user:x:1000:' >> /etc/group && "
    "mkdir -p /home/user && chown 1000:1000 /home/user; fi; fi"
)


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StepFailed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class Build:
    template_id: str
    build_id: str
    names: list[str]
    tags: list[str]
    cpu_count: float | None = None
    memory_mb: int | None = None
    status: str = "waiting"  # waiting -> building -> ready | error
    logs: list[dict[str, Any]] = field(default_factory=list)
    reason: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    log_bytes: int = 0
    truncated: bool = False

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        self.log_bytes += len(message)
        if len(self.logs) >= MAX_LOG_ENTRIES or self.log_bytes > MAX_LOG_BYTES:
            if not self.truncated:
                self.truncated = True
                note = f"(log truncated: a build keeps {MAX_LOG_ENTRIES} lines, {MAX_LOG_BYTES >> 20} MiB)"
                self.logs.append({"timestamp": _now_iso(time.time()), "level": "warn", "message": note})
            if level != "error":
                return
        entry: dict[str, Any] = {"timestamp": _now_iso(time.time()), "level": level, "message": message}
        if step is not None:
            entry["step"] = step
        self.logs.append(entry)

    def to_json(self) -> dict[str, Any]:
        return {
            "templateID": self.template_id,
            "buildID": self.build_id,
            "names": self.names,
            "tags": self.tags,
            "cpuCount": self.cpu_count,
            "memoryMB": self.memory_mb,
            "status": self.status,
            "logEntries": self.logs,
            "reason": self.reason,
            "created": self.created,
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Build:
        return cls(
            template_id=d["templateID"],
            build_id=d["buildID"],
            names=d.get("names", []),
            tags=d.get("tags", []),
            cpu_count=d.get("cpuCount"),
            memory_mb=d.get("memoryMB"),
            status=d.get("status", "error"),
            logs=d.get("logEntries", []),
            reason=d.get("reason"),
            created=d.get("created", 0.0),
            finished=d.get("finished"),
        )


class TemplateBuilds:
    def __init__(self, manager: SandboxManager, store: TemplateStore) -> None:
        self.manager = manager
        self.store = store
        self.layers: LayerStore = store.layers
        self.builds: dict[str, Build] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # told (in a thread) of each template deleted, with its names: a cluster's bucket forgets it (cluster/layers.py)
        self.on_delete: list[Callable[[str, list[str]], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._upload_key = secrets.token_bytes(32)
        self.layers.clean_stale()  # what a build cut short by a crash left half-committed
        store.clean_scratch()  # a snapshot's template a crash cut short (core/snapshots.py)
        store.clean_forks()  # and a fork's snapshot it left
        store.prune_snapshot_layers()  # and the layers of deleted snapshots whose last sandbox a crash took
        self.registry: images.Registry | None = None  # where images are pulled from (--registry)
        self._pull_lock = asyncio.Lock()
        # builds running at once (of different templates): each step holds a sandbox of up to 2 GiB
        self._slots = asyncio.Semaphore(manager.settings.max_builds)
        # built-in templates may be (re)built: only on the server `sandboxd template build` starts for it
        self.builtin_builds = False

    # -- requests ----------------------------------------------------------------------------------
    def request(self, name: str, tags: list[str], cpu_count: int | None, memory_mb: int | None) -> Build:
        """POST /v3/templates: a new build of the template `name` (made if it does not exist)."""
        base, tag = self.store.split_tag(name)
        if not NAME_RE.match(base):
            raise BadRequest(
                f"template name '{base[:120]}' is not valid: lowercase letters, digits, '.', '_', '-', at most "
                "100 characters, optionally one 'namespace/' in front"
            )
        all_tags = [*([tag] if tag else []), *tags]
        for t in all_tags:
            if not TAG_RE.match(t):
                raise BadRequest(f"tag '{t[:130]}' is not valid: letters, digits, '.', '_', '-', at most 128")
        all_tags = list(dict.fromkeys(all_tags)) or ["default"]
        if cpu_count is not None and not 1 <= cpu_count <= 64:
            raise BadRequest("cpuCount must be between 1 and 64")
        if memory_mb is not None and not 128 <= memory_mb <= 1 << 20:
            raise BadRequest("memoryMB must be at least 128")
        builtin = base in builtin_names()
        if builtin and not self.builtin_builds:
            raise Forbidden(
                f"'{base}' is a built-in template: it is built on the server's host (`sandboxd template build "
                f"{base}`); give your template another name"
            )
        local, _ = self.store.resolve(base)
        ident_for_new = None
        if self.manager.catalog is not None and not builtin:  # (the cluster's ID for it: one template per name)
            named = self.manager.catalog.name(base, local or new_template_id())
            if local is None:
                ident_for_new = named
            elif named != local:
                log.warning("template %r here is %s, but %s in the cluster's catalog: built here as %s", base, local,
                            named, local)  # fmt: skip
        try:
            ident = self.store.claim(base, builtin=builtin, ident_for_new=ident_for_new)
        except TemplateError as e:
            raise Forbidden(str(e)) from None
        build = Build(
            template_id=ident,
            build_id=str(uuid.uuid4()),
            names=[base],
            tags=all_tags,
            cpu_count=cpu_count,
            memory_mb=memory_mb,
        )
        self.builds[build.build_id] = build
        self._save(build)
        # requested and never started: kept a while, not forever
        stale = [b for b in self.builds.values() if b.status == "waiting" and b.created < time.time() - WAITING_TTL]
        for b in stale:
            self.builds.pop(b.build_id, None)
        return build

    def tagged(self, ident: str, tags: list[str], build_id: str) -> None:
        """`tags` of the template now mean `build_id` (a build, or the API): told to a cluster's catalog."""
        tell_tagged(self.manager, ident, tags, build_id)

    def untagged(self, ident: str, tags: list[str]) -> None:
        catalog = self.manager.catalog
        if catalog is not None and not self.store.is_builtin(ident):
            try:
                catalog.untagged(ident, tags)
            except Exception:
                log.exception("template %s untagged %s: telling the cluster's catalog failed", ident, tags)

    def template_id(self, ident_or_name: str) -> str:
        ident, _ = self.store.resolve(ident_or_name)
        if ident is None or not (self.store.dir / ident / "meta.json").is_file():
            raise NotFound(f"template '{ident_or_name}' not found")
        return ident

    def get(self, template_id: str, build_id: str) -> Build:
        build = self.builds.get(build_id)
        if build is None:
            try:
                uuid.UUID(build_id)
                path = self.store.dir / template_id / "builds" / f"{build_id}.json"
                build = Build.from_json(json.loads(path.read_text()))
            except (ValueError, OSError, KeyError):
                raise NotFound(f"build '{build_id[:64]}' of template '{template_id[:64]}' not found") from None
            if build.status == "building":  # the server that ran it is gone
                build.status = "error"
                build.reason = {"message": "the build was interrupted (the server stopped); start it again"}
            elif build.status == "waiting":
                raise NotFound(f"build '{build_id}' was never started and has expired: request a new one")
        if build.template_id != template_id:
            raise NotFound(f"build '{build_id}' of template '{template_id}' not found")
        return build

    def _save(self, build: Build) -> None:
        d = self.store.dir / build.template_id / "builds"
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / f"{build.build_id}.json", build.to_json())

    async def delete(self, template_id: str) -> None:
        names = [n for n in self.store.meta(template_id).get("names", []) if isinstance(n, str)]
        await asyncio.to_thread(self.store.delete, template_id)
        self.manager.pool.drop_stale()  # its idle pooled sandboxes go now
        for told in self.on_delete:
            try:
                await asyncio.to_thread(told, template_id, names)
            except Exception:
                log.exception("template %s deleted: telling %r failed", template_id, told)

    def history(self, template_id: str) -> list[Build]:
        """The template's builds, newest first (from their files)."""
        out = []
        for path in (self.store.dir / template_id / "builds").glob("*.json"):
            with contextlib.suppress(ValueError, OSError, KeyError):
                out.append(self.builds.get(path.stem) or Build.from_json(json.loads(path.read_text())))
        return sorted(out, key=lambda b: b.created, reverse=True)

    # -- files -------------------------------------------------------------------------------------
    def _files(self, template_id: str) -> Path:
        return self.store.dir / template_id / "files"

    def _upload_mac(self, template_id: str, files_hash: str, expires: str) -> str:
        msg = f"{template_id}/{files_hash}/{expires}".encode()
        return hmac.new(self._upload_key, msg, hashlib.sha256).hexdigest()

    def upload_token(self, template_id: str, files_hash: str) -> str:
        expires = str(int(time.time()) + 3600)
        return f"{expires}.{self._upload_mac(template_id, files_hash, expires)}"

    def check_upload_token(self, template_id: str, files_hash: str, token: str) -> bool:
        expires, _, mac = token.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(mac, self._upload_mac(template_id, files_hash, expires))

    def has_files(self, template_id: str, files_hash: str) -> bool:
        return (self._files(template_id) / f"{files_hash}.json").is_file()

    async def receive_files(self, template_id: str, files_hash: str, chunks: AsyncIterator[bytes]) -> None:
        d = self._files(template_id)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".up-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_UPLOAD:
                        raise BadRequest(f"the upload is over the limit of {MAX_UPLOAD} bytes")
                    digest.update(chunk)
                    await asyncio.to_thread(_write_all, fd, chunk)
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            tmp.rename(d / files_hash)
            (d / f"{files_hash}.json").write_text(json.dumps({"sha256": digest.hexdigest(), "size": size}))
        finally:
            tmp.unlink(missing_ok=True)

    # -- running -----------------------------------------------------------------------------------
    def start(self, template_id: str, build_id: str, recipe: Recipe) -> None:
        build = self.get(template_id, build_id)
        if build.status != "waiting":
            raise BadRequest(f"build '{build_id}' was started already (it is {build.status})")
        if recipe.service and not self.store.is_builtin(template_id):
            raise BadRequest("service is sandboxd's own field for its built-in templates: use startCmd")
        for i, step in enumerate(recipe.steps, 1):
            if step.type == "COPY" and not self.has_files(template_id, step.files_hash or ""):
                raise BadRequest(
                    f"step {i} (COPY {step.args[0]}): its files were not uploaded (filesHash {step.files_hash})"
                )
        build.status = "building"
        self._save(build)
        task = asyncio.ensure_future(self._run(build, recipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, build: Build, recipe: Recipe) -> None:
        started = time.monotonic()
        outcome = FAILED
        lock = self._locks.setdefault(build.template_id, asyncio.Lock())
        try:
            if lock.locked():
                build.log("waiting for the running build of this template to end")
            async with lock:
                if self._slots.locked():
                    build.log(f"waiting for one of the {self.manager.settings.max_builds} builds running to end")
                async with self._slots:
                    await self._build(build, recipe)
            build.status, outcome = "ready", "ok"
            build.log(f"build finished in {time.monotonic() - started:.1f} s")
        except StepFailed as e:
            build.status = "error"
            build.reason = {"message": str(e), "step": e.step, "logEntries": build.logs[-TAIL_LINES:]}
            build.log(str(e), "error", e.step)
        except asyncio.CancelledError:
            build.status, outcome = "error", CANCELLED
            build.reason = {"message": "the build was cancelled (the server is stopping)"}
            raise
        except Exception as e:  # a bug or the host: still an answer for the client
            log.exception("build %s of %s failed", build.build_id, build.template_id)
            build.status = "error"
            build.reason = {"message": f"the build failed: {e}"}
            build.log(f"the build failed: {e}", "error")
        finally:
            build.finished = time.time()
            self._save(build)
            self.builds.pop(build.build_id, None)  # done: its status and log are read from its file now
            self.manager.events.emit(Event("build", build.template_id, outcome, time.monotonic() - started))

    async def _base(self, build: Build, recipe: Recipe) -> tuple[str | None, Path, BuildState, str]:
        """(top layer, rootfs below it, the state it leaves, a description) of the recipe's base."""
        if recipe.from_template:
            name = recipe.from_template
        else:
            image = recipe.from_image or DEFAULT_IMAGE
            if image not in (DEFAULT_IMAGE, "e2bdev/base:latest", "e2bdev/code-interpreter"):
                return await self._image(build, image, recipe.force)
            name = "code-interpreter-v1" if image == "e2bdev/code-interpreter" else "base"
        try:
            t = self.store.get(name)
        except TemplateError as e:
            raise StepFailed("base", str(e)) from None
        inherited = {
            "service": list(t.service),
            "service_user": t.service_user,
            "start_cmd": t.start_cmd,
            "ready_cmd": t.ready_cmd,
            "probe_cmd": t.probe_cmd,
            "probe_timeout": t.probe_timeout,
            "memory_mb": t.memory_mb,
            "cpu_count": t.cpu_count,
        }
        state = BuildState(user=t.default_user, workdir=t.default_workdir, env=dict(t.env), inherited=inherited)
        base = Path(t.base) if t.base else t.rootfs
        return t.top_layer, base, state, f"{name} ({t.digest[:12]})"

    async def _build(self, build: Build, recipe: Recipe) -> None:
        build.log(f"FROM {recipe.base}", step="base")
        top, base, state, described = await self._base(build, recipe)
        build.log(f"base: {described}", "debug", "base")
        forced = recipe.force
        total = len(recipe.steps)
        for i, step in enumerate(recipe.steps, 1):
            label = f"[{i}/{total}] {step.describe()}"
            forced = forced or step.force
            if step.type == "ENV":
                for k, v in zip(step.args[::2], step.args[1::2], strict=False):
                    state.env[k] = _expand(v, state.env)
                build.log(label, step=str(i))
                continue
            if step.type == "USER":
                state.user = step.args[0]
                build.log(label, step=str(i))
                continue
            if step.type == "WORKDIR":
                state.workdir = step.args[0]
            payload: dict[str, Any] = {"builder": BUILDER, "type": step.type, "args": list(step.args), **state.key()}
            if step.type == "COPY":
                payload["files"] = self._files_digest(build.template_id, step.files_hash or "")
            if forced:
                payload["forced"] = build.build_id
            key = layer_key(top, base, payload)
            if not forced and self.layers.get(key) is not None:
                build.log(f"CACHED {label}", step=str(i))
                top = key
                continue
            build.log(label, step=str(i))
            step_started = time.monotonic()
            await self._run_step(build, str(i), step, state, top, base, key, label)
            build.log(f"done {label} in {time.monotonic() - step_started:.2f} s", "debug", str(i))
            top = key
        own = bool(recipe.start_cmd or recipe.ready_cmd)
        if not own and (state.inherited.get("start_cmd") or state.inherited.get("ready_cmd")):
            recipe = replace(recipe, start_cmd=state.inherited["start_cmd"], ready_cmd=state.inherited["ready_cmd"])
        if recipe.start_cmd or recipe.ready_cmd:
            await self._finalize(build, recipe, state, top, base)
        self._commit_version(build, recipe, state, top, base)

    async def _image(self, build: Build, ref: str, force: bool) -> tuple[str | None, Path, BuildState, str]:
        """An OCI image from this server's registry as layers, or without a registry a Debian-family image
        made with mmdebstrap; then the user `user` that SDK commands run as by default (added if the image
        has none)."""

        def progress(text: str) -> None:
            build.log(text, step="base")

        try:
            async with self._pull_lock:  # one writer of the shared layout and of the Debian cache at a time
                debian = images.debian_base(ref) if self.registry is None else None
                if debian is not None:
                    rootfs = await asyncio.to_thread(images.debian_rootfs, self.store.dir, *debian, progress)
                    top, base, config = None, rootfs, images.ImageConfig(env={})
                    described = f"image {ref} (Debian {debian[0]}, mmdebstrap)"
                else:
                    source = images.source_for(ref, self.registry)
                    layout = await asyncio.to_thread(
                        images.pull, source, self.registry, self.store.dir / ".oci", progress
                    )
                    layers, config = await asyncio.to_thread(images.read_layout, layout, "img")
                    top = await asyncio.to_thread(images.import_layers, layout, layers, self.layers, progress)
                    base = images.empty_root(self.layers)
                    described = f"image {ref} ({len(layers)} layers)"
        except images.ImageError as e:
            raise StepFailed("base", str(e)) from None
        root = BuildState(user="root", workdir="/", env=config.env)
        provision = Step("RUN", (PROVISION, "root"))
        key = layer_key(top, base, {"builder": BUILDER, "provision": PROVISION, **root.key()})
        if force or self.layers.get(key) is None:
            progress("adding the user 'user' (uid 1000) unless the image has one")
            await self._run_step(build, "base", provision, root, top, base, key, "[base] user")
        state = BuildState(user="user", workdir=config.workdir or "/home/user", env=config.env)
        return key, base, state, described

    def _files_digest(self, template_id: str, files_hash: str) -> str:
        meta = json.loads((self._files(template_id) / f"{files_hash}.json").read_text())
        return str(meta["sha256"])

    async def _sandbox(self, build: Build, top: str | None, base: Path) -> SandboxHandle:
        layers = self.layers.lowers(top, base)
        limits = Limits(
            memory_mb=build.memory_mb or BUILD_MEMORY_MB,  # the template's own memory, if it names one
            cpu_count=float(build.cpu_count or 2),
            pids=4096,
            disk_mb=0,
        )
        return await self.manager.build_sandbox(SandboxSpec("", layers, "build", limits))

    async def _run_step(
        self, build: Build, n: str, step: Step, state: BuildState, top: str | None, base: Path, key: str, label: str
    ) -> None:
        runtime = self.manager.runtime
        handle = await self._sandbox(build, top, base)
        work = self.layers.new_dir()
        kept = False
        try:
            tail: list[str] = []

            def line(text: str) -> None:
                tail.append(text)
                del tail[:-TAIL_LINES]
                build.log(text, step=n)

            try:
                if step.type == "RUN":
                    who = startup.identity(
                        runtime,
                        handle,
                        step.args[1] if len(step.args) > 1 and step.args[1] else state.user,
                        state.env,
                        state.workdir,
                    )
                    code = await startup.run(runtime, handle, who, step.args[0], line, timeout=STEP_TIMEOUT)
                elif step.type == "WORKDIR":
                    who = startup.identity(runtime, handle, "root", {}, "/")
                    code = await startup.run(runtime, handle, who, f"mkdir -p '{_q(step.args[0])}'", line)
                else:  # COPY
                    code = await self._copy(build, handle, step, state, line)
            except (startup.StartError, ContextError) as e:
                raise StepFailed(n, f"step {label} failed: {e}") from None
            if code != 0:
                how = "timed out" if code == -1 else f"exited with status {code}"
                output = ("; last output:\n" + "\n".join(tail)) if tail else ""
                raise StepFailed(n, f"step {label} failed: the command {how}{output}")
            await runtime.destroy(handle, keep_upper=work / "diff")
            kept = True
            drop_per_sandbox_files(work / "diff")
            await asyncio.to_thread(self.layers.commit, work, key, top, base, label, handle.uid_base)
        finally:
            if not kept:
                await runtime.destroy(handle)
            self.manager.build_sandbox_gone(handle)
            shutil.rmtree(work, ignore_errors=True)

    async def _copy(self, build: Build, handle: SandboxHandle, step: Step, state: BuildState, line: Any) -> int:
        runtime = self.manager.runtime
        owner = startup.identity(runtime, handle, step.args[2] or state.user, {}, "/").user
        mode = int(step.args[3], 8) if step.args[3] else None
        target = CopyTarget(step.args[0], step.args[1], owner.uid, owner.gid, mode)
        archive = self._files(build.template_id) / (step.files_hash or "")
        root = startup.identity(runtime, handle, "root", {}, "/")
        read, write = os.pipe()
        errors: list[ContextError] = []

        def feed() -> None:
            try:
                with open(archive, "rb") as src, os.fdopen(write, "wb") as out:
                    count = copy_stream(src, target, out, MAX_UNPACKED)
                line(f"copied {count} entries to {step.args[1]}")
            except ContextError as e:
                errors.append(e)
            except BrokenPipeError:
                errors.append(ContextError("the sandbox's tar stopped reading"))

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            code = await startup.run(
                runtime,
                handle,
                root,
                "tar -x -f - -C / --same-owner --same-permissions --keep-directory-symlink --no-overwrite-dir",
                line,
                stdin=read,
            )
        finally:
            os.close(read)
        await asyncio.to_thread(feeder.join)
        if errors:
            raise errors[0]
        return code

    async def _finalize(self, build: Build, recipe: Recipe, state: BuildState, top: str | None, base: Path) -> None:
        build.log(
            f"[finalize] start: {recipe.start_cmd or '(none)'}; ready: {recipe.ready_cmd or '(none)'}", step="finalize"
        )
        runtime = self.manager.runtime
        handle = await self._sandbox(build, top, base)
        try:
            who = startup.identity(runtime, handle, state.user, state.env, state.workdir)
            started = time.monotonic()
            timeout = self.manager.settings.ready_timeout
            await startup.start_service(runtime, handle, who, recipe.start_cmd, recipe.ready_cmd, timeout)
            build.log(f"[finalize] ready after {time.monotonic() - started:.2f} s", step="finalize")
        except startup.StartError as e:
            raise StepFailed("finalize", f"the template does not start: {e}") from None
        finally:
            await runtime.destroy(handle)
            self.manager.build_sandbox_gone(handle)

    def _commit_version(self, build: Build, recipe: Recipe, state: BuildState, top: str | None, base: Path) -> None:
        size = sum(layer.size_bytes for layer in self.layers.chain(top)) if top else 0
        meta = {
            "top": top,
            "base": str(base),
            "env": state.env,
            "default_user": state.user,
            "default_workdir": state.workdir,
            "start_cmd": recipe.start_cmd,
            "ready_cmd": recipe.ready_cmd,
            "probe_cmd": recipe.probe_cmd or state.inherited.get("probe_cmd", ""),
            "probe_timeout": recipe.probe_timeout or state.inherited.get("probe_timeout") or 5.0,
            "recipe": recipe.label,
            "cpu_count": build.cpu_count or state.inherited.get("cpu_count"),
            "memory_mb": build.memory_mb or state.inherited.get("memory_mb"),
            "service": list(recipe.service) or state.inherited.get("service", []),
            "service_user": state.inherited.get("service_user", "user"),
            "built_at": time.time(),
            "size_bytes": size,
        }
        self.store.add_version(build.template_id, build.build_id, meta, build.tags)
        self.tagged(build.template_id, build.tags, build.build_id)
        build.log(f"template {build.names[0]} ({build.template_id}) tagged {', '.join(build.tags)}")


def tell_tagged(manager: SandboxManager, ident: str, tags: list[str], build_id: str) -> None:
    """A cluster's catalog told that `tags` of the template now mean `build_id` (a failure is logged: the template is
    made here all the same, and other nodes follow at the next change)."""
    catalog = manager.catalog
    if catalog is not None and not manager.templates.is_builtin(ident):
        try:
            catalog.tagged(ident, tags, build_id)
        except Exception:
            log.exception("template %s tagged %s: telling the cluster's catalog failed", ident, tags)


def _expand(value: str, env: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` of a variable the build has set (ARG and ENV, as in a Dockerfile: the SDKs turn
    `ENV A=$B` into a literal); any other `$` stays as it is (a password's `$$` is not eaten)."""
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
        lambda m: env.get(m.group(1) or m.group(2), m.group(0)),
        value,
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _q(s: str) -> str:
    return s.replace("'", "'\\''")
