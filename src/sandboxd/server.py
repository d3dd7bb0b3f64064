"""Assembles the server: state, templates, runtime, manager, control plane, envd, router, lifespan."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import Receive, Scope, Send

from sandboxd.api.app import build_control_plane
from sandboxd.core.manager import SandboxManager, Settings
from sandboxd.envd.app import build_envd_app
from sandboxd.routing.proxy import PortProxy
from sandboxd.routing.router import ENVD_PORT, Router
from sandboxd.runtime.namespaces import NamespaceRuntime
from sandboxd.state.db import StateDB
from sandboxd.templates.store import TemplateStore

log = logging.getLogger("sandboxd")

DEFAULT_DATA_DIR = Path("/var/lib/sandboxd")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: Path = DEFAULT_DATA_DIR
    templates_dir: Path | None = None
    keep_sandboxes: bool = False  # on shutdown, leave sandboxes running for the next start to re-adopt
    favor_dynmods: bool = True  # remount cgroup2 with favordynmods (see runtime/cgroups.py)
    settings: Settings = field(default_factory=Settings)

    @property
    def template_path(self) -> Path:
        return self.templates_dir or self.data_dir / "templates"


class App:
    """The ASGI application plus the objects behind it."""

    def __init__(self, config: ServerConfig) -> None:
        if os.geteuid() != 0:
            raise SystemExit("sandboxd serve must run as root (it creates namespaces, mounts and cgroups)")
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = StateDB(config.data_dir / "state.db")
        self.api_key, self.key_created = self.db.api_key()
        self.templates = TemplateStore(config.template_path)
        self.runtime = NamespaceRuntime(config.data_dir, favor_dynmods=config.favor_dynmods)
        self.manager = SandboxManager(self.runtime, self.templates, self.db, config.settings)
        self.router = Router(
            self.manager,
            build_control_plane(self.manager, self.api_key),
            {ENVD_PORT: build_envd_app(self.manager)},
            PortProxy(self.manager),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.router(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.manager.start()
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                self._announce()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.manager.stop(destroy=not self.config.keep_sandboxes)
                self.db.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _announce(self) -> None:
        c = self.config
        host = "localhost" if c.host in ("127.0.0.1", "0.0.0.0", "::") else c.host
        url = f"http://{host}:{c.port}"
        names = self.templates.names()
        lines = [
            f"sandboxd listening on {url} (data in {c.data_dir})",
            f"templates: {', '.join(names) if names else 'none — run `sandboxd template build base`'}",
            f"API key{' (new)' if self.key_created else ''}: {self.api_key}",
            f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={self.api_key}",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)


def serve(config: ServerConfig) -> None:
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Shut down gracefully (sandboxes destroyed, state closed), then exit 0: uvicorn would
            # otherwise re-raise the signal after its shutdown and report death by SIGTERM.
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            self._captured_signals.clear()

    app = App(config)
    uconfig = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="on",
        log_level="warning",
        access_log=False,
        loop="auto",
        http="auto",
        timeout_keep_alive=650,
        timeout_graceful_shutdown=5,
    )
    _Server(uconfig).run()
