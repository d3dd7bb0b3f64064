"""Work done for a sandbox is charged to it (issue 7, finding 6): output nobody reads, watches, streams, requests.

Every test talks to a real `sandboxd serve` through the official SDK (or Connect on the wire). Server work is
measured as the server process's CPU time (utime + stime from /proc), compared with generous margins; no test
asserts a latency.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import CommandExitException, Sandbox
from e2b.exceptions import SandboxException

from conftest import Server, host_pids_of, start_server
from wire import envd_headers, envelope, messages

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def server_cpu_over(server: Server, seconds: float) -> float:
    before = cpu_seconds(server.proc.pid)
    time.sleep(seconds)
    return cpu_seconds(server.proc.pid) - before


def cpu_of_command(server: Server, sandbox_id: str, comm: str) -> float:
    """CPU seconds used so far by the processes named `comm` in a sandbox (host view)."""
    total = 0.0
    for pid in host_pids_of(server, sandbox_id):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                total += cpu_seconds(pid)
        except OSError:
            pass
    return total


class Reader:
    """Follows a process handle in a thread, collecting stdout; records how the stream ended."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.out: list[str] = []
        self.size = 0
        self.ended: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_stdout(self, chunk: str) -> None:
        if len(self.out) < 64:  # the first chunks are enough to look at
            self.out.append(chunk)
        self.size += len(chunk)

    def _run(self) -> None:
        try:
            self.handle.wait(on_stdout=self._on_stdout)
        except BaseException as e:  # the exit by a signal is a CommandExitException
            self.ended = e

    def until(self, predicate, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert predicate(), f"got {self.size} bytes: {''.join(self.out)[:200]!r}"


@pytest.fixture(scope="module")
def small_server() -> Iterator[Server]:
    """A second server with small per-sandbox caps, so that reaching them is quick."""
    tmp = Path(tempfile.mkdtemp(prefix="sandboxd-charge-"))
    srv = start_server(
        tmp / "data",
        "--pool-size",
        "0",
        "--max-watched-dirs",
        "100",
        "--max-watchers",
        "3",
        "--max-process-streams",
        "4",
        "--max-concurrent-requests",
        "2",
        "--stalled-stream-seconds",
        "2",
    )
    try:
        yield srv
    finally:
        code = srv.stop()
        log = srv.log()
        shutil.rmtree(tmp, ignore_errors=True)
        assert code == 0, log


def on(srv: Server, **kwargs) -> Sandbox:
    return Sandbox.create(
        template="base", timeout=120, api_key=srv.api_key, api_url=srv.url, sandbox_url=srv.url, **kwargs
    )


# -- output nobody reads ---------------------------------------------------------------------------


def test_detached_yes_is_not_read_then_reconnect_and_kill(server: Server, sandbox: Sandbox) -> None:
    h = sandbox.commands.run("yes", background=True, timeout=0)
    h.disconnect()
    time.sleep(1)  # the output buffer for the next Connect fills in milliseconds
    # Nobody reads: the server stops reading the pipe. Before, this cost ~0.75 s of server CPU per second.
    assert server_cpu_over(server, 2) < 0.5
    # ...and `yes` blocks on its full pipe instead of running.
    yes_cpu = cpu_of_command(server, sandbox.sandbox_id, "yes")
    time.sleep(1)
    assert cpu_of_command(server, sandbox.sandbox_id, "yes") - yes_cpu < 0.2
    assert h.pid in {p.pid for p in sandbox.commands.list()}

    # A client that connects gets the kept output, then live output: well past the 1 MiB buffer.
    reader = Reader(sandbox.commands.connect(h.pid))
    reader.until(lambda: reader.size > 4 * MIB)
    assert reader.out[0].startswith("y\ny\n")
    # Killed while it may be blocked on the pipe, it still ends with an end event.
    assert sandbox.commands.kill(h.pid) is True
    reader.thread.join(15)
    assert not reader.thread.is_alive(), "no end event after the kill"
    assert isinstance(reader.ended, CommandExitException), reader.ended
    assert h.pid not in {p.pid for p in sandbox.commands.list()}


def test_reconnect_sees_output_written_while_detached(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 0.5; echo written-while-detached; sleep 60", background=True)
    h.disconnect()
    time.sleep(1.5)
    reader = Reader(sandbox.commands.connect(h.pid))
    reader.until(lambda: "written-while-detached" in "".join(reader.out))
    sandbox.commands.kill(h.pid)
    reader.thread.join(15)
    assert not reader.thread.is_alive()


def test_detached_output_past_the_buffer_blocks_the_writer_and_loses_nothing(sandbox: Sandbox) -> None:
    # 3 MiB of numbered lines, then a marker file: the writer must block once the 1 MiB buffer and the pipe
    # are full (no marker yet), and everything arrives in order once a client connects.
    # (it starts writing after the handle has disconnected, so every line goes to the detached buffer)
    h = sandbox.commands.run("sleep 0.5; seq 1 400000; touch /tmp/seq-done; sleep 60", background=True)
    h.disconnect()
    time.sleep(2)
    assert sandbox.commands.run("test -e /tmp/seq-done && echo done || echo blocked").stdout == "blocked\n"
    got: list[str] = []
    conn = sandbox.commands.connect(h.pid)
    t = threading.Thread(target=lambda: _wait_quietly(conn, got), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while sandbox.commands.run("test -e /tmp/seq-done && echo y || echo n").stdout != "y\n":
        assert time.monotonic() < deadline, "the writer did not resume after Connect"
        time.sleep(0.2)
    time.sleep(0.5)
    sandbox.commands.kill(h.pid)
    t.join(15)
    lines = "".join(got).split()
    assert lines == [str(i) for i in range(1, 400001)]  # complete and in order


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_tiny_interleaved_writes_while_detached_cost_little(server: Server, sandbox: Sandbox) -> None:
    # 1-byte writes alternating between stdout and stderr: each read returns a byte or two, so a buffer
    # bounded only in bytes would hold a million tiny runs (~150 MiB of objects) and take seconds of CPU.
    script = "import os\nwhile True:\n    os.write(1, b'o')\n    os.write(2, b'e')\n"
    sandbox.files.write("/tmp/interleave.py", script)
    rss0 = rss_mib(server.proc.pid)
    h = sandbox.commands.run("python3 /tmp/interleave.py", background=True, timeout=0)
    h.disconnect()
    time.sleep(2)
    assert server_cpu_over(server, 2) < 0.5
    assert rss_mib(server.proc.pid) - rss0 < 32
    reader = Reader(sandbox.commands.connect(h.pid))
    reader.until(lambda: reader.size > 1000)
    sandbox.commands.kill(h.pid)
    reader.thread.join(15)
    assert not reader.thread.is_alive()


def _wait_quietly(handle, out: list[str]) -> None:
    try:
        handle.wait(on_stdout=out.append)
    except CommandExitException:
        pass


# -- watches ---------------------------------------------------------------------------------------


def test_recursive_watch_over_the_dir_cap_fails_and_the_neighbour_still_watches(small_server: Server) -> None:
    a, b = on(small_server), on(small_server)
    try:
        a.commands.run("mkdir -p /tmp/tree/d{1..150}")
        with pytest.raises(SandboxException) as exc:
            a.files.watch_dir("/tmp/tree", recursive=True)
        assert "watched_dirs" in str(exc.value) and "100" in str(exc.value), exc.value
        # the failed watch left nothing counted: a smaller tree can still be watched, and without recursion
        a.commands.run("mkdir -p /tmp/small/s{1..50}")
        w = a.files.watch_dir("/tmp/small", recursive=True)
        w.stop()
        a.files.watch_dir("/tmp/tree").stop()
        # another sandbox on the same server is not affected
        b.commands.run("mkdir -p /tmp/tree/d{1..90}")
        wb = b.files.watch_dir("/tmp/tree", recursive=True)
        b.files.write("/tmp/tree/d90/x", "x")
        time.sleep(0.3)
        assert any(e.name == "d90/x" for e in wb.get_new_events())
        wb.stop()
    finally:
        a.kill()
        b.kill()


def test_directories_created_under_a_recursive_watch_count_too(small_server: Server) -> None:
    a = on(small_server)
    try:
        a.commands.run("mkdir -p /tmp/grow/g{1..60}")
        w = a.files.watch_dir("/tmp/grow", recursive=True)
        a.commands.run("mkdir -p /tmp/grow/h{1..60}")
        deadline = time.monotonic() + 10
        with pytest.raises(SandboxException) as exc:
            while time.monotonic() < deadline:
                w.get_new_events()
                time.sleep(0.2)
        assert "watched_dirs" in str(exc.value), exc.value
        w.stop()
    finally:
        a.kill()


def test_watcher_cap_per_sandbox(small_server: Server) -> None:
    a = on(small_server)
    try:
        watchers = [a.files.watch_dir("/tmp") for _ in range(3)]
        with pytest.raises(SandboxException) as exc:
            a.files.watch_dir("/tmp")
        assert "--max-watchers" in str(exc.value), exc.value
        watchers.pop().stop()
        watchers.append(a.files.watch_dir("/tmp"))  # a stopped watcher frees its place
        for w in watchers:
            w.stop()
    finally:
        a.kill()


# -- streams and requests --------------------------------------------------------------------------


def test_process_stream_cap_refuses_the_tenant_not_its_neighbour(small_server: Server) -> None:
    a, b = on(small_server), on(small_server)
    try:
        handles = [a.commands.run("sleep 60", background=True) for _ in range(4)]
        with pytest.raises(SandboxException) as exc:
            a.commands.run("touch /tmp/refused-command-ran")
        assert "process_streams" in str(exc.value) and "4" in str(exc.value), exc.value
        assert b.commands.run("echo neighbour-ok").stdout == "neighbour-ok\n"
        # a disconnected client frees its stream at once (not at its next keepalive)
        handles[0].disconnect()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert a.commands.run("echo again; ls /tmp").stdout.split() == ["again"]  # nothing refused ran
                break
            except SandboxException:
                assert time.monotonic() < deadline, "the disconnected stream was not released"
                time.sleep(0.1)
        for h in handles:
            a.commands.kill(h.pid)
    finally:
        a.kill()
        b.kill()


def test_concurrent_request_cap_refuses_the_tenant_not_its_neighbour(small_server: Server) -> None:
    a, b = on(small_server), on(small_server)
    try:
        h = a.commands.run("sleep 60", background=True, stdin=True)
        done = [threading.Event(), threading.Event()]

        def flood(ev: threading.Event) -> None:
            try:  # far more than a pipe holds: the request stays in flight until the process dies
                a.commands.send_stdin(h.pid, "x" * MIB, request_timeout=30)
            except Exception:
                pass
            finally:
                ev.set()

        for ev in done:
            threading.Thread(target=flood, args=(ev,), daemon=True).start()
        time.sleep(1)
        assert not any(ev.is_set() for ev in done)
        with pytest.raises(SandboxException) as exc:
            a.files.list("/tmp")
        assert "concurrent_requests" in str(exc.value), exc.value
        # plain HTTP is refused with a 429 naming the limit
        r = httpx.get(
            f"{small_server.url}/files",
            params={"path": "/etc/hostname"},
            headers={"E2b-Sandbox-Id": a.sandbox_id, "X-Access-Token": a._envd_access_token},
        )
        assert r.status_code == 429 and "concurrent_requests" in r.text, r.text
        # the neighbour is not affected
        assert b.commands.list() == []
        assert b.files.read("/etc/hostname").strip() == b.sandbox_id
        a.commands.kill(h.pid)  # SendSignal is never refused: the tenant can stop what holds its requests
        assert all(ev.wait(10) for ev in done)
        assert a.files.read("/etc/hostname").strip() == a.sandbox_id
    finally:
        a.kill()
        b.kill()


def test_a_stalled_stream_is_dropped_and_does_not_hold_back_the_others(small_server: Server) -> None:
    a = on(small_server)
    try:
        h = a.commands.run("yes", background=True, timeout=0)
        h.disconnect()
        headers = envd_headers(a)
        body = envelope({"process": {"pid": h.pid}})
        received = [0]
        fast_end: list[dict] = []

        def fast() -> None:  # reads as fast as it can, keeps nothing (the SDK would keep all the output)
            with httpx.Client(base_url=small_server.url, timeout=60) as client:
                with client.stream("POST", "/process.Process/Connect", headers=headers, content=body) as r:
                    for flags, payload in messages(r):
                        received[0] += 1
                        if flags == 2:
                            fast_end.append(payload)

        t = threading.Thread(target=fast, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while received[0] < 100:
            assert time.monotonic() < deadline, received
            time.sleep(0.05)
        # A second client connects and never reads: once its queue (and the socket buffers) are full, it holds
        # reading back for every stream of the process, until it is dropped (--stalled-stream-seconds 2).
        with httpx.Client(base_url=small_server.url, timeout=60) as client:
            with client.stream("POST", "/process.Process/Connect", headers=headers, content=body) as stalled:
                time.sleep(5)
                before = received[0]
                deadline = time.monotonic() + 10
                while received[0] < before + 500:  # the fast reader goes on (~500 events of <= 32 KiB)
                    assert time.monotonic() < deadline, (before, received)
                    time.sleep(0.05)
                ends = [p for f, p in messages(stalled) if f == 2]
        assert ends and ends[0]["error"]["code"] == "resource_exhausted", ends
        assert "stalled_stream_seconds" in ends[0]["error"]["message"], ends
        a.commands.kill(h.pid)
        t.join(15)
        assert not t.is_alive() and fast_end == [{}], fast_end  # the fast stream ended normally, with the end event
    finally:
        a.kill()


def test_an_oversized_recursive_watch_is_refused_without_server_work(server: Server, sandbox: Sandbox) -> None:
    # The tree is counted inside the sandbox (its broker, its CPU) before anything is watched: refusing
    # 20,000 directories costs the server almost nothing (walking them here cost ~5 s of its CPU).
    sandbox.commands.run("mkdir -p /tmp/huge/d{1..20000}", timeout=120)

    before = cpu_seconds(server.proc.pid)
    with pytest.raises(SandboxException) as exc:
        sandbox.files.watch_dir("/tmp/huge", recursive=True)
    assert "watched_dirs" in str(exc.value), exc.value
    assert cpu_seconds(server.proc.pid) - before < 1.0
    # the tree can still be watched without recursion
    sandbox.files.watch_dir("/tmp/huge").stop()
