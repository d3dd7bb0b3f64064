"""Templates built with the official SDK's `Template` builder against a real server: every builder method
that needs no outside network, files from a context with symlinks, start and ready commands, the layer
cache (asserted from the build log), skip_cache, a failing step, builds in the background, tags,
aliases, `exists`, and deletion.

The server has a templates directory of its own (the cached built-in templates linked into it), so the
layers these tests make never mix with the shared template cache.
"""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, Template, wait_for_file, wait_for_port
from e2b.exceptions import BuildException
from netlab import Lab
from packages import APT_SOURCES, NPM_ENV, PIP_ENV, make_wheel, prepare_repos

from conftest import SANDBOXD, Server, builder_server


@pytest.fixture(scope="module")
def tserver(tmp_path_factory: pytest.TempPathFactory, lab: object) -> Iterator[Server]:
    with builder_server(tmp_path_factory.mktemp("tbuild")) as srv:
        yield srv


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "app" / "hello.txt").write_text("hello from the context\n")
    (ctx / "app" / "sub" / "deep.txt").write_text("deep\n")
    (ctx / "app" / "link.txt").symlink_to("hello.txt")
    (ctx / "app" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (ctx / "server.py").write_text(
        "import http.server, socketserver\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = open('/etc/motd-build').read().encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "socketserver.TCPServer(('0.0.0.0', 8080), H).serve_forever()\n"
    )
    make_wheel(ctx)
    return ctx


def _logs() -> tuple[list[str], object]:
    lines: list[str] = []
    return lines, lambda e: lines.append(e.message)


def test_build_with_the_builder_methods_then_a_sandbox_finds_its_service_ready(tserver: Server, context: Path) -> None:
    name = f"full-{secrets.token_hex(3)}"
    t = (
        Template(file_context_path=str(context))
        .from_base_image()
        .run_cmd("echo building as $(whoami)")
        .copy("app", "/home/user/app")
        .copy("app/run.sh", "/usr/local/bin/run-demo", user="root", mode=0o755)
        .copy("server.py", "/srv/")
        .copy("sbxdemo-1.0-py3-none-any.whl", "/tmp/wheels/")
        .pip_install("/tmp/wheels/sbxdemo-1.0-py3-none-any.whl")
        .set_envs({"GREETING": "hello env", "MODE": "test"})
        .make_dir("/srv/data", mode=0o750, user="root")
        .make_symlink("/srv/server.py", "/srv/current.py", user="root")
        .run_cmd(
            "git init -q /tmp/repo && cd /tmp/repo && echo v1 > f && git add f && "
            "git -c user.email=a@b -c user.name=t commit -q -m one"
        )
        .git_clone("file:///tmp/repo", "/home/user/clone")
        .run_cmd("touch /tmp/gone /tmp/old")
        .remove("/tmp/gone", force=True)
        .rename("/tmp/old", "/tmp/new")
        .run_cmd("echo built-motd > /etc/motd-build", user="root")
        .set_workdir("/srv")
        .set_user("user")
        .set_start_cmd("python3 /srv/server.py", wait_for_port(8080))
    )
    lines, on_logs = _logs()
    info = Template.build(t, f"{name}:v1", on_build_logs=on_logs)
    assert info.tags == ["v1"]
    assert any("[finalize] ready" in line for line in lines), lines
    assert Template.exists(name) and Template.exists(f"{name}:v1")
    assert not Template.exists(f"{name}:nope") and not Template.exists(f"missing-{name}")

    started = time.monotonic()
    sbx = Sandbox.create(f"{name}:v1")
    try:
        assert time.monotonic() - started < 60
        # the service answered before create returned: no waiting here
        r = sbx.commands.run("curl -s localhost:8080")
        assert r.stdout == "built-motd\n"
        r = sbx.commands.run(
            "cat app/hello.txt 2>/dev/null || true; cd /home/user; cat app/hello.txt; readlink app/link.txt; "
            "cat app/sub/deep.txt; stat -c '%U %a' app/hello.txt /usr/local/bin/run-demo /srv/data; run-demo; "
            "python3 -c 'import sbxdemo; print(sbxdemo.ANSWER)'; echo $GREETING/$MODE; readlink /srv/current.py; "
            "cat clone/f; ls /tmp/gone 2>&1 | head -c 0; test -e /tmp/gone || echo gone; test -e /tmp/new && echo new; "
            "whoami"
        )
        out = r.stdout.splitlines()
        assert out == [
            "hello from the context",
            "hello.txt",
            "deep",
            "user 644",
            "root 755",
            "root 750",
            "run",
            "42",
            "hello env/test",
            "/srv/server.py",
            "v1",
            "gone",
            "new",
            "user",
        ], r.stdout
        assert sbx.commands.run("pwd").stdout.strip() == "/srv"  # WORKDIR is where commands start
        # the port is reachable through sandboxd from the host, too
        host = sbx.get_host(8080)
        got = httpx.get(f"{tserver.url}/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8080"})
        assert got.text == "built-motd\n", (host, got.status_code, got.text)
    finally:
        sbx.kill()


def test_a_rebuild_that_changes_only_the_last_step_reruns_only_that_step(tserver: Server, tmp_path: Path) -> None:
    name = f"cache-{secrets.token_hex(3)}"
    (tmp_path / "f.txt").write_text("one\n")

    def template(extra: str) -> Template:
        return (
            Template(file_context_path=str(tmp_path))
            .from_template("base")
            .run_cmd(f"echo first {name} > /tmp/first")
            .run_cmd("echo second > /tmp/second")
            .copy("f.txt", f"/opt/{extra}/")
        )

    lines, on_logs = _logs()
    Template.build(template("a"), name, on_build_logs=on_logs)
    assert [line for line in lines if line.startswith("CACHED")] == []
    (tmp_path / "f.txt").write_text("two\n")
    lines, on_logs = _logs()
    started = time.monotonic()
    Template.build(template("a"), name, on_build_logs=on_logs)
    rebuild = time.monotonic() - started
    cached = [line for line in lines if line.startswith("CACHED")]
    ran = [line for line in lines if line.startswith("[") and "/3]" in line]
    assert len(cached) == 2 and "RUN echo first" in cached[0] and "RUN echo second" in cached[1], lines
    assert ran == ["[3/3] COPY f.txt /opt/a/"], lines
    sbx = Sandbox.create(name)
    try:
        assert sbx.commands.run("cat /opt/a/f.txt /tmp/second").stdout == "two\nsecond\n"
    finally:
        sbx.kill()
    print(f"cached rebuild: {rebuild:.2f} s")

    # skip_cache: every step from there on runs again
    lines, on_logs = _logs()
    Template.build(template("a"), name, on_build_logs=on_logs, skip_cache=True)
    assert not [line for line in lines if line.startswith("CACHED")], lines


def test_a_failing_step_reports_step_command_status_and_output_and_keeps_nothing(tserver: Server) -> None:
    name = f"fail-{secrets.token_hex(3)}"
    t = Template().from_base_image().run_cmd("echo fine").run_cmd("echo 'about to fail' >&2; echo more; exit 7")
    with pytest.raises(BuildException) as err:
        Template.build(t, name)
    message = str(err.value)
    assert "[2/2]" in message and "exit 7" in message and "status 7" in message, message
    assert "about to fail" in message and "more" in message, message
    assert not Template.exists(name)  # no build: the name has nothing to start
    with pytest.raises(Exception, match=r"not found|no tag|has no"):
        Sandbox.create(name)

    # a start command whose ready command never succeeds fails the build at finalize
    t = Template().from_base_image().set_start_cmd("sleep 1000", "exit 1")
    started = time.monotonic()
    with pytest.raises(BuildException, match="does not start"):
        Template.build(t, f"{name}-ready", on_build_logs=lambda e: None)
    assert time.monotonic() - started < 60  # the server's --ready-timeout


def test_build_in_background_with_status_polling_and_logs(tserver: Server) -> None:
    name = f"bg-{secrets.token_hex(3)}"
    t = Template().from_base_image().run_cmd("for i in 1 2 3; do echo line $i; sleep 0.2; done")
    info = Template.build_in_background(t, name)
    offset, messages = 0, []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = Template.get_build_status(info, logs_offset=offset)
        offset += len(status.log_entries)
        messages += [e.message for e in status.log_entries]
        if status.status.value in ("ready", "error"):
            break
        time.sleep(0.2)
    assert status.status.value == "ready", status
    assert ["line 1", "line 2", "line 3"] == [m for m in messages if m.startswith("line ")]
    # a finished build's logs stay; an offset past the end gives none
    again = Template.get_build_status(info, logs_offset=0)
    assert len(again.log_entries) == offset
    assert Template.get_build_status(info, logs_offset=offset).log_entries == []


def test_tags_and_names(tserver: Server) -> None:
    name = f"tags-{secrets.token_hex(3)}"
    Template.build(Template().from_base_image().run_cmd("echo one > /v", user="root"), f"{name}:one", tags=["first"])
    Template.build(Template().from_base_image().run_cmd("echo two > /v", user="root"), f"{name}:two")
    assert Template.exists(f"{name}:one") and Template.exists(f"{name}:first") and Template.exists(f"{name}:two")
    tags = {t.tag: t.build_id for t in Template.get_tags(name)}
    assert set(tags) >= {"one", "first", "two"}
    assert tags["one"] == tags["first"] != tags["two"]

    assigned = Template.assign_tags(f"{name}:two", ["prod"])
    assert assigned.tags == ["prod"] and assigned.build_id == tags["two"]
    for tag, want in (("one", "one"), ("prod", "two")):
        sbx = Sandbox.create(f"{name}:{tag}")
        try:
            assert sbx.commands.run("cat /v", user="root").stdout == want + "\n"
        finally:
            sbx.kill()
    Template.remove_tags(name, ["prod"])
    assert not Template.exists(f"{name}:prod")

    # the template API lists it; deleting removes its names, tags and builds
    headers = {"X-API-KEY": tserver.api_key}
    listed = httpx.get(f"{tserver.url}/templates", headers=headers).json()
    mine = [t for t in listed if name in t["names"]]
    assert len(mine) == 1 and "one" in mine[0]["tags"]
    detail = httpx.get(f"{tserver.url}/templates/{name}", headers=headers).json()
    assert [b["status"] for b in detail["builds"]] == ["ready", "ready"]
    assert {b["buildID"] for b in detail["builds"]} == {tags["one"], tags["two"]}
    assert httpx.delete(f"{tserver.url}/templates/{name}", headers=headers).status_code == 204
    assert not Template.exists(name) and not Template.exists(f"{name}:one")
    assert httpx.delete(f"{tserver.url}/templates/{name}", headers=headers).status_code == 404


def test_builtin_names_are_not_taken_and_bad_names_are_refused(tserver: Server) -> None:
    with pytest.raises(Exception, match="built-in"):
        Template.build(Template().from_base_image().run_cmd("true"), "base")
    with pytest.raises(Exception, match="not valid"):
        Template.build(Template().from_base_image().run_cmd("true"), "../etc")
    with pytest.raises(BuildException, match=r"pulls no images|registry"):
        Template.build(Template().from_image("quay.io/someone/thing:1"), f"img-{secrets.token_hex(3)}")


def test_ready_file_helper_and_template_resources(tserver: Server) -> None:
    name = f"res-{secrets.token_hex(3)}"
    t = (
        Template()
        .from_base_image()
        .set_start_cmd("sleep 0.5; touch /tmp/ready; sleep 1000", wait_for_file("/tmp/ready"))
    )
    Template.build(t, name, cpu_count=2, memory_mb=768)
    started = time.monotonic()
    sbx = Sandbox.create(name)
    try:
        assert sbx.commands.run("test -f /tmp/ready && echo ready").stdout == "ready\n"
        info = sbx.get_info()
        assert info.memory_mb == 768 and info.cpu_count == min(2, os.cpu_count() or 1)
    finally:
        sbx.kill()
    print(f"create with a 0.5 s ready wait: {time.monotonic() - started:.2f} s")


def test_the_upload_url_is_signed(tserver: Server, tmp_path: Path) -> None:
    name = f"up-{secrets.token_hex(3)}"
    headers = {"X-API-KEY": tserver.api_key}
    created = httpx.post(f"{tserver.url}/v3/templates", json={"name": name}, headers=headers)
    assert created.status_code == 202, created.text
    tid = created.json()["templateID"]
    digest = "ab" * 32
    link = httpx.get(f"{tserver.url}/templates/{tid}/files/{digest}", headers=headers).json()
    assert link["present"] is False and "token=" in link["url"]
    body = io.BytesIO(b"not a tar")
    bare = link["url"].split("?")[0]
    assert httpx.put(bare, content=body.getvalue()).status_code == 403
    assert httpx.put(bare + "?token=1999999999.00", content=b"x").status_code == 403
    other = link["url"].replace(digest, "cd" * 32)
    assert httpx.put(other, content=b"x").status_code == 403  # a token is for one template and one hash
    assert httpx.put(link["url"], content=body.getvalue()).status_code == 200
    assert httpx.get(f"{tserver.url}/templates/{tid}/files/{digest}", headers=headers).json()["present"] is True
    # a COPY of files that are not a tar fails the build with a clear reason
    build = {"steps": [{"type": "COPY", "args": ["x", "/x", "", ""], "force": False, "filesHash": digest}]}
    r = httpx.post(f"{tserver.url}/v2/templates/{tid}/builds/{created.json()['buildID']}", json=build, headers=headers)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = httpx.get(
            f"{tserver.url}/templates/{tid}/builds/{created.json()['buildID']}/status", headers=headers
        ).json()
        if st["status"] in ("ready", "error"):
            break
        time.sleep(0.1)
    assert st["status"] == "error" and "not a tar archive" in st["reason"]["message"], st


DOCKERFILE = """\
# a Dockerfile with what E2B's converter takes
FROM e2bdev/base
ARG GREETING=hi
ENV APP_MODE=prod \\
    OTHER=x
WORKDIR /app
COPY app/ /app/
COPY --chown=user --chmod=0755 run.sh /usr/local/bin/run.sh
RUN echo "$GREETING built" > /app/built.txt
USER user
EXPOSE 9000
CMD ["python3", "-m", "http.server", "9000"]
"""


def test_a_dockerfile_build_with_the_cli_and_prune_keeps_layers_in_use(tserver: Server, tmp_path: Path) -> None:
    ctx = tmp_path / "df"
    (ctx / "app").mkdir(parents=True)
    (ctx / "app" / "index.html").write_text("from the dockerfile\n")
    (ctx / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    name = f"df-{secrets.token_hex(3)}"
    templates: Path = tserver.templates  # type: ignore[attr-defined]
    cmd = [
        SANDBOXD,
        "template",
        "build",
        "-f",
        str(ctx / "Dockerfile"),
        "--name",
        name,
        "--tag",
        "v1",
        "--url",
        tserver.url,
        "--api-key",
        tserver.api_key,
        "--templates-dir",
        str(templates),
        "--ready-cmd",
        '[ -n "$(ss -Htuln sport = :9000)" ]',
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "built" in res.stderr and "RUN echo" in res.stderr, res.stderr
    sbx = Sandbox.create(f"{name}:v1")
    try:
        r = sbx.commands.run(
            "curl -s localhost:9000/built.txt; curl -s localhost:9000/index.html; run.sh; echo $APP_MODE $OTHER; "
            "whoami; pwd; stat -c '%U %a' /usr/local/bin/run.sh"
        )
        assert r.stdout.splitlines() == [
            "hi built",
            "from the dockerfile",
            "ran",
            "prod x",
            "user",
            "/app",
            "user 755",
        ], r.stdout
        # the same file again: every step is cached
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stderr.count("CACHED") >= 4, res.stderr
        # list (layers and sizes) and the last build's log
        listed = subprocess.run(
            [SANDBOXD, "template", "list", "--layers", "--templates-dir", str(templates)],
            capture_output=True,
            text=True,
        ).stdout
        row = next(line for line in listed.splitlines() if line.startswith(name))
        assert "tags=default,v1" in row and " layers" in row and " MB" in row, listed
        assert "RUN echo" in listed and "COPY run.sh" in listed, listed
        log = subprocess.run(
            [SANDBOXD, "template", "logs", name, "--templates-dir", str(templates)], capture_output=True, text=True
        ).stdout
        assert "CACHED [" in log and "status: ready" in log, log
        # remove the template and prune while a sandbox of it runs: its layers stay
        layers = {p.name for p in (templates / ".layers").iterdir() if not p.name.startswith(".")}
        for args in (["rm", name], ["prune"]):
            res = subprocess.run(
                [SANDBOXD, "template", *args, "--templates-dir", str(templates)], capture_output=True, text=True
            )
            assert res.returncode == 0, res.stderr
        assert not Template.exists(name)
        assert sbx.commands.run("cat /app/built.txt").stdout == "hi built\n"
        after = {p.name for p in (templates / ".layers").iterdir() if not p.name.startswith(".")}
        in_use = layers - after
        assert after, "the running sandbox's layers were pruned"
    finally:
        sbx.kill()
    # once the sandbox is gone (and the pool has let go of the removed template's idle ones), prune takes them
    final = after
    for _ in range(20):
        res = subprocess.run(
            [SANDBOXD, "template", "prune", "--templates-dir", str(templates)], capture_output=True, text=True
        )
        assert res.returncode == 0 and "removed" in res.stderr, res.stderr
        final = {p.name for p in (templates / ".layers").iterdir() if not p.name.startswith(".")}
        if len(final) < len(after):
            break
        time.sleep(0.5)
    assert len(final) < len(after), (in_use, after, final)


def test_resources_per_create_through_reserved_metadata(tserver: Server) -> None:
    sbx = Sandbox.create("base", metadata={"sandboxd.memory_mb": "768", "sandboxd.cpus": "2"})
    try:
        info = sbx.get_info()
        assert info.memory_mb == 768 and info.cpu_count == min(2, os.cpu_count() or 1)
        total_kib = int(sbx.commands.run("grep MemTotal /proc/meminfo").stdout.split()[1])
        assert total_kib == 768 * 1024
    finally:
        sbx.kill()
    for bad, message in (
        ({"sandboxd.memory_mb": str(1 << 30)}, "at most"),
        ({"sandboxd.memory_mb": "lots"}, "sandboxd.memory_mb"),
        ({"sandboxd.cpus": "0"}, "sandboxd.cpus"),
        ({"sandboxd.cpus": "1000"}, "at most"),
    ):
        with pytest.raises(Exception, match=message):
            Sandbox.create("base", metadata=bad)


def test_skip_cache_mid_chain_reruns_from_there_on(tserver: Server) -> None:
    name = f"mid-{secrets.token_hex(3)}"

    def template(skip: bool) -> Template:
        t = Template().from_base_image().run_cmd(f"echo {name} one > /tmp/one")
        if skip:
            t = t.skip_cache()
        return t.run_cmd("echo two > /tmp/two").run_cmd("echo three > /tmp/three")

    Template.build(template(False), name)
    lines, on_logs = _logs()
    Template.build(template(True), name, on_build_logs=on_logs)
    cached = [line for line in lines if line.startswith("CACHED")]
    ran = [line for line in lines if line.startswith("[") and "/3]" in line]
    assert len(cached) == 1 and "one" in cached[0], lines
    assert len(ran) == 2 and "two" in ran[0] and "three" in ran[1], lines


def _entries(info: object) -> list:
    entries: list = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = Template.get_build_status(info, logs_offset=len(entries))
        entries += status.log_entries
        if status.status.value in ("ready", "error"):
            assert status.status.value == "ready", status
            return entries
        time.sleep(0.1)
    raise AssertionError("build did not end")


def _span(entries: list, marker: str) -> tuple[object, object]:
    """When the step whose log line contains `marker` started and when it was done."""
    start = next(e.timestamp for e in entries if e.message.startswith("[1/1]") and marker in e.message)
    done = next(e.timestamp for e in entries if e.message.startswith("done [1/1]") and marker in e.message)
    return start, done


def test_builds_of_one_template_take_turns_and_of_two_templates_overlap(tserver: Server) -> None:
    a, b = f"turn-a-{secrets.token_hex(3)}", f"turn-b-{secrets.token_hex(3)}"

    def slow(tag: str) -> Template:
        return Template().from_base_image().run_cmd(f"echo {tag}; sleep 1.5")

    # the same template twice at once: the second build's step starts after the first one's is done
    first = Template.build_in_background(slow("first"), a)
    second = Template.build_in_background(slow("second"), a)
    e1, e2 = _entries(first), _entries(second)
    s1, d1 = _span(e1, "first")
    s2, d2 = _span(e2, "second")
    assert d1 <= s2 or d2 <= s1, (s1, d1, s2, d2)
    assert any("waiting for the running build" in e.message for e in e1 + e2)
    # two templates at once: their steps run side by side
    one = Template.build_in_background(slow("left"), a)
    other = Template.build_in_background(slow("right"), b)
    e1, e2 = _entries(one), _entries(other)
    s1, d1 = _span(e1, "left")
    s2, d2 = _span(e2, "right")
    assert s1 < d2 and s2 < d1, (s1, d1, s2, d2)


def test_a_template_built_on_the_code_interpreter_keeps_its_interpreter(tserver: Server, tmp_path: Path) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    make_wheel(tmp_path, "sbxextra", "VALUE = 'extended'\n")
    name = f"ci-ext-{secrets.token_hex(3)}"
    t = (
        Template(file_context_path=str(tmp_path))
        .from_template("code-interpreter-v1")
        .copy("sbxextra-1.0-py3-none-any.whl", "/tmp/w/")
        .pip_install("/tmp/w/sbxextra-1.0-py3-none-any.whl")
    )
    Template.build(t, name)
    sbx = CodeSandbox.create(template=name)
    try:
        execution = sbx.run_code("import sbxextra, numpy; sbxextra.VALUE + ' ' + str(numpy.int64(2) * 21)")
        assert execution.error is None, execution.error
        assert execution.text == "'extended 42'"
        assert sbx.get_info().memory_mb == 1024  # the code interpreter's default, kept
    finally:
        sbx.kill()


def test_the_sdks_own_dockerfile_conversion(tserver: Server, tmp_path: Path) -> None:
    (tmp_path / "conf.txt").write_text("conf\n")
    dockerfile = (
        "FROM e2bdev/base\nARG LEVEL=3\nENV LEVEL=$LEVEL\nRUN mkdir -p /etc/app\n"
        "COPY --chown=user conf.txt /etc/app/\nWORKDIR /etc/app\n"
    )
    name = f"sdk-df-{secrets.token_hex(3)}"
    Template.build(Template(file_context_path=str(tmp_path)).from_dockerfile(dockerfile), name)
    sbx = Sandbox.create(name)
    try:
        r = sbx.commands.run("cat conf.txt; stat -c %U conf.txt; echo $LEVEL; whoami; pwd")
        assert r.stdout.splitlines() == ["conf", "user", "3", "user", "/etc/app"], r.stdout
    finally:
        sbx.kill()


def test_a_debian_image_without_a_registry_is_made_with_mmdebstrap(tserver: Server) -> None:
    from conftest import TEMPLATES_DIR

    # made by scripts/setup.sh (`sandboxd template build debian:bookworm`): this test never fetches it
    assert list((TEMPLATES_DIR / ".debian").glob("bookworm-*/rootfs")), "run scripts/setup.sh first"
    name = f"deb-{secrets.token_hex(3)}"
    Template.build(Template().from_debian_image("bookworm").run_cmd("echo built > /tmp/mark"), name)
    sbx = Sandbox.create(name)
    try:
        r = sbx.commands.run(
            "cut -d. -f1 /etc/debian_version; cat /tmp/mark; whoami; test -e /usr/bin/git || echo minimal"
        )
        assert r.stdout.splitlines() == ["12", "built", "user", "minimal"], r.stdout
    finally:
        sbx.kill()
    for image, message in (
        ("python:3.12", "Python \\(3.11\\)"),
        ("node:lts", "Node.js \\(18\\)"),
        ("ubuntu:24.04", "Ubuntu"),
    ):
        with pytest.raises(BuildException, match=message):
            Template.build(Template().from_image(image), f"img-{secrets.token_hex(3)}")


def test_apt_pip_and_npm_install_from_the_labs_repositories(tserver: Server, lab: Lab) -> None:
    """The builder methods that reach package repositories, against the lab's (tests/packages.py): an apt
    repository, a PEP 503 index and an npm registry inside the lab's namespace."""
    prepare_repos(lab.dir)
    name = f"pkgs-{secrets.token_hex(3)}"
    t = (
        Template()
        .from_base_image()
        .run_cmd(APT_SOURCES, user="root")
        .apt_install(["sbx-hello"])
        .set_envs({**PIP_ENV, **NPM_ENV})
        .pip_install(["sbxdemo"])
        .npm_install(["sbxdemo"])
        .npm_install(["sbxdemo"], g=True)
    )
    Template.build(t, name)
    sbx = Sandbox.create(name)
    try:
        r = sbx.commands.run(
            "sbx-hello; python3 -c 'import sbxdemo; print(sbxdemo.ANSWER)'; "
            "node -e 'console.log(require(\"sbxdemo\").answer)'; ls /usr/local/lib/node_modules"
        )
        assert r.stdout.splitlines() == ["hello from apt", "42", "42", "sbxdemo"], r.stdout
    finally:
        sbx.kill()
