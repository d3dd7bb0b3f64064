"""Processes outlive the server process (envd/kept.py, sbxhelper.c keep_relay): a server is SIGKILLed
while commands run; the next one lists them, `connect(pid)` follows each with everything it wrote
(meanwhile too), stdin and signals still work, and a command that ended while no server ran can be
connected to once for its output and exit code."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from e2b import CommandExitException, PtySize, Sandbox
from e2b.exceptions import NotFoundException

from conftest import Server, host_pids_of, keeping_server, read_until, start_server

ECHO = "python3 -u -c 'import sys\nfor line in sys.stdin: print(\"got\", line.strip(), flush=True)'"


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


def test_commands_outlive_a_server_crash_and_are_taken_over(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with keeping_server(data) as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)
        counter = sbx.commands.run(
            "for i in $(seq 1 120); do echo tick $i; sleep 0.05; done; echo finished >&2; exit 3", background=True
        )
        echo = sbx.commands.run(ECHO, background=True, stdin=True)
        sbx.commands.send_stdin(echo.pid, "one\n")
        assert "got one" in read_until(echo, "got one")  # (its Start stream: a Connect now could come after it)
        late = sbx.commands.run("sleep 1; echo late output; echo to stderr >&2; exit 7", background=True)
        time.sleep(0.3)
        srv.stop(signal.SIGKILL)
        time.sleep(2)  # no server: the counter goes on, `late` ends
        srv2 = start_server(data, port=port)
        try:
            again = Sandbox.connect(sbx.sandbox_id, **env)
            listed = {p.pid: p for p in again.commands.list()}
            assert counter.pid in listed and echo.pid in listed, listed
            assert late.pid not in listed, "an ended process is not listed"
            assert "for line in sys.stdin" in " ".join(listed[echo.pid].args), "its config is kept"

            with pytest.raises(CommandExitException) as ended:
                again.commands.connect(counter.pid).wait()
            assert ended.value.exit_code == 3
            assert ended.value.stdout.splitlines() == [f"tick {i}" for i in range(1, 121)], "output lost or repeated"
            assert ended.value.stderr == "finished\n"

            # the reader's stdin stayed open through the crash; it goes on where it was
            follow = again.commands.connect(echo.pid)
            again.commands.send_stdin(echo.pid, "two\n")
            seen = read_until(follow, "got two")
            assert seen.index("got one") < seen.index("got two"), seen
            again.commands.close_stdin(echo.pid)
            assert follow.wait().exit_code == 0

            # ended while no server ran: its output and exit code, once
            with pytest.raises(CommandExitException) as gone:
                again.commands.connect(late.pid).wait()
            assert (gone.value.exit_code, gone.value.stdout, gone.value.stderr) == (7, "late output\n", "to stderr\n")
            with pytest.raises(NotFoundException):
                again.commands.connect(late.pid)
            assert not list((data / "sandboxes" / sbx.sandbox_id / "procs").iterdir()), (
                "records of ended processes stay"
            )
        finally:
            assert srv2.stop() == 0
        assert not host_pids_of(srv2, sbx.sandbox_id)


def test_a_command_taken_over_can_be_killed_and_its_output_is_bounded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with keeping_server(data) as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)
        # writes ~8 MiB while no server reads it: the keeper logs the newest 0.5-1 MiB and never blocks it
        flood = sbx.commands.run(
            'python3 -c \'import sys\nfor i in range(100000): sys.stdout.write(f"{i:09d}" * 8 + "\\n")\n\''
            " ; echo flooded > /tmp/flood-done; sleep 1000",
            background=True,
        )
        srv.stop(signal.SIGTERM)  # a clean stop that keeps sandboxes: the same for their processes
        srv2 = start_server(data, port=port)
        try:
            again = Sandbox.connect(sbx.sandbox_id, **env)
            deadline = time.monotonic() + 30
            while again.commands.run("cat /tmp/flood-done 2>/dev/null || true").stdout != "flooded\n":
                assert time.monotonic() < deadline, "the command blocked on output no server read"
                time.sleep(0.2)
            follow = again.commands.connect(flood.pid)
            assert again.commands.kill(flood.pid)
            with pytest.raises(CommandExitException) as killed:
                follow.wait()
            out = killed.value.stdout
            assert 512 << 10 <= len(out) <= (1 << 20) + 65536, len(out)
            assert out.endswith(f"{99999:09d}" * 8 + "\n"), "the newest output is kept"
            assert flood.pid not in {p.pid for p in again.commands.list()}
        finally:
            assert srv2.stop() == 0


def test_a_terminal_outlives_a_server_crash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with keeping_server(data) as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)
        term = sbx.pty.create(PtySize(rows=24, cols=80))
        sbx.pty.send_stdin(term.pid, b"export MARK=kept-$((6*7)); echo $MARK\n")
        seen = bytearray()
        for _, _, pty in term:
            seen += pty or b""
            if b"kept-42\r\n" in seen:
                break
        srv.stop(signal.SIGKILL)
        srv2 = start_server(data, port=port)
        try:
            again = Sandbox.connect(sbx.sandbox_id, **env)
            assert term.pid in [p.pid for p in again.commands.list()]
            follow = again.pty.connect(term.pid)
            out = bytearray()

            def until(needle: bytes) -> None:
                deadline = time.monotonic() + 20
                for _, _, pty in follow:
                    out.extend(pty or b"")
                    if needle in out or time.monotonic() > deadline:
                        break
                assert needle in out, bytes(out)[-300:]

            until(b"kept-42\r\n")  # what it wrote before the crash, replayed
            again.pty.send_stdin(term.pid, b"echo still $MARK; stty size\n")  # the same shell, its state kept
            until(b"still kept-42\r\n24 80")
            again.pty.resize(term.pid, PtySize(rows=40, cols=120))
            again.pty.send_stdin(term.pid, b"stty size\n")
            until(b"40 120")
            again.pty.send_stdin(term.pid, b"exit 4\n")
            with pytest.raises(CommandExitException) as ended:
                follow.wait()
            assert ended.value.exit_code == 4
        finally:
            assert srv2.stop() == 0
