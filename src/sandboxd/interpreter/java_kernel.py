"""A Jupyter kernel for Java over the JDK's JShell API (SbxJShell.java beside this file, run as a
single-file source program by the template's JDK). Started only on the first use of Java.

Each execution sends the code to the Java process and relays what it answers: printed output as a
stdout stream, the last expression's value as the execution result (text/plain), a compile error or
an exception as an error. A JVM's environment is fixed when it starts (System.getenv cannot change), so
the JVM starts on the first execution, after the interpreter has set the sandbox's env vars here
(`%sbx_env`, see kernels.env_code); env vars given to later executions do not reach Java code.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

DRIVER = Path(__file__).with_name("SbxJShell.java")


class JavaKernel(Kernel):
    implementation = "sandboxd-java"
    implementation_version = "1"
    language = "java"
    language_version = "17"
    language_info = {"name": "java", "mimetype": "text/x-java", "file_extension": ".java"}
    banner = "Java (JShell)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._silent = False
        self._java: subprocess.Popen[bytes] | None = None

    def _start_java(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["java", "-Xshare:auto", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=os.getcwd(),
            env=dict(os.environ),
        )

    def _ask(self, code: str) -> list[dict[str, Any]]:
        if self._java is None:
            self._java = self._start_java()
        assert self._java.stdin is not None and self._java.stdout is not None
        self._java.stdin.write(base64.b64encode(code.encode()) + b"\n")
        self._java.stdin.flush()
        replies: list[dict[str, Any]] = []
        while True:
            line = self._java.stdout.readline()
            if not line:
                raise RuntimeError("the Java process ended")
            reply = json.loads(line)
            if reply.get("done"):
                return replies
            replies.append(reply)
            if "out" in reply and not self._silent:
                self.send_response(self.iopub_socket, "stream", {"name": "stdout", "text": reply["out"]})

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        self._silent = silent
        if code.startswith("%sbx_env "):
            change = json.loads(code[len("%sbx_env ") :])
            os.environ.update(change["set"])
            for name in change["unset"]:
                os.environ.pop(name, None)
            return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}
        if not code.strip():
            return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}
        try:
            replies = self._ask(code)
        except Exception as e:
            replies = [{"error": str(e), "name": "KernelError"}]
        for reply in replies:
            if "error" in reply:
                content = {"ename": reply["name"], "evalue": reply["error"], "traceback": [reply["error"]]}
                if not silent:
                    self.send_response(self.iopub_socket, "error", content)
                return {"status": "error", "execution_count": self.execution_count, **content}
            if "value" in reply and not silent:
                self.send_response(
                    self.iopub_socket,
                    "execute_result",
                    {"execution_count": self.execution_count, "data": {"text/plain": reply["value"]}, "metadata": {}},
                )
        return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self._java is not None:
            self._java.kill()
        return {"status": "ok", "restart": restart}


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=JavaKernel)
