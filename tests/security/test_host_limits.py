"""Host-wide limits: no tenant (or all of them together) takes the host's sandboxes, memory or PIDs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from conftest import Server, start_server

CG = Path("/sys/fs/cgroup")


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


def _create(srv: Server, template: str = "base") -> httpx.Response:
    with srv.api() as api:
        return api.post("/sandboxes", json={"templateID": template, "timeout": 60})


@pytest.fixture
def limited(tmp_path: Path, request: pytest.FixtureRequest):
    srv = start_server(tmp_path / "data", "--pool-size", "0", "--prewarm", "", *request.param)
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("limited", [("--max-sandboxes", "2")], indirect=True)
def test_sandbox_count_limit(limited: Server) -> None:
    a, b = _create(limited), _create(limited)
    assert a.status_code == b.status_code == 201
    r = _create(limited)
    assert r.status_code == 429, r.text
    assert "limit of 2 sandboxes" in r.json()["message"] and "--max-sandboxes" in r.json()["message"]
    # the SDK shows it as its rate-limit error, with the message
    from e2b import RateLimitException

    with pytest.raises(RateLimitException, match="max-sandboxes"):
        Sandbox.create(template="base", **_env(limited))
    with limited.api() as api:
        assert api.delete(f"/sandboxes/{a.json()['sandboxID']}").status_code == 204
    assert _create(limited).status_code == 201  # room again


@pytest.mark.parametrize("limited", [("--max-memory-mb", "1100")], indirect=True)
def test_committed_memory_limit(limited: Server) -> None:
    assert _create(limited).status_code == 201  # 512
    r = _create(limited, "code-interpreter-v1")  # 1024 more: 1536 > 1100
    assert r.status_code == 429 and "memory budget" in r.json()["message"], r.text
    assert _create(limited).status_code == 201  # 1024 <= 1100
    assert _create(limited).status_code == 429


@pytest.mark.parametrize("limited", [("--max-total-pids", "1100", "--pids", "512")], indirect=True)
def test_total_pids_limit_admission_and_kernel(limited: Server) -> None:
    assert _create(limited).status_code == 201
    assert _create(limited).status_code == 201
    r = _create(limited)
    assert r.status_code == 429 and "PIDs" in r.json()["message"], r.text
    instance = next((CG / "pids" / "sandboxd").glob("i*/"), None) if (CG / "pids").is_dir() else None
    if instance is not None:
        values = {p.parent.name: p.read_text().strip() for p in (CG / "pids" / "sandboxd").glob("i*/pids.max")}
        assert "1100" in values.values(), values


def test_pooled_sandboxes_give_way(tmp_path: Path) -> None:
    # The pool fills the limit with idle `base` sandboxes: users still get sandboxes of another template.
    srv = start_server(tmp_path / "data", "--max-sandboxes", "2", "--pool-size", "2", "--prewarm", "base")
    try:
        for _ in range(100):  # the pool fills in the background
            if len(list((srv.data_dir / "sandboxes").iterdir())) >= 2:
                break
            time.sleep(0.1)
        assert len(list((srv.data_dir / "sandboxes").iterdir())) == 2
        r = _create(srv, "code-interpreter-v1")
        assert r.status_code == 201, r.text
        assert _create(srv).status_code == 201  # the other pooled one is handed out
        assert _create(srv).status_code == 429  # and now the limit is the users' own
    finally:
        assert srv.stop() == 0


def test_server_runs_in_its_own_memory_cgroup(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--server-memory-mb", "3000", "--prewarm", "")
    try:
        lines = Path(f"/proc/{srv.proc.pid}/cgroup").read_text().splitlines()
        mem = next((line.split(":", 2)[2] for line in lines if ":memory:" in line), None)
        if mem is None:  # pure cgroup v2
            mem = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
            limit = (CG / mem.lstrip("/") / "memory.max").read_text().strip()
        else:
            limit = (CG / "memory" / mem.lstrip("/") / "memory.limit_in_bytes").read_text().strip()
        assert mem.startswith("/sandboxd/") and mem.endswith(".server"), mem
        assert int(limit) == 3000 * 1024 * 1024
    finally:
        assert srv.stop() == 0
    assert not (CG / "memory" / mem.lstrip("/")).exists(), "the server's cgroup is removed at a clean exit"
