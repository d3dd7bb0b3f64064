"""Prometheus metrics at GET /metrics (telemetry/prometheus.py): they move with what really happens to sandboxes
(creates, commands, pauses, resumes, kills, a create refused), per-sandbox series come and go with the sandbox
(and not at all with `--no-metrics-per-sandbox`), and the Grafana dashboard in deploy/grafana charts exactly the
names the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, start_server

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "sandboxd.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(srv: Server, bearer: bool = False) -> str:
    headers = {"Authorization": f"Bearer {srv.api_key}"} if bearer else {"X-API-KEY": srv.api_key}
    r = httpx.get(srv.url + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
    return r.text


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(data: Samples, name: str, **labels: str) -> float:
    return data.get((name, frozenset(labels.items())), 0.0)


def total(data: Samples, name: str, **labels: str) -> float:
    """Summed over the labels not given."""
    want = set(labels.items())
    return sum(v for (n, ls), v in data.items() if n == name and want <= ls)


def with_sandbox(data: Samples, sandbox_id: str) -> list[str]:
    return sorted({n for (n, ls), _ in data.items() if ("sandbox_id", sandbox_id) in ls})


def test_metrics_need_the_api_key_as_a_header_or_a_bearer_token(server: Server) -> None:
    assert httpx.get(server.url + "/metrics").status_code == 401
    wrong = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer e2b_" + "0" * 40})
    assert wrong.status_code == 401
    assert "Bearer" in httpx.get(server.url + "/metrics").json()["message"]  # (says how to send it)
    # a bearer token is for /metrics alone: the rest of the API keeps to X-API-KEY
    assert (
        httpx.get(server.url + "/v2/sandboxes", headers={"Authorization": f"Bearer {server.api_key}"}).status_code
        == 401
    )
    assert "e2b_sandbox_count" in scrape(server, bearer=True)


def test_metrics_move_with_what_happens_to_a_sandbox(server: Server) -> None:
    before = samples(scrape(server))
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        assert sbx.commands.run("echo hi").stdout == "hi\n"
        sbx.get_metrics()  # (a fresh sample of its CPU, memory and disk: what /metrics shows of it)
        now = samples(scrape(server))
        assert value(now, "e2b_sandbox_count", template="base", status="running") >= 1
        assert total(now, "sandboxd_sandboxes", template="base", state="running") >= 1
        assert total(now, "sandboxd_sandbox_creates_total", template="base", outcome="ok") == (
            total(before, "sandboxd_sandbox_creates_total", template="base", outcome="ok") + 1
        )
        assert total(now, "sandboxd_sandbox_create_seconds_count", template="base") == (
            total(before, "sandboxd_sandbox_create_seconds_count", template="base") + 1
        )
        pool = ("sandboxd_pool_hits_total", "sandboxd_pool_misses_total")
        assert (
            sum(value(now, n, template="base") for n in pool)
            == sum(value(before, n, template="base") for n in pool) + 1
        )
        started = dict(api="envd", route="/process.Process/Start", method="POST", status="200")
        assert value(now, "sandboxd_http_request_duration_seconds_count", **started) >= 1 + value(
            before, "sandboxd_http_request_duration_seconds_count", **started
        )
        created = dict(api="control", route="/v2/sandboxes", method="POST", status="201")
        assert value(now, "sandboxd_http_request_duration_seconds_count", **created) >= 1
        # its own series: E2B's usual CPU gauge and sandboxd's CPU, memory and disk, with its limits
        mine = dict(sandbox_id=sbx.sandbox_id, template="base")
        assert set(with_sandbox(now, sbx.sandbox_id)) == {
            "e2b_sandbox_cpu_usage",
            "sandboxd_sandbox_cpu_percent",
            "sandboxd_sandbox_memory_bytes",
            "sandboxd_sandbox_memory_limit_bytes",
            "sandboxd_sandbox_disk_bytes",
            "sandboxd_sandbox_disk_limit_bytes",
        }
        assert (
            0
            < value(now, "sandboxd_sandbox_memory_bytes", **mine)
            < value(now, "sandboxd_sandbox_memory_limit_bytes", **mine)
        )
        assert 0 <= value(now, "e2b_sandbox_cpu_usage", **mine) <= 100

        sbx.pause()
        paused = samples(scrape(server))
        assert value(paused, "e2b_sandbox_count", template="base", status="paused") == 1 + value(
            now, "e2b_sandbox_count", template="base", status="paused"
        )
        assert value(paused, "sandboxd_sandbox_pauses_total", mode="memory", outcome="ok") == 1 + value(
            now, "sandboxd_sandbox_pauses_total", mode="memory", outcome="ok"
        )
        assert not with_sandbox(paused, sbx.sandbox_id), "a paused sandbox has no CPU or memory in use to show"
        Sandbox.connect(sbx.sandbox_id).commands.run("true")
        resumed = samples(scrape(server))
        assert value(resumed, "sandboxd_sandbox_resumes_total", mode="memory", outcome="ok") == 1 + value(
            paused, "sandboxd_sandbox_resumes_total", mode="memory", outcome="ok"
        )
        assert value(resumed, "sandboxd_sandbox_resume_seconds_count", mode="memory") >= 1
    finally:
        sbx.kill()
    ended = samples(scrape(server))
    assert value(ended, "sandboxd_sandbox_ends_total", template="base", reason="killed") >= 1 + value(
        before, "sandboxd_sandbox_ends_total", template="base", reason="killed"
    )
    assert not with_sandbox(ended, sbx.sandbox_id), "a killed sandbox's series stay"
    killed = dict(api="control", route="/sandboxes/{sandbox_id}", method="DELETE", status="204")
    assert value(ended, "sandboxd_http_request_duration_seconds_count", **killed) >= 1

    # a create refused: counted under the unknown template, never under the name the client sent
    with pytest.raises(Exception, match="not found"):
        Sandbox.create(template="no-such-template-7f3a", timeout=30)
    refused = samples(scrape(server))
    assert value(refused, "sandboxd_sandbox_creates_total", template="(unknown)", source="new", outcome="rejected") == (
        1 + value(ended, "sandboxd_sandbox_creates_total", template="(unknown)", source="new", outcome="rejected")
    )
    assert "no-such-template-7f3a" not in scrape(server)


def _exported(text: str) -> set[str]:
    """The sample names the exposition has, or would have, for each family it declares."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def test_the_grafana_dashboard_charts_exactly_the_exported_names(server: Server) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {n for e in exprs for n in re.findall(r"\b(?:sandboxd|e2b)_[a-z0-9_]+", e)}
    exported = _exported(scrape(server))
    assert used, exprs
    assert not used - exported, f"the dashboard charts names the server does not export: {sorted(used - exported)}"
    families = {n for n in exported if not n.endswith(("_count", "_sum"))}
    charted = {re.sub(r"_(bucket|count|sum)$", "", n) for n in used} | used
    uncharted = {n for n in families if n not in charted and re.sub(r"_bucket$", "", n) not in charted}
    assert not uncharted, f"exported but charted nowhere in {DASHBOARD.name}: {sorted(uncharted)}"


def test_per_sandbox_series_can_be_switched_off(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--pool-size", "0", "--no-metrics-per-sandbox")
    try:
        env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
        sbx = Sandbox.create(template="base", timeout=60, **env)  # type: ignore[arg-type]
        sbx.get_metrics()
        data = samples(scrape(srv))
        assert value(data, "e2b_sandbox_count", template="base", status="running") == 1
        assert not any(dict(ls).get("sandbox_id") for (_, ls) in data), "a per-sandbox series"
        assert value(data, "sandboxd_pool_misses_total", template="base") == 1  # (no pool: each create makes one)
        sbx.kill()
    finally:
        assert srv.stop() == 0
