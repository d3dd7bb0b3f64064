"""sandboxd.fleet's pool (fleet/pool.py) against the real server through the official SDK: min made at start, at
most max lent, a waiter served by a release, PoolExhausted saying what to do, recycle (the same sandbox) and reset
(killed, another), a sandbox killed behind the pool's back not lent, close kills them; the synchronous face."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox

from sandboxd.fleet import (
    AsyncSandboxPool,
    AutoScaler,
    HealthMonitor,
    LoadBalancer,
    NoSandboxes,
    NoTemplate,
    PoolExhausted,
    Rule,
    SandboxPool,
    TemplateAffinity,
    retrying_sync,
)
from sandboxd.fleet.pool import POOL_KEY

from conftest import Server, keeping_server, start_server


def _mine(server: Server, pool_id: str) -> list[str]:
    listed = server.api().get("/v2/sandboxes", params={"metadata": f"{POOL_KEY}={pool_id}"}).json()
    return sorted(s["sandboxID"] for s in listed)


def test_an_async_pool_lends_within_its_limits_and_takes_back(server: Server) -> None:
    async def body() -> None:
        async with AsyncSandboxPool("base", min=2, max=3, timeout=120, acquire_timeout=1) as pool:
            assert len(_mine(server, pool.id)) == 2 and pool.stats()["idle"] == 2
            async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
                assert len({a.sandbox_id, b.sandbox_id, c.sandbox_id}) == 3
                assert (await a.commands.run("echo ok")).stdout == "ok\n"
                started = time.monotonic()
                with pytest.raises(PoolExhausted, match="raise max"):
                    async with pool.acquire():
                        pass
                assert time.monotonic() - started >= 0.9
                kept = a.sandbox_id
            # recycled: the same sandboxes come back
            async with pool.acquire() as again:
                assert again.sandbox_id in {kept, b.sandbox_id, c.sandbox_id}

            # a waiter gets the one released meanwhile
            async def hold(seconds: float) -> str:
                async with pool.acquire() as s:
                    await asyncio.sleep(seconds)
                    return str(s.sandbox_id)

            ids = await asyncio.gather(hold(0.5), hold(0.5), hold(0.5), hold(0.1))
            assert len(set(ids)) <= 3

            # killed behind its back: not lent
            victim = pool._idle[0].sandbox_id
            server.api().delete(f"/sandboxes/{victim}")
            async with pool.acquire() as s:
                assert s.sandbox_id != victim and (await s.commands.run("true")).exit_code == 0
            pool_id = pool.id
        deadline = time.monotonic() + 10
        while _mine(server, pool_id):  # (closed: its sandboxes killed)
            assert time.monotonic() < deadline, _mine(server, pool_id)
            await asyncio.sleep(0.2)

    asyncio.run(body())


def _status(server: Server, sandbox_id: str) -> int:
    return httpx.get(f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": server.api_key}).status_code


def test_reset_gives_a_clean_sandbox_and_kills_the_used_one(server: Server) -> None:
    async def body() -> None:
        async with AsyncSandboxPool("base", min=1, max=2, timeout=120, on_release="reset") as pool:
            async with pool.acquire() as s:
                await s.files.write("/tmp/dirty", "x")
                used = s.sandbox_id
            async with pool.acquire() as s:
                assert s.sandbox_id != used
                assert not await s.files.exists("/tmp/dirty")
            deadline = time.monotonic() + 10
            while (await asyncio.to_thread(_status, server, used)) != 404:
                assert time.monotonic() < deadline, "the used sandbox was not killed"
                await asyncio.sleep(0.2)

    asyncio.run(body())


def test_the_synchronous_pool(server: Server) -> None:
    with SandboxPool("base", min=1, max=2, timeout=120) as pool:
        with pool.acquire() as sbx:
            assert isinstance(sbx, Sandbox)
            assert sbx.commands.run("echo sync").stdout == "sync\n"
            first = sbx.sandbox_id
        with pool.acquire() as sbx:
            assert sbx.sandbox_id == first  # (recycled)
        with pytest.raises(RuntimeError), pool.acquire() as sbx:
            raise RuntimeError("the block failed")  # (then the sandbox is not lent again)
        assert pool.stats()["lent"] == 0
        pool_id = pool.pool.id
    time.sleep(1)
    assert first not in _mine(server, pool_id)


def test_the_load_balancer_spreads_work_by_its_strategy(server: Server) -> None:
    boxes = [Sandbox.create(template="base", timeout=120) for _ in range(3)]
    try:
        ids = [b.sandbox_id for b in boxes]
        rr = LoadBalancer(boxes, strategy="round_robin")
        picked = []
        for _ in range(6):
            with rr.use_sync() as s:
                picked.append(s.sandbox_id)
        assert picked == ids + ids

        lc = LoadBalancer(boxes, strategy="least_connections")
        with lc.use_sync() as a, lc.use_sync() as b, lc.use_sync() as c:
            assert {a.sandbox_id, b.sandbox_id, c.sandbox_id} == set(ids)  # (each busy one avoided)
            assert lc.in_flight == dict.fromkeys(ids, 1)
        assert lc.in_flight == dict.fromkeys(ids, 0)

        # metrics: the sandbox burning its CPU is avoided
        boxes[0].commands.run("timeout 60 sh -c 'while :; do :; done' >/dev/null 2>&1 &")
        by_cpu = LoadBalancer(boxes, strategy="metrics", metrics_ttl=0)
        deadline = time.monotonic() + 30
        while by_cpu.cpu.get(ids[0], 0) < 50:
            assert time.monotonic() < deadline, by_cpu.cpu
            by_cpu.refresh_sync()
            time.sleep(1.1)
        for _ in range(4):
            with by_cpu.use_sync() as s:
                assert s.sandbox_id != ids[0], by_cpu.cpu
        with pytest.raises(NoSandboxes, match="add"):
            LoadBalancer([]).pick()
    finally:
        for b in boxes:
            b.kill()


def test_a_call_survives_a_server_restart_and_a_create_is_never_made_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with keeping_server(data, "--pool-size", "0") as (srv, port):
        env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
        srv.stop()  # (down: the next create's request cannot be sent)
        restarted: list[Server] = []

        def restart() -> None:
            time.sleep(1.0)
            restarted.append(start_server(data, "--pool-size", "0", port=port, keep=True))

        helper = threading.Thread(target=restart)
        helper.start()
        sbx = retrying_sync(lambda: Sandbox.create(template="base", timeout=60, **env), idempotent=False, attempts=8)
        helper.join()
        srv2 = restarted[0]
        try:
            listed = srv2.api().get("/v2/sandboxes").json()
            assert [s["sandboxID"] for s in listed] == [sbx.sandbox_id]  # made once
            # an idempotent read across a restart
            srv2.stop()
            helper = threading.Thread(target=restart)
            helper.start()
            info = retrying_sync(lambda: Sandbox.get_info(sbx.sandbox_id, **env), idempotent=True, attempts=8)
            helper.join()
            assert info.sandbox_id == sbx.sandbox_id
            # what is not worth another try is raised at once
            started = time.monotonic()
            with pytest.raises(Exception, match="not found"):
                retrying_sync(lambda: Sandbox.create(template="no-such-x", timeout=60, **env), idempotent=False)
            assert time.monotonic() - started < 2
            Sandbox.kill(sbx.sandbox_id, **env)
        finally:
            for s in restarted:
                s.stop()


def test_the_health_monitor_reports_and_replaces_broken_sandboxes(server: Server) -> None:
    async def body() -> None:
        boxes = [await AsyncSandbox.create(template="base", timeout=120) for _ in range(2)]
        for b in boxes:
            await b.files.write("/tmp/ok", "")
        lb = LoadBalancer(boxes)
        seen: list[tuple[str, str]] = []
        replaced: list[tuple[str, str]] = []

        async def make(old: AsyncSandbox) -> AsyncSandbox:
            new = await AsyncSandbox.create(template="base", timeout=120)
            await new.files.write("/tmp/ok", "")
            return new

        monitor = HealthMonitor(
            lb,
            probe="test -f /tmp/ok",
            replace=make,
            on_unhealthy=lambda s, why: seen.append((s.sandbox_id, why)),
            on_replaced=lambda old, new: replaced.append((old.sandbox_id, new.sandbox_id)),
        )
        try:
            assert await monitor.check() == {}
            dead, sick = boxes
            await asyncio.to_thread(lambda: server.api().delete(f"/sandboxes/{dead.sandbox_id}"))
            await sick.commands.run("rm /tmp/ok")
            bad = await monitor.check()
            assert set(bad) == {dead.sandbox_id, sick.sandbox_id}, bad
            assert "not running" in bad[dead.sandbox_id] and "test -f /tmp/ok" in bad[sick.sandbox_id], bad
            assert {old for old, _ in replaced} == set(bad) and len(seen) == 2
            now = {s.sandbox_id for s in lb._sandboxes}
            assert now == {new for _, new in replaced} and not now & set(bad)
            assert await monitor.check() == {}  # (the new ones are healthy)
            assert await asyncio.to_thread(_status, server, sick.sandbox_id) == 404  # (the sick one killed)
        finally:
            for s in lb._sandboxes:
                await s.kill()

    asyncio.run(body())


def test_the_autoscaler_rule_grows_and_shrinks_by_its_steps_within_limits() -> None:
    pool = AsyncSandboxPool("base", min=4, max=10)
    scaler = AutoScaler(pool, min_size=2, max_size=7, rule=Rule(window=60))
    assert scaler.decide(0, 95, 4, 0).reason == ""  # (not yet a whole window)
    assert scaler.decide(30, 95, 4, 0).reason == ""
    grow = scaler.decide(60, 95, 4, 0)
    assert grow.size == 6 and "above 70 %" in grow.reason  # +50 %
    assert scaler.decide(120, 99, 6, 0).size == 7  # (capped at max_size)
    assert scaler.decide(121, 50, 6, 0).reason == ""  # between the thresholds: the windows start again
    assert scaler.decide(122, 10, 6, 0).reason == ""
    assert scaler.decide(182, 10, 6, 3).reason == ""  # (callers waiting: never shrunk)
    shrink = scaler.decide(183, 10, 6, 0)
    assert shrink.size == 5 and "below 30 %" in shrink.reason  # -30 % rounded down, at least one
    assert scaler.decide(300, 10, 2, 0).reason == ""  # (at min_size)
    assert scaler.decide(301, 50, 9, 0).size == 7  # (outside the limits: brought back)
    with pytest.raises(ValueError, match="max_size"):
        AutoScaler(pool, min_size=2, max_size=11)
    with pytest.raises(ValueError, match="low < high"):
        Rule(low=80, high=70)


def test_the_autoscaler_sizes_a_pool_by_its_sandboxes_cpu(server: Server) -> None:
    burn = "timeout 60 sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > /tmp/burn.pid"

    async def body() -> None:
        async with AsyncSandboxPool("base", min=2, max=4, timeout=120) as pool:
            # (two busy sandboxes of one CPU each may share one of the host's two: 50 % each, counted as busy)
            scaler = AutoScaler(pool, min_size=1, max_size=4, rule=Rule(high=40, low=20, window=1.5))
            async with pool.acquire() as a, pool.acquire() as b:
                for s in (a, b):
                    await s.commands.run(burn)
                deadline = time.monotonic() + 40
                while pool.min < 3:  # both busy: grown by one (50 % of 2)
                    assert time.monotonic() < deadline, (scaler.steps, pool.stats(), await scaler.average_cpu())
                    await scaler.step()
                    await asyncio.sleep(0.5)
                assert pool.min == 3 and len(_mine(server, pool.id)) == 3 and "above" in scaler.steps[-1][3]
                for s in (a, b):
                    await s.commands.run("kill $(cat /tmp/burn.pid)")  # (timeout passes it on to the loop)
                while (await scaler.average_cpu() or 0) >= 20:  # (their latest samples idle too)
                    assert time.monotonic() < deadline, (scaler.steps, await scaler.average_cpu())
                    await asyncio.sleep(0.5)
            deadline = time.monotonic() + 40
            while pool.min > 1:  # idle: shrunk step by step to min_size, and no further
                assert time.monotonic() < deadline, (scaler.steps, pool.stats())
                await scaler.step()
                await asyncio.sleep(0.5)
            assert [step[1:3] for step in scaler.steps] == [(2, 3), (3, 2), (2, 1)], scaler.steps
            assert pool.size == 1 and len(_mine(server, pool.id)) == 1
            await asyncio.sleep(1.2)
            await scaler.step()
            assert pool.min == 1

    asyncio.run(body())


def test_tasks_go_to_their_templates_pools(server: Server) -> None:
    async def body() -> None:
        rules = {"shell": "base"}
        affinity = TemplateAffinity(
            rules, matchers=[lambda t: "code-interpreter-v1" if t.startswith("py:") else None], min=0, max=2, timeout=60
        )
        async with affinity:
            async with affinity.acquire("shell") as s:
                info = await s.get_info()
                assert info.name == "base" or info.template_id == "base"
            async with affinity.acquire("py:pandas") as s:
                assert (await s.get_info()).template_id == "code-interpreter-v1"
            assert sorted(affinity.pools) == ["base", "code-interpreter-v1"]
            with pytest.raises(NoTemplate, match="no default"):
                affinity.template_for("gpu")
            assert TemplateAffinity(default="base").template_for("anything") == "base"

    asyncio.run(body())
