"""envd process service through the official SDK: run, background, stdin, signals, PTY (sync and async)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time

import httpx
import pytest
from e2b import AsyncSandbox, CommandExitException, PtySize, Sandbox
from e2b.exceptions import AuthenticationException, NotFoundException, SandboxException, TimeoutException

from wire import envd_headers, envelope, messages


def test_stdout_stderr_exit_code(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("echo partial; exit 3")
    assert exc.value.exit_code == 3 and exc.value.stdout == "partial\n"


def test_envs_cwd_and_users(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo $FOO-$HOME-$USER; pwd", envs={"FOO": "bar"})
    assert r.stdout == "bar-/home/user-user\n/home/user\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("id -u; id -un").stdout == "1000\nuser\n"
    assert sandbox.commands.run("id -u; echo $HOME", user="root").stdout == "0\n/root\n"
    with pytest.raises(CommandExitException):
        sandbox.commands.run("touch /etc/forbidden")  # user is not root
    sandbox.commands.run("touch /etc/allowed", user="root")


def test_unknown_user_is_rejected(sandbox: Sandbox) -> None:
    with pytest.raises(AuthenticationException) as exc:
        sandbox.commands.run("true", user="nobody-here")  # type: ignore[arg-type]
    assert "invalid username" in str(exc.value)


def test_sandbox_env_vars_layering(server) -> None:
    sbx = Sandbox.create(template="base", envs={"LAYER": "sandbox", "ONLY_SBX": "1"}, timeout=60)
    try:
        assert sbx.commands.run("echo $LAYER $ONLY_SBX").stdout == "sandbox 1\n"
        assert sbx.commands.run("echo $LAYER $ONLY_SBX", envs={"LAYER": "request"}).stdout == "request 1\n"
    finally:
        sbx.kill()


def test_missing_cwd_fails_clearly(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as exc:
        sandbox.commands.run("pwd", cwd="/does/not/exist")
    assert "/does/not/exist" in exc.value.stderr


def test_too_short_timeout_is_enforced(sandbox: Sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30; echo late", timeout=1)
    assert time.monotonic() - start < 10
    # the server killed the process: nothing named sleep is left
    assert "sleep 30" not in sandbox.commands.run("ps -eo args").stdout


def test_special_characters_and_invalid_utf8(sandbox: Sandbox) -> None:
    text = "quotes ' \" back\\slash $HOME `x` ünïcödé 🚀 tab\tnew"
    r = sandbox.commands.run(f"printf '%s' {_sh_quote(text)}")
    assert r.stdout == text
    r = sandbox.commands.run(r"printf 'ok \xff\xfe end'")
    assert r.stdout.startswith("ok ") and r.stdout.endswith(" end") and "\ufffd" in r.stdout


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def test_large_output_is_streamed(sandbox: Sandbox) -> None:
    chunks: list[str] = []
    size = 20 * 1024 * 1024
    r = sandbox.commands.run(f"head -c {size} /dev/zero | tr '\\0' 'a'", on_stdout=chunks.append, timeout=120)
    assert len(r.stdout) == size
    assert len(chunks) > 100  # streamed in many pieces (<= 32 KiB each), not one blob
    assert max(len(c) for c in chunks) <= 32 * 1024


def test_background_connect_list_kill(sandbox: Sandbox) -> None:
    h = sandbox.commands.run(
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; sleep 0.2; done; sleep 60", background=True
    )
    assert h.pid > 0
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert h.pid in listed and listed[h.pid].cmd == "/bin/bash"
    h.disconnect()
    time.sleep(0.5)
    again = sandbox.commands.connect(h.pid)
    got: list[str] = []

    def wait() -> None:
        try:
            again.wait(on_stdout=got.append)
        except CommandExitException:
            pass

    t = threading.Thread(target=wait)
    t.start()
    deadline = time.monotonic() + 10
    while not any("tick 10" in g for g in got) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("tick 10" in g for g in got), got
    assert sandbox.commands.kill(h.pid) is True
    t.join(10)
    assert not t.is_alive()
    assert h.pid not in {p.pid for p in sandbox.commands.list()}
    assert sandbox.commands.kill(h.pid) is False
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(h.pid)


def test_background_survives_client_disconnect(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 1; echo done > /tmp/bg-done", background=True)
    h.disconnect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sandbox.commands.run("cat /tmp/bg-done 2>/dev/null || true").stdout == "done\n":
            break
        time.sleep(0.2)
    else:
        pytest.fail("background command did not finish after its client disconnected")


def test_tag_selects_process(sandbox: Sandbox, server) -> None:
    # The SDK does not expose tags: speak Connect on the wire directly.
    headers = envd_headers(sandbox)
    unary = envd_headers(sandbox, streaming=False)
    start = {"process": {"cmd": "/bin/bash", "args": ["-c", "echo tagged; sleep 30"]}, "tag": "my-tag"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/process.Process/Start", headers=headers, content=envelope(start)) as resp:
            it = messages(resp)
            _, first = next(it)
            pid = first["event"]["start"]["pid"]
            _, second = next(it)
            assert base64.b64decode(second["event"]["data"]["stdout"]) == b"tagged\n"
            listed = client.post("/process.Process/List", content=b"{}", headers=unary).json()
            mine = next(p for p in listed["processes"] if p["pid"] == pid)
            assert mine["tag"] == "my-tag" and mine["config"]["cmd"] == "/bin/bash"
            with client.stream(
                "POST", "/process.Process/Connect", headers=headers, content=envelope({"process": {"tag": "my-tag"}})
            ) as conn:
                _, ev = next(messages(conn))
                assert ev["event"]["start"]["pid"] == pid
            body = json.dumps({"process": {"tag": "my-tag"}, "signal": "SIGNAL_SIGKILL"}).encode()
            r = client.post("/process.Process/SendSignal", headers=unary, content=body)
            assert r.status_code == 200, r.text
            rest = list(it)
            end = [p for f, p in rest if f == 0 and "end" in p.get("event", {})]
            assert end and end[0]["event"]["end"]["status"] == "signal: killed"
            assert rest[-1][0] == 2  # end-of-stream envelope
        r = client.post("/process.Process/Connect", headers=headers, content=envelope({"process": {"tag": "nope"}}))
        assert b"not_found" in r.content


def test_keepalive_events_during_silence(sandbox: Sandbox, server) -> None:
    headers = envd_headers(sandbox, **{"Keepalive-Ping-Interval": "1"})
    start = {"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 2.6; echo late"]}}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/process.Process/Start", headers=headers, content=envelope(start)) as resp:
            kinds = [next(iter(p["event"])) for f, p in messages(resp) if f == 0]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 2, kinds
    assert kinds.index("data") > kinds.index("keepalive")


def test_timeout_kills_the_command_even_after_its_client_left(sandbox: Sandbox, server) -> None:
    """As envd: a Start's Connect-Timeout-Ms bounds the command itself. A client whose own timer fires
    first just disconnects (the SDKs enforce the same deadline locally); the command still ends at it."""
    headers = envd_headers(sandbox, **{"Connect-Timeout-Ms": "1000"})
    start = {"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 77"]}}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/process.Process/Start", headers=headers, content=envelope(start)) as resp:
            _, first = next(messages(resp))
            assert first["event"]["start"]["pid"] > 0
        # the stream is closed: the server sees the client gone, long before the deadline
    assert "sleep 77" in sandbox.commands.run("ps -eo args").stdout  # still running: a disconnect is no kill
    for _ in range(100):  # bounded: 10 s
        if "sleep 77" not in sandbox.commands.run("ps -eo args").stdout:
            break
        time.sleep(0.1)
    assert "sleep 77" not in sandbox.commands.run("ps -eo args").stdout


def test_stdin_send_and_close(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello ")
    h.send_stdin(b"world\n")
    sandbox.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "hello world\n"


def test_stream_input(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sha256sum", background=True, stdin=True)
    parts = [f"line {i}\n".encode() for i in range(2000)]
    sandbox.commands.stream_input(h.pid, iter(parts))
    sandbox.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout.split()[0] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_stdin_disabled_by_default(sandbox: Sandbox) -> None:
    # without stdin=True the process reads EOF at once instead of hanging
    assert sandbox.commands.run("cat; echo eof", timeout=10).stdout == "eof\n"


def test_sigterm_via_kill_of_a_process_group(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 100 & sleep 100 & wait", background=True)
    time.sleep(0.3)
    assert sandbox.commands.kill(h.pid)
    with pytest.raises(CommandExitException):
        h.wait()
    assert "sleep 100" not in sandbox.commands.run("ps -eo args").stdout


def test_pty_create_input_resize_kill(sandbox: Sandbox) -> None:
    out = bytearray()
    h = sandbox.pty.create(PtySize(rows=24, cols=80))
    done = threading.Event()

    def reader() -> None:
        try:
            h.wait(on_pty=lambda b: out.extend(b))
        except CommandExitException:
            pass
        finally:
            done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()

    def until(needle: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in out and time.monotonic() < deadline:
            time.sleep(0.05)
        assert needle in out, bytes(out)[-500:]

    sandbox.pty.send_stdin(h.pid, b"tty; echo marker-$((6*7))\n")
    until(b"marker-42")
    assert b"/dev/pts/0" in out and b"not a tty" not in out  # the sandbox's own devpts
    sandbox.pty.send_stdin(h.pid, b"stty size\n")
    until(b"24 80")
    sandbox.pty.resize(h.pid, PtySize(rows=40, cols=120))
    sandbox.pty.send_stdin(h.pid, b"stty size\n")
    until(b"40 120")
    assert sandbox.pty.kill(h.pid) is True
    assert done.wait(10)


def test_kill_sandbox_during_command(server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sbx.commands.run("sleep 60", timeout=30)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    assert sbx.kill() is True
    t.join(15)
    assert not t.is_alive(), "the command stream did not end when the sandbox was killed"
    assert errors and isinstance(errors[0], SandboxException), errors
    # as when envd disappears with its sandbox: the SDK's own "killed" error, not a message of ours
    from e2b.exceptions import SandboxNotRunningException

    assert isinstance(errors[0], SandboxNotRunningException), repr(errors[0])
    assert "killed or reached its end of life" in str(errors[0]), str(errors[0])
    assert not sbx.is_running()


# -- async SDK -----------------------------------------------------------------------------------


async def test_async_run_and_exit_codes(async_sandbox: AsyncSandbox) -> None:
    r = await async_sandbox.commands.run("echo a; echo b >&2", envs={"X": "1"})
    assert (r.stdout, r.stderr) == ("a\n", "b\n")
    with pytest.raises(CommandExitException):
        await async_sandbox.commands.run("exit 7")
    assert (await async_sandbox.commands.run("whoami", user="root")).stdout == "root\n"
    assert (await async_sandbox.commands.run("pwd", cwd="/usr")).stdout == "/usr\n"


async def test_async_too_short_timeout(async_sandbox: AsyncSandbox) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        await async_sandbox.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - start < 10


async def test_async_background_stdin_and_kill(async_sandbox: AsyncSandbox) -> None:
    h = await async_sandbox.commands.run("cat", background=True, stdin=True)
    await async_sandbox.commands.send_stdin(h.pid, "abc\n")
    await async_sandbox.commands.close_stdin(h.pid)
    assert (await h.wait()).stdout == "abc\n"
    h2 = await async_sandbox.commands.run("sleep 60", background=True)
    assert h2.pid in {p.pid for p in await async_sandbox.commands.list()}
    assert await async_sandbox.commands.kill(h2.pid) is True
    with pytest.raises(CommandExitException):
        await h2.wait()


async def test_async_pty(async_sandbox: AsyncSandbox) -> None:
    out = bytearray()
    h = await async_sandbox.pty.create(PtySize(rows=10, cols=50), on_data=lambda b: out.extend(b))
    await async_sandbox.pty.send_stdin(h.pid, b"echo hi-$((1+1))\nexit\n")
    try:
        await h.wait()
    except CommandExitException:
        pass
    assert b"hi-2" in out


async def test_async_large_output(async_sandbox: AsyncSandbox) -> None:
    r = await async_sandbox.commands.run("seq 1 2000000", timeout=120)
    lines = r.stdout.splitlines()
    assert len(lines) == 2_000_000 and lines[-1] == "2000000"


def test_process_that_never_reads_stdin_does_not_stall_the_server(server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        h = sbx.commands.run("sleep 30", background=True, stdin=True)
        done = threading.Event()

        def flood() -> None:
            try:
                sbx.commands.send_stdin(h.pid, "x" * (1 << 20), request_timeout=30)  # far more than a pipe holds
            except Exception:
                pass
            finally:
                done.set()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        time.sleep(0.5)
        start = time.monotonic()
        assert sbx.commands.run("echo still-serving", timeout=10).stdout == "still-serving\n"
        assert httpx.get(server.url + "/health", timeout=5).status_code == 204
        assert time.monotonic() - start < 5
        assert not done.is_set()  # the writer is still waiting for the process to read
        sbx.commands.kill(h.pid)
        assert done.wait(10), "the blocked stdin write did not end when the process died"
    finally:
        sbx.kill()


def test_end_event_error_text_as_envd(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("exit 3")
    assert e.value.exit_code == 3 and e.value.error == "exit status 3"
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("kill -9 $$")
    assert e.value.exit_code == -1 and e.value.error == "signal: killed"
    assert sandbox.commands.run("true").error in (None, "")


def test_oom_kill_says_so(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("python3 -c 'x = bytearray(2 << 30)'", timeout=60)
    assert "out of memory" in (e.value.error or ""), e.value
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def _tiny_wheel() -> bytes:
    """A minimal pure-Python wheel (no network or build backend needed to install it)."""
    import io
    import zipfile

    buf = io.BytesIO()
    files = {
        "sbxtiny/__init__.py": "VALUE = 42\n",
        "sbxtiny-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: sbxtiny\nVersion: 0.1\n",
        "sbxtiny-0.1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(
            "sbxtiny-0.1.dist-info/RECORD", "".join(f"{n},,\n" for n in [*files, "sbxtiny-0.1.dist-info/RECORD"])
        )
    return buf.getvalue()


def test_python_and_pip_as_on_e2b_base(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("python --version").stdout.startswith("Python 3")
    for tool in ("pip", "pip3", "python3", "node", "npm", "git", "curl", "wget", "jq", "vi", "sudo", "make", "gcc"):
        assert sandbox.commands.run(f"command -v {tool}").stdout.strip(), tool
    # `pip install` works for the default user (no PEP 668 refusal): into ~/.local
    sandbox.files.write("/tmp/sbxtiny-0.1-py3-none-any.whl", _tiny_wheel())
    r = sandbox.commands.run("pip install --no-index /tmp/sbxtiny-0.1-py3-none-any.whl 2>&1")
    assert "externally-managed" not in r.stdout, r.stdout
    assert sandbox.commands.run("python -c 'import sbxtiny; print(sbxtiny.VALUE)'").stdout == "42\n"
