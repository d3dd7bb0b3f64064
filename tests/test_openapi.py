"""`GET /openapi.json` (api/openapi.py): a valid OpenAPI 3.1 document of the control plane, made from its
routes: every path and method it lists is routed (the server never answers it "no such endpoint" or "method not
allowed"), the routes the official SDKs call are in it, request bodies have their models' schemas."""

from __future__ import annotations

import httpx
from openapi_spec_validator import validate

from conftest import Server

SDK_ROUTES = {  # what e2b's Python SDK calls (../shared/e2b-protocol.md)
    ("post", "/v2/sandboxes"),
    ("get", "/v2/sandboxes"),
    ("get", "/sandboxes/{sandbox_id}"),
    ("delete", "/sandboxes/{sandbox_id}"),
    ("post", "/sandboxes/{sandbox_id}/timeout"),
    ("post", "/sandboxes/{sandbox_id}/connect"),
    ("post", "/sandboxes/{sandbox_id}/pause"),
    ("get", "/sandboxes/{sandbox_id}/metrics"),
    ("post", "/sandboxes/{sandbox_id}/snapshots"),
    ("post", "/sandboxes/{sandbox_id}/fork"),
    ("get", "/snapshots"),
    ("post", "/v3/templates"),
}


def test_the_openapi_document_is_valid_and_lists_every_route(server: Server) -> None:
    r = httpx.get(server.url + "/openapi.json")  # (no key needed)
    assert r.status_code == 200, r.text
    doc = r.json()
    validate(doc)
    listed = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert SDK_ROUTES <= listed, SDK_ROUTES - listed
    assert {("get", "/metrics"), ("get", "/pools"), ("put", "/pools/{template}")} <= listed
    create = doc["paths"]["/v2/sandboxes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = doc["components"]["schemas"][create["$ref"].rsplit("/", 1)[1]]
    assert "templateID" in body["properties"] and "templateID" in body["required"], body
    assert doc["paths"]["/health"]["get"]["security"] == []
    # every listed route is routed: never the router's "no such endpoint" (404) or "not allowed" (405)
    with server.api() as api:
        for method, path in sorted(listed):
            concrete = path.replace("{", "x-").replace("}", "")
            if method != "get" and "{" not in path:
                continue  # (a create would make one; with an ID that names nothing, nothing is made or changed)
            answer = api.request(method.upper(), concrete, json={})
            json_body = answer.headers.get("content-type", "").startswith("application/json")
            said = answer.json() if json_body else {}
            said = said.get("message", "") if isinstance(said, dict) else ""
            assert answer.status_code != 405 and not said.startswith("no such endpoint"), (method, path, answer.text)
