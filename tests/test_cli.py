"""`sandboxd sandbox ...` (cli/sandboxes.py, cli/shell.py) against the real server, as a user at a terminal or a
script would run it: every command, its output (a table or --json), its exit status; the shell through a real
PTY (pexpect), with a resize."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pexpect

from conftest import SANDBOXD, Server


def cli(srv: Server, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    argv = [SANDBOXD, "sandbox", *args[:1], "--url", srv.url, "--api-key", srv.api_key, *args[1:]]
    done = subprocess.run(argv, capture_output=True, timeout=120, input=stdin)
    return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_a_sandboxs_life_through_the_cli(server: Server) -> None:
    made = cli(server, "create", "base", "--timeout", "120", "--metadata", "who=cli", "--env", "GREETING=hej")
    assert made.returncode == 0, made.stderr
    ident = made.stdout.strip()
    try:
        listed = cli(server, "list", "--metadata", "who=cli", "--json")
        assert [s["sandboxID"] for s in json.loads(listed.stdout)] == [ident], listed
        assert ident in cli(server, "list").stdout  # (the table)
        info = json.loads(cli(server, "info", ident, "--json").stdout)
        assert info["state"] == "running" and info["metadata"] == {"who": "cli"}
        assert "running" in cli(server, "info", ident).stdout

        run = cli(server, "exec", ident, "--", "sh", "-c", 'echo "$GREETING $PWD"; echo oops >&2; exit 7')
        assert (run.returncode, run.stdout, run.stderr) == (7, "hej /home/user\n", "oops\n"), run
        as_root = ("--user", "root", "--cwd", "/tmp", "--env", "A=1")  # (before the ID: what follows is the command)
        run = cli(server, "exec", *as_root, ident, "--", "sh", "-c", "echo $A $(id -u) $PWD")
        assert (run.returncode, run.stdout) == (0, "1 0 /tmp\n"), run

        assert cli(server, "metrics", ident, "--json").returncode == 0
        assert cli(server, "pause", ident).returncode == 0
        assert json.loads(cli(server, "info", ident, "--json").stdout)["state"] == "paused"
        assert "resumed" in cli(server, "resume", ident).stdout
        assert cli(server, "exec", ident, "--", "true").returncode == 0

        logs = cli(server, "logs", ident)
        assert "created from template base" in logs.stdout and "paused" in logs.stdout, logs
        warned = cli(server, "logs", ident, "--level", "warn", "--json")
        assert all(json.loads(line)["level"] == "warn" for line in warned.stdout.splitlines()), warned
        assert any("exit status 7" in line for line in warned.stdout.splitlines()), warned

        # -f follows until the sandbox ends
        follow = subprocess.Popen(
            [SANDBOXD, "sandbox", "logs", "--url", server.url, "--api-key", server.api_key, ident, "-f"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        cli(server, "exec", ident, "--", "echo", "late")
    finally:
        assert cli(server, "kill", ident).returncode == 0
    out, _ = follow.communicate(timeout=30)
    assert follow.returncode == 0
    assert "started as user: /bin/bash -l -c 'echo late'" in out and "killed by an API request" in out, out
    assert out.count("created from template base") == 1  # (each entry once)


def test_files_in_and_out_through_the_cli(server: Server, tmp_path: Path) -> None:
    ident = cli(server, "create", "base", "--timeout", "60").stdout.strip()
    try:
        local = tmp_path / "in.bin"
        local.write_bytes(bytes(range(256)) * 100)
        assert cli(server, "cp", str(local), f"{ident}:/home/user/in.bin").returncode == 0
        back = tmp_path / "back.bin"
        assert cli(server, "cp", f"{ident}:/home/user/in.bin", str(back)).returncode == 0
        assert back.read_bytes() == local.read_bytes()
        assert cli(server, "cp", "-", f"{ident}:/tmp/s.txt", stdin=b"from stdin").returncode == 0
        assert cli(server, "cp", f"{ident}:/tmp/s.txt", "-").stdout == "from stdin"
        missing = cli(server, "cp", f"{ident}:/nope/x", str(tmp_path / "x"))
        assert missing.returncode == 1 and "sandboxd:" in missing.stderr, missing
        assert cli(server, "cp", str(local), str(back)).returncode == 2  # (no sandbox side)
    finally:
        cli(server, "kill", ident)


def test_the_cli_says_what_went_wrong(server: Server) -> None:
    for args, code, says in (
        (("info", "nope-nope"), 1, "not found"),
        (("kill", "nope-nope"), 1, "not found"),
        (("exec", "nope-nope"), 2, "no command"),
        (("create", "no-such-template-x"), 1, "not found"),
        (("create", "base", "--metadata", "novalue"), 1, "KEY=VALUE"),
    ):
        done = cli(server, *args)
        assert done.returncode == code and says in done.stderr, (args, done)
    bad_key = subprocess.run(
        [SANDBOXD, "sandbox", "list", "--url", server.url, "--api-key", "e2b_" + "0" * 40],
        capture_output=True,
        text=True,
    )
    assert bad_key.returncode == 1 and "invalid API key" in bad_key.stderr, bad_key
    alone = subprocess.run(
        [SANDBOXD, "nodes", "--url", server.url, "--api-key", server.api_key], capture_output=True, text=True
    )
    assert alone.returncode == 1 and "not part of a cluster" in alone.stderr, alone


def test_an_interactive_shell_through_a_real_terminal(server: Server) -> None:
    ident = cli(server, "create", "base", "--timeout", "60").stdout.strip()
    try:
        shell = pexpect.spawn(
            SANDBOXD,
            ["sandbox", "shell", "--url", server.url, "--api-key", server.api_key, ident],
            timeout=30,
            dimensions=(24, 80),
        )
        shell.sendline("echo answer-$((6*7))")
        shell.expect("answer-42")
        shell.sendline("stty size")
        shell.expect("24 80")
        shell.setwinsize(40, 132)  # (SIGWINCH: the sandbox's terminal follows)
        time.sleep(0.5)
        shell.sendline("stty size")
        shell.expect("40 132")
        shell.sendline("exit 3")
        shell.expect(pexpect.EOF)
        shell.close()
        assert shell.exitstatus == 3, (shell.exitstatus, shell.signalstatus)
    finally:
        cli(server, "kill", ident)


def _complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "completions"
    env = {"PATH": "/usr/bin:/bin", "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line))}
    env["_ARGCOMPLETE_STDOUT_FILENAME"] = str(out)
    subprocess.run([SANDBOXD], env=env, timeout=30, check=True)
    return sorted(out.read_text().split())


def test_shell_completion(tmp_path: Path) -> None:
    assert _complete("sandboxd sandbox ex", tmp_path) == ["exec"]
    assert _complete("sandboxd pool s", tmp_path) == ["set", "show"]
    assert "--pool-max" in _complete("sandboxd serve --pool-", tmp_path)
    script = subprocess.run(
        [SANDBOXD, "completion", "bash"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    registered = subprocess.run(
        ["bash", "-c", script + "\ncomplete -p sandboxd"], capture_output=True, text=True, timeout=30
    )
    assert registered.returncode == 0 and "sandboxd" in registered.stdout, registered
