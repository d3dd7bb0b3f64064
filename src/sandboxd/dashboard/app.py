"""/dashboard: the page (public: it holds no data; the API key is typed into it), its static bundle, and
/dashboard/terminal/{sandbox_id}, the terminal's WebSocket (terminal.py). Served with a Content-Security-Policy
that lets the page load only its own scripts and talk only to this server."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from sandboxd.dashboard.terminal import TerminalBridge

HERE = Path(__file__).parent
STATIC = HERE / "static"
PREFIX = "/dashboard"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
NOT_BUILT = (
    "<!doctype html><title>sandboxd</title><p>The dashboard is not built on this machine: run "
    "<code>bash scripts/setup.sh</code> (or <code>bash scripts/build-dashboard.sh</code>) in sandboxd's "
    "repository, then reload.</p>"
)


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: dict) -> Response:  # type: ignore[override]
        response = await super().get_response(path, scope)
        response.headers.update({k: v for k, v in SECURITY_HEADERS.items() if k != "Cache-Control"})
        return response


def dashboard_routes(api_url: str) -> list[BaseRoute]:
    """`api_url`: where the terminal's bridge reaches this server's API (its own listener, on loopback)."""
    bridge = TerminalBridge(api_url)

    async def page(request: Request) -> Response:
        if not (STATIC / "app.js").is_file():
            return HTMLResponse(NOT_BUILT, status_code=503, headers=SECURITY_HEADERS)
        return HTMLResponse((HERE / "index.html").read_text(), headers=SECURITY_HEADERS)

    async def slash(request: Request) -> Response:
        return RedirectResponse(PREFIX + "/", status_code=308)

    return [
        Route(PREFIX, slash, methods=["GET"], include_in_schema=False),
        Route(PREFIX + "/", page, methods=["GET"], include_in_schema=False),
        WebSocketRoute(PREFIX + "/terminal/{sandbox_id:str}", bridge),
        Mount(PREFIX + "/static", app=_Static(directory=STATIC, check_dir=False), name="dashboard-static"),
    ]
