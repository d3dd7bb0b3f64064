"""The environment an API client gives a command reaches the command only: never the host-root helper
that starts it (while it is still outside the sandbox) and never the server."""

from __future__ import annotations

import pytest
from e2b import CommandExitException, Sandbox

from conftest import Server


def test_client_environment_never_reaches_the_host_helper(server: Server, sandbox: Sandbox) -> None:
    # A static helper ignores LD_PRELOAD, but glibc honours other variables (GCONV_PATH, LOCPATH, TZ,
    # MALLOC_*...). The helper's own environment must be empty: the command's comes on a memfd.
    hostile = {
        "LD_PRELOAD": "/tmp/evil.so",
        "GCONV_PATH": "/tmp/evil-gconv",
        "MALLOC_CHECK_": "3",
        "TZ": "/etc/passwd",
        "MARKER": "only-for-the-command",
    }
    h = sandbox.commands.run("sleep 30", background=True, envs=hostile)
    try:
        helpers = []
        for pid in _proc_pids():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() != "sandbox-exec":
                        continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    helpers.append(f.read())
            except OSError:
                continue
        assert helpers, "no exec helper found"
        assert all(b"only-for-the-command" not in env and b"LD_PRELOAD" not in env for env in helpers), helpers
        # the command itself has every variable, exactly
        r = sandbox.commands.run("env", envs=hostile)
        for k, v in hostile.items():
            assert f"{k}={v}" in r.stdout.splitlines()
    finally:
        h.kill()


def _proc_pids() -> list[int]:
    import os

    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def test_environment_with_odd_bytes_and_sizes(sandbox: Sandbox) -> None:
    envs = {"EMPTY": "", "SPACES": "a b  c", "EQUALS": "x=y=z", "UNICODE": "héllo ✓", "BIG": "v" * 100_000}
    r = sandbox.commands.run("env", envs=envs)
    lines = r.stdout.splitlines()
    for k, v in envs.items():
        assert f"{k}={v}" in lines, k


@pytest.mark.parametrize("bad", [{"A=B": "x"}, {"": "x"}])
def test_invalid_environment_names_are_refused(sandbox: Sandbox, bad: dict[str, str]) -> None:
    with pytest.raises(Exception) as e:
        sandbox.commands.run("true", envs=bad)
    assert not isinstance(e.value, CommandExitException) or e.value.exit_code != 0
    assert sandbox.commands.run("echo still").stdout == "still\n"
