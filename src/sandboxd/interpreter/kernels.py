"""Contexts: one Jupyter kernel each, with its language, working directory and an execution lock."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

HERE = Path(__file__).resolve().parent
HOME = os.path.expanduser("~")
SITE = os.environ.get("SANDBOXD_SITE", "/opt/sandboxd/site")
KEEPALIVE_S = 5.0
LATE_RESULT_S = 0.03

# language aliases -> kernel name
LANGUAGES = {
    "python": "python3",
    "javascript": "deno",
    "js": "deno",
    "typescript": "deno",
    "ts": "deno",
    "bash": "bash",
    "r": "ir",
    "java": "java",
}
CANONICAL = {"python3": "python", "deno": "javascript", "bash": "bash", "ir": "r", "java": "java"}
# Kernels built on ipykernel talk to the interpreter over unix sockets (ZeroMQ's ipc transport), not TCP on
# loopback: a pause to disk carries unix sockets over (CRIU restores both ends; TCP on loopback too, with TCP
# repair, but at more cost). Deno's and R's kernels name ipc endpoints their own way (`path:port`, where
# jupyter_client writes `path-port`): they stay on TCP.
IPC_KERNELS = frozenset({"python3", "bash", "java"})

MIME_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


class UnknownLanguage(Exception):
    pass


def write_kernelspecs(root: Path) -> Path:
    """Kernel specs for the kernels this template has, in a private directory."""
    python = sys.executable
    specs = {
        "python3": {
            "argv": [
                python,
                "-m",
                "sandboxd_interpreter.python_kernel",  # ipykernel_launcher without the debugger
                "-f",
                "{connection_file}",
                f"--IPKernelApp.exec_files=['{HERE / 'startup.py'}']",
                # IPython's input history in memory, not in ~/.ipython's SQLite file: creating and
                # syncing that file cost the first execution ~15 ms (the history of the session works
                # as before: In, Out, _i, %history)
                "--HistoryManager.hist_file=:memory:",
            ],
            "language": "python",
        },
        "bash": {"argv": [python, "-m", "bash_kernel", "-f", "{connection_file}"], "language": "bash"},
        "deno": {
            "argv": [f"{SITE}/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
            "language": "typescript",
        },
        # Java over the JDK's JShell API (java_kernel.py), started on the first use of Java
        "java": {
            "argv": [python, "-m", "sandboxd_interpreter.java_kernel", "-f", "{connection_file}"],
            "language": "java",
        },
        # IRkernel from Debian (r-cran-irkernel), started on the first use of R
        "ir": {
            "argv": ["/usr/bin/R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"],
            "language": "R",
        },
    }
    for name, spec in specs.items():
        d = root / "kernels" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kernel.json").write_text(json.dumps({**spec, "display_name": name}))
    return root / "kernels"


def _quote_py(s: str) -> str:
    return json.dumps(s)


def env_code(kernel: str, set_vars: dict[str, str], unset: list[str]) -> str:
    """Code, in the kernel's language, that sets and unsets environment variables."""
    if kernel == "python3":
        lines = ["import os as __sbx_os"]
        lines += [f"__sbx_os.environ[{_quote_py(k)}] = {_quote_py(v)}" for k, v in set_vars.items()]
        lines += [f"__sbx_os.environ.pop({_quote_py(k)}, None)" for k in unset]
        lines.append("del __sbx_os")
        return "\n".join(lines)
    if kernel == "java":
        # handled by java_kernel.py: a JVM's environment is fixed when it starts, so this sets the one the
        # JVM will start with (it starts on the first execution, after the sandbox's env vars are set)
        return "%sbx_env " + json.dumps({"set": set_vars, "unset": unset})
    if kernel == "ir":
        parts = [f"do.call(Sys.setenv, setNames(list({_quote_py(v)}), {_quote_py(k)}))" for k, v in set_vars.items()]
        parts += [f"Sys.unsetenv({_quote_py(k)})" for k in unset]
        return "; ".join(parts) or "invisible(NULL)"
    if kernel == "bash":
        parts = [f"export {k}={shlex.quote(v)}" for k, v in set_vars.items() if k.isidentifier()]
        parts += [f"unset {k}" for k in unset if k.isidentifier()]
        return "; ".join(parts) or "true"
    parts = [f"Deno.env.set({_quote_py(k)}, {_quote_py(v)});" for k, v in set_vars.items()]
    parts += [f"Deno.env.delete({_quote_py(k)});" for k in unset]
    return " ".join(parts) or "undefined;"


@dataclass
class Context:
    id: str
    kernel: str
    cwd: str
    manager: AsyncKernelManager
    client: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    start_error: str | None = None
    global_env: dict[str, str] = field(default_factory=dict)  # sandbox env vars applied so far
    pending_restore: str | None = None  # code that undoes the running execution's env_vars

    @property
    def language(self) -> str:
        return CANONICAL[self.kernel]

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Kernels:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sandboxd-kernels-"))
        self.specs = KernelSpecManager(kernel_dirs=[str(write_kernelspecs(self.dir))])
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}  # kernel name -> id of its default context
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    def kernel_for(self, language: str | None) -> str:
        name = LANGUAGES.get((language or "python").lower())
        if name is None:
            raise UnknownLanguage(
                f"language '{language}' is not available in this sandbox; available: python, javascript, "
                "typescript, bash, r, java"
            )
        return name

    def create(self, language: str | None, cwd: str | None, default: bool = False) -> Context:
        kernel = self.kernel_for(language)
        ident = str(uuid.uuid4())
        manager = AsyncKernelManager(kernel_name=kernel, kernel_spec_manager=self.specs)
        if kernel in IPC_KERNELS:  # (in this process's private dir; a socket's path fits in 108 bytes)
            manager.transport = "ipc"
            manager.connection_file = str(self.dir / f"{ident[:8]}.json")
            manager.ip = str(self.dir / ident[:8])
        ctx = Context(id=ident, kernel=kernel, cwd=cwd or os.path.expanduser("~"), manager=manager)
        self.contexts[ctx.id] = ctx
        if default:
            self.defaults[kernel] = ctx.id
        task = asyncio.ensure_future(self._start(ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ctx

    async def _start(self, ctx: Context) -> None:
        try:
            env = dict(os.environ)
            env.setdefault("DENO_DIR", f"{HOME}/.cache/deno")
            env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
            await ctx.manager.start_kernel(cwd=ctx.cwd, env=env)
            ctx.client = ctx.manager.client()
            ctx.client.start_channels()
            await ctx.client.wait_for_ready(timeout=120)
            if ctx.kernel == "python3":
                # A kernel's first execution pays for code paths run once (in ipykernel, IPython and
                # jupyter_client): ~15 ms more than the next. Pay it here, silently (no history, no
                # output, no execution count), before anyone waits on it.
                await self._silent(ctx, "pass")
        except Exception as e:  # reported to whoever executes in this context
            ctx.start_error = f"{type(e).__name__}: {e}"
        finally:
            ctx.ready.set()

    def default_for(self, language: str | None) -> Context:
        kernel = self.kernel_for(language)
        ctx_id = self.defaults.get(kernel)
        if ctx_id is None or ctx_id not in self.contexts:
            return self.create(language, None, default=True)
        return self.contexts[ctx_id]

    async def restart(self, ctx: Context) -> None:
        async with ctx.lock:
            await ctx.ready.wait()
            ctx.global_env = {}
            if ctx.start_error is not None or ctx.client is None:
                ctx.ready.clear()
                ctx.start_error = None
                await self._start(ctx)
                return
            await ctx.manager.restart_kernel(now=True)
            await ctx.client.wait_for_ready(timeout=120)

    async def remove(self, ctx: Context) -> None:
        self.contexts.pop(ctx.id, None)
        if self.defaults.get(ctx.kernel) == ctx.id:
            del self.defaults[ctx.kernel]
        await ctx.ready.wait()
        if ctx.client is not None:
            ctx.client.stop_channels()
        if ctx.start_error is None:
            await ctx.manager.shutdown_kernel(now=True)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.remove(c) for c in list(self.contexts.values())), return_exceptions=True)

    # -- execution -------------------------------------------------------------------------------
    async def _silent(self, ctx: Context, code: str) -> None:
        if not code:
            return
        msg_id = ctx.client.execute(code, silent=True, store_history=False)
        while True:
            msg = await ctx.client.get_shell_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id:
                return

    async def execute(
        self, ctx: Context, code: str, env_vars: dict[str, str] | None, sandbox_env: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """NDJSON events of one execution. The caller holds ctx.lock."""
        await ctx.ready.wait()
        if ctx.start_error is not None:
            yield {"type": "error", "name": "KernelStartError", "value": ctx.start_error, "traceback": ""}
            return
        if not await ctx.manager.is_alive():
            yield await self._kernel_died(ctx, "since the last execution")
            return
        # sandbox env vars first (once per context, and when they change), then this execution's own
        if sandbox_env != ctx.global_env:
            gone = [k for k in ctx.global_env if k not in sandbox_env]
            await self._silent(ctx, env_code(ctx.kernel, sandbox_env, gone))
            ctx.global_env = dict(sandbox_env)
        if env_vars:
            await self._silent(ctx, env_code(ctx.kernel, env_vars, []))
            restore = {k: sandbox_env[k] for k in env_vars if k in sandbox_env}
            ctx.pending_restore = env_code(ctx.kernel, restore, [k for k in env_vars if k not in sandbox_env])
        async for event in self._run(ctx, code):
            yield event
        await self._restore(ctx)

    async def _restore(self, ctx: Context) -> None:
        """Undo an execution's own env vars (after it ended, or after it was interrupted)."""
        code, ctx.pending_restore = ctx.pending_restore, None
        if code:
            await self._silent(ctx, code)

    async def _kernel_died(self, ctx: Context, when: str) -> dict[str, Any]:
        """Restart a context whose kernel died; the error event that says so."""
        await ctx.manager.restart_kernel(now=True)
        await ctx.client.wait_for_ready(timeout=120)
        ctx.global_env = {}
        return {
            "type": "error",
            "name": "KernelDied",
            "traceback": "",
            "value": f"the kernel of this context died {when} (out of memory?): it was restarted, state is lost",
        }

    async def _run(self, ctx: Context, code: str) -> AsyncIterator[dict[str, Any]]:
        client = ctx.client
        msg_id = client.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        error_sent = False
        while True:
            try:
                msg = await client.get_iopub_msg(timeout=KEEPALIVE_S)
            except Exception:  # queue.Empty: silence
                if not await ctx.manager.is_alive():
                    yield await self._kernel_died(ctx, "during the execution")
                    return
                yield {"type": "keepalive"}
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            if msg["msg_type"] == "status" and content.get("execution_state") == "idle":
                break
            event = output_event(msg)
            if event is not None and (event["type"] != "error" or not error_sent):
                error_sent = error_sent or event["type"] == "error"
                yield event
        if ctx.kernel == "deno":
            # Measured: Deno's kernel sometimes publishes execute_result *after* status idle. Collect
            # what belongs to this execution until the channel has been quiet for a moment.
            while True:
                try:
                    msg = await client.get_iopub_msg(timeout=LATE_RESULT_S)
                except Exception:
                    return
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] != "error":
                    event = output_event(msg)
                    if event is not None:
                        yield event

    async def interrupt(self, ctx: Context) -> None:
        """After a client went away mid-execution: stop the code and drain its output."""
        try:
            await ctx.manager.interrupt_kernel()
            async for _ in self._run_until_idle(ctx):
                pass
            await self._restore(ctx)
        except Exception:
            pass

    async def _run_until_idle(self, ctx: Context) -> AsyncIterator[None]:
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            try:
                msg = await ctx.client.get_iopub_msg(timeout=1)
            except Exception:
                return
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                return
            yield None


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Deno colours its text/plain


def output_event(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The NDJSON event for one iopub message of an execution (None for those the API does not carry)."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "execute_input":
        return {"type": "number_of_executions", "execution_count": content.get("execution_count")}
    if kind == "stream":
        return {
            "type": "stdout" if content.get("name") == "stdout" else "stderr",
            "text": content.get("text", ""),
            "timestamp": _timestamp(msg),
        }
    if kind in ("execute_result", "display_data"):
        return result_event(content.get("data", {}), is_main=kind == "execute_result")
    if kind == "error":
        return {
            "type": "error",
            "name": content.get("ename", ""),
            "value": content.get("evalue", ""),
            "traceback": "\n".join(content.get("traceback", [])),
        }
    return None


def result_event(data: dict[str, Any], is_main: bool) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "result", "is_main_result": is_main}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        key = MIME_KEYS.get(mime)
        if key is None:
            extra[mime] = value
        elif key == "text":
            # Jupyter's text/plain exactly ('abc' keeps its quotes), as E2B returns it; only Deno's colours go
            event["text"] = ANSI.sub("", value) if isinstance(value, str) else value
        else:
            event[key] = value
    if extra:
        event["extra"] = extra
    return event


def _timestamp(msg: dict[str, Any]) -> str:
    date = msg.get("header", {}).get("date")
    return date.isoformat() if hasattr(date, "isoformat") else str(date or "")


def decode_env_header(value: str | None) -> dict[str, str]:
    if not value:
        return {}
    try:
        data = json.loads(base64.b64decode(value))
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
