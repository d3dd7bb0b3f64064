"""A hostile tenant builds templates: archives that try to leave the build context or write through a
symlink onto the host, steps that try to outlive their sandbox or take the host's memory, names and
users that try to escape their fields. Each attack is answered by the kernel or a clear error, and
the host is left as it was."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

from conftest import Server, builder_server

UID_SHIFT = 100000


@pytest.fixture(scope="module")
def tserver(tmp_path_factory: pytest.TempPathFactory, lab: object) -> Iterator[Server]:
    with builder_server(tmp_path_factory.mktemp("tattack")) as srv:
        yield srv


def _build_with_archive(srv: Server, steps_for: object, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> dict:
    """Request a build, upload `members` as the COPY archive (not what an SDK would make), run it."""
    headers = {"X-API-KEY": srv.api_key}
    created = httpx.post(f"{srv.url}/v3/templates", json={"name": f"evil-{secrets.token_hex(3)}"}, headers=headers)
    tid, bid = created.json()["templateID"], created.json()["buildID"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    digest = "e" * 64
    link = httpx.get(f"{srv.url}/templates/{tid}/files/{digest}", headers=headers).json()
    assert httpx.put(link["url"], content=buf.getvalue()).status_code == 200
    steps = steps_for(digest)  # type: ignore[operator]
    r = httpx.post(f"{srv.url}/v2/templates/{tid}/builds/{bid}", json={"steps": steps}, headers=headers)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = httpx.get(f"{srv.url}/templates/{tid}/builds/{bid}/status", headers=headers).json()
        if st["status"] in ("ready", "error"):
            return {"templateID": tid, **st}
        time.sleep(0.1)
    raise AssertionError("build did not end")


def _file(name: str, data: bytes = b"x", **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def _copy(src: str, dest: str) -> object:
    return lambda digest: [{"type": "COPY", "args": [src, dest, "", ""], "force": False, "filesHash": digest}]


def test_archive_entries_outside_the_context_fail_the_build(tserver: Server) -> None:
    for bad in ("../../../tmp/escaped", "/etc/escaped", "app/../../escaped"):
        st = _build_with_archive(tserver, _copy("app", "/app"), [_file("app/ok"), _file(bad)])
        assert st["status"] == "error" and "outside the context" in st["reason"]["message"], st
    assert not Path("/tmp/escaped").exists() and not Path("/etc/escaped").exists()


def test_a_symlink_in_the_context_cannot_carry_a_write_onto_the_host(tserver: Server, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    st = _build_with_archive(
        tserver,
        _copy("app", "/app"),
        [_link("app/l", str(canary)), _file("app/l/pwned", b"owned"), _file("app/setuid", b"#!", mode=0o4755)],
    )
    assert list(canary.iterdir()) == []  # whatever the build did, it did inside its sandbox
    if st["status"] == "ready":
        sbx = Sandbox.create(st["templateID"])
        try:
            r = sbx.commands.run("stat -c %a /app/setuid", user="root")
            assert r.stdout.strip() == "755"  # no setuid bit comes from a build context
        finally:
            sbx.kill()


def test_layers_are_owned_by_the_sandbox_uid_range_and_kept_from_host_users(tserver: Server) -> None:
    name = f"owners-{secrets.token_hex(3)}"
    Template.build(
        Template()
        .from_base_image()
        .run_cmd("cp /bin/ls /usr/local/bin/suidls && chmod u+s /usr/local/bin/suidls", user="root"),
        name,
    )
    templates: Path = tserver.templates  # type: ignore[attr-defined]
    assert os.stat(templates).st_mode & 0o077 == 0  # host users cannot reach into layers
    found = False
    for layer in (templates / ".layers").iterdir():
        for dirpath, dirnames, filenames in os.walk(layer / "diff"):
            for entry in [*dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, entry))
                if entry == "suidls":
                    found = True
                    assert st.st_uid == UID_SHIFT and st.st_mode & 0o4000  # sandbox root's, not host root's
                if not (st.st_mode & 0o170000 == 0o020000 and st.st_rdev == 0):  # whiteouts are host root's
                    assert st.st_uid >= UID_SHIFT and st.st_gid >= UID_SHIFT, (dirpath, entry, st.st_uid)
    assert found


def test_a_step_cannot_leave_processes_behind(tserver: Server) -> None:
    marker = f"sbx-linger-{secrets.token_hex(4)}"
    Template.build(
        Template()
        .from_base_image()
        .run_cmd(f"bash -c 'exec -a {marker} sleep 1000' & setsid sleep 1000 & echo started"),
        f"linger-{secrets.token_hex(3)}",
    )
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in out


def test_a_step_is_held_to_its_memory_limit_by_the_kernel(tserver: Server) -> None:
    t = Template().from_base_image().run_cmd("python3 -c 'b = bytearray(8 << 30); print(len(b))'")
    with pytest.raises(BuildException) as err:
        Template.build(t, f"hog-{secrets.token_hex(3)}", memory_mb=256)
    assert "status" in str(err.value)  # killed (or MemoryError): not the host's memory


def test_names_users_and_steps_that_try_to_escape_their_fields(tserver: Server) -> None:
    headers = {"X-API-KEY": tserver.api_key}
    for name in ("../x", "a/../../b", ".hidden", "x" * 300, "UPPER", "a/b/c", "n:../t"):  # (base: 403, below)
        r = httpx.post(f"{tserver.url}/v3/templates", json={"name": name}, headers=headers)
        assert r.status_code == 400, (name, r.text)
    created = httpx.post(f"{tserver.url}/v3/templates", json={"name": f"f-{secrets.token_hex(3)}"}, headers=headers)
    tid, bid = created.json()["templateID"], created.json()["buildID"]
    bad_steps = [
        {"type": "RUN", "args": ["true", "root; rm -rf /"]},
        {"type": "USER", "args": ["../../etc"]},
        {"type": "ENV", "args": ["A=B", "x"]},
        {"type": "WORKDIR", "args": ["relative"]},
        {"type": "COPY", "args": ["a", "/b", "", ""], "filesHash": "../../../etc/passwd"},
        {"type": "COPY", "args": ["a", "/b", "", ""], "filesHash": "f" * 64},  # never uploaded
        {"type": "EXEC", "args": ["x"]},
        {"type": "RUN", "args": ["x" * (300 * 1024)]},
    ]
    for step in bad_steps:
        r = httpx.post(f"{tserver.url}/v2/templates/{tid}/builds/{bid}", json={"steps": [step]}, headers=headers)
        assert r.status_code == 400, (step["type"], r.text)
    r = httpx.get(f"{tserver.url}/templates/{tid}/files/..%2F..%2Fetc", headers=headers)
    assert r.status_code in (400, 404, 405)  # never a file
    r = httpx.get(f"{tserver.url}/templates/{tid}/builds/..%2F..%2Fmeta/status", headers=headers)
    assert r.status_code in (404, 405)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak: what reading the output cost at its worst
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_step_that_floods_output_without_newlines_costs_the_server_no_memory(tserver: Server) -> None:
    before = _peak_rss_kib(tserver.proc.pid)
    lines: list[str] = []
    flood = "head -c 300000000 /dev/zero | tr '\\\\0' x; echo; echo the-end"
    Template.build(
        Template().from_base_image().run_cmd(flood),
        f"flood-{secrets.token_hex(3)}",
        on_build_logs=lambda e: lines.append(e.message),
    )
    grown = _peak_rss_kib(tserver.proc.pid) - before
    assert grown < 150 * 1024, f"the server's peak memory grew by {grown} KiB"
    assert any("log truncated" in line for line in lines)
    assert sum(len(line) for line in lines) < 8 << 20


def test_builds_beyond_the_servers_limit_wait_their_turn(tserver: Server) -> None:
    infos = [
        Template.build_in_background(
            Template().from_base_image().run_cmd(f"echo {i}; sleep 1"), f"q{i}-{secrets.token_hex(3)}"
        )
        for i in range(3)
    ]
    messages = []
    for info in infos:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = Template.get_build_status(info, logs_offset=0)
            if st.status.value in ("ready", "error"):
                break
            time.sleep(0.2)
        assert st.status.value == "ready", st
        messages += [e.message for e in st.log_entries]
    assert any("builds running to end" in m for m in messages), messages


def test_a_client_cannot_rebuild_retag_or_delete_a_built_in_template(tserver: Server) -> None:
    """Built-in templates are every tenant's: the API refuses to build over them, tag or untag them, or
    delete them, and a build may not give its template a service of sandboxd's own."""
    headers = {"X-API-KEY": tserver.api_key}
    for name in ("base", "code-interpreter-v1", "httpbin", "base:evil"):
        r = httpx.post(f"{tserver.url}/v3/templates", json={"name": name}, headers=headers)
        assert r.status_code == 403 and "built-in" in r.json()["message"], (name, r.text)
    for name in ("base", "code-interpreter-v1"):
        r = httpx.post(f"{tserver.url}/templates/tags", json={"target": name, "tags": ["evil"]}, headers=headers)
        assert r.status_code == 403, r.text
        untag = {"name": name, "tags": ["default"]}
        r = httpx.request("DELETE", f"{tserver.url}/templates/tags", json=untag, headers=headers)
        assert r.status_code == 403, r.text
        r = httpx.delete(f"{tserver.url}/templates/{name}", headers=headers)
        assert r.status_code == 403, r.text
        assert httpx.get(f"{tserver.url}/templates/{name}", headers=headers).status_code == 200
    name = "svc-" + secrets.token_hex(3)
    created = httpx.post(f"{tserver.url}/v3/templates", json={"name": name}, headers=headers)
    tid, bid = created.json()["templateID"], created.json()["buildID"]
    r = httpx.post(
        f"{tserver.url}/v2/templates/{tid}/builds/{bid}",
        json={"steps": [], "service": ["/bin/sh", "-c", "id"]},
        headers=headers,
    )
    assert r.status_code == 400 and "service" in r.json()["message"], r.text
    sbx = Sandbox.create("base", timeout=30)  # base still works for everyone
    try:
        assert sbx.commands.run("whoami").stdout == "user\n"
    finally:
        sbx.kill()
