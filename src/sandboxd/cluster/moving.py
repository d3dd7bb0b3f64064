"""A sandbox paused to its files or to disk outlives its node (a cluster with a bucket, `--layer-bucket`).

- Pausing a sandbox to its files on a node with a bucket first takes an image of its files: a snapshot of them named
  `paused-<sandbox ID>`, listed by no one (core/snapshots.py), which the node puts in the bucket as it does every
  template (cluster/layers.py). Writing a sandbox paused in memory to disk first takes a snapshot *with memory* under
  that name (its processes written by CRIU once more, left paused, then the pause to disk proper): the bucket gets
  its processes too. Once the sandbox runs again or ends, the image goes (here and from the bucket).
- When its node is lost, a connect (or resume) of the sandbox through an API replica — by a key that sees it —
  asks a node to take it over: `POST /admin/cluster/sandboxes/{id}/take-over` (the operator's key). That node claims
  the lost record in the state (one statement: one node wins), fetches the image and boots a sandbox from it with
  the same ID, access tokens, metadata, environment, network policy and team: to its clients the sandbox resumed
  from its files, as it would have on its own node (a new boot, its files kept) — or, for one written to disk, from
  its memory: its processes run on from where they were (a new address; envd's kept commands can be connected to
  again), as after a host reboot; if they cannot be restored there, it boots from the image's files. The replica
  then sends the connect there. If anything fails the record is lost again, for the next try.

A sandbox paused in memory and not yet on disk (`--checkpoint-after`), one whose image could not be taken (what a
snapshot with memory cannot carry: its 409s), and one with volumes (on the lost node's disk) stay lost with their node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sandboxd.cluster.layers import LayerShare
from sandboxd.core import pausing, snapshots
from sandboxd.core.errors import Conflict, NotFound, SandboxdError
from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.state.sql import State

log = logging.getLogger("sandboxd.cluster")

IMAGE_PREFIX = "paused-"
TAKE_OVER = "/admin/cluster/sandboxes/{sandbox_id}/take-over"
IMAGE_GRACE = 60.0  # s: an image this young is never collected (its sandbox is still being paused)


def image_of(sandbox_id: str) -> str:
    return IMAGE_PREFIX + sandbox_id


class Moving:
    def __init__(
        self, manager: SandboxManager, state: State, layers: LayerShare, owned_by: Callable[[str, str], None]
    ) -> None:
        self.manager, self.state, self.layers = manager, state, layers
        self._owned_by = owned_by  # (template ID, team): the image is its sandbox's team's, as the sandbox

    async def keep_image(self, sandbox: Sandbox) -> None:
        """Before the sandbox is paused to its files (its pause lock held): an image of them, its team's."""
        await self._keep(sandbox, memory=False)

    async def _keep(self, sandbox: Sandbox, memory: bool) -> None:
        made = await snapshots.create(self.manager, sandbox.id, image_of(sandbox.id), memory=memory, paused=True)
        await asyncio.to_thread(self._owned_by, made["snapshotID"], sandbox.record.team)

    async def keep_memory_image(self, sandbox: Sandbox) -> None:
        """Before a sandbox paused in memory is written to disk (its pause lock held): an image of its processes and
        files, its team's. One that cannot be taken (volumes; what a snapshot with memory cannot carry) is not: the
        sandbox goes to disk all the same, and stays with its node."""
        if sandbox.record.volume_mounts:
            return
        try:
            await self._keep(sandbox, memory=True)
        except SandboxdError as e:
            log.warning(
                "sandbox %s: no image of its memory for other nodes (it stays with this node): %s", sandbox.id, e
            )

    def collect(self) -> None:
        """Images whose sandbox runs again here, or ended, go (here and from the bucket)."""
        store = self.manager.templates
        for ident in store.names():
            snap = store.meta(ident).get("snapshot") or {}
            if not (isinstance(snap, dict) and snap.get("paused")):
                continue
            if time.time() - float(snap.get("createdAt") or 0) < IMAGE_GRACE:
                continue
            sandbox = self.manager.sandboxes.get(str(snap.get("sandboxID")))
            if sandbox is not None and pausing.without_processes(sandbox):
                continue
            names = [n for n in store.meta(ident).get("names", []) if isinstance(n, str)]
            store.delete(ident)
            self.layers.forget(ident, names)
            log.info(
                "the image of sandbox %s (paused to its files) is not needed any more: deleted", snap.get("sandboxID")
            )

    def routes(self) -> list[BaseRoute]:
        async def take_over(request: Request) -> Response:
            sandbox = await self.take_over(request.path_params["sandbox_id"])
            return JSONResponse({"sandboxID": sandbox.id, "state": sandbox.record.state})

        return [Route(TAKE_OVER, take_over, methods=["POST"])]

    async def take_over(self, sandbox_id: str) -> Sandbox:
        claimed = await asyncio.to_thread(self.state.claim_lost, sandbox_id) if len(sandbox_id) <= 64 else None
        if claimed is None:
            raise NotFound(f"sandbox '{sandbox_id[:80]}' is not a lost sandbox (or another node took it already)")
        rec, kept = claimed
        try:
            if not movable(rec):
                raise Conflict(
                    f"sandbox '{sandbox_id}' was {rec.state} ({rec.pause_mode or 'running'}) on its lost node, "
                    f"{'with volumes kept there' if rec.volume_mounts else 'in its memory'}: it cannot move"
                )
            await self.manager.ensure_template(image_of(sandbox_id))
            try:
                sandbox = await self._boot(rec, memory=True)
            except SandboxdError as e:  # (a restore that failed says so as a SandboxdError itself, not a subclass)
                if (
                    type(e) is not SandboxdError
                    or self.manager.templates.get(image_of(sandbox_id)).memory_images is None
                ):
                    raise
                log.warning(
                    "sandbox %s: its processes could not be restored here (%s): it boots from its files", sandbox_id, e
                )
                sandbox = await self._boot(rec, memory=False)
        except BaseException:
            await asyncio.to_thread(self.state.unclaim, kept)
            raise
        log.info("sandbox %s (paused to %s on a lost node) taken over here, from its image", sandbox_id, rec.pause_mode)
        return sandbox

    async def _boot(self, rec: Any, memory: bool) -> Sandbox:
        return await self.manager.create(
            image_of(rec.sandbox_id),
            timeout=self.manager.settings.default_timeout,  # (the connect that asked says how long, next)
            metadata=rec.metadata,
            env_vars=rec.env_vars,
            auto_pause=rec.auto_pause,
            auto_pause_memory=rec.auto_pause_memory,
            auto_resume=rec.auto_resume,
            disk_mb=rec.disk_mb,
            recorded_as=(rec.template_id, rec.alias or rec.template_id),
            pool=False,
            team=rec.team,
            same_as=rec,
            memory=memory,
        )


def movable(rec: Any) -> bool:
    """A lost sandbox's record that another node may take over (from its image, if its node left one)."""
    return (
        rec is not None
        and rec.state == "paused"
        and rec.pause_mode in (pausing.FILESYSTEM, pausing.DISK)
        and not rec.volume_mounts
    )
