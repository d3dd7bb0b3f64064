"""The server process and its data directory, attacked as a host user or a careless operator would."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

from e2b import Sandbox

from conftest import (
    SANDBOXD,
    TEMPLATES_DIR,
    Server,
    free_port,
    host_pids_of,
    start_server,
    template_layers,
    upper_on_host,
)

NOBODY = 65534


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv as an unprivileged host user (nobody), as an attacker on the host would."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_second_server_on_the_same_data_dir_is_refused(server: Server, sandbox: Sandbox) -> None:
    r = subprocess.run(
        [SANDBOXD, "serve", "--port", str(free_port()), "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert f"PID {server.proc.pid}" in r.stderr and str(server.data_dir) in r.stderr, r.stderr
    assert "API key" not in r.stderr + r.stdout  # nothing announced
    # the first server and its sandboxes are untouched
    assert sandbox.commands.run("echo fine").stdout == "fine\n"


def test_port_in_use_fails_before_anything_is_announced(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        r = subprocess.run(
            [SANDBOXD, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert r.returncode != 0
    assert f"127.0.0.1:{port} is in use" in r.stderr, r.stderr
    assert "listening" not in r.stderr and "API key" not in r.stderr, r.stderr


def reachable_parent(server: Server) -> None:
    """The session server's data dir sits in a 0700 temp dir: open that up, as /var/lib is, so that only
    the data dir's own mode stands between a host user and the files."""
    os.chmod(server.data_dir.parent, 0o755)


def test_data_dir_and_secrets_are_root_only(server: Server) -> None:
    reachable_parent(server)
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    for name in ("state.db", "state.db-wal", "state.db-shm", "sandboxd.lock"):
        p = server.data_dir / name
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, f"{name} is {oct(p.stat().st_mode)}"
    assert stat.S_IMODE(TEMPLATES_DIR.stat().st_mode) == 0o700
    r = as_nobody("cat", str(server.data_dir / "state.db"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    for layer in template_layers("base"):
        r = as_nobody("ls", str(layer))
        assert r.returncode != 0 and "Permission denied" in r.stderr, layer


def test_setuid_file_made_in_a_sandbox_cannot_be_run_by_a_host_user(server: Server, sandbox: Sandbox) -> None:
    reachable_parent(server)
    # Sandbox root makes a setuid copy of cat (its root is a sandbox uid on the host) and a secret.
    sandbox.commands.run("cp /bin/cat /tmp/suidcat && chmod 4755 /tmp/suidcat", user="root")
    sandbox.commands.run("echo secret > /root/secret && chmod 600 /root/secret", user="root")
    state = server.data_dir / "sandboxes" / sandbox.sandbox_id
    with upper_on_host(server, sandbox.sandbox_id) as upper:
        suid = upper / "tmp" / "suidcat"
        assert suid.stat().st_mode & stat.S_ISUID  # it is there, setuid, on the host
        r = as_nobody(str(suid), str(upper / "root" / "secret"))
        assert r.returncode != 0 and "secret" not in r.stdout, (r.stdout, r.stderr)
    # and nothing of the sandbox's state (its disk image, its dirs) is open to host users
    for target in (state, state / "disk.img", server.data_dir / "sandboxes"):
        r = as_nobody("stat", str(target))
        assert r.returncode != 0 and "Permission denied" in r.stderr, (target, r.stderr)


def test_sandbox_processes_get_the_usual_umask(sandbox: Sandbox) -> None:
    # The server's own umask is 077; what runs in a sandbox must not inherit it.
    assert sandbox.commands.run("umask").stdout.strip() == "0022"
    sandbox.commands.run("mkdir /tmp/d && touch /tmp/f")
    assert sandbox.commands.run("stat -c %a /tmp/d /tmp/f").stdout.split() == ["755", "644"]


def test_api_key_names_its_data_dir_and_refuses_a_missing_one(server: Server, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    r = subprocess.run([SANDBOXD, "api-key", "--data-dir", str(missing)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and str(missing) in r.stderr, r.stderr
    assert not missing.exists(), "api-key created a data dir"
    r = subprocess.run(
        [SANDBOXD, "api-key", "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and r.stdout.strip() == server.api_key
    assert str(server.data_dir) in r.stderr
    r = subprocess.run(
        [SANDBOXD, "template", "list", "--data-dir", str(missing)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and str(missing) in r.stderr, r.stderr


def test_sigterm_drains_and_keeps_sandboxes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, keep=True)
    env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
    sbx = Sandbox.create(template="base", timeout=120, **env)
    sbx.files.write("/home/user/work.txt", "precious")
    handle = sbx.commands.run("sleep 600", background=True)
    port = int(srv.url.rsplit(":", 1)[1])
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0
    assert host_pids_of(srv, sbx.sandbox_id), "SIGTERM must keep sandboxes running by default"
    srv2 = start_server(data, port=port)  # this one destroys them at its exit
    try:
        again = Sandbox.connect(sbx.sandbox_id, **{**env, "api_key": srv2.api_key})
        assert again.files.read("/home/user/work.txt") == "precious"
        assert "sleep 600" in again.commands.run("ps -eo args").stdout
        del handle
    finally:
        assert srv2.stop() == 0
    assert not host_pids_of(srv2, sbx.sandbox_id)


def test_sigterm_ends_open_command_streams_with_a_clear_error(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", keep=True)
    env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
    sbx = Sandbox.create(template="base", timeout=120, **env)
    errors: list[BaseException] = []

    def attached() -> None:
        try:
            sbx.commands.run("sleep 600", timeout=0)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=attached)
    t.start()
    for _ in range(100):
        if any(p.cmd == "/bin/bash" and "sleep 600" in " ".join(p.args) for p in sbx.commands.list()):
            break
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert srv.proc.wait(timeout=30) == 0
    assert errors, "the attached command returned normally"
    assert "shutting down, reconnect" in str(errors[0]), repr(errors[0])
    # and the process itself is still there for the next start
    srv2 = start_server(tmp_path / "data", port=int(srv.url.rsplit(":", 1)[1]))
    try:
        again = Sandbox.connect(sbx.sandbox_id, **{**env, "api_key": srv2.api_key})
        assert "sleep 600" in again.commands.run("ps -eo args").stdout
    finally:
        assert srv2.stop() == 0
