"""Templates on every node without a shared disk: a node asked for a sandbox of a template it does not hold fetches
the template from a node that does (the nodes' leases say which), layer by layer, and keeps each layer only if its
content has the digest the cluster's state recorded for its key.

- A node serves its templates to the others under `/admin/cluster/` (the operator's key, and the cluster's token
  when there is one): a template's manifest (its build's config, its layers' keys from the top down, the root
  filesystem at the bottom) and each layer as a tar stream (templates/transfer.py). Serving a manifest records each
  of its layers' content digest in the state (computed once by the node holding the layer, kept in its layer.json;
  the first told for a key stays).
- The fetching node takes the layers it lacks, bottom first, each unpacked beside its layers, checked against the
  state's digest and then renamed into place; the template itself (its ID, names, build) is written last, whole: a
  create that fails midway leaves only whole layers. Concurrent creates of one template fetch it once.
- A snapshot with its processes' memory carries CRIU's images of them as one more tree, under a key of its own
  (`memory_key`: a hash of the template's ID, build and what its processes need at a restore — their uid range and
  what the server's parts carry for them), checked by its digest in the state as a layer is: its config cannot be
  changed without changing its key, for which the state then has no digest. One whose processes had volumes mounted
  stays on its node (the volumes are that node's).
- The root filesystem at the bottom (a built-in Debian root filesystem every node's setup makes) is not moved: a
  node without it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from sandboxd.cluster import CLUSTER_HEADER
from sandboxd.cluster.bucket import COLLECT_SECONDS, Bucket, BucketError
from sandboxd.cluster.catalog import Catalog
from sandboxd.cluster.tls import ClusterTLS
from sandboxd.core.errors import BadRequest, NotFound, SandboxdError
from sandboxd.periodic import Periodic
from sandboxd.state.sql import State
from sandboxd.templates import transfer
from sandboxd.templates.images import empty_root
from sandboxd.templates.store import TemplateError, TemplateStore

log = logging.getLogger("sandboxd.cluster")

PREFIX = "/admin/cluster"
PUSH_SECONDS = 5.0  # with a bucket: how often a node looks for templates to put there
KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")
IDENT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
BUILD_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
MAX_MANIFEST = 4 * 1024 * 1024
MAX_LAYERS = 1000
MAX_LOG_ENTRIES = 500  # of a build's log, carried with its template to other nodes
STREAM_SLACK = 64 * 1024 * 1024  # bytes a layer's tar may carry beyond twice its size on disk (headers, padding)
MEMORY_DIGEST = "memory-digest.json"  # a snapshot's memory's digest, kept beside it in its build's dir
TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=60.0, pool=5.0)


class FetchFailed(SandboxdError):
    """A template that other nodes hold could not be had from any of them."""

    status = 503


class LayerShare:
    def __init__(
        self,
        store: TemplateStore,
        state: State,
        api_key: str,
        token: str | None,
        tls: ClusterTLS | None = None,
        bucket: Bucket | None = None,
    ) -> None:
        self.store, self.state, self.bucket = store, state, bucket
        self._pushed: set[tuple[str, str]] = set()  # (template ID, build) in the bucket
        self.before_push: list[Callable[[], None]] = []  # each round, first (cluster/moving.py collects its images)
        self._collect_at = time.monotonic() + COLLECT_SECONDS  # (the bucket's layers no manifest names: collected)
        self._pusher = Periodic("sandboxd-bucket", PUSH_SECONDS, self._push_round, log)
        self._verify: ssl.SSLContext | bool = tls.client_context() if tls else True  # (other nodes: mutual TLS)
        self._headers = {"X-API-KEY": api_key, **({CLUSTER_HEADER.decode(): token} if token else {})}
        self._fetching = asyncio.Lock()  # (one fetch at a time: creates of a template being fetched wait for it)
        self.catalog: Catalog | None = None  # (the cluster's: cluster/catalog.py, set by the server)
        # memory key -> (a snapshot's images here, their digest): told in a manifest, served and put in the bucket
        self._memories: dict[str, tuple[Path, str]] = {}
        self._told: set[str] = set()  # keys whose digest this process told the state

    async def start(self) -> None:
        if self.bucket is not None:
            self._pusher.start()

    async def stop(self) -> None:
        await self._pusher.stop()

    # -- the bucket -------------------------------------------------------------------------------
    async def _push_round(self) -> None:
        await asyncio.to_thread(self.push)
        if time.monotonic() >= self._collect_at:
            self._collect_at = time.monotonic() + COLLECT_SECONDS
            assert self.bucket is not None
            gone = await asyncio.to_thread(self.bucket.collect)
            if gone:
                log.info("%d layer(s) no template names any more deleted from %s", len(gone), self.bucket.url)

    def push(self) -> int:
        """Each template here (not the built-in ones: every node's setup makes those) into the bucket, its layers
        first, then its manifest; the templates put."""
        assert self.bucket is not None
        for step in self.before_push:
            try:
                step()
            except Exception:
                log.exception("before putting templates in the bucket: %r failed", step)
        done = 0
        idents = self.store.names()
        builtin = {ident for ident in idents if self.store.is_builtin(ident)}
        theirs: set[str] = set()  # the built-in templates' layers: every node has them (and they are big)
        for ident in builtin:
            with contextlib.suppress(TemplateError, FileNotFoundError, ValueError):
                top = self.store.get(ident).top_layer
                theirs |= {layer.key for layer in self.store.layers.chain(top)} if top else set()
        for ident in idents:
            if ident in builtin:
                continue
            if (ident, self.store.tag(ident, "default")) in self._pushed:  # (a link read, not its layers)
                continue
            try:
                manifest = self.manifest(ident)
            except (SandboxdError, TemplateError):  # (a snapshot whose processes had volumes, an old single rootfs)
                continue
            started, sent = time.monotonic(), 0
            trees: list[tuple[str, Path | None, str, int]] = []  # (key, its tree here, digest, size): bottom last
            for entry in manifest["layers"]:
                if entry["key"] not in theirs:
                    layer = self.store.layers.get(entry["key"])
                    trees.append(
                        (entry["key"], layer.diff, self.store.layers.digest_of(layer), layer.size_bytes)
                        if layer is not None
                        else (entry["key"], None, "", 0)
                    )
            if (memory := manifest.get("memory")) is not None:
                images, digest = self._memories[memory["key"]]  # (just told, by manifest())
                trees.append((memory["key"], images, digest, int(memory["size_bytes"])))
            for key, tree, digest, size in trees:
                if self.bucket.has_layer(key):
                    continue
                if tree is None or not digest:
                    break  # (pruned or deleted meanwhile: the next round)
                self._put(key, tree, digest)
                sent += size
            else:
                names = [ident, *(n for n in manifest["meta"].get("names", []) if isinstance(n, str))]
                self.bucket.put_manifest(names, manifest)
                self._pushed.add((ident, manifest["build"]))
                done += 1
                log.info(
                    "template %s put in %s (%.1f MB of new layers, %.2f s)",
                    ident,
                    self.bucket.url,
                    sent / 1e6,
                    time.monotonic() - started,
                )
        return done

    def _put(self, key: str, tree: Path, digest: str) -> None:
        assert self.bucket is not None
        proc = transfer.pack(tree)
        assert proc.stdout is not None
        try:
            self.bucket.put_layer(key, proc.stdout, digest)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if proc.returncode != 0:
            raise BucketError(f"layer {key}: tar failed ({proc.returncode}): not put in the bucket")

    def forget(self, ident: str, names: list[str]) -> None:
        """The template was deleted here: not in the bucket any more either (a create elsewhere finds it nowhere)."""
        self._pushed = {pushed for pushed in self._pushed if pushed[0] != ident}
        if self.bucket is not None:
            self.bucket.forget([ident, *names])

    # -- serving ----------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        async def manifest(request: Request) -> Response:
            build = request.query_params.get("build")
            if build is not None and not BUILD_RE.match(build):
                raise BadRequest(f"build {build[:80]!r} is not a build's ID")
            return JSONResponse(await asyncio.to_thread(self.manifest, request.path_params["name"], build))

        async def layer(request: Request) -> Response:
            key = request.path_params["key"]
            found = self.store.layers.get(key) if KEY_RE.match(key) else None
            tree = found.diff if found is not None else self._memories.get(key, (None, ""))[0]
            if tree is None or not tree.is_dir():
                raise NotFound(f"layer {key[:80]!r} is not on this node")
            proc = transfer.pack(tree)

            async def body() -> Any:
                assert proc.stdout is not None
                try:
                    while chunk := await asyncio.to_thread(proc.stdout.read, transfer.CHUNK):
                        yield chunk
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    await asyncio.to_thread(proc.wait)

            return StreamingResponse(body(), media_type="application/x-tar")

        return [
            Route(PREFIX + "/templates/{name:path}", manifest, methods=["GET"]),
            Route(PREFIX + "/layers/{key}", layer, methods=["GET"]),
        ]

    def manifest(self, name: str, build: str | None = None) -> dict[str, Any]:
        """What another node needs to hold the template `name` (its default build, or `name:tag`'s, or `build`)."""
        try:
            t = self.store.get(name)
            if build is not None and t.digest != build:
                t = self.store.version(t.name, build)
        except TemplateError as e:
            raise NotFound(str(e)) from None
        if t.memory_volume_mounts:
            raise BadRequest(f"'{name}' is a snapshot whose processes had volumes mounted: it runs on their node")
        if not t.top_layer:
            raise BadRequest(f"template '{name}' is one root filesystem of an old install: build it again to share it")
        base = self._relative(Path(t.base))
        layers = []
        for layer in self.store.layers.chain(t.top_layer):
            digest = self.store.layers.digest_of(layer)
            self._tell(layer.key, digest, layer.size_bytes)
            layers.append(
                {
                    "key": layer.key,
                    "parent": layer.parent,
                    "step": layer.step,
                    "size_bytes": layer.size_bytes,
                    "created": layer.created,
                }
            )
        version = json.loads((t.path / "template.json").read_text())
        memory = self._memory(t, version.get("memory")) if t.memory_images is not None else None
        record: dict[str, Any] | None = None  # (the build's record: its status and log, as GET /templates/{id} shows)
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((self.store.dir / t.name / "builds" / f"{t.digest}.json").read_text())
            if isinstance(record, dict):
                record["logEntries"] = list(record.get("logEntries") or [])[-MAX_LOG_ENTRIES:]
        return {
            "templateID": t.name,
            "meta": self.store.meta(t.name),
            "build": t.digest,
            "version": {**version, "base": base},
            "base": base,
            "layers": layers,
            "buildRecord": record,
            "memory": memory,
        }

    def _memory(self, t: Any, config: Any) -> dict[str, Any]:
        """A snapshot's processes, told: their key and size, the config a restore needs; their digest recorded (computed
        once, then kept beside them)."""
        images: Path = t.memory_images
        if not isinstance(config, dict):
            raise BadRequest(f"snapshot '{t.name}' is damaged: its memory's config is not recorded")
        key = memory_key(t.name, t.digest, config)
        kept = t.path / MEMORY_DIGEST
        try:
            told = json.loads(kept.read_text())
            digest, size = str(told["digest"]), int(told["size"])
            if told.get("key") != key:
                raise ValueError("another key")
        except (OSError, ValueError, KeyError, TypeError):
            digest = transfer.tree_digest(images)
            size = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(images))
            tmp = kept.with_name(f".{kept.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "digest": digest, "size": size}))
            os.rename(tmp, kept)
        self._tell(key, digest, size)
        self._memories[key] = (images, digest)
        return {"key": key, "size_bytes": size, "config": config}

    def _tell(self, key: str, digest: str, size: int) -> None:
        """The state told a tree's digest (once per process: the first told stays there anyway)."""
        if key not in self._told:
            self.state.put_layer(key, digest, size)
            self._told.add(key)

    def _relative(self, base: Path) -> str:
        """The root filesystem's place in the templates dir (the same on every node)."""
        rel = os.path.relpath(base, self.store.dir)
        if not rel.startswith(".."):
            return rel
        parts = base.parts  # (a templates dir whose built-in root filesystems are linked from another's)
        if ".debian" in parts:
            return str(Path(*parts[parts.index(".debian") :]))
        if base.name == ".empty-root":
            return base.name
        raise BadRequest(f"the template's root filesystem {base} is outside this node's templates dir")

    # -- fetching ---------------------------------------------------------------------------------
    async def ensure(self, name: str) -> None:
        """`name` held here as the cluster's catalog says (cluster/catalog.py: the build its tag means, fetched if
        need be; a tag removed elsewhere removed here), or — not catalogued — held here at all, fetched from a node
        that holds it if need be (nothing happens when no node does: the create then says it is not found)."""
        base, tag = self.store.split_tag(name)
        told = await asyncio.to_thread(self.catalog.tags, base) if self.catalog is not None else None
        if told is None:
            if self.store.resolve(name)[0] is None:
                await self._fetch_any(name, base, None, ("default",))
            return
        ident, tags = told
        tag = tag or "default"
        if tag not in tags:  # (removed elsewhere, or never there: not here either)
            if self.store.drop_tag(ident, tag):
                log.info("template %s: tag %r removed, as the cluster's catalog says", ident, tag)
            return
        build, holder = tags[tag]
        if self.store.tag(ident, tag) == build:
            return
        if not self.store.has_version(ident, build):
            await self._fetch_any(ident, ident, build, (tag,), holder)
        if not self.store.has_version(ident, build):
            raise FetchFailed(
                f"template '{name}' is build {build} in the cluster (built or tagged on node {holder}), which this "
                "node could not fetch from any node or bucket: try again once that node answers"
            )
        if self.store.tag(ident, tag) != build:
            self.store.set_tag(ident, tag, build)
            log.info("template %s: tag %r is build %s, as the cluster's catalog says", ident, tag, build)

    async def _fetch_any(
        self, name: str, held_as: str, build: str | None, tags: tuple[str, ...], holder: str | None = None
    ) -> None:
        """The template `name` (its build `build`, then `name` is its ID; else its default) from the node `holder` (the
        one that told the catalog of that build) or a node whose lease says it holds `held_as`, else from the bucket."""
        async with self._fetching:
            if self.store.has_version(name, build) if build is not None else self.store.resolve(name)[0] is not None:
                return  # (fetched by the create that held the lock)
            nodes = await asyncio.to_thread(self.state.nodes)
            holders = sorted(
                (
                    n
                    for n in nodes
                    if n.alive
                    and n.node_id != self.state.node
                    and (n.node_id == holder or held_as in (n.capacity.get("templates") or ()))
                ),
                key=lambda n: n.node_id != holder,
            )
            problems = []
            sources: list[tuple[str, Callable[[], AbstractContextManager[Source]]]] = [
                (f"node {n.node_id}", functools.partial(self._peer, n.url)) for n in holders
            ]
            if self.bucket is not None:  # (when no node that holds it answers, or none is alive)
                bucket_source = BucketSource(self.bucket)
                sources.append((f"the bucket {self.bucket.url}", lambda: contextlib.nullcontext(bucket_source)))
            for what, source in sources:
                try:
                    if await asyncio.to_thread(self._fetch_with, source, name, build, tags):
                        return
                except (FetchFailed, BucketError, httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("template %r: fetching it from %s failed: %s", name, what, e)
                    problems.append(f"{what}: {e}")
                except Exception as e:  # (boto3's errors: botocore.exceptions.*)
                    log.warning("template %r: fetching it from %s failed: %r", name, what, e)
                    problems.append(f"{what}: {e}")
            if problems:
                which = f"'{name}'" + (f" (build {build})" if build else "")
                raise FetchFailed(
                    f"template {which} could not be fetched from the nodes that hold it: {'; '.join(problems)}"
                )

    @contextlib.contextmanager
    def _peer(self, url: str) -> Iterator[Source]:
        with httpx.Client(base_url=url, headers=self._headers, timeout=TIMEOUT, verify=self._verify) as client:
            yield PeerSource(url, client)

    def _fetch_with(
        self, opening: Callable[[], AbstractContextManager[Source]], name: str, build: str | None, tags: tuple[str, ...]
    ) -> bool:
        with opening() as source:
            return self._fetch(source, name, build, tags)

    def _fetch(self, source: Source, name: str, want: str | None = None, tags: tuple[str, ...] = ("default",)) -> bool:
        """The template `name` (its build `want`, else its default) from `source`, layer by layer, under `tags`; False
        when the source does not have it."""
        started = time.monotonic()
        manifest = source.manifest(name, want)
        if manifest is None:
            return False
        ident, build, layers, version = _checked(manifest)
        if want is not None and build != want:
            raise FetchFailed(f"asked for build {want}, it sent build {build[:80]!r}")
        told = manifest.get("memory")  # (a snapshot's processes: checked as a layer is)
        memory_entry = _checked_memory(told, ident, build) if told is not None else None
        base = self._local_base(str(manifest["base"]))
        moved = fetched = 0
        for entry in reversed(layers):  # (bottom first: a layer is whole on disk only with what it sits on)
            key = str(entry["key"])
            if self.store.layers.get(key) is not None:
                continue
            moved += self._fetch_layer(source, key, entry, base)
            fetched += 1
        record = manifest.get("buildRecord")
        record = record if isinstance(record, dict) and record.get("buildID") == build else None
        meta = {**dict(manifest["meta"]), "builtin": False}  # (a built-in template is every node's own, never fetched)
        version = {**version, "base": str(base)}
        memory: Path | None = None
        try:
            if memory_entry is not None:
                key, config = memory_entry
                work, got = self._receive(source, key)
                memory, version["memory"] = work / "diff", config
                moved += got
            self.store.adopt(ident, meta, build, version, record, memory=memory, tags=tags)
        finally:
            if memory is not None:
                shutil.rmtree(memory.parent, ignore_errors=True)
        log.info(
            "template %r (%s) fetched from %s: %d of its %d layer(s), %.1f MB, in %.2f s",
            name,
            ident,
            source.where,
            fetched,
            len(layers),
            moved / 1e6,
            time.monotonic() - started,
        )
        return True

    def _local_base(self, rel: str) -> Path:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise FetchFailed(f"its manifest names a root filesystem {rel[:200]!r} not allowed")
        base = self.store.dir / rel
        if rel == ".empty-root":
            empty_root(self.store.layers)
        if not base.is_dir():
            raise FetchFailed(
                f"it sits on the root filesystem {rel!r}, which this node lacks: run the setup on this node (it "
                "builds the built-in templates' root filesystems)"
            )
        return base

    def _fetch_layer(self, source: Source, key: str, entry: dict[str, Any], base: Path) -> int:
        work, got = self._receive(source, key)
        try:
            digest, size = self.state.layer(key) or ("", 0)
            meta = {
                "key": key,
                "parent": entry.get("parent"),
                "base": str(base),
                "step": str(entry.get("step", ""))[:4096],
                "size_bytes": size,
                "created": float(entry.get("created") or 0.0),
                "digest": digest,
            }
            self.store.layers.adopt(work, meta)
            return got
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def _receive(self, source: Source, key: str) -> tuple[Path, int]:
        """The tree `key` from `source`, unpacked in a new dir's `diff/` and checked against the digest the state
        recorded for it: (the dir, the bytes received)."""
        told = self.state.layer(key)
        if told is None:
            raise FetchFailed(f"layer {key}: the cluster's state has no digest for it")
        digest, size = told
        bound = 2 * size + STREAM_SLACK
        work = self.store.layers.new_dir()
        try:
            (work / "diff").mkdir()
            unpack = transfer.unpacker(work / "diff")
            assert unpack.stdin is not None and unpack.stderr is not None
            got = 0
            try:
                with source.layer(key) as chunks:
                    for chunk in chunks:
                        got += len(chunk)
                        if got > bound:
                            raise FetchFailed(f"layer {key}: over {bound} bytes (its size is {size}): refused")
                        unpack.stdin.write(chunk)
                unpack.stdin.close()
                if unpack.wait(timeout=600) != 0:
                    raise FetchFailed(f"layer {key}: unpacking failed: {unpack.stderr.read()[-300:]!r}")
            finally:
                if unpack.poll() is None:
                    unpack.kill()
                    unpack.wait()
            if (found := transfer.tree_digest(work / "diff")) != digest:
                raise FetchFailed(f"layer {key}: its content's digest {found} is not the one recorded ({digest})")
            return work, got
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _checked(manifest: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]], dict[str, Any]]:
    """A manifest from another node or the bucket, checked before anything of it is used: its template's ID and build
    (names, not paths), its layers a chain (each one's parent the next one's key, the last on the root filesystem)
    ending in the build's top layer; its build's config without what only a node itself writes (a snapshot's memory:
    checked on its own, by _checked_memory)."""
    ident, build = str(manifest["templateID"]), str(manifest["build"])
    if not IDENT_RE.match(ident) or not BUILD_RE.match(build):
        raise FetchFailed(f"its manifest names a template {ident[:80]!r} / build {build[:80]!r} not allowed")
    layers = manifest["layers"]
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise FetchFailed(f"its manifest has no layers, or more than {MAX_LAYERS}")
    for i, entry in enumerate(layers):
        key, parent = entry.get("key"), entry.get("parent")
        below = layers[i + 1].get("key") if i + 1 < len(layers) else None
        if not isinstance(key, str) or not KEY_RE.match(key) or parent != below:
            raise FetchFailed(f"its manifest's layers are not a chain (layer {str(key)[:80]!r}, parent {parent!r})")
    version = {
        k: v for k, v in dict(manifest["version"]).items() if k not in ("kind", "name", "build_id", "memory", "base")
    }
    if version.get("top") != layers[0]["key"]:
        raise FetchFailed(f"its manifest's build does not end in its top layer ({str(version.get('top'))[:80]!r})")
    return ident, build, layers, version


def memory_key(ident: str, build: str, config: dict[str, Any]) -> str:
    """The key a snapshot's processes travel under: bound to its template, build and restore config."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"sandboxd memory\0{ident}\0{build}\0{canonical}".encode()).hexdigest()


def _checked_memory(told: Any, ident: str, build: str) -> tuple[str, dict[str, Any]]:
    """A manifest's memory entry: its config what a restore reads (no volumes: those stay on their node), and its key
    the one that config gives (else the state's digest would not be for this config)."""
    if not isinstance(told, dict) or not isinstance(config := told.get("config"), dict):
        raise FetchFailed("its manifest's memory entry is not an object")
    uid_base, parts = config.get("uid_base"), config.get("parts", {})
    if not isinstance(uid_base, int) or isinstance(uid_base, bool) or uid_base < 0 or not isinstance(parts, dict):
        raise FetchFailed("its manifest's memory entry has no uid range or parts")
    if config.get("volume_mounts"):
        raise FetchFailed("its manifest's memory entry has volumes: such a snapshot stays on its node")
    key = memory_key(ident, build, config)
    if told.get("key") != key:
        raise FetchFailed(f"its manifest's memory key {str(told.get('key'))[:80]!r} is not its config's")
    return key, config


class Source(Protocol):
    """Where a template is fetched from: a node that holds it, or the cluster's bucket."""

    where: str

    def manifest(self, name: str, build: str | None = None) -> dict[str, Any] | None: ...

    def layer(self, key: str) -> AbstractContextManager[Iterator[bytes]]: ...


class PeerSource:
    def __init__(self, url: str, client: httpx.Client) -> None:
        self.where, self.client = url, client

    def manifest(self, name: str, build: str | None = None) -> dict[str, Any] | None:
        query = {"build": build} if build else None
        r = self.client.get(f"{PREFIX}/templates/{quote(name, safe='')}", params=query)
        if r.status_code != 200 or len(r.content) > MAX_MANIFEST:
            raise FetchFailed(f"its manifest: HTTP {r.status_code} {r.text[:300]}")
        value = r.json()
        return value if isinstance(value, dict) else None

    @contextlib.contextmanager
    def layer(self, key: str) -> Iterator[Iterator[bytes]]:
        with self.client.stream("GET", f"{PREFIX}/layers/{key}") as r:
            if r.status_code != 200:
                raise FetchFailed(f"layer {key}: HTTP {r.status_code} {r.read()[:300]!r}")
            yield r.iter_bytes(transfer.CHUNK)


class BucketSource:
    def __init__(self, bucket: Bucket) -> None:
        self.where, self.bucket = bucket.url, bucket

    def manifest(self, name: str, build: str | None = None) -> dict[str, Any] | None:
        found = self.bucket.manifest(TemplateStore.split_tag(name)[0])  # (a tag: its default build is what is there)
        return None if found is None or (build is not None and found.get("build") != build) else found

    def layer(self, key: str) -> AbstractContextManager[Iterator[bytes]]:
        return self.bucket.layer(key)
