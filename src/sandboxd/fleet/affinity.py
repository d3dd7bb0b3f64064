"""Task -> template affinity: each kind of task runs in sandboxes of the template made for it (data work in a
template with pandas, browsing in one with a browser, the rest in `default`), each template with a pool of its own
(`AsyncSandboxPool`, made on first use with the options given). `acquire(task)` lends a sandbox of the task's
template; a task no rule names goes to `default`, or is refused (`NoTemplate`) when there is none.

Rules are a mapping of task kinds to templates, and/or callables `task -> template | None` tried in order (the
first that names a template wins), for kinds that are patterns rather than names.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from e2b import AsyncSandbox

from sandboxd.fleet.errors import FleetError
from sandboxd.fleet.pool import AsyncSandboxPool

Matcher = Callable[[str], "str | None"]


class NoTemplate(FleetError):
    """A task that no rule sends to a template, with no default."""


class TemplateAffinity:
    def __init__(
        self,
        rules: Mapping[str, str] | None = None,
        *,
        matchers: list[Matcher] | None = None,
        default: str | None = None,
        pool_options: Mapping[str, Mapping[str, Any]] | None = None,
        **opts: Any,
    ) -> None:
        """opts: every pool's options (min, max, timeout, on_release, and the SDK's connection options);
        pool_options: a template's own, over those."""
        self.rules = dict(rules or {})
        self.matchers = list(matchers or [])
        self.default = default
        self.opts = opts
        self.pool_options = {k: dict(v) for k, v in (pool_options or {}).items()}
        self.pools: dict[str, AsyncSandboxPool] = {}

    def template_for(self, task: str) -> str:
        if task in self.rules:
            return self.rules[task]
        for match in self.matchers:
            template = match(task)
            if template:
                return template
        if self.default is None:
            raise NoTemplate(
                f"no rule sends task {task!r} to a template and there is no default: add it to the rules "
                f"(known: {sorted(self.rules)}) or give default="
            )
        return self.default

    async def pool(self, template: str) -> AsyncSandboxPool:
        """The template's pool (made, and started, on first use)."""
        if template not in self.pools:
            options = {**self.opts, **self.pool_options.get(template, {})}
            self.pools[template] = AsyncSandboxPool(template, **options)
            await self.pools[template].start()
        return self.pools[template]

    @contextlib.asynccontextmanager
    async def acquire(self, task: str) -> AsyncIterator[AsyncSandbox]:
        """A sandbox of the task's template, lent until the block ends (as `AsyncSandboxPool.acquire`)."""
        pool = await self.pool(self.template_for(task))
        async with pool.acquire() as sandbox:
            yield sandbox

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    async def __aenter__(self) -> TemplateAffinity:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
