"""`sandboxd serve --role api`: an API replica. It runs no sandbox; it holds no state of its own (the cluster's is in
PostgreSQL), so any number of them serve one cluster, behind any load balancer. Clients (the official SDKs: both
E2B_API_URL and E2B_SANDBOX_URL point at a replica) never see the nodes:

- a request about one sandbox (E2B's `/sandboxes/{id}/...`, or the data plane with `E2b-Sandbox-Id`) is streamed
  both ways, unbuffered, to the node that runs it (the sandboxes table says which); one that ended says why (the
  ended records are the cluster's);
- a create goes to the node placement picks (cluster/placement.py), the next one if that node fails to answer;
- the lists are every node's, merged (each sandbox once), sorted and paged here;
- a request about one template (its builds and their files, its tags, itself) goes to a node that holds it (a
  delete to every one), the list of templates is every node's, merged;
- a request about one volume (itself, its files) goes to the node that keeps it (its files are that node's disk),
  and so does a create that mounts volumes (all of one node); one whose node was lost says so;
- anything else (the list of volumes, snapshots, pools, keys, secrets, metrics) goes to one node;
- with `--domain D`, a request for the host `{port}-{id}.D` (how the SDKs reach a sandbox with E2B_DOMAIN, over TLS
  on `--tls-port`) is the sandbox's too, sent on with E2b-Sandbox-Id and E2b-Sandbox-Port (the nodes need no
  domain of their own); a signed `/files` URL (no sandbox ID in it) goes to the node whose sandbox signed it
  (cluster/signatures.py).

The client's own credentials go along: each node checks the API key against the cluster's teams (the state is
shared), so a replica cannot widen what a key may do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import uvicorn
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from sandboxd import httpfwd
from sandboxd.cluster import CLUSTER_HEADER
from sandboxd.cluster.moving import TAKE_OVER, image_of, movable
from sandboxd.cluster.placement import Policy, order
from sandboxd.cluster.signatures import PATH as SIGNED_PATH
from sandboxd.cluster.tls import ClusterTLS
from sandboxd.core import endings
from sandboxd.core.quotas import TeamLimitReached, TeamQuotas
from sandboxd.core.teams import VOLUME, Caller, Teams
from sandboxd.listeners import Listener, MainListener
from sandboxd.routing.router import host_route
from sandboxd.routing.websocket import HANDSHAKE, relay
from sandboxd.state.sql import Node, State

log = logging.getLogger("sandboxd.cluster")

SANDBOX_PATH = re.compile(r"^/(?:v2/)?sandboxes/([^/]+)")
# a template's own routes (api/templates.py): /templates/{t}..., /v2/templates/{t}/builds/..., an alias, an upload
RESUME_PATH = re.compile(r"^/(?:v2/)?sandboxes/[^/]+/(?:connect|resume)$")
TEMPLATE_PATH = re.compile(r"^/(?:v\d+/)?templates/(?:aliases/)?([^/]+)|^/template-files/([^/]+)/")
CREATE_PATHS = frozenset({"/sandboxes", "/v2/sandboxes"})
VOLUME_PATH = re.compile(r"^/(?:volumes|volumecontent)/([^/]+)")
NODES_TTL = 1.0  # s: the nodes' leases read again after this
WHERE_TTL = 5.0  # s: a sandbox's node remembered this long (a node that stops answering drops it at once)
MAX_CREATE_BODY = 1024 * 1024
MAX_PAGE = 100
MAX_NODE_PAGES = 20  # a list asks each node for at most this many pages of 100
TERMINAL_PREFIX = "/dashboard/terminal/"
RESPONSE_DROP = httpfwd.HOP_BY_HOP | {b"date", b"server"}  # (this server says its own)
MAX_IDLE_PER_NODE = 64
CONNECT_TIMEOUT = 5.0
MAX_SIGNED = 10_000  # signed URLs' sandboxes remembered
MAX_SIGNED_QUERY = 8192


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


class Replica:
    def __init__(
        self,
        state: State,
        policy: Policy = "spread",
        quotas: TeamQuotas | None = None,
        token: str | None = None,
        domain: str | None = None,
        tls: ClusterTLS | None = None,
    ) -> None:
        self.state = state
        self._ssl = tls.client_context() if tls else None  # (nodes whose URL is https: their certificate checked)
        self._host_route = host_route(domain) if domain else None
        self._signed: dict[str, str] = {}  # a signed URL's signature -> the sandbox that signed it
        # what every request to a node carries besides the client's own headers: the cluster's token
        self._ours = [(CLUSTER_HEADER, token.encode())] if token else []
        self.policy: Policy = policy
        self._operator = state.api_key()[0]  # (what a replica asks its nodes with: cluster/signatures.py)
        self.teams = Teams(state, self._operator)
        self.quotas = quotas or TeamQuotas(state)
        self._nodes: list[Node] = []
        self._nodes_at = 0.0
        self._sent: Counter[str] = Counter()  # creates sent to each node since its last beat we saw
        self._beats: dict[str, float] = {}  # node ID -> the lease end of its last beat we saw
        self._where: dict[str, tuple[str, float]] = {}  # sandbox ID -> (its node's URL, until when)
        self._idle: dict[tuple[str, int], list[httpfwd.Upstream]] = {}  # kept-alive connections to each node
        self.client = httpx.AsyncClient(
            verify=self._ssl or True,
            timeout=httpx.Timeout(connect=5.0, read=None, write=None, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30),
            follow_redirects=False,
        )

    # -- the ASGI app ---------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        scope = self._by_host(scope)
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        path = scope["path"]
        try:
            sandbox_id = _header(scope, b"e2b-sandbox-id")
            if sandbox_id is None and path == "/files":
                sandbox_id = await self._signer(scope)
                if sandbox_id is None:
                    message = "a /files request needs the E2b-Sandbox-Id header or a valid signature"
                    await _error(401, message)(scope, receive, send)
                    return
            if sandbox_id is not None:
                await self._to_sandbox(scope, receive, send, sandbox_id, data_plane=True)
            elif path == "/health":
                await Response(status_code=204)(scope, receive, send)
            elif path in CREATE_PATHS and scope["method"] == "POST":
                await self._create(scope, receive, send)
            elif path in CREATE_PATHS and scope["method"] == "GET":
                await self._list(scope, receive, send)
            elif path == "/sandboxes/metrics" and scope["method"] == "GET":
                await self._metrics_many(scope, receive, send)
            elif m := SANDBOX_PATH.match(path):
                await self._to_sandbox(scope, receive, send, m.group(1), data_plane=False)
            elif path == "/templates" and scope["method"] == "GET":
                await self._templates(scope, receive, send)
            elif path == "/templates/tags":
                await self._to_tags(scope, receive, send)
            elif m := TEMPLATE_PATH.match(path):
                await self._to_template(scope, receive, send, m.group(1) or m.group(2))
            elif path == "/volumes" and scope["method"] == "POST":  # (where its files go: spread as sandboxes)
                await self._to_any(scope, receive, send, first=order(await self._alive(), self.policy, self._sent))
            elif m := VOLUME_PATH.match(path):
                await self._to_volume(scope, receive, send, m.group(1))
            else:
                await self._to_any(scope, receive, send)
        except NoNodes as e:
            await _error(503, str(e), {"Retry-After": "2"})(scope, receive, send)
        except ClientGone:  # (before its whole body came: nothing was passed on, no one to answer)
            return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await asyncio.to_thread(self.state.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the nodes ------------------------------------------------------------------------------------
    async def nodes(self) -> list[Node]:
        if time.monotonic() - self._nodes_at >= NODES_TTL:
            self._nodes = await asyncio.to_thread(self.state.nodes)
            self._nodes_at = time.monotonic()
            for n in self._nodes:  # (a node that beat since: its capacity counts what was sent to it before)
                if self._beats.get(n.node_id) != n.lease_until:
                    self._beats[n.node_id] = n.lease_until
                    self._sent[n.node_id] = 0
        return self._nodes

    async def _alive(self) -> list[Node]:
        alive = [n for n in await self.nodes() if n.alive]
        if not alive:
            raise NoNodes("no node of this cluster is alive (none holds a lease): start one, or wait for it")
        return alive

    async def _node_of(self, sandbox_id: str) -> str | None:
        known = self._where.get(sandbox_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        if len(sandbox_id) > 64:
            return None
        node_id = await asyncio.to_thread(self.state.node_of, sandbox_id)
        url = next((n.url for n in await self.nodes() if n.node_id == node_id), None)
        if url is not None:
            if len(self._where) > 100_000:
                self._where.clear()
            self._where[sandbox_id] = (url, time.monotonic() + WHERE_TTL)
        return url

    # -- requests -------------------------------------------------------------------------------------
    def _by_host(self, scope: Scope) -> Scope:
        """`{port}-{id}.D` (with --domain D) as the headers the nodes route by; a request that names its sandbox in
        a header keeps it."""
        if self._host_route is None or _header(scope, b"e2b-sandbox-id") is not None:
            return scope
        m = self._host_route.fullmatch((_header(scope, b"host") or "").lower())
        if m is None:
            return scope
        named = [(b"e2b-sandbox-id", m.group(2).encode()), (b"e2b-sandbox-port", m.group(1).encode())]
        theirs = [(k, v) for k, v in scope["headers"] if k != b"e2b-sandbox-port"]
        return {**scope, "headers": [*theirs, *named]}

    async def _signer(self, scope: Scope) -> str | None:
        """The sandbox whose envd token signed this /files URL: asked of every node (once per signature)."""
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        signature = query.get("signature", "")
        if not signature or len(scope["query_string"]) > MAX_SIGNED_QUERY:
            return None
        known = self._signed.get(signature)
        if known is not None:
            return known
        params = {**query, "method": scope["method"]}
        headers = [("X-API-KEY", self._operator), *((k.decode(), v.decode()) for k, v in self._ours)]

        async def ask(node: Node) -> str | None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                r = await self.client.get(node.url + SIGNED_PATH, params=params, headers=headers)
                if r.status_code == 200:
                    return str(r.json()["sandboxID"])
            return None

        found = [sid for sid in await asyncio.gather(*(ask(n) for n in await self._alive())) if sid]
        if not found:
            return None
        if len(self._signed) >= MAX_SIGNED:
            self._signed.pop(next(iter(self._signed)))
        self._signed[signature] = found[0]
        return found[0]

    async def _to_sandbox(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, data_plane: bool) -> None:
        url = await self._node_of(sandbox_id)
        if url is None and not data_plane and scope["method"] == "POST" and RESUME_PATH.match(scope["path"]):
            url = await self._move(scope, sandbox_id)
        if url is None:
            ended = await asyncio.to_thread(self.state.ended, sandbox_id) if len(sandbox_id) <= 64 else None
            why = f": {endings.explain(ended)}" if ended else ""
            if data_plane:  # (the SDKs show a data-plane 502's message)
                await _error(502, f"The sandbox was not found{why}")(scope, receive, send)
            else:
                await _error(404, f"sandbox '{sandbox_id[:80]}' not found{why}")(scope, receive, send)
            return
        if not await self._proxy(scope, receive, send, url, body=await _small_body(scope, receive)):
            self._where.pop(sandbox_id, None)
            await _error(502, "the sandbox's node did not answer: retry")(scope, receive, send)

    async def _move(self, scope: Scope, sandbox_id: str) -> str | None:
        """A connect of a sandbox whose node was lost while it was paused to its files or to disk, by a key that sees
        it: another node takes it over from its image (cluster/moving.py); that node's URL, or None (it stays lost)."""
        if len(sandbox_id) > 64:
            return None
        rec = await asyncio.to_thread(self.state.lost_record, sandbox_id)
        caller = await self._caller(scope)
        if rec is None or not movable(rec) or caller is None or not caller.sees(rec.team):
            return None
        headers = {"X-API-KEY": self._operator, **{k.decode(): v.decode() for k, v in self._ours}}
        for node in order(await self._alive(), self.policy, self._sent, image_of(sandbox_id)):
            try:
                r = await self.client.post(node.url + TAKE_OVER.format(sandbox_id=sandbox_id), headers=headers)
            except httpx.HTTPError as e:
                log.warning("sandbox %s: node %s did not answer its take-over: %s", sandbox_id, node.node_id, e)
                continue
            if r.status_code == 200:
                self._where[sandbox_id] = (node.url, time.monotonic() + WHERE_TTL)
                return node.url
            log.warning(
                "sandbox %s: node %s refused its take-over: %d %s",
                sandbox_id,
                node.node_id,
                r.status_code,
                r.text[:300],
            )
            if r.status_code in (404, 409):  # (taken by another, or it cannot move: no other node will do better)
                return None
        return None

    async def _to_any(
        self, scope: Scope, receive: Receive, send: Send, first: list[Node] | None = None, body: bytes | None = None
    ) -> None:
        """To the first node that answers: of `first` (those holding what the request is about), then any. `body`:
        the request's, read already."""
        alive = await self._alive()
        ordered = [*(first or []), *(n for n in alive if n not in (first or []))]
        if body is None:
            body = await _small_body(scope, receive)
        for node in ordered:
            if await self._proxy(scope, receive, send, node.url, body=body):
                return
            if body is None:
                break
        await _error(502, "no node of the cluster answered: retry")(scope, receive, send)

    async def _to_template(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        """A request about one template (its builds, files, tags, itself) to a node that holds it (the leases say
        which: a build's calls stay on the node building it); a delete to every node (one that fetched the template a
        moment ago has not told it yet)."""
        alive = await self._alive()
        holders = await self._holders(name)
        if scope["method"] == "DELETE":  # (the others first: when the client hears it is deleted, it is everywhere)
            headers = [*_forwarded(scope), *self._ours]
            answering = holders[0] if holders else alive[0]
            for node in (n for n in alive if n is not answering):
                with contextlib.suppress(httpx.HTTPError):
                    r = await self.client.delete(node.url + scope["path"], headers=headers)
                    if r.status_code not in (204, 404):
                        log.warning("template %r: its delete on node %s answered %d", name, node.node_id, r.status_code)
        await self._to_any(scope, receive, send, first=holders)

    async def _to_tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Tags assigned to or removed from a template (named in the body): to a node that holds it (the cluster's
        catalog tells the others)."""
        body = await _read_body(receive, MAX_CREATE_BODY)
        if body is None:
            await _error(413, f"request body is over the limit of {MAX_CREATE_BODY} bytes")(scope, receive, send)
            return
        fields = _fields(body)
        name = fields.get("target") or fields.get("name")
        holders = await self._holders(name) if isinstance(name, str) else []
        await self._to_any(scope, receive, send, first=holders, body=body)

    async def _holders(self, name: str) -> list[Node]:
        """The alive nodes whose leases say they hold the template `name` (`name:tag`: the template's)."""
        name = name.rpartition(":")[0] or name  # (leases tell names)
        return [n for n in await self._alive() if name in (n.capacity.get("templates") or ())]

    async def _to_volume(self, scope: Scope, receive: Receive, send: Send, ref: str) -> None:
        """A request about one volume to the node that keeps it; if that node was lost, its record (a GET of the
        volume itself) is any node's to tell, anything else says where the files are."""
        found = await asyncio.to_thread(self.state.volume, ref) if len(ref) <= 256 else None
        home = found.get("node") if isinstance(found, dict) else None
        if not home or not isinstance(found, dict) or not await self._sees_volume(scope, found):
            await self._to_any(scope, receive, send)  # (unknown, a single server's, or not the caller's: a node says)
            return
        node = next((n for n in await self._alive() if n.node_id == home), None)
        if node is None:
            if scope["method"] == "GET" and scope["path"].startswith("/volumes/"):
                await self._to_any(scope, receive, send)
            else:
                await _error(503, _lost_volume(repr(found.get("name")), home), {"Retry-After": "5"})(
                    scope, receive, send
                )
            return
        if not await self._proxy(scope, receive, send, node.url, body=await _small_body(scope, receive)):
            await _error(502, f"volume {found.get('name')!r}: its node {home} did not answer: retry")(
                scope, receive, send
            )

    async def _caller(self, scope: Scope) -> Caller | None:
        """Whose API key the request carries (None: none, or not a key: the node says so)."""
        given = _header(scope, b"x-api-key")
        return await asyncio.to_thread(self.teams.caller, given.encode("latin-1")) if given is not None else None

    async def _sees_volume(self, scope: Scope, found: dict[str, Any]) -> bool:
        """The request may learn where the volume is: its content API with the volume's token, anything else with a
        key of the team that owns it (else the node answers, as for a volume that does not exist)."""
        if scope["path"].startswith("/volumecontent/"):
            scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), str(found.get("token", "")).encode()
            )
        caller = await self._caller(scope)
        return caller is not None and await self._owns_volume(caller, found)

    async def _owns_volume(self, caller: Caller, found: dict[str, Any]) -> bool:
        return caller.sees(await asyncio.to_thread(self.teams.owner, VOLUME, str(found.get("volume_id"))))

    async def _volumes_home(self, volumes: list[str], caller: Caller | None) -> tuple[str | None, str | None]:
        """(the node keeping the `volumes` a create mounts, or None when it mounts none of a node; why it cannot be
        placed, or None). Volumes the caller does not see count for nothing (the node then says not found)."""
        homes: dict[str, str] = {}  # node -> a volume of it
        if caller is None:
            return None, None
        for ref in volumes:
            found = await asyncio.to_thread(self.state.volume, ref)
            if isinstance(found, dict) and found.get("node") and await self._owns_volume(caller, found):
                homes.setdefault(str(found["node"]), str(found.get("name")))
        if len(homes) > 1:
            shown = ", ".join(f"{name!r} on node {node}" for node, name in sorted(homes.items()))
            return (
                None,
                f"volumeMounts: these volumes are kept on different nodes ({shown}): a sandbox mounts volumes of one "
                "node",
            )
        return next(iter(homes), None), None

    async def _templates(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every node's templates, each once (a template a node fetched is the same template)."""
        headers = [*_forwarded(scope), *self._ours]
        query = scope["query_string"].decode("latin-1")

        async def ask(node: Node) -> tuple[int, Any]:
            try:
                r = await self.client.get(node.url + "/templates" + (f"?{query}" if query else ""), headers=headers)
                return r.status_code, r.json()
            except (httpx.HTTPError, ValueError):
                return 200, []  # (a node that does not answer: its templates are not listed)

        answers = await asyncio.gather(*(ask(n) for n in await self._alive()))
        seen: dict[str, Any] = {}
        for status, items in answers:
            if status != 200 or not isinstance(items, list):
                await JSONResponse(items, status_code=status)(scope, receive, send)
                return
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("templateID"), str):
                    seen.setdefault(item["templateID"], item)
        ordered = sorted(seen.values(), key=lambda t: (str(t.get("createdAt", "")), t["templateID"]))
        await JSONResponse(ordered)(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, MAX_CREATE_BODY)
        if body is None:
            await _error(413, f"request body is over the limit of {MAX_CREATE_BODY} bytes")(scope, receive, send)
            return
        caller = await self._caller(scope)
        if caller is not None:  # (else the node says what is wrong with the key)
            try:
                await asyncio.to_thread(self.quotas.admit, caller)
            except TeamLimitReached as e:
                await _error(429, str(e), {"Retry-After": str(e.retry_after)})(scope, receive, send)
                return
        fields = _fields(body)
        candidates = order(await self._alive(), self.policy, self._sent, _template_of(fields))
        volumes = _volumes_of(fields)
        home, refused = await self._volumes_home(volumes, caller)
        if refused is not None:
            await _error(400, refused)(scope, receive, send)
            return
        if home is not None:  # (its volumes' files are that node's: it runs there, or nowhere)
            candidates = [n for n in candidates if n.node_id == home]
            if not candidates:
                await _error(503, _lost_volume(", ".join(map(repr, volumes)), home), {"Retry-After": "5"})(
                    scope, receive, send
                )
                return
        for node in candidates:
            self._sent[node.node_id] += 1
            if await self._proxy(scope, receive, send, node.url, body=body):
                return
        await _error(503, f"no node could take the sandbox (tried {len(candidates)})", {"Retry-After": "2"})(
            scope, receive, send
        )

    async def _list(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every node's sandboxes (each once), sorted and paged as one server would."""
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        v2 = scope["path"] == "/v2/sandboxes"
        try:
            limit = int(query.pop("limit", MAX_PAGE)) if v2 else 10**9
        except ValueError:
            await _error(400, "limit must be a whole number")(scope, receive, send)
            return
        if v2 and not 1 <= limit <= MAX_PAGE:
            await _error(400, f"limit must be between 1 and {MAX_PAGE}, got {limit}")(scope, receive, send)
            return
        cursor = query.pop("nextToken", None)
        order_desc = query.get("order", "desc").lower() != "asc"
        headers = [*_forwarded(scope), *self._ours]
        alive = await self._alive()
        answers = await asyncio.gather(*(self._node_list(n.url, scope["path"], query, headers) for n in alive))
        for status, body in answers:
            if status != 200:  # (the same for every node: a bad key, a bad filter)
                await JSONResponse(body, status_code=status)(scope, receive, send)
                return
        seen: dict[str, dict[str, Any]] = {}
        for _, items in answers:
            for item in items:
                seen.setdefault(item["sandboxID"], item)
        items = sorted(seen.values(), key=lambda s: (s.get("startedAt", ""), s["sandboxID"]), reverse=order_desc)
        if cursor:
            try:
                after = tuple(base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode().split("|", 1))
                if len(after) != 2:
                    raise ValueError(cursor)
            except (ValueError, binascii.Error, UnicodeDecodeError):
                await _error(400, "nextToken is not a token this cluster issued")(scope, receive, send)
                return
            items = [s for s in items if ((s.get("startedAt", ""), s["sandboxID"]) < after) == order_desc]
        page = items[:limit]
        running = sum(1 for s in seen.values() if s.get("state") == "running")
        out_headers = {"X-Total-Running": str(running)}
        if len(items) > limit:
            last = page[-1]
            out_headers["X-Next-Token"] = base64.urlsafe_b64encode(
                f"{last.get('startedAt', '')}|{last['sandboxID']}".encode()
            ).decode()
        await JSONResponse(page, headers=out_headers)(scope, receive, send)

    async def _node_list(
        self, url: str, path: str, query: dict[str, str], headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, Any]:
        items: list[Any] = []
        params = dict(query)
        if path == "/v2/sandboxes":
            params["limit"] = str(MAX_PAGE)
        for _ in range(MAX_NODE_PAGES):
            try:
                r = await self.client.get(url + path, params=params, headers=headers)
            except httpx.TransportError:
                return 200, items  # (a node that does not answer: its sandboxes are not listed)
            if r.status_code != 200:
                return r.status_code, r.json()
            items.extend(r.json())
            token = r.headers.get("x-next-token")
            if not token:
                break
            params["nextToken"] = token
        return 200, items

    async def _metrics_many(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qsl(scope["query_string"].decode("latin-1"))
        ids = [i for k, raw in query if k == "sandbox_ids" for i in raw.split(",") if i][:MAX_PAGE]
        by_node: dict[str, list[str]] = {}
        for sandbox_id in dict.fromkeys(ids):
            url = await self._node_of(sandbox_id)
            if url is not None:
                by_node.setdefault(url, []).append(sandbox_id)
        headers = [*_forwarded(scope), *self._ours]
        merged: dict[str, Any] = {}
        for url, mine in by_node.items():
            with contextlib.suppress(httpx.TransportError, ValueError):
                r = await self.client.get(
                    url + "/sandboxes/metrics", params={"sandbox_ids": ",".join(mine)}, headers=headers
                )
                if r.status_code == 200:
                    merged.update(r.json().get("sandboxes", {}))
                elif r.status_code in (400, 401, 403):
                    await JSONResponse(r.json(), status_code=r.status_code)(scope, receive, send)
                    return
        if not ids:
            await _error(400, "sandbox_ids is required (comma-separated sandbox IDs)")(scope, receive, send)
            return
        await JSONResponse({"sandboxes": merged})(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket to a sandbox's port (E2b-Sandbox-Id) or to the dashboard's terminal of a sandbox, relayed to the
        sandbox's node."""
        if (await receive())["type"] != "websocket.connect":
            return
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        if sandbox_id is None and scope["path"].startswith(TERMINAL_PREFIX):
            sandbox_id = scope["path"][len(TERMINAL_PREFIX) :]
        url = await self._node_of(sandbox_id) if sandbox_id else None
        if url is None:
            await send({"type": "websocket.close", "code": 1008, "reason": "no such sandbox in this cluster"})
            return
        theirs = [(k, v) for k, v in scope["headers"] if k.lower() not in HANDSHAKE and k.lower() != CLUSTER_HEADER]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in [*theirs, *self._ours]]
        parts = urlsplit(url)
        tls = self._ssl if parts.scheme == "https" else None
        await relay(scope, receive, send, parts.netloc, headers, far="the sandbox's node", tls=tls)

    # -- the proxy ------------------------------------------------------------------------------------
    async def _proxy(self, scope: Scope, receive: Receive, send: Send, base: str, body: bytes | None = None) -> bool:
        """The request to the node at `base` (its body: `body`, else streamed from the client), its answer streamed
        back (httpfwd: HTTP/1.1 over kept-alive connections to each node). False when the node could not be reached
        or gave no answer: nothing was sent to the client then."""
        parts = urlsplit(base)
        tls = parts.scheme == "https"
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80)
        up = await self._connection(host, port, tls)
        if up is None:
            return False
        frame = [(b"content-length", str(len(body)).encode())] if body is not None else httpfwd.framing(scope)
        headers = [(b"host", parts.netloc.encode("latin-1")), *_forwarded(scope), *self._ours, *frame]
        outcome = await httpfwd.forward(scope, receive, send, up, headers, body, drop=RESPONSE_DROP)
        if outcome is httpfwd.Outcome.DONE and up.release():
            pool = self._idle.setdefault((host, port), [])
            if len(pool) < MAX_IDLE_PER_NODE:
                pool.append(up)
        else:
            up.close()
        return outcome is not httpfwd.Outcome.NOT_STARTED

    async def _connection(self, host: str, port: int, tls: bool) -> httpfwd.Upstream | None:
        pool = self._idle.get((host, port), [])
        while pool:
            up = pool.pop()
            if up.reusable():
                return up
            up.close()
        if tls and self._ssl is None:
            log.warning("node %s:%d is served over TLS: give this replica --cluster-ca/-cert/-key", host, port)
            return None
        opening = (
            asyncio.open_connection(host, port, ssl=self._ssl, server_hostname=host)
            if tls
            else asyncio.open_connection(host, port)
        )
        try:
            reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:  # (ssl.SSLError is an OSError: a node whose certificate is not ours)
            if tls:
                log.warning("node %s:%d: no TLS connection: %s", host, port, e)
            return None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return httpfwd.Upstream(reader, writer)


class NoNodes(Exception):
    pass


class ClientGone(Exception):
    """The client went away before sending the whole body it declared."""


def _forwarded(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The client's headers a node gets (never a cluster token of the client's making)."""
    return [(k, v) for k, v in scope["headers"] if k.lower() not in httpfwd.HOP_BY_HOP and k.lower() != CLUSTER_HEADER]


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _lost_volume(names: str, node: str) -> str:
    return (
        f"volume {names} is kept on node {node}, which was lost (its lease ran out): its files are on that node's "
        "disk, and come back with it"
    )


def _fields(body: bytes) -> dict[str, Any]:
    """A small request body's JSON object, for routing (a body that is not what a node expects — too large to look
    into here, not an object, nested without end — routes as an empty one: the node says what is wrong)."""
    try:
        value = json.loads(body) if len(body) <= 65536 else None
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _volumes_of(fields: dict[str, Any]) -> list[str]:
    """The names (or IDs) of the volumes a create mounts."""
    mounts = fields.get("volumeMounts")
    if not isinstance(mounts, list):
        return []
    return [
        m["name"]
        for m in mounts[:16]
        if isinstance(m, dict) and isinstance(m.get("name"), str) and len(m["name"]) <= 256
    ]


def _template_of(fields: dict[str, Any]) -> str | None:
    """The create's templateID, for placement."""
    value = fields.get("templateID")
    return value if isinstance(value, str) and 0 < len(value) <= 256 else None


async def _small_body(scope: Scope, receive: Receive) -> bytes | None:
    """A request's body read whole when it is small and of a known size (sent with its length, and sent again to
    another node if the first does not answer); None: streamed as it comes (an upload)."""
    length = _header(scope, b"content-length")
    if length is None:
        return None if _header(scope, b"transfer-encoding") else b""
    if not length.isdigit() or int(length) > MAX_CREATE_BODY:
        return None
    return await _read_body(receive, MAX_CREATE_BODY)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    async for chunk in _request_body(receive):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def serve(
    host: str,
    port: int,
    database: str,
    policy: Policy = "spread",
    team_max_sandboxes: int = 0,
    team_creates_per_minute: int = 0,
    cluster_token: str | None = None,
    domain: str | None = None,
    tls_port: int = 443,
    data_dir: Path | None = None,
    cluster_tls: ClusterTLS | None = None,
) -> None:
    """Run an API replica on host:port (and, with `domain`, over TLS on tls_port: a certificate for the domain and its
    subdomains from the local CA in `data_dir`, routing/tls.py) until SIGTERM/SIGINT."""
    import sys

    from sandboxd.state.postgres import PostgresState

    state = PostgresState(database)
    key, _ = state.api_key()
    quotas = TeamQuotas(state, team_max_sandboxes, team_creates_per_minute)
    replica = Replica(state, policy, quotas, cluster_token, domain, cluster_tls)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"
    alive = [n.node_id for n in state.nodes() if n.alive]
    lines = [
        f"sandboxd API replica listening on {url} (nodes alive: {', '.join(alive) or 'none yet'})",
        f"API key: {key}",
        f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={key}",
    ]
    common: dict[str, Any] = {"log_level": "warning", "access_log": False, "timeout_keep_alive": 650}
    listeners = [uvicorn.Config(replica, host=host, port=port, lifespan="on", timeout_graceful_shutdown=5, **common)]
    if domain:
        from sandboxd.routing.tls import LocalCA

        chain, tls_key = LocalCA(data_dir or Path(".")).server_cert(domain)
        listeners.append(
            uvicorn.Config(
                replica,
                host=host,
                port=tls_port,
                lifespan="off",
                ssl_certfile=str(chain),
                ssl_keyfile=str(tls_key),
                **common,
            )
        )
        lines.append(
            f"and on https://api.{domain}:{tls_port} (E2B_DOMAIN={domain}; sandboxes at {{port}}-{{id}}.{domain})"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)
    others: list[uvicorn.Server] = [Listener(c) for c in listeners[1:]]
    main = MainListener(listeners[0], others)

    async def run_all() -> None:
        await asyncio.gather(main.serve(), *(other.serve() for other in others))

    asyncio.run(run_all())
