"""Server restarts and crashes leave nothing behind: live sandboxes are re-adopted, dead ones cleaned up."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
from e2b import Sandbox

from conftest import Server, cgroup_dirs, host_pids_of, start_server


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


def test_crash_then_restart_readopts_running_sandboxes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data)
    sbx = Sandbox.create(template="base", timeout=120, metadata={"keep": "me"}, **_env(srv))
    sbx.commands.run("echo before-crash > /tmp/state")
    port = int(srv.url.rsplit(":", 1)[1])
    srv.stop(signal.SIGKILL)  # a crash: no cleanup at all
    assert host_pids_of(srv, sbx.sandbox_id), "the sandbox outlives a crashed server"

    srv2 = start_server(data, port=port)
    try:
        assert srv2.api_key == srv.api_key, "the API key survives a restart"
        again = Sandbox.connect(sbx.sandbox_id, **_env(srv2))
        assert again.commands.run("cat /tmp/state").stdout == "before-crash\n"
        assert again.get_info().metadata == {"keep": "me"}
        assert "re-adopted 1 sandbox" in srv2.log()
    finally:
        assert srv2.stop() == 0
    assert not host_pids_of(srv2, sbx.sandbox_id)
    assert not cgroup_dirs(sbx.sandbox_id)
    assert not (data / "sandboxes" / sbx.sandbox_id).exists()


def test_leftovers_of_dead_sandboxes_are_cleaned_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data)
    a = Sandbox.create(template="base", timeout=120, **_env(srv))
    b = Sandbox.create(template="base", timeout=120, **_env(srv))
    port = int(srv.url.rsplit(":", 1)[1])
    srv.stop(signal.SIGKILL)
    # While the server is down, one sandbox dies (as after a host reboot or an OOM of its init).
    for pid in host_pids_of(srv, a.sandbox_id):
        import os

        os.kill(pid, signal.SIGKILL)
    srv2 = start_server(data, port=port)
    try:
        assert not cgroup_dirs(a.sandbox_id), "cgroups of a dead sandbox are removed at start"
        assert not (data / "sandboxes" / a.sandbox_id).exists()
        with httpx.Client(base_url=srv2.url, headers={"X-API-KEY": srv2.api_key}) as api:
            assert api.get(f"/sandboxes/{a.sandbox_id}").status_code == 404
            assert api.get(f"/sandboxes/{b.sandbox_id}").status_code == 200
    finally:
        assert srv2.stop() == 0
    assert not cgroup_dirs(b.sandbox_id)


def test_sandboxes_are_kept_on_clean_shutdown_by_default(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, keep=True)
    sbx = Sandbox.create(template="base", timeout=120, **_env(srv))
    port = int(srv.url.rsplit(":", 1)[1])
    assert srv.stop(signal.SIGTERM) == 0
    assert host_pids_of(srv, sbx.sandbox_id)
    srv2 = start_server(data, port=port)
    try:
        assert Sandbox.connect(sbx.sandbox_id, **_env(srv2)).commands.run("echo back").stdout == "back\n"
    finally:
        assert srv2.stop(signal.SIGINT) == 0
    assert not cgroup_dirs(sbx.sandbox_id)


def test_two_servers_on_one_host_leave_each_other_alone(sandbox: Sandbox, tmp_path: Path) -> None:
    # `sandbox` belongs to the session server; a second server with its own data dir starts and stops.
    data = tmp_path / "data"
    other = start_server(data)
    try:
        mine = Sandbox.create(template="base", timeout=60, **_env(other))
        assert mine.commands.run("echo other").stdout == "other\n"
    finally:
        assert other.stop() == 0
    assert sandbox.is_running()
    assert sandbox.commands.run("echo still").stdout == "still\n"


def test_cpus_are_spread_counting_the_sandboxes_a_restart_readopted(tmp_path: Path) -> None:
    """Sandboxes of 1 CPU on a host of several get the CPU the fewest sandboxes hold, also right after a
    restart: the re-adopted sandboxes' cpusets are counted."""
    import os

    from conftest import cgroup_dir

    if len(os.sched_getaffinity(0)) < 2:
        return  # one CPU: every sandbox has it, nothing to spread
    data = tmp_path / "data"
    srv = start_server(data, "--pool-size", "0")

    def cpus_of(sandbox_id: str) -> str:
        return (cgroup_dir("cpuset", sandbox_id) / "cpuset.cpus").read_text().strip()

    host = sorted(os.sched_getaffinity(0))
    count = len(host) + 1  # one CPU gets two sandboxes
    made = [Sandbox.create(template="base", timeout=120, **_env(srv)) for _ in range(count)]
    held = [cpus_of(s.sandbox_id) for s in made]
    assert held == [str(host[i % len(host)]) for i in range(count)], held  # least held first, lowest on a tie
    port = int(srv.url.rsplit(":", 1)[1])
    srv.stop(signal.SIGKILL)
    srv2 = start_server(data, "--pool-size", "0", port=port)
    try:
        after = Sandbox.create(template="base", timeout=120, **_env(srv2))
        # host[0] holds two re-adopted sandboxes, the others one: the next goes to host[1]
        assert cpus_of(after.sandbox_id) == str(host[1])
        assert after.commands.run("nproc").stdout == "1\n"
    finally:
        assert srv2.stop() == 0
