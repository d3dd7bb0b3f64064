"""`GET /admin/nodes` (the operator's key): a cluster's nodes as their leases in the state say — where each serves,
whether its lease runs, its sandboxes, CPUs, memory available, templates and warm sandboxes. Served by every node
(and through the replicas): the state is the cluster's. `sandboxd nodes` (cli/nodes.py) shows it."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sandboxd.api.serialize import rfc3339
from sandboxd.state.sql import Node, State

PATH = "/admin/nodes"


def shape(node: Node, now: float) -> dict[str, Any]:
    cap = node.capacity
    warm = cap.get("warm") if isinstance(cap.get("warm"), dict) else {}
    return {
        "nodeID": node.node_id,
        "url": node.url,
        "alive": node.alive,
        "startedAt": rfc3339(node.started_at),
        "leaseUntil": rfc3339(node.lease_until),
        "leaseLeftSeconds": round(node.lease_until - now, 1),
        "sandboxes": int(cap.get("sandboxes", 0) or 0),
        "cpus": int(cap.get("cpus", 0) or 0),
        "memoryAvailableMB": int(cap.get("memoryAvailableMB", 0) or 0),
        "templates": len(cap.get("templates") or ()),
        "warm": sum(int(v or 0) for v in warm.values()) if warm else 0,
    }


def node_routes(state: State) -> list[BaseRoute]:
    async def nodes(request: Request) -> Response:
        found, now = await asyncio.to_thread(lambda: (state.nodes(), state.now()))
        return JSONResponse([shape(n, now) for n in found])

    return [Route(PATH, nodes, methods=["GET"])]
