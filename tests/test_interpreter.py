"""Code interpreter on port 49999 through the official e2b-code-interpreter SDK (sync and async)."""

from __future__ import annotations

import ast
import threading
import time

import httpx
import pytest
from e2b.exceptions import TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox
from e2b_code_interpreter.charts import ChartType

from conftest import Server

TEMPLATE = "code-interpreter-v1"


@pytest.fixture(scope="module")
def ci(server: Server):
    sbx = Sandbox.create(template=TEMPLATE, timeout=600, envs={"SANDBOX_LEVEL": "from-sandbox"})
    try:
        yield sbx
    finally:
        sbx.kill()


def test_state_results_and_execution_count(ci: Sandbox) -> None:
    first = ci.run_code("counter = 40")
    assert first.error is None and first.results == []
    e = ci.run_code("counter += 2\ncounter")
    assert e.text == "42" and e.results[0].is_main_result
    assert e.execution_count and e.execution_count > (first.execution_count or 0)
    assert ci.run_code("'a string'").text == "'a string'"  # Jupyter's text/plain exactly, as E2B
    assert ci.commands.run("tr -d '\\0' < /proc/1/cmdline").stdout == "sandbox-init"  # no host paths
    assert ci.get_info().memory_mb == 1024  # the template's default: three kernels need room


def test_streaming_callbacks(ci: Sandbox) -> None:
    out, err, results, errors = [], [], [], []
    e = ci.run_code(
        "import sys, time\nprint('one'); sys.stdout.flush(); time.sleep(0.3)\nprint('two', file=sys.stderr)\n"
        "display('shown')\n'final'",
        on_stdout=lambda m: out.append((m.line, time.monotonic())),
        on_stderr=lambda m: err.append(m.line),
        on_result=results.append,
        on_error=errors.append,
    )
    assert [o[0] for o in out] == ["one\n"] and err == ["two\n"]
    assert [r.text for r in results] == ["'shown'", "'final'"] and not errors
    assert [r.is_main_result for r in e.results] == [False, True]
    ci.run_code("raise ValueError('boom')", on_error=errors.append)
    assert errors and (errors[0].name, errors[0].value) == ("ValueError", "boom")
    assert "ValueError" in errors[0].traceback


def test_errors(ci: Sandbox) -> None:
    e = ci.run_code("undefined_name + 1")
    assert e.error is not None and e.error.name == "NameError" and "undefined_name" in e.error.value
    syntax = ci.run_code("def broken(:")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    assert ci.run_code("1 + 1").text == "2"  # the context still works


def test_rich_formats(ci: Sandbox) -> None:
    e = ci.run_code(
        "from IPython.display import HTML, Markdown, SVG, Latex, JSON, Javascript, display\n"
        "display(HTML('<b>bold</b>')); display(Markdown('# title')); display(Latex(r'$x^2$'))\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>\'))\n'
        "display(JSON({'a': 1})); display(Javascript('console.log(1)'))\n"
        "{'k': [1, 2]}"
    )
    assert e.error is None, e.error
    formats = [set(r.formats()) for r in e.results]
    assert {"html"} <= formats[0] and {"markdown"} <= formats[1] and {"latex"} <= formats[2]
    assert "svg" in formats[3] and "json" in formats[4] and "javascript" in formats[5]
    # a plain dict is text/plain only, as stock Jupyter sends it: no MIME type Jupyter did not send
    assert e.results[-1].formats() == ["text"] and e.results[-1].text == "{'k': [1, 2]}"
    assert e.results[-1].is_main_result


def test_dataframe_png_and_pil(ci: Sandbox) -> None:
    e = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})")
    r = e.results[0]
    assert r.data == {"a": [1, 2], "b": ["x", None]} and "<table" in (r.html or "")
    e = ci.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
    assert e.error is None and e.results and e.results[0].png  # base64 PNG
    e = ci.run_code("from PIL import Image\nImage.new('RGB', (4, 4), 'red').save('/tmp/red.png')")
    assert e.error is None and any(r.png for r in e.results)


def test_kernel_starts_light_and_patches_pil_on_first_import(ci: Sandbox) -> None:
    """A new kernel loads neither ipykernel's debugger (debugpy), psutil nor PIL; each works when code
    wants it, and an image saved with PIL is still displayed."""
    ctx = ci.create_code_context()
    try:
        loaded = "import sys\nprint(sorted(m for m in ('debugpy', 'psutil', 'PIL.Image') if m in sys.modules))"
        e = ci.run_code(loaded, context=ctx)
        assert e.logs.stdout == ["[]\n"], e
        e = ci.run_code("from PIL import Image\nImage.new('RGB', (4, 4), 'blue').save('/tmp/blue.png')", context=ctx)
        assert e.error is None and any(r.png for r in e.results), e
        later = "import debugpy, psutil\nprint(callable(debugpy.listen), psutil.Process().pid > 0)"
        e = ci.run_code(later, context=ctx)
        assert e.error is None and e.logs.stdout == ["True True\n"], e
        # its first counted execution is number 1 (the warm-up is silent), and the session's input
        # history works (kept in memory)
        e = ci.run_code("a = 5", context=ctx)
        e = ci.run_code("print(_i, len(In))\nget_ipython().execution_count - 1", context=ctx)
        assert e.logs.stdout == ["a = 5 6\n"] and e.results[0].text == "5", e
    finally:
        ci.remove_code_context(ctx)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("plt.plot([1, 2, 3], [3, 1, 2], label='l'); plt.title('line')", ChartType.LINE),
        ("plt.bar(['a', 'b'], [3, 5]); plt.title('bar')", ChartType.BAR),
        ("plt.scatter([1, 2, 3], [3, 2, 1]); plt.title('scatter')", ChartType.SCATTER),
        ("plt.pie([1, 2, 3], labels=['x', 'y', 'z']); plt.title('pie')", ChartType.PIE),
    ],
)
def test_charts(ci: Sandbox, code: str, kind: ChartType) -> None:
    e = ci.run_code(f"import matplotlib.pyplot as plt\nplt.figure()\n{code}\nplt.show()")
    charts = [r.chart for r in e.results if getattr(r, "chart", None) is not None]
    assert charts and charts[0].type == kind, [r.formats() for r in e.results]
    assert charts[0].title in ("line", "bar", "scatter", "pie")


def test_box_and_whisker_chart(ci: Sandbox) -> None:
    # e2b-charts (the package E2B's template uses too) reads boxes drawn as patches
    code = (
        "import matplotlib.pyplot as plt\nplt.figure()\n"
        "plt.boxplot([[1, 2, 3, 4, 5, 9], [2, 4, 6, 8, 10, 14, 20]], tick_labels=['A', 'B'], patch_artist=True)\n"
        "plt.title('box')\nplt.show()"
    )
    e = ci.run_code(code)
    charts = [r.chart for r in e.results if getattr(r, "chart", None) is not None]
    assert charts and charts[0].type == ChartType.BOX_AND_WHISKER, [r.formats() for r in e.results]
    a, b = charts[0].elements
    assert (a.label, a.min, a.first_quartile, a.median, a.third_quartile, a.max) == ("A", 1, 2.25, 3.5, 4.75, 5)
    assert a.outliers == [9] and b.label == "B" and b.median == 8


def test_env_vars_sandbox_execution_and_overwrite(ci: Sandbox) -> None:
    assert ci.run_code("import os; os.environ.get('SANDBOX_LEVEL')").text == "'from-sandbox'"
    e = ci.run_code("os.environ.get('ONLY_NOW')", envs={"ONLY_NOW": "yes"})
    assert e.text == "'yes'"
    assert ci.run_code("str(os.environ.get('ONLY_NOW'))").text == "'None'"  # only for that execution
    assert ci.run_code("os.environ['SANDBOX_LEVEL']", envs={"SANDBOX_LEVEL": "overwritten"}).text == "'overwritten'"
    assert ci.run_code("os.environ['SANDBOX_LEVEL']").text == "'from-sandbox'"  # restored
    bash = ci.run_code("echo $SANDBOX_LEVEL-$EXTRA", language="bash", envs={"EXTRA": "x"})
    assert bash.logs.stdout == ["from-sandbox-x\n"]
    js = ci.run_code("Deno.env.get('SANDBOX_LEVEL')", language="javascript")
    assert "from-sandbox" in (js.text or "")


def test_bash_and_javascript(ci: Sandbox) -> None:
    ci.run_code("export KEPT=1; cd /tmp", language="bash")
    assert ci.run_code("echo $KEPT $(pwd)", language="bash").logs.stdout == ["1 /tmp\n"]
    ci.run_code("let total = 5;", language="javascript")
    js = ci.run_code("console.log('sum', total + 1); total * 2", language="js")
    assert js.logs.stdout == ["sum 6\n"] and js.text and "10" in js.text
    ts = ci.run_code("const n: number = 3; n * n", language="typescript")
    assert ts.error is None and "9" in (ts.text or "")
    err = ci.run_code("throw new Error('js boom')", language="javascript")
    assert err.error is not None and "js boom" in err.error.value
    with pytest.raises(Exception) as exc:
        ci.run_code("1", language="cobol")
    assert "cobol" in str(exc.value)


def test_contexts(ci: Sandbox, server: Server) -> None:
    a = ci.create_code_context(cwd="/tmp")
    b = ci.create_code_context(language="python")
    try:
        assert a.cwd == "/tmp" and a.language == "python"
        ci.run_code("secret = 'in a'", context=a)
        assert ci.run_code("import os; os.getcwd()", context=a).text == "'/tmp'"
        missing = ci.run_code("secret", context=b)
        assert missing.error is not None and missing.error.name == "NameError"  # contexts are isolated
        ids = {c.id for c in ci.list_code_contexts()}
        assert {a.id, b.id} <= ids
        ci.restart_code_context(a)
        assert ci.run_code("'secret' in dir()", context=a).text == "False"  # state gone after restart
        r = httpx.post(
            f"{server.url}/execute",
            json={"code": "1", "context_id": a.id, "language": "python"},
            headers={
                "E2b-Sandbox-Id": ci.sandbox_id,
                "E2b-Sandbox-Port": "49999",
                "X-Access-Token": ci._envd_access_token,
            },
        )
        assert r.status_code == 400 and "not both" in r.text
    finally:
        ci.remove_code_context(a)
        ci.remove_code_context(b)
    assert a.id not in {c.id for c in ci.list_code_contexts()}
    with pytest.raises(Exception) as exc:
        ci.run_code("1", context=a)
    assert "not found" in str(exc.value)


def test_client_timeout_interrupts_the_kernel(ci: Sandbox) -> None:
    ctx = ci.create_code_context()
    try:
        ci.run_code("import time", context=ctx)
        with pytest.raises(TimeoutException):
            ci.run_code("while True: time.sleep(0.01)", context=ctx, timeout=1)
        start = time.monotonic()
        assert ci.run_code("'free again'", context=ctx, timeout=30).text == "'free again'"
        assert time.monotonic() - start < 20
    finally:
        ci.remove_code_context(ctx)


def test_reconnect(ci: Sandbox) -> None:
    ci.run_code("reconnected_value = 7")
    again = Sandbox.connect(ci.sandbox_id)
    assert again.run_code("reconnected_value * 6").text == "42"


def test_kill_during_execution(server: Server) -> None:
    sbx = Sandbox.create(template=TEMPLATE, timeout=120)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sbx.run_code("import time; time.sleep(60)", timeout=90)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    assert sbx.kill() is True
    t.join(30)
    assert not t.is_alive() and errors, "run_code did not end when the sandbox was killed"
    assert not sbx.is_running()


async def test_async_interpreter(server: Server) -> None:
    sbx = await AsyncSandbox.create(template=TEMPLATE, timeout=120, envs={"LEVEL": "async"})
    try:
        seen: list[str] = []
        e = await sbx.run_code("import os\nprint(os.environ['LEVEL'])\n3 * 3", on_stdout=lambda m: seen.append(m.line))
        assert e.text == "9" and seen == ["async\n"]
        ctx = await sbx.create_code_context(language="javascript")
        assert (await sbx.run_code("[1,2,3].length", context=ctx)).text == "3"
        assert any(c.id == ctx.id for c in await sbx.list_code_contexts())
        await sbx.remove_code_context(ctx)
        assert (await sbx.run_code("echo hi", language="bash")).logs.stdout == ["hi\n"]
    finally:
        await sbx.kill()


def test_dead_kernel_is_reported_and_restarted(ci: Sandbox) -> None:
    ctx = ci.create_code_context()
    try:
        ci.run_code("kept = 1", context=ctx)
        died = ci.run_code("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", context=ctx)
        after = died if died.error is not None else ci.run_code("1", context=ctx)
        assert after.error is not None and after.error.name == "KernelDied", (died, after)
        e = ci.run_code("'kept' in dir(), 6 * 7", context=ctx)  # a fresh kernel: state gone, works again
        assert e.error is None and e.text == "(False, 42)"
    finally:
        ci.remove_code_context(ctx)


def test_executions_in_one_context_are_serialized(ci: Sandbox) -> None:
    ctx = ci.create_code_context()
    try:
        ci.run_code("import time\nlog = []", context=ctx)
        code = "log.append(('start', {i})); time.sleep(0.3); log.append(('end', {i}))"
        threads = [
            threading.Thread(target=ci.run_code, args=(code.format(i=i),), kwargs={"context": ctx}) for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        log = ast.literal_eval(ci.run_code("log", context=ctx).text)
        assert log is not None and len(log) == 6
        # each execution ran from start to end before the next began
        for k in range(0, 6, 2):
            assert log[k][0] == "start" and tuple(log[k + 1]) == ("end", log[k][1]), log
    finally:
        ci.remove_code_context(ctx)


def test_idle_sandbox_runs_only_the_python_kernel(server: Server) -> None:
    # Kernels other than Python start on the first use of their language: an idle sandbox pays for the
    # server and one kernel only (Deno alone is ~180 MiB).
    sbx = Sandbox.create(template=TEMPLATE, timeout=120)
    try:
        assert sbx.run_code("1 + 1").text == "2"
        procs = sbx.commands.run("ps -eo args").stdout
        for lazy in ("deno", "bash_kernel", "IRkernel", "java_kernel"):
            assert lazy not in procs, procs
        assert sbx.run_code("[1, 2].length", language="javascript").text == "2"  # started on demand
        assert "deno" in sbx.commands.run("ps -eo args").stdout
    finally:
        sbx.kill()


def test_r_kernel(ci: Sandbox) -> None:
    # IRkernel, started on the first use of R. It shows values as display_data (not a main result), so
    # they are in `results`, as on E2B. Env vars per sandbox and per execution, errors, contexts, cwd.
    def value(e) -> str:  # type: ignore[no-untyped-def]
        assert e.error is None, e.error
        return e.results[0].text

    assert value(ci.run_code("x <- 6; x * 7", language="r")) == "[1] 42"
    assert value(ci.run_code("x + 1", language="r")) == "[1] 7"  # state kept
    assert value(ci.run_code('Sys.getenv("SANDBOX_LEVEL")', language="r")) == '[1] "from-sandbox"'
    assert value(ci.run_code('Sys.getenv("ONLY_NOW")', language="r", envs={"ONLY_NOW": "yes"})) == '[1] "yes"'
    assert value(ci.run_code('Sys.getenv("ONLY_NOW")', language="r")) == '[1] ""'  # undone after
    err = ci.run_code('stop("r boom")', language="r")
    assert err.error is not None and "r boom" in err.error.value
    ctx = ci.create_code_context(cwd="/tmp", language="r")
    assert value(ci.run_code("getwd()", context=ctx)) == '[1] "/tmp"'
    ci.remove_code_context(ctx)


def test_java_kernel(ci: Sandbox) -> None:
    # Java over the JDK's JShell API, started on the first use of Java: state, output, values, errors
    e = ci.run_code('int x = 6;\nSystem.out.println("hi from java");\nx * 7', language="java", timeout=120)
    assert e.error is None, e.error
    assert e.text == "42" and e.logs.stdout == ["hi from java\n"], (e.text, e.logs)
    assert ci.run_code("x + 1", language="java").text == "7"  # state kept
    assert ci.run_code('System.getenv("SANDBOX_LEVEL")', language="java").text == '"from-sandbox"'
    err = ci.run_code('throw new IllegalStateException("java boom");', language="java")
    assert err.error is not None and err.error.name.endswith("IllegalStateException"), err.error
    bad = ci.run_code("int y = ;", language="java")
    assert bad.error is not None and bad.error.name == "CompilationError"
    ctx = ci.create_code_context(cwd="/tmp", language="java")
    assert ci.run_code('System.getProperty("user.dir")', context=ctx).text == '"/tmp"'
    ci.remove_code_context(ctx)
