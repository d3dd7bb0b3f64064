"""GET /metrics as a hostile client would use it: what it sends must never become a label. Random paths on the
control plane and on envd, random envd methods and template names would each make new series (the server's
memory, every scrape's size, Prometheus' storage) if a label took them as they came; and /metrics without the
key tells nothing."""

from __future__ import annotations

import secrets

import httpx
from e2b import Sandbox
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server
from wire import envd_headers

ROUNDS = 25


def _scrape(srv: Server) -> str:
    r = httpx.get(srv.url + "/metrics", headers={"X-API-KEY": srv.api_key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


# what a client's requests are counted in (other families move with the shared server's own life: a sandbox of
# an earlier test reaching its timeout ends, and its per-sandbox series go)
REQUEST_FAMILIES = ("sandboxd_http_request_duration_seconds", "sandboxd_sandbox_creates", "sandboxd_sandbox_create_")


def _series(text: str) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text) if f.name.startswith(REQUEST_FAMILIES))


def test_what_a_client_sends_never_becomes_a_label(server: Server, sandbox: Sandbox) -> None:
    api = {"X-API-KEY": server.api_key}
    sent: list[str] = []

    def burst() -> None:
        for _ in range(ROUNDS):
            word = "zz" + secrets.token_hex(6)
            sent.append(word)
            assert httpx.get(f"{server.url}/{word}", headers=api).status_code == 404
            assert httpx.get(f"{server.url}/sandboxes/{word}", headers=api).status_code == 404
            assert httpx.post(f"{server.url}/v2/sandboxes", headers=api, json={"templateID": word}).status_code == 404
            for path in (f"/process.Process/{word}", f"/{word}"):
                r = httpx.post(server.url + path, headers=envd_headers(sandbox, streaming=False), content=b"{}")
                assert r.status_code == 404, (path, r.status_code, r.text)
            assert httpx.get(f"{server.url}/{word}", headers={"X-API-KEY": word}).status_code == 401

    sandbox.get_metrics()  # (its own series are there from now on)
    burst()  # (each kind of refusal has its series now)
    _scrape(server)  # (and the scrapes theirs)
    grown = _series(_scrape(server))
    burst()
    text = _scrape(server)
    assert _series(text) == grown, "refused requests made new series"
    leaked = [w for w in sent if w in text]
    assert not leaked, f"client-sent words became labels: {leaked[:5]}"


def test_metrics_tell_nothing_without_the_key(server: Server) -> None:
    for headers in (
        {},
        {"X-API-KEY": "e2b_" + "0" * 40},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic x"},
    ):
        r = httpx.get(server.url + "/metrics", headers=headers)
        assert r.status_code == 401, (headers, r.status_code)
        assert "e2b_sandbox" not in r.text and "sandboxd_" not in r.text
