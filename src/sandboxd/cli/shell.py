"""`sandboxd sandbox exec|shell|cp`: into a sandbox through envd, with the official `e2b` SDK (what any client
uses; no back door):

- `exec [--user U] [--cwd DIR] [--env K=V] ID -- CMD ARGS...` (options before the ID: what follows it is the
  command's): runs the command, its output streamed as it comes
  (stdout to stdout, stderr to stderr), its exit status ours;
- `shell ID [--user U]`: an interactive terminal (a PTY in the sandbox running the user's login shell), this
  terminal in raw mode, its size followed (SIGWINCH); ends when the shell does, with its status;
- `cp SRC DST`: one side `ID:PATH` in the sandbox, the other a local path (`-`: stdin or stdout).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from sandboxd.cli.output import err

COMMANDS = ("exec", "shell", "cp")


def add_parsers(ssub: argparse._SubParsersAction, server_options: argparse.ArgumentParser) -> None:
    p = ssub.add_parser("exec", parents=[server_options], help="run a command in a sandbox: sandbox exec ID -- CMD")
    p.add_argument("sandbox_id")
    p.add_argument("--user", default=None, help="who runs it (default: the template's user)")
    p.add_argument("--cwd", default=None, help="where (default: the user's home)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--timeout", type=float, default=0, help="seconds it may run (default: no limit)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments")
    p = ssub.add_parser("shell", parents=[server_options], help="an interactive terminal in a sandbox")
    p.add_argument("sandbox_id")
    p.add_argument("--user", default=None)
    p = ssub.add_parser(
        "cp", parents=[server_options], help="copy a file in or out: cp ID:PATH LOCAL, cp LOCAL ID:PATH"
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--user", default=None)


def _connect(sandbox_id: str, url: str, api_key: str) -> Any:
    from e2b import Sandbox

    return Sandbox.connect(sandbox_id, api_key=api_key, api_url=url, sandbox_url=url)


def main(args: argparse.Namespace, url: str, api_key: str) -> int:
    from e2b.exceptions import SandboxException

    try:
        if args.sandbox_command == "exec":
            return _exec(args, url, api_key)
        if args.sandbox_command == "shell":
            return _shell(args, url, api_key)
        return _cp(args, url, api_key)
    except SandboxException as e:
        err.print(f"sandboxd: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


def _exec(args: argparse.Namespace, url: str, api_key: str) -> int:
    from e2b.sandbox.commands.command_handle import CommandExitException

    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        err.print("sandboxd: no command: sandboxd sandbox exec ID -- CMD [ARGS...]")
        return 2
    envs = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            err.print(f"sandboxd: --env must be NAME=VALUE, got {item!r}")
            return 2
        envs[name] = value
    sbx = _connect(args.sandbox_id, url, api_key)
    out, errout = sys.stdout, sys.stderr
    try:
        result = sbx.commands.run(
            shlex.join(argv),
            user=args.user,
            cwd=args.cwd,
            envs=envs or None,
            timeout=args.timeout or 0,
            on_stdout=lambda s: (out.write(s), out.flush()),
            on_stderr=lambda s: (errout.write(s), errout.flush()),
        )
    except CommandExitException as e:
        return int(e.exit_code) if 0 <= e.exit_code < 256 else 1
    return int(result.exit_code)


def _shell(args: argparse.Namespace, url: str, api_key: str) -> int:
    import select
    import termios
    import tty

    from e2b import PtySize
    from e2b.sandbox.commands.command_handle import CommandExitException

    if not os.isatty(sys.stdin.fileno()):
        err.print("sandboxd: `sandbox shell` needs a terminal (use `sandbox exec` for scripts)")
        return 2
    sbx = _connect(args.sandbox_id, url, api_key)
    cols, rows = os.get_terminal_size()
    out = sys.stdout.buffer
    handle = sbx.pty.create(PtySize(rows=rows, cols=cols), user=args.user, timeout=0)

    def resized(*_: object) -> None:
        c, r = os.get_terminal_size()
        sbx.pty.resize(handle.pid, PtySize(rows=r, cols=c))

    import threading

    done = threading.Event()
    status: list[int] = []

    def follow() -> None:
        try:
            for _, _, data in handle:  # (stdout, stderr, pty): the terminal's bytes
                if data:
                    out.write(data)
                    out.flush()
            status.append(handle.wait().exit_code)
        except CommandExitException as e:
            status.append(int(e.exit_code))
        except Exception:
            status.append(1)
        finally:
            done.set()

    threading.Thread(target=follow, daemon=True).start()
    saved = termios.tcgetattr(sys.stdin.fileno())
    old_winch = signal.signal(signal.SIGWINCH, resized)
    try:
        tty.setraw(sys.stdin.fileno(), termios.TCSANOW)  # (not TCSAFLUSH: what was typed ahead goes in too)
        while not done.is_set():
            ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.1)
            if ready:
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    break
                sbx.pty.send_stdin(handle.pid, data)
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
    done.wait(5)
    return status[0] if status else 0


def _split(spec: str) -> tuple[str, str] | None:
    """(sandbox ID, path) of `ID:PATH`; None for a local path."""
    ident, sep, path = spec.partition(":")
    if sep and ident and path.startswith("/") and "/" not in ident:
        return ident, path
    return None


def _cp(args: argparse.Namespace, url: str, api_key: str) -> int:
    src, dst = _split(args.src), _split(args.dst)
    if (src is None) == (dst is None):
        err.print("sandboxd: give one side as ID:/ABSOLUTE/PATH in the sandbox and the other as a local path")
        return 2
    if src is not None:
        sbx = _connect(src[0], url, api_key)
        data = sbx.files.read(src[1], format="bytes", user=args.user)
        if args.dst == "-":
            sys.stdout.buffer.write(bytes(data))
            sys.stdout.buffer.flush()
        else:
            Path(args.dst).write_bytes(bytes(data))
        return 0
    assert dst is not None
    sbx = _connect(dst[0], url, api_key)
    payload = sys.stdin.buffer.read() if args.src == "-" else Path(args.src).read_bytes()
    sbx.files.write(dst[1], payload, user=args.user)
    return 0
