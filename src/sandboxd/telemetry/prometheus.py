"""Prometheus metrics of a server, at `GET /metrics` (the API key, as `X-API-Key` or `Authorization: Bearer`).

Two kinds (prometheus-client, one registry per server):

- read when scraped, from the server's own state (`_State.collect`): sandboxes by template and state (and E2B's
  usual `e2b_sandbox_count{template,status}`), each sandbox's CPU, memory and disk from its last sample
  (core/metrics.py; E2B's usual `e2b_sandbox_cpu_usage{sandbox_id,template}` too), pools, template builds
  running. Per-sandbox series can be switched off (`sandboxd serve --no-metrics-per-sandbox`): one series
  per sandbox and metric is what a fleet of thousands cannot afford;
- counted as things happen (core/events.py): creates, pauses, resumes by outcome, with their latencies; ends
  by reason; template builds; and every API and envd request by route, method and status (`Requests`, the
  ASGI middleware in front of both), timed until its response starts (a stream's headers, not its end).

Labels are never what a client typed: a route is the route's template (`/sandboxes/{sandbox_id}`), an envd
path one envd answered (else `(unknown)`), a template one that exists (else `(unknown)`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxd.core import pausing
from sandboxd.core.events import Event
from sandboxd.core.health import HEALTH_KEY

if TYPE_CHECKING:
    from sandboxd.core.builds import TemplateBuilds
    from sandboxd.core.manager import SandboxManager

# the classic text format, which every Prometheus reads (generate_latest writes it)
access = logging.getLogger("sandboxd.access")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_ROUTE = "(unknown)"
# latencies from a pooled create (a few ms) to a template build (minutes)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BUILD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STATES = ("running", "paused_memory", "paused_disk", "paused_filesystem")


def _state(record: Any) -> str:
    if record.state != "paused":
        return "running"
    return {pausing.DISK: "paused_disk", pausing.FILESYSTEM: "paused_filesystem"}.get(
        record.pause_mode, "paused_memory"
    )


class Exporter:
    def __init__(self, manager: SandboxManager, builds: TemplateBuilds | None = None, per_sandbox: bool = True) -> None:
        disable_created_metrics()  # (no `_created` series beside each counter: Prometheus has no use for them)
        self.registry = CollectorRegistry(auto_describe=True)
        self.manager = manager
        self.builds = builds
        self.per_sandbox = per_sandbox
        r = self.registry
        self.creates = Counter(
            "sandboxd_sandbox_creates",
            "Sandbox creates by outcome; source: pool or new",
            ["template", "source", "outcome"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "sandboxd_sandbox_create_seconds",
            "Time a successful create took, until the sandbox was ready",
            ["template", "source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pauses = Counter("sandboxd_sandbox_pauses", "Pauses by mode and outcome", ["mode", "outcome"], registry=r)
        self.pause_seconds = Histogram(
            "sandboxd_sandbox_pause_seconds",
            "Time a successful pause took",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "sandboxd_sandbox_resumes", "Resumes by mode and outcome", ["mode", "outcome"], registry=r
        )
        self.resume_seconds = Histogram(
            "sandboxd_sandbox_resume_seconds",
            "Time a successful resume took",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ends = Counter(
            "sandboxd_sandbox_ends",
            "Sandboxes that ended, by why (killed, timeout, oom, ...)",
            ["template", "reason"],
            registry=r,
        )
        self.template_builds = Counter(
            "sandboxd_template_builds", "Template builds that ended, by outcome", ["outcome"], registry=r
        )
        self.build_seconds = Histogram(
            "sandboxd_template_build_seconds",
            "Time a successful template build took",
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.requests = Histogram(
            "sandboxd_http_request_duration_seconds",
            "API and envd requests until their response started, by route, method and status",
            ["api", "route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_State(self))
        manager.events.listen(self.on_event)

    def on_event(self, e: Event) -> None:
        ok = e.outcome == "ok"
        if e.kind == "create":
            self.creates.labels(e.template, e.mode or "new", e.outcome).inc()
            if ok:
                self.create_seconds.labels(e.template, e.mode or "new").observe(e.seconds)
        elif e.kind == "pause":
            self.pauses.labels(e.mode, e.outcome).inc()
            if ok:
                self.pause_seconds.labels(e.mode).observe(e.seconds)
        elif e.kind == "resume":
            self.resumes.labels(e.mode, e.outcome).inc()
            if ok:
                self.resume_seconds.labels(e.mode).observe(e.seconds)
        elif e.kind == "end":
            self.ends.labels(e.template, e.outcome).inc()
        elif e.kind == "build":
            self.template_builds.labels(e.outcome).inc()
            if ok:
                self.build_seconds.observe(e.seconds)

    def exposition(self) -> bytes:
        """The text format, as scraped (on the event loop: it reads the server's state as it is)."""
        return generate_latest(self.registry)


class _State:
    """Gauges read from the server's state at each scrape."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def describe(self) -> list[Metric]:
        return []  # (no fixed description: collected at each scrape)

    def collect(self) -> Iterator[Metric]:
        m = self.exporter.manager
        e2b_count = GaugeMetricFamily(
            "e2b_sandbox_count", "Sandboxes by template and status (running, paused)", labels=["template", "status"]
        )
        by_state = GaugeMetricFamily(
            "sandboxd_sandboxes",
            "Sandboxes by template and state (paused_*: where a paused one is kept)",
            labels=["template", "state"],
        )
        counts: dict[tuple[str, str], int] = {}
        sandboxes = list(m.sandboxes.values())
        for s in sandboxes:
            key = (s.record.template_id, _state(s.record))
            counts[key] = counts.get(key, 0) + 1
        templates = {t for t, _ in counts}
        for t in sorted(templates):
            for state in STATES:
                by_state.add_metric([t, state], counts.get((t, state), 0))
            e2b_count.add_metric([t, "running"], counts.get((t, "running"), 0))
            e2b_count.add_metric([t, "paused"], sum(counts.get((t, st), 0) for st in STATES[1:]))
        yield e2b_count
        yield by_state
        unhealthy = GaugeMetricFamily(
            "sandboxd_sandboxes_unhealthy",
            "Running sandboxes whose template's probe fails (core/health.py)",
            labels=["template"],
        )
        sick: dict[str, int] = {}
        for s in sandboxes:
            health = s.ext.get(HEALTH_KEY)
            if health is not None and not health.healthy and s.record.state == "running":
                sick[s.record.template_id] = sick.get(s.record.template_id, 0) + 1
        for t in sorted(templates | set(sick)):
            unhealthy.add_metric([t], sick.get(t, 0))
        yield unhealthy
        probes = CounterMetricFamily("sandboxd_health_probes", "Health probes run, by outcome", labels=["outcome"])
        for outcome in ("pass", "fail", "timeout"):
            probes.add_metric([outcome], m.health.probes[outcome])
        yield probes
        if self.exporter.per_sandbox:
            yield from self._per_sandbox(sandboxes)
        yield from self._pools()
        count, memory, _ = m.committed()
        host = m.host_limits
        for name, doc, value in (
            ("sandboxd_committed_sandboxes", "Sandboxes running, paused, pooled and being made", count),
            (
                "sandboxd_committed_sandboxes_limit",
                "The most there may be (sandboxd serve --max-sandboxes)",
                host.max_sandboxes,
            ),
            ("sandboxd_committed_memory_bytes", "The sum of their memory limits", memory << 20),
            ("sandboxd_committed_memory_limit_bytes", "The most that sum may be", host.max_committed_memory_mb << 20),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        builds = self.exporter.builds
        running = GaugeMetricFamily("sandboxd_template_builds_running", "Template builds under way")
        running.add_metric([], sum(1 for b in builds.builds.values() if b.status == "building") if builds else 0)
        yield running

    def _pools(self) -> Iterator[Metric]:
        pool, scaler = self.exporter.manager.pool, self.exporter.manager.autoscaler
        labels = ["template"]
        idle = GaugeMetricFamily("sandboxd_pool_idle", "Idle sandboxes in the warm pool, per template", labels=labels)
        target = GaugeMetricFamily("sandboxd_pool_target", "Idle sandboxes the pool is kept at now", labels=labels)
        low = GaugeMetricFamily("sandboxd_pool_min", "The least the pool's target may be", labels=labels)
        high = GaugeMetricFamily("sandboxd_pool_max", "The most the pool's target may be", labels=labels)
        hits = CounterMetricFamily("sandboxd_pool_hits", "Creates served from the warm pool", labels=labels)
        misses = CounterMetricFamily("sandboxd_pool_misses", "Creates that found the warm pool empty", labels=labels)
        replaced = CounterMetricFamily(
            "sandboxd_pool_replaced", "Idle pooled sandboxes found broken and made again", labels=labels
        )
        moves = CounterMetricFamily(
            "sandboxd_pool_scalings", "Times the autoscaler moved the pool's target", labels=["template", "direction"]
        )
        sizes = pool.idle()
        for t in sorted(set(sizes) | set(pool.targets) | set(pool.hits) | set(pool.misses)):
            limits = pool.limits_of(t)
            idle.add_metric([t], sizes.get(t, 0))
            target.add_metric([t], pool.target_of(t))
            low.add_metric([t], limits.min)
            high.add_metric([t], limits.max)
            hits.add_metric([t], pool.hits[t])
            misses.add_metric([t], pool.misses[t])
            replaced.add_metric([t], pool.replaced[t])
        for (t, direction), times in sorted(scaler.changes.items()):
            moves.add_metric([t, direction], times)
        yield from (idle, target, low, high, hits, misses, replaced, moves)

    def _per_sandbox(self, sandboxes: list[Any]) -> Iterator[Metric]:
        labels = ["sandbox_id", "template"]
        cpu_e2b = GaugeMetricFamily(
            "e2b_sandbox_cpu_usage", "CPU use of each running sandbox, percent of its CPUs", labels=labels
        )
        cpu = GaugeMetricFamily("sandboxd_sandbox_cpu_percent", "CPU use, percent of the sandbox's CPUs", labels=labels)
        mem = GaugeMetricFamily("sandboxd_sandbox_memory_bytes", "Memory the sandbox uses", labels=labels)
        mem_limit = GaugeMetricFamily(
            "sandboxd_sandbox_memory_limit_bytes", "The sandbox's memory limit", labels=labels
        )
        disk = GaugeMetricFamily("sandboxd_sandbox_disk_bytes", "Disk the sandbox uses", labels=labels)
        disk_limit = GaugeMetricFamily("sandboxd_sandbox_disk_limit_bytes", "The sandbox's disk size", labels=labels)
        sampler = self.exporter.manager.metrics
        for s in sandboxes:
            last = sampler.latest(s.id) if s.running else None
            if last is None:
                continue
            values = [s.id, s.record.template_id]
            cpu_e2b.add_metric(values, last["cpu_used_pct"])
            cpu.add_metric(values, last["cpu_used_pct"])
            mem.add_metric(values, last["mem_used"])
            mem_limit.add_metric(values, last["mem_total"])
            disk.add_metric(values, last["disk_used"])
            disk_limit.add_metric(values, last["disk_total"])
        yield from (cpu_e2b, cpu, mem, mem_limit, disk, disk_limit)


class Requests:
    """ASGI middleware: each HTTP request of `app` into the exporter's request histogram, labelled with `api`
    ("control" or "envd"), the route it matched, its method and status, timed until its response started."""

    def __init__(self, app: ASGIApp, exporter: Exporter, api: str) -> None:
        self.app = app
        self.exporter = exporter
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        seen = False

        async def timed_send(message: Message) -> None:
            nonlocal seen
            if message["type"] == "http.response.start" and not seen:
                seen = True
                status, took = int(message["status"]), time.monotonic() - started
                route, method = self._route(scope, status), scope["method"] if scope["method"] in METHODS else "OTHER"
                self.exporter.requests.labels(self.api, route, method, str(status)).observe(took)
                if access.isEnabledFor(logging.INFO):
                    self._log(scope, route, method, status, took)
            await send(message)

        await self.app(scope, receive, timed_send)

    def _log(self, scope: Scope, route: str, method: str, status: int, took: float) -> None:
        """One line per request (sandboxd serve --log-format json: one JSON object), with its sandbox's ID."""
        sandbox = scope.get("sandboxd.sandbox") or (scope.get("path_params") or {}).get("sandbox_id") or "-"
        fields = {
            "api": self.api,
            "method": method,
            "route": route,
            "status": status,
            "ms": round(took * 1000, 2),
            "sandbox_id": UNSAFE.sub("?", str(sandbox)[:64]),  # (what a client sent: no line breaks in a log)
        }
        access.info(
            "%s %s %s %d %.1f ms sandbox=%s",
            self.api,
            method,
            route,
            status,
            took * 1000,
            fields["sandbox_id"],
            extra={"fields": fields},
        )

    def _route(self, scope: Scope, status: int) -> str:
        route = scope.get("route")  # (Starlette's: the route that matched)
        if route is not None and isinstance(getattr(route, "path", None), str):
            return CONVERTER.sub("}", route.path)  # /sandboxes/{sandbox_id:str} -> /sandboxes/{sandbox_id}
        if self.api == "envd" and status != 404:  # (a path envd answers: from a fixed set)
            return str(scope["path"])
        return UNKNOWN_ROUTE


UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
CONVERTER = re.compile(r":\w+\}")
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
