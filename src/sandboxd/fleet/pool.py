"""A pool of the user's own sandboxes, client-side, on the official `e2b` SDK: `min` kept made, at most `max`;
`acquire()` lends one (an async context manager), which goes back to the pool (`on_release="recycle"`: the same
sandbox, its timeout renewed) or is killed and replaced (`"reset"`: a clean one next time). A sandbox found dead
when lent (killed, timed out, its server restarted without it) is dropped and another lent instead; waiting for
one ends after `acquire_timeout` with `PoolExhausted`, saying what to change.

`AsyncSandboxPool` is the implementation; `SandboxPool` runs it on an event loop of its own for synchronous code,
and lends `e2b.Sandbox` objects connected to the same sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from e2b import AsyncSandbox, Sandbox

from sandboxd.fleet.errors import PoolClosed, PoolExhausted

POOL_KEY = "sandboxd.fleet.pool"  # the metadata naming the pool a sandbox belongs to


class AsyncSandboxPool:
    def __init__(
        self,
        template: str = "base",
        *,
        min: int = 0,
        max: int = 10,
        timeout: int = 300,
        on_release: Literal["recycle", "reset"] = "recycle",
        acquire_timeout: float = 60.0,
        **opts: Any,
    ) -> None:
        """opts: the SDK's connection options (api_key, api_url, sandbox_url, domain, ...)."""
        if not 0 <= min <= max or max < 1:
            raise ValueError(f"a pool needs 0 <= min <= max and max >= 1 (got min={min}, max={max})")
        if on_release not in ("recycle", "reset"):
            raise ValueError(f"on_release is 'recycle' or 'reset', not {on_release!r}")
        self.template, self.min, self.max, self.timeout = template, min, max, timeout
        self.on_release, self.acquire_timeout, self.opts = on_release, acquire_timeout, opts
        self.id = uuid.uuid4().hex[:12]
        self._idle: list[AsyncSandbox] = []
        self._lent: dict[str, AsyncSandbox] = {}
        self._making = 0
        self._waiting = 0  # callers of acquire() waiting for a sandbox
        self._trim = 0  # lent sandboxes to kill when they come back (the pool was shrunk meanwhile)
        self._closed = False
        self._changed: asyncio.Condition | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def size(self) -> int:
        """Sandboxes of the pool: idle, lent and being made."""
        return len(self._idle) + len(self._lent) + self._making

    def stats(self) -> dict[str, int]:
        return {
            "idle": len(self._idle),
            "lent": len(self._lent),
            "making": self._making,
            "waiting": self._waiting,
            "min": self.min,
        }

    def sandboxes(self) -> list[AsyncSandbox]:
        """The pool's sandboxes now, idle and lent."""
        return [*self._idle, *self._lent.values()]

    async def resize(self, target: int) -> int:
        """Keep `target` sandboxes made from now on (within 0..max; returned): more are made at once, idle ones
        beyond it are killed (lent ones are never taken back; they count)."""
        target = max(0, min(self.max, target))
        self.min = target
        extra = max(0, len(self._idle) + len(self._lent) - target)
        cond = self._cond()
        async with cond:
            cut = min(extra, len(self._idle))
            surplus, self._idle = self._idle[:cut], self._idle[cut:]
            self._trim = extra - cut  # lent ones killed when they come back
        await asyncio.gather(*(_kill(s) for s in surplus), return_exceptions=True)
        await self._fill()
        return target

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def start(self) -> AsyncSandboxPool:
        """Make `min` sandboxes (at once)."""
        await self._fill()
        return self

    async def __aenter__(self) -> AsyncSandboxPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _make(self) -> AsyncSandbox:
        return await AsyncSandbox.create(
            template=self.template, timeout=self.timeout, metadata={POOL_KEY: self.id}, **self.opts
        )

    async def _fill(self) -> None:
        want = self.min - self.size
        if want <= 0 or self._closed:
            return
        self._making += want
        try:
            made = await asyncio.gather(*(self._make() for _ in range(want)), return_exceptions=True)
        finally:
            self._making -= want
        cond = self._cond()
        async with cond:
            self._idle += [m for m in made if isinstance(m, AsyncSandbox)]
            cond.notify_all()
        failed = [m for m in made if isinstance(m, BaseException)]
        if failed and not any(isinstance(m, AsyncSandbox) for m in made):
            raise failed[0]

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[AsyncSandbox]:
        """A sandbox of the pool, lent until the block ends (an error in the block resets it: not reused)."""
        sandbox = await self._take()
        broken = False
        try:
            yield sandbox
        except BaseException:
            broken = True
            raise
        finally:
            await self._give_back(sandbox, broken)

    async def _take(self) -> AsyncSandbox:
        if self._closed:
            raise PoolClosed("this pool is closed: make a new one")
        cond = self._cond()
        deadline = asyncio.get_running_loop().time() + self.acquire_timeout
        while True:
            async with cond:
                self._waiting += 1
                try:
                    await self._wait_for_room(cond, deadline)
                finally:
                    self._waiting -= 1
                sandbox = self._idle.pop(0) if self._idle else None
                if sandbox is None:
                    self._making += 1
                else:
                    self._lent[sandbox.sandbox_id] = sandbox  # (counted while it is checked)
            if sandbox is None:
                try:
                    sandbox = await self._make()
                finally:
                    self._making -= 1
                self._lent[sandbox.sandbox_id] = sandbox
                return sandbox
            if await _alive(sandbox):
                return sandbox
            # gone behind our back (killed, timed out): not lent; another, and the pool back to min
            self._lent.pop(sandbox.sandbox_id, None)
            self._later(_kill(sandbox))
            self._later(self._fill())
            async with cond:
                cond.notify_all()

    async def _wait_for_room(self, cond: asyncio.Condition, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while not self._idle and self.size >= self.max:
            left = deadline - loop.time()
            if left <= 0:
                raise PoolExhausted(
                    f"all {self.max} sandboxes of the pool are lent and none came back within "
                    f"{self.acquire_timeout:g} s: release them sooner (leave the `acquire()` block), or raise max"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cond.wait(), left)
            if self._closed:
                raise PoolClosed("the pool was closed while waiting for a sandbox")

    async def _give_back(self, sandbox: AsyncSandbox, broken: bool) -> None:
        self._lent.pop(sandbox.sandbox_id, None)
        keep = self.on_release == "recycle" and not broken and not self._closed
        if keep and self._trim > 0:  # (resize() shrank the pool while this one was lent)
            self._trim -= 1
            keep = False
        if keep:
            try:
                await sandbox.set_timeout(self.timeout)
            except Exception:
                keep = False  # (gone meanwhile)
        if not keep:
            self._later(_kill(sandbox))
        cond = self._cond()
        async with cond:
            if keep:
                self._idle.append(sandbox)
            cond.notify_all()
        if not keep:
            self._later(self._fill())

    def _later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Kill the idle sandboxes (those lent are killed when they come back)."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_kill(s) for s in idle), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        cond = self._cond()
        async with cond:
            cond.notify_all()


async def _alive(sandbox: AsyncSandbox) -> bool:
    try:
        return bool(await sandbox.is_running())
    except Exception:
        return False


async def _kill(sandbox: AsyncSandbox) -> None:
    with contextlib.suppress(Exception):
        await sandbox.kill()


class SandboxPool:
    """The synchronous face of `AsyncSandboxPool` (the same arguments): its own event loop in a thread;
    `acquire()` lends an `e2b.Sandbox` connected to the pool's sandbox."""

    def __init__(self, template: str = "base", **kwargs: Any) -> None:
        self._opts = {
            k: v for k, v in kwargs.items() if k not in ("min", "max", "timeout", "on_release", "acquire_timeout")
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandboxd-fleet-pool", daemon=True)
        self._thread.start()
        self.pool = self._run(_new(template, kwargs))

    def _run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return dict(self.pool.stats())

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Sandbox]:
        lend = self.pool.acquire()
        sandbox = self._run(lend.__aenter__())
        failed: BaseException | None = None
        try:
            yield Sandbox.connect(sandbox.sandbox_id, **self._opts)
        except BaseException as e:
            failed = e
            raise
        finally:
            if failed is None:
                self._run(lend.__aexit__(None, None, None))
            else:
                self._run(lend.__aexit__(type(failed), failed, failed.__traceback__))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.pool.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


async def _new(template: str, kwargs: dict[str, Any]) -> AsyncSandboxPool:
    return await AsyncSandboxPool(template, **kwargs).start()
