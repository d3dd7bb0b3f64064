"""Run by tests/test_compat.py with older official SDKs (e2b 2.45.1, v1 create/connect paths; e2b-code-interpreter
2.9.2).

Exits 0 and prints OK when every step worked; any exception fails the test with its traceback.
"""

from __future__ import annotations

import sys

from e2b import CommandExitException, Sandbox, SandboxQuery


def main() -> None:
    sbx = Sandbox.create(template="base", timeout=60, metadata={"sdk": "old"}, envs={"V": "1"})
    assert sbx.commands.run("echo $V; whoami").stdout == "1\nuser\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    try:
        sbx.commands.run("exit 4")
        raise AssertionError("exit 4 did not raise")
    except CommandExitException as e:
        assert e.exit_code == 4
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "piped\n")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "piped\n"
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.is_running()
    listed = Sandbox.list(query=SandboxQuery(metadata={"sdk": "old"})).next_items()
    assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
    assert sbx.kill() is True
    assert not sbx.is_running()
    # the code interpreter SDK of the same era (e2b-code-interpreter 2.9.2)
    from e2b_code_interpreter import Sandbox as CodeSandbox

    ci = CodeSandbox.create(timeout=120)
    try:
        assert ci.run_code("x = 6; x * 7").text == "42"
        assert ci.run_code("'text'").text == "'text'"
        assert ci.run_code("1/0").error.name == "ZeroDivisionError"
    finally:
        ci.kill()
    print("OK", sbx.sandbox_id)


if __name__ == "__main__":
    main()
    sys.exit(0)
