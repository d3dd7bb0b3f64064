"""Hostile paths: every file operation a client can ask for, aimed outside the sandbox.

Each case tries to reach something it must not (the host's files, the server's data directory, the
template's rootfs, another sandbox, a file its user may not touch) through the official SDK (sync and
async) or raw HTTP, and asserts that the attempt fails or stays confined inside the sandbox, then checks
that nothing outside changed (host markers by content, existence and mtime; the other sandbox's files).
Every loop is bounded in iterations and time; traffic goes only to the test server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import FileNotFoundException

from conftest import Server, host_pids_of, run_as, template_layers, upper_on_host

HOST_SECRET_PREFIX = "HOST-SECRET-"
HOME = "/home/user"


# -- helpers ------------------------------------------------------------------------------------------


def run_root(sbx: Sandbox, cmd: str, timeout: float = 30) -> tuple[int, str, str]:
    return run_as(sbx, cmd, "root", timeout)


def sandbox_cat(sbx: Sandbox, path: str) -> str | None:
    """A file's content as the sandbox's root sees it (None if it does not exist there)."""
    _, out, _ = run_root(sbx, f"cat '{path}' 2>/dev/null || echo __missing__")
    return None if out == "__missing__\n" else out


def envd_headers(sbx: Sandbox | AsyncSandbox) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token or ""}


def attempt(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, result) or (False, exception): for operations whose only requirement is confinement."""
    try:
        return True, fn()
    except Exception as e:
        return False, e


def refused(fn: Callable[[], Any]) -> Exception:
    """The operation must fail (any error: the exact kind is not what these tests are about)."""
    ok, got = attempt(fn)
    assert not ok, f"expected a refusal, got {got!r}"
    return got


async def arefused(awaitable: Awaitable[Any]) -> Exception:
    try:
        got = await awaitable
    except Exception as e:
        return e
    raise AssertionError(f"expected a refusal, got {got!r}")


def fails_quickly(fn: Callable[[], Any], limit: float = 10.0) -> Exception:
    start = time.monotonic()
    with pytest.raises(Exception) as exc:
        fn()
    took = time.monotonic() - start
    assert took < limit, f"the error took {took:.1f}s"
    return exc.value  # type: ignore[return-value]


def file_state(p: Path) -> tuple[bool, bytes | None, int | None, int | None]:
    try:
        st = p.lstat()
    except FileNotFoundError:
        return False, None, None, None
    data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return True, data, st.st_mtime_ns, st.st_mode


@dataclass
class HostMarkers:
    """Unique files on the host that no sandbox may read, list, stat, overwrite or delete."""

    secret: str
    tmp_file: Path
    data_file: Path
    tmp_dir: Path
    watched: list[Path] = field(default_factory=list)
    before: dict[Path, object] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [self.tmp_file, self.data_file, self.tmp_dir / "inner"]

    def snapshot(self) -> None:
        self.before = {p: file_state(p) for p in self.watched}
        self.before[self.tmp_dir] = sorted(os.listdir(self.tmp_dir))

    def assert_untouched(self) -> None:
        for p in self.watched:
            assert file_state(p) == self.before[p], f"host file {p} was changed"
        assert sorted(os.listdir(self.tmp_dir)) == self.before[self.tmp_dir], "host marker dir was changed"

    def assert_not_leaked(self, value: object) -> None:
        text = value.decode(errors="replace") if isinstance(value, bytes | bytearray) else str(value)
        assert self.secret not in text, f"host content leaked: {text[:200]!r}"
        assert HOST_SECRET_PREFIX not in text, f"host content leaked: {text[:200]!r}"


@pytest.fixture
def markers(server: Server) -> Iterator[HostMarkers]:
    tag = uuid.uuid4().hex
    secret = f"{HOST_SECRET_PREFIX}{tag}"
    m = HostMarkers(
        secret=secret,
        tmp_file=Path(f"/tmp/hostile-marker-{tag}"),
        data_file=server.data_dir / f"hostile-marker-{tag}",
        tmp_dir=Path(f"/tmp/hostile-dir-{tag}"),
    )
    m.tmp_file.write_text(secret)
    m.data_file.write_text(secret)
    m.tmp_dir.mkdir()
    (m.tmp_dir / "inner").write_text(secret)
    # the host's own sensitive files: read-only checks (content hash and mtime)
    m.watched = [*m.files, Path("/etc/shadow"), Path("/etc/hostname"), Path("/etc/passwd")]
    m.snapshot()
    try:
        yield m
        m.assert_untouched()
    finally:
        for p in m.files:
            p.unlink(missing_ok=True)
        for p in sorted(m.tmp_dir.rglob("*"), reverse=True):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        m.tmp_dir.rmdir()


def escapes(path: str) -> list[str]:
    """Ways of spelling a host path from inside a sandbox."""
    return [
        f"/../../../..{path}",
        f"../../../../../../..{path}",
        f"{HOME}/../../../../../..{path}",
        f"/proc/self/root/../../..{path}",
        f"/proc/1/root/../..{path}",
        f"~/../../../../../..{path}",
    ]


def overlay_dirs(server: Server, sandbox_id: str) -> tuple[list[Path], Path]:
    """(lower layers, upper dir) of a sandbox's root overlay on the host (the sandbox's mountinfo names
    them only by relative names, so they come from the layout of the data and template dirs)."""
    lowers = [layer.resolve() for layer in template_layers("base")]
    return lowers, server.data_dir / "sandboxes" / sandbox_id / "upper"


# -- `..` traversal ---------------------------------------------------------------------------------
def test_dotdot_read_gives_the_sandboxs_files(sandbox: Sandbox, markers: HostMarkers) -> None:
    hostname = sandbox.files.read("/home/user/../../../../../etc/hostname")
    assert hostname.strip() == sandbox.sandbox_id
    assert hostname.strip() != socket.gethostname()
    for user in ("user", "root"):
        hn = sandbox.files.read("../../../../../../etc/hostname", user=user)  # type: ignore[arg-type]
        assert hn.strip() == sandbox.sandbox_id
    # the sandbox's /etc/shadow: denied to `user`, and as root it is the sandbox's, not the host's
    refused(lambda: sandbox.files.read("../../../../etc/shadow"))
    shadow = sandbox.files.read("../../../../etc/shadow", user="root")
    assert shadow == sandbox_cat(sandbox, "/etc/shadow")
    assert shadow.encode() != Path("/etc/shadow").read_bytes()
    # listing `/` through `..` shows the sandbox's root
    names = {e.name for e in sandbox.files.list("/home/user/../../../../..")}
    _, ls, _ = run_root(sandbox, "ls -A /")
    assert names == set(ls.split())


def test_dotdot_cannot_read_stat_or_list_host_markers(sandbox: Sandbox, markers: HostMarkers) -> None:
    for user in ("user", "root"):
        for host_path in (markers.tmp_file, markers.data_file, markers.tmp_dir / "inner"):
            for p in escapes(str(host_path)):
                ok, got = attempt(lambda p=p, user=user: sandbox.files.read(p, user=user))
                assert not ok, f"read {p} as {user}: {got!r}"
                ok, got = attempt(lambda p=p, user=user: sandbox.files.get_info(p, user=user))
                assert not ok, f"stat {p} as {user}: {got!r}"
                ok, got = attempt(lambda p=p, user=user: sandbox.files.exists(p, user=user))
                assert not ok or got is False, p
        for d in (markers.tmp_dir, markers.data_file.parent):
            for p in escapes(str(d)):
                refused(lambda p=p, user=user: sandbox.files.list(p, user=user))  # type: ignore[arg-type]
        # the sandbox's own /tmp, whatever the spelling, never shows host entries
        for p in escapes("/tmp"):
            ok, got = attempt(lambda p=p, user=user: sandbox.files.list(p, user=user))
            if ok:
                entries = {e.name for e in got}
                assert markers.tmp_file.name not in entries and markers.tmp_dir.name not in entries
    markers.assert_untouched()


def test_dotdot_write_make_dir_rename_remove_stay_inside(sandbox: Sandbox, markers: HostMarkers) -> None:
    # remove first: nothing of the host may disappear
    for user in ("user", "root"):
        for host_path in (markers.tmp_file, markers.data_file, markers.tmp_dir):
            for p in escapes(str(host_path)):
                attempt(lambda p=p, user=user: sandbox.files.remove(p, user=user))
    markers.assert_untouched()
    # rename a host path away: there is no such file in the sandbox
    for p in escapes(str(markers.tmp_file)):
        refused(lambda p=p: sandbox.files.rename(p, f"{HOME}/stolen", user="root"))
    markers.assert_untouched()
    # writes and make_dir land inside the sandbox (root may create /tmp/..., /var/... there)
    for i, p in enumerate(escapes(str(markers.tmp_file))):
        for user in ("user", "root"):
            attempt(lambda p=p, user=user, i=i: sandbox.files.write(p, f"sandbox-{user}-{i}", user=user))
    for p in escapes(str(markers.data_file)):
        attempt(lambda p=p: sandbox.files.write(p, "sandbox-data", user="root"))
    for p in escapes(str(markers.tmp_dir / "inner")):
        attempt(lambda p=p: sandbox.files.write(p, "sandbox-inner", user="root"))
    for p in escapes(str(markers.tmp_dir / "made")):
        attempt(lambda p=p: sandbox.files.make_dir(p, user="root"))
    sandbox.files.write(f"{HOME}/moved", "sandbox-moved")
    attempt(lambda: sandbox.files.rename(f"{HOME}/moved", f"../../../../..{markers.tmp_dir}/moved-in"))
    markers.assert_untouched()
    assert not (markers.tmp_dir / "made").exists() and not (markers.tmp_dir / "moved-in").exists()
    # ...and they really are in the sandbox
    content = sandbox_cat(sandbox, str(markers.tmp_file))
    assert content is not None and content.startswith("sandbox-")
    assert sandbox_cat(sandbox, str(markers.data_file)) == "sandbox-data"
    assert sandbox_cat(sandbox, str(markers.tmp_dir / "inner")) == "sandbox-inner"
    assert sandbox.files.exists(str(markers.tmp_dir / "made"), user="root")


def test_dotdot_watch_sees_only_the_sandbox(sandbox: Sandbox, markers: HostMarkers) -> None:
    for p in escapes(str(markers.tmp_dir)):
        refused(lambda p=p: sandbox.files.watch_dir(p))
    handle = sandbox.files.watch_dir("../../../../../../tmp")
    try:
        host_new = Path(f"/tmp/hostile-watch-{uuid.uuid4().hex}")
        host_new.write_text("host")
        try:
            sandbox.files.write("/tmp/inside-event", "x")
            deadline = time.monotonic() + 5
            names: set[str] = set()
            while time.monotonic() < deadline and "inside-event" not in names:
                names |= {e.name for e in handle.get_new_events()}
                time.sleep(0.1)
            assert "inside-event" in names
            assert host_new.name not in names
        finally:
            host_new.unlink()
    finally:
        handle.stop()


# -- symlinks ----------------------------------------------------------------------------------------
def test_absolute_symlinks_resolve_inside_the_sandbox(sandbox: Sandbox, markers: HostMarkers) -> None:
    links = {
        "to-marker": str(markers.tmp_file),
        "to-data": str(markers.data_file),
        "to-proc1": f"/proc/1/root{markers.tmp_file}",
        "to-self-root": f"/proc/self/root/../../..{markers.tmp_file}",
        "to-shadow": "/etc/shadow",
        "to-dir": str(markers.tmp_dir),
        "to-data-dir": str(markers.data_file.parent),
    }
    cmd = "; ".join(f"ln -s '{t}' {HOME}/{n}" for n, t in links.items())
    assert run_as(sandbox, cmd, "user")[0] == 0
    for user in ("user", "root"):
        for name in ("to-marker", "to-data", "to-proc1", "to-self-root"):
            p = f"{HOME}/{name}"
            ok, got = attempt(lambda p=p, user=user: sandbox.files.read(p, user=user))
            assert not ok, f"read through {name} as {user} returned {got!r}"
            # stat describes the (dangling) link itself, never the host file behind it
            info = sandbox.files.get_info(p, user=user)  # type: ignore[arg-type]
            assert info.type is not None and info.type.value == "symlink", info
            markers.assert_not_leaked(info)
        for name in ("to-dir", "to-data-dir"):
            refused(lambda name=name, user=user: sandbox.files.list(f"{HOME}/{name}", user=user))  # type: ignore[arg-type]
            refused(lambda name=name, user=user: sandbox.files.read(f"{HOME}/{name}/inner", user=user))  # type: ignore[arg-type]
    # /etc/shadow through a link: denied to `user`; root gets the sandbox's file, never the host's
    refused(lambda: sandbox.files.read(f"{HOME}/to-shadow"))
    shadow = sandbox.files.read(f"{HOME}/to-shadow", user="root")
    assert shadow == sandbox_cat(sandbox, "/etc/shadow")
    assert shadow.encode() != Path("/etc/shadow").read_bytes()
    markers.assert_untouched()


def test_writes_through_symlinks_stay_inside(sandbox: Sandbox, markers: HostMarkers) -> None:
    run_as(
        sandbox,
        f"ln -s {markers.tmp_file} {HOME}/m; ln -s {markers.tmp_dir} {HOME}/d; ln -s /etc {HOME}/etc; "
        f"ln -s /proc/1/root{markers.tmp_dir} {HOME}/pd; ln -s {markers.data_file.parent} {HOME}/data",
        "user",
    )
    for user in ("user", "root"):
        attempt(lambda user=user: sandbox.files.write(f"{HOME}/m", f"through-link-{user}", user=user))
        for link in ("d", "pd", "data"):
            attempt(lambda link=link, user=user: sandbox.files.write(f"{HOME}/{link}/inner", "pwned", user=user))
            attempt(lambda link=link, user=user: sandbox.files.make_dir(f"{HOME}/{link}/newdir", user=user))
            attempt(lambda link=link, user=user: sandbox.files.remove(f"{HOME}/{link}/inner", user=user))
            attempt(lambda link=link, user=user: sandbox.files.rename(f"{HOME}/.profile", f"{HOME}/{link}/x"))
    markers.assert_untouched()
    assert not (markers.tmp_dir / "newdir").exists()
    assert not (markers.data_file.parent / "inner").exists()
    # a symlink to a sandbox directory: `user` may not write into /etc through it, root may (inside only)
    refused(lambda: sandbox.files.write(f"{HOME}/etc/pwned-by-user", "x"))
    assert sandbox_cat(sandbox, "/etc/pwned-by-user") is None
    sandbox.files.write(f"{HOME}/etc/written-by-root", "inside", user="root")
    assert sandbox_cat(sandbox, "/etc/written-by-root") == "inside"
    assert not Path("/etc/written-by-root").exists()
    # removing the link removes the link, not what it points at
    sandbox.files.remove(f"{HOME}/etc", user="root")
    assert sandbox_cat(sandbox, "/etc/hostname") is not None
    markers.assert_untouched()


def test_relative_symlink_chains_cannot_climb_out(sandbox: Sandbox, markers: HostMarkers) -> None:
    up = "../" * 40
    run_as(
        sandbox,
        f"cd {HOME} && mkdir -p a/b/c && ln -s ../../.. a/b/c/up && ln -s a/b/c/up/{up}tmp chain1 && "
        f"ln -s chain1/{up}tmp chain2 && ln -s chain2/{markers.tmp_file.name} chain3 && "
        f"ln -s {up}{up}{str(markers.data_file)[1:]} chain4",
        "user",
    )
    for user in ("user", "root"):
        for name in ("chain3", "chain4"):
            with pytest.raises(FileNotFoundException):
                sandbox.files.read(f"{HOME}/{name}", user=user)  # type: ignore[arg-type]
        listed = {e.name for e in sandbox.files.list(f"{HOME}/chain2", user=user)}  # type: ignore[arg-type]
        assert markers.tmp_file.name not in listed and markers.tmp_dir.name not in listed
        _, tmp, _ = run_root(sandbox, "ls -A /tmp")
        assert listed == set(tmp.split())
    for user in ("user", "root"):
        for name in ("chain3", "chain4"):
            attempt(lambda name=name, user=user: sandbox.files.write(f"{HOME}/{name}", "w", user=user))
    markers.assert_untouched()


def test_symlink_loops_error_and_do_not_hang(sandbox: Sandbox) -> None:
    run_as(sandbox, f"cd {HOME} && ln -s loop1 loop2 && ln -s loop2 loop1 && ln -s self self", "user")
    start = time.monotonic()
    for p in (f"{HOME}/loop1", f"{HOME}/self", f"{HOME}/loop1/x"):
        fails_quickly(lambda p=p: sandbox.files.read(p))
        fails_quickly(lambda p=p: sandbox.files.list(p))
        fails_quickly(lambda p=p: sandbox.files.watch_dir(p))
        fails_quickly(lambda p=p: sandbox.files.make_dir(p + "/sub"))
        fails_quickly(lambda p=p: sandbox.files.write(p + "/f", "x"))
    fails_quickly(lambda: sandbox.files.get_info(f"{HOME}/loop1/x"))
    ok, got = attempt(lambda: sandbox.files.exists(f"{HOME}/loop1/x"))
    assert not ok or got is False
    # the loop itself can be described and removed
    assert sandbox.files.get_info(f"{HOME}/loop1").symlink_target == f"{HOME}/loop1"  # unresolvable: itself
    sandbox.files.remove(f"{HOME}/loop1")
    assert time.monotonic() - start < 30


# -- TOCTOU: a path swapped while the server works on it ---------------------------------------------
SWAPPER = r"""
import os, sys, time
target, content, seconds, links = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
end, i = time.time() + seconds, 0
while time.time() < end:
    tmp = f"{target}.swap{i % 2}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    if i % 2 == 0:
        with open(tmp, "w") as f:
            f.write(content)
    else:
        os.symlink(links[(i // 2) % len(links)], tmp)
    os.replace(tmp, target)
    i += 1
"""


def start_swapper(sbx: Sandbox, target: str, content: str, links: list[str], seconds: float = 20) -> object:
    sbx.files.write("/tmp/swapper.py", SWAPPER)
    args = " ".join(f"'{a}'" for a in (target, content, str(seconds), *links))
    handle = sbx.commands.run(f"python3 /tmp/swapper.py {args}", background=True)
    deadline = time.monotonic() + 10
    while not sbx.files.exists(target) and time.monotonic() < deadline:
        time.sleep(0.05)
    return handle


def test_toctou_symlink_swap_during_reads(sandbox: Sandbox, markers: HostMarkers) -> None:
    target = f"{HOME}/swapped"
    shadow_line = sandbox_cat(sandbox, "/etc/shadow").splitlines()[0]  # type: ignore[union-attr]
    handle = start_swapper(
        sandbox, target, "sandbox-regular", [str(markers.tmp_file), "/etc/shadow", f"/proc/1/root{markers.tmp_file}"]
    )
    try:
        seen: set[str] = set()
        errors = 0
        deadline = time.monotonic() + 20
        for i in range(200):
            if time.monotonic() > deadline:
                break
            ok, got = attempt(lambda: sandbox.files.read(target))
            if ok:
                markers.assert_not_leaked(got)
                assert shadow_line not in str(got), "`user` read the sandbox's /etc/shadow"
                seen.add(str(got))
            else:
                errors += 1
            if i % 10 == 0:
                ok, info = attempt(lambda: sandbox.files.get_info(target))
                if ok:
                    markers.assert_not_leaked(info)
        assert seen <= {"sandbox-regular"}, seen
        assert seen and errors, "the swap was not exercised: both outcomes should have been seen"
    finally:
        handle.kill()  # type: ignore[attr-defined]
    markers.assert_untouched()


def test_toctou_symlink_swap_during_root_reads_and_writes(sandbox: Sandbox, markers: HostMarkers) -> None:
    target = f"{HOME}/swapped-w"
    handle = start_swapper(sandbox, target, "sandbox-regular", [str(markers.tmp_file), str(markers.data_file)])
    try:
        deadline = time.monotonic() + 20
        for i in range(150):
            if time.monotonic() > deadline:
                break
            user = "root" if i % 2 else "user"
            ok, got = attempt(lambda user=user: sandbox.files.read(target, user=user))  # type: ignore[arg-type]
            if ok:
                markers.assert_not_leaked(got)
            attempt(lambda i=i, user=user: sandbox.files.write(target, f"client-{i}", user=user))  # type: ignore[arg-type]
            if i % 25 == 0:
                markers.assert_untouched()
    finally:
        handle.kill()  # type: ignore[attr-defined]
    markers.assert_untouched()


def test_toctou_directory_swap_during_writes(sandbox: Sandbox, markers: HostMarkers) -> None:
    """`d` alternates between a symlink to a private directory and symlinks to /etc and the host's
    marker directory; `user` writes `d/f-N` meanwhile. Nothing may land in /etc or on the host."""
    run_as(sandbox, f"mkdir -p {HOME}/real", "user")
    target = f"{HOME}/d"
    # (half of the time `d` is a regular file: writes under it must fail with ENOTDIR)
    handle = start_swapper(sandbox, target, "unused", [f"{HOME}/real", "/etc", str(markers.tmp_dir)])
    try:
        deadline = time.monotonic() + 20
        for i in range(200):
            if time.monotonic() > deadline:
                break
            attempt(lambda i=i: sandbox.files.write(f"{target}/f-{i}", "client"))
            if i % 20 == 0:
                attempt(lambda i=i: sandbox.files.make_dir(f"{target}/dir-{i}"))
    finally:
        handle.kill()  # type: ignore[attr-defined]
    markers.assert_untouched()
    _, etc, _ = run_root(sandbox, "ls -A /etc")
    assert not [n for n in etc.split() if n.startswith(("f-", "dir-", ".sandboxd-upload-"))], etc
    # inside the sandbox the host marker dir does not exist, so nothing was made there either
    code, _, _ = run_root(sandbox, f"ls -A {markers.tmp_dir}")
    assert code != 0


# -- special files -----------------------------------------------------------------------------------
def test_device_files_error_quickly(sandbox: Sandbox, server: Server) -> None:
    for user in ("user", "root"):
        for dev in ("/dev/zero", "/dev/urandom", "/dev/random", "/dev/full", "/dev/tty", "/dev/ptmx", "/dev/null"):
            fails_quickly(lambda dev=dev, user=user: sandbox.files.read(dev, user=user), limit=5)  # type: ignore[arg-type]
    with httpx.Client(base_url=server.url, headers=envd_headers(sandbox), timeout=10) as http:
        for dev in ("/dev/zero", "/dev/urandom"):
            r = http.get("/files", params={"path": dev}, headers={"Range": "bytes=0-1048575"})
            assert r.status_code == 400 and len(r.content) < 4096
            r = http.get("/files", params={"path": dev, "username": "root"}, headers={"Accept-Encoding": "gzip"})
            assert r.status_code == 400 and len(r.content) < 4096
    assert httpx.get(server.url + "/health").status_code == 204
    assert sandbox.files.read("/etc/hostname").strip() == sandbox.sandbox_id


def test_refused_downloads_hold_no_server_file_descriptor(sandbox: Sandbox, server: Server) -> None:
    """A download refused for what the path is (a device, a directory, a FIFO) must not leave the file the
    broker opened open in the server: a tenant could otherwise exhaust the server's descriptors."""
    run_as(sandbox, f"mkfifo {HOME}/leakfifo", "user")
    fds = Path(f"/proc/{server.proc.pid}/fd")
    with httpx.Client(base_url=server.url, headers=envd_headers(sandbox), timeout=10) as http:
        http.get("/files", params={"path": "/dev/zero"})  # warm up whatever the first request opens
        before = len(list(fds.iterdir()))
        for _ in range(30):
            for path in ("/dev/zero", "/dev/null", HOME, f"{HOME}/leakfifo"):
                assert http.get("/files", params={"path": path}).status_code == 400
        after = len(list(fds.iterdir()))
    assert after - before < 10, f"the server holds {after - before} more descriptors after 120 refused downloads"


def test_fifos_and_sockets_do_not_hang(sandbox: Sandbox) -> None:
    run_as(
        sandbox,
        f"mkfifo {HOME}/fifo && python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.bind('{HOME}/sock')\"",
        "user",
    )
    for user in ("user", "root"):
        fails_quickly(lambda user=user: sandbox.files.read(f"{HOME}/fifo", user=user), limit=5)  # type: ignore[arg-type]
        fails_quickly(lambda user=user: sandbox.files.read(f"{HOME}/sock", user=user), limit=5)  # type: ignore[arg-type]
        fails_quickly(lambda user=user: sandbox.files.list(f"{HOME}/fifo", user=user), limit=5)  # type: ignore[arg-type]
        fails_quickly(lambda user=user: sandbox.files.watch_dir(f"{HOME}/fifo", user=user), limit=5)  # type: ignore[arg-type]
    # stat and list describe them without opening them
    names = {e.name for e in sandbox.files.list(HOME)}
    assert {"fifo", "sock"} <= names
    sandbox.files.get_info(f"{HOME}/fifo")
    # a write to the FIFO's path must finish (no reader will ever come)
    start = time.monotonic()
    attempt(lambda: sandbox.files.write(f"{HOME}/fifo", "x"))
    assert time.monotonic() - start < 10


# -- hard links --------------------------------------------------------------------------------------
def test_hard_links_cannot_reach_unseen_files(sandbox: Sandbox, server: Server, markers: HostMarkers) -> None:
    attempts = [
        f"ln /proc/1/root{markers.tmp_file} /tmp/hl1",
        f"ln {markers.tmp_file} /tmp/hl2",
        f"ln {markers.data_file} /tmp/hl3",
        f"ln /proc/self/root/../..{markers.tmp_file} /tmp/hl4",
    ]
    for pid in sorted(host_pids_of(server, sandbox.sandbox_id))[:3]:
        attempts.append(f"ln /proc/{pid}/root{markers.tmp_file} /tmp/hl-{pid}")
    for cmd in attempts:
        code, _, _ = run_root(sandbox, cmd)
        assert code != 0, f"'{cmd}' succeeded"
    for name in ("hl1", "hl2", "hl3", "hl4"):
        assert sandbox.files.exists(f"/tmp/{name}", user="root") is False
    markers.assert_untouched()


def test_hard_link_to_root_file_cannot_be_overwritten_by_user(sandbox: Sandbox) -> None:
    passwd_before = sandbox_cat(sandbox, "/etc/passwd")
    assert passwd_before and passwd_before.startswith("root:")
    # root plants hard links to root-owned files in places `user` can write
    code, _, err = run_root(
        sandbox,
        f"ln /etc/passwd {HOME}/pw-link && ln /etc/passwd /tmp/pw-link && "
        "echo root-only > /root/secret && chmod 600 /root/secret && ln /root/secret /tmp/secret-link",
    )
    assert code == 0, err
    # `user` writing through the link never changes the root-owned inode
    for p in (f"{HOME}/pw-link", "/tmp/pw-link"):
        attempt(lambda p=p: sandbox.files.write(p, "user:x:0:0::/root:/bin/sh\n"))
    assert sandbox_cat(sandbox, "/etc/passwd") == passwd_before
    # in sticky /tmp, replacing root's link is refused and the link stays intact
    assert sandbox_cat(sandbox, "/tmp/pw-link") == passwd_before
    refused(lambda: sandbox.files.read("/tmp/secret-link"))
    refused(lambda: sandbox.files.write("/tmp/secret-link", "overwritten"))
    assert sandbox_cat(sandbox, "/root/secret") == "root-only\n"
    # `user` cannot hard-link a file it cannot read (protected_hardlinks), nor read it anyway
    code, _, _ = run_as(sandbox, f"ln /root/secret {HOME}/mine 2>/dev/null || ln /etc/shadow {HOME}/mine", "user")
    if code == 0:
        refused(lambda: sandbox.files.read(f"{HOME}/mine"))


# -- permissions -------------------------------------------------------------------------------------
def test_user_is_bound_by_permissions_root_is_not(sandbox: Sandbox) -> None:
    run_root(sandbox, "echo root-only > /srv/secret && chmod 600 /srv/secret && mkdir -p /root/private")
    refused(lambda: sandbox.files.read("/srv/secret"))
    refused(lambda: sandbox.files.write("/etc/evil", "x"))
    refused(lambda: sandbox.files.write("/root/evil", "x"))
    refused(lambda: sandbox.files.write("/srv/secret", "overwritten"))
    refused(lambda: sandbox.files.make_dir("/root/evil-dir"))
    refused(lambda: sandbox.files.make_dir("/etc/evil-dir"))
    refused(lambda: sandbox.files.remove("/etc/passwd"))
    refused(lambda: sandbox.files.rename("/etc/passwd", f"{HOME}/passwd"))
    refused(lambda: sandbox.files.rename(f"{HOME}/.profile", "/etc/profile"))
    refused(lambda: sandbox.files.list("/root"))
    refused(lambda: sandbox.files.watch_dir("/root"))
    _, etc, _ = run_root(sandbox, "ls -A /etc /root; cat /srv/secret; test -f /etc/passwd && echo passwd-ok")
    assert "evil" not in etc and "root-only" in etc and "passwd-ok" in etc
    # root can do all of it, inside the sandbox
    assert sandbox.files.read("/srv/secret", user="root") == "root-only\n"
    sandbox.files.write("/etc/evil", "x", user="root")
    sandbox.files.write("/root/evil", "x", user="root")
    sandbox.files.make_dir("/root/evil-dir", user="root")
    assert {e.name for e in sandbox.files.list("/root", user="root")} >= {"evil", "evil-dir", "private"}
    sandbox.files.rename("/etc/passwd", "/etc/passwd.moved", user="root")
    sandbox.files.rename("/etc/passwd.moved", "/etc/passwd", user="root")
    sandbox.files.remove("/etc/evil", user="root")
    assert not Path("/etc/evil").exists() and not Path("/root/evil").exists()


def test_user_cannot_see_metadata_of_files_it_cannot_read(sandbox: Sandbox) -> None:
    """`user.e2b.*` xattrs of a root-only file are as private as its content: `user` cannot getxattr
    it, so neither list nor stat may hand them out (the server must not read them with its own rights)."""
    code, _, err = run_root(
        sandbox,
        "python3 -c \"import os; p='/home/user/root-only'; open(p,'w').write('x'); os.chmod(p, 0o600); "
        "os.setxattr(p, 'user.e2b.secret', b'TOPSECRET')\"",
    )
    assert code == 0, err
    code, _, _ = run_as(
        sandbox, "python3 -c \"import os; os.getxattr('/home/user/root-only', 'user.e2b.secret')\"", "user"
    )
    assert code != 0, "`user` can read the xattr directly: the premise of this test does not hold"
    entries = {e.name: e for e in sandbox.files.list(HOME)}
    assert "TOPSECRET" not in str(entries["root-only"].metadata)
    assert "TOPSECRET" not in str(sandbox.files.get_info(f"{HOME}/root-only").metadata)
    # root may see them
    root_entries = {e.name: e for e in sandbox.files.list(HOME, user="root")}
    assert root_entries["root-only"].metadata == {"secret": "TOPSECRET"}


def test_hostile_passwd_cannot_redirect_home_outside(sandbox: Sandbox, markers: HostMarkers) -> None:
    """The sandbox owns /etc/passwd: a home directory pointing at host paths stays a sandbox path."""
    code, _, err = run_root(
        sandbox,
        "python3 -c \"import sys; p='/etc/passwd'; lines=open(p).read().splitlines(); "
        "f=[l.split(':') for l in lines]; [x.__setitem__(5, sys.argv[1]) for x in f if x[0]=='user']; "
        f"open(p,'w').write(chr(10).join(':'.join(x) for x in f)+chr(10))\" /../../../..{markers.tmp_dir}",
    )
    assert code == 0, err
    assert f"/../../../..{markers.tmp_dir}:" in (sandbox_cat(sandbox, "/etc/passwd") or "")
    refused(lambda: sandbox.files.list("~"))
    refused(lambda: sandbox.files.read("inner"))
    refused(lambda: sandbox.files.read("~/inner"))
    attempt(lambda: sandbox.files.write("~/inner", "via-home"))
    attempt(lambda: sandbox.files.remove("~/inner"))
    markers.assert_untouched()
    # /etc/passwd as a symlink to a host file in passwd format: the server reads the sandbox's file
    # (here: none), so the host-only user is unknown, and `user` still works
    host_passwd = Path(f"/tmp/hostile-passwd-{uuid.uuid4().hex}")
    host_passwd.write_text("hostonly:x:0:0:host:/:/bin/sh\nuser:x:0:0:host:/:/bin/sh\n")
    try:
        code, _, err = run_root(sandbox, f"rm /etc/passwd && ln -s {host_passwd} /etc/passwd")
        assert code == 0, err
        refused(lambda: sandbox.files.read("/etc/hostname", user="hostonly"))  # type: ignore[arg-type]
        assert sandbox.files.read("/etc/hostname").strip() == sandbox.sandbox_id
        info = sandbox.files.get_info("/etc/hostname")
        assert info.owner != "hostonly", "owner names came from the host's file"
        assert sandbox.files.get_info(HOME).owner in ("user", "1000")
    finally:
        host_passwd.unlink()
    # ...and as a FIFO (last: the sandbox's own shells would block on it): the server does not hang
    run_root(sandbox, "rm /etc/passwd && mkfifo /etc/passwd")
    start = time.monotonic()
    assert sandbox.files.read("/etc/hostname").strip() == sandbox.sandbox_id
    refused(lambda: sandbox.files.read("/etc/hostname", user="hostonly"))  # type: ignore[arg-type]
    assert time.monotonic() - start < 10
    markers.assert_untouched()


def test_hostile_group_file_does_not_make_the_sandbox_look_dead(sandbox: Sandbox) -> None:
    """The sandbox owns /etc/group: a group with an unmappable GID listing `user` must not turn every file
    operation of `user` into "the sandbox was not found"."""
    from e2b.exceptions import SandboxNotRunningException

    code, _, err = run_root(sandbox, "echo 'evil:x:4000000:user' >> /etc/group && echo 'neg:x:-5:user' >> /etc/group")
    assert code == 0, err
    ok, got = attempt(lambda: sandbox.files.read("/etc/hostname"))
    assert sandbox.is_running()
    assert ok or not isinstance(got, SandboxNotRunningException), f"a live sandbox was reported dead: {got}"
    assert not ok or got.strip() == sandbox.sandbox_id
    # root (not a member) is unaffected
    assert sandbox.files.read("/etc/hostname", user="root").strip() == sandbox.sandbox_id


# -- other sandboxes ---------------------------------------------------------------------------------
def test_other_sandboxes_files_are_unreachable(server: Server) -> None:
    a = Sandbox.create(template="base", timeout=60)
    b = Sandbox.create(template="base", timeout=60)
    try:
        secret = f"a-secret-{uuid.uuid4().hex}"
        a.files.write("/tmp/a-secret", secret)
        a.files.write(f"{HOME}/a-home-secret", secret)
        _, a_upper = overlay_dirs(server, a.sandbox_id)  # its path as the sandbox's mountinfo shows it
        with upper_on_host(server, a.sandbox_id) as upper:
            assert (upper / "tmp" / "a-secret").read_text() == secret  # where it lives
        paths = [
            "/tmp/a-secret",
            f"/../../../..{a_upper}/tmp/a-secret",
            f"/proc/self/root/../..{a_upper}/tmp/a-secret",
        ]
        for pid in sorted(host_pids_of(server, a.sandbox_id)):
            paths += [f"/proc/{pid}/root/tmp/a-secret", f"/proc/{pid}/cwd/tmp/a-secret"]
        for user in ("user", "root"):
            for p in paths:
                ok, got = attempt(lambda p=p, user=user: b.files.read(p, user=user))  # type: ignore[arg-type]
                assert not ok or secret not in str(got), p
                ok, got = attempt(lambda p=p, user=user: b.files.get_info(p, user=user))  # type: ignore[arg-type]
                assert not ok, p
            for pid in sorted(host_pids_of(server, a.sandbox_id)):
                ok, got = attempt(lambda pid=pid, user=user: b.files.list(f"/proc/{pid}/root/tmp", user=user))  # type: ignore[arg-type]
                assert not ok or "a-secret" not in {e.name for e in got}  # type: ignore[attr-defined]
        # B's commands, with A's host PIDs
        for pid in sorted(host_pids_of(server, a.sandbox_id)):
            _, out, _ = run_root(b, f"cat /proc/{pid}/root/tmp/a-secret; ls /proc/*/root/tmp 2>/dev/null")
            assert secret not in out and "a-secret" not in out
        # B writing and removing at the same spellings changes nothing in A
        for p in paths:
            attempt(lambda p=p: b.files.write(p, "from-b", user="root"))
            attempt(lambda p=p: b.files.remove(p, user="root"))
        assert a.files.read("/tmp/a-secret") == secret
        assert a.files.read(f"{HOME}/a-home-secret") == secret
        # B's access token does not open A
        with httpx.Client(base_url=server.url, timeout=10) as http:
            crossed = {"E2b-Sandbox-Id": a.sandbox_id, "X-Access-Token": b._envd_access_token or ""}
            r = http.get("/files", params={"path": "/tmp/a-secret"}, headers=crossed)
            assert r.status_code == 401 and secret not in r.text
            r = http.post("/files", params={"path": "/tmp/a-secret"}, headers=crossed, files={"file": b"from-b"})
            assert r.status_code == 401
            r = http.post(
                "/filesystem.Filesystem/Stat",
                json={"path": "/tmp/a-secret"},
                headers={**crossed, "Content-Type": "application/json", "Connect-Protocol-Version": "1"},
            )
            assert r.status_code == 401
            r = http.post(
                "/filesystem.Filesystem/Remove",
                json={"path": "/tmp/a-secret"},
                headers={**crossed, "Content-Type": "application/json", "Connect-Protocol-Version": "1"},
            )
            assert r.status_code == 401
        assert a.files.read("/tmp/a-secret") == secret
    finally:
        a.kill()
        b.kill()


def with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for k, v in changes.items():
        if v is None:
            query.pop(k, None)
        else:
            query[k] = v
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_signed_urls_are_bound_to_their_sandbox_path_user_and_operation(server: Server) -> None:
    a = Sandbox.create(template="base", timeout=60)
    b = Sandbox.create(template="base", timeout=60)
    try:
        a.files.write(f"{HOME}/shared.txt", "a-content")
        b.files.write(f"{HOME}/shared.txt", "b-content")
        b_before = b.files.read(f"{HOME}/shared.txt")
        path = f"{HOME}/shared.txt"
        down = a.download_url(path)
        up = a.upload_url(path)
        down_exp = a.download_url(path, use_signature_expiration=120)
        with httpx.Client(timeout=10) as http:
            r = http.get(down)
            assert r.status_code == 200 and r.text == "a-content"  # the URL itself works
            assert http.get(down_exp).status_code == 200
            b_header = {"E2b-Sandbox-Id": b.sandbox_id}
            # A's signature presented to B
            assert http.get(down, headers=b_header).status_code == 401
            assert http.post(up, headers=b_header, files={"file": b"pwned"}).status_code == 401
            assert http.get(down_exp, headers=b_header).status_code == 401
            # tampered path, username, expiration
            for tampered in (
                with_query(down, path="/etc/shadow"),
                with_query(down, path=f"{HOME}/../../etc/shadow"),
                with_query(down, path=f"{HOME}/shared.txt/"),
                with_query(down, username="root"),
                with_query(down_exp, signature_expiration=str(int(time.time()) + 10**6)),
                with_query(down_exp, signature_expiration=None),
                with_query(down, signature="v1_" + base64.b64encode(hashlib.sha256(b"x").digest()).decode()),
                with_query(down, signature=""),
                with_query(down, signature=None),
            ):
                r = http.get(tampered)
                assert r.status_code == 401, (tampered, r.status_code, r.text)
                assert "root:" not in r.text and "a-content" not in r.text
                r = http.get(tampered, headers=b_header)
                assert r.status_code == 401 and "b-content" not in r.text
            # a read signature does not allow a write; expired signatures are refused
            assert http.post(down, files={"file": b"pwned"}).status_code == 401
            expired = a.download_url(path, use_signature_expiration=-5)
            assert http.get(expired).status_code == 401
            for tampered in (with_query(up, path="/etc/passwd"), with_query(up, username="root")):
                assert http.post(tampered, files={"file": b"pwned"}).status_code == 401
        assert a.files.read(path) == "a-content"
        assert b.files.read(path) == b_before
        assert a.files.read("/etc/passwd", user="root").startswith("root:")
    finally:
        a.kill()
        b.kill()


# -- raw HTTP uploads and the template ---------------------------------------------------------------
def test_raw_http_upload_traversal_is_confined(sandbox: Sandbox, server: Server, markers: HostMarkers) -> None:
    with httpx.Client(base_url=server.url, headers=envd_headers(sandbox), timeout=10) as http:
        evil_names = [
            f"../../../../../..{markers.tmp_file}",
            f"/../../..{markers.data_file}",
            f"{HOME}/../../../..{markers.tmp_dir}/inner",
            f"/proc/1/root{markers.tmp_file}",
        ]
        for name in evil_names:
            for user in ("user", "root"):
                # the filename of a multipart part, with no path parameter
                http.post("/files", params={"username": user}, files={"file": (name, b"via-filename")})
                # the path parameter, octet-stream body
                http.post(
                    "/files",
                    params={"path": name, "username": user},
                    content=b"via-path",
                    headers={"Content-Type": "application/octet-stream"},
                )
                r = http.get("/files", params={"path": name, "username": user})
                assert markers.secret not in r.text
        # a NUL, an empty and an over-long path
        for bad in ("/tmp/a\0b", "/tmp/" + "x" * 5000, "/tmp/" + "y" * 300):
            r = http.post(
                "/files", params={"path": bad}, content=b"x", headers={"Content-Type": "application/octet-stream"}
            )
            assert r.status_code in (400, 404), (bad[:20], r.status_code)
            assert http.get("/files", params={"path": bad}).status_code in (400, 404)
        r = http.post("/files", params={"path": ""}, content=b"x", headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 400
    markers.assert_untouched()
    # what was written landed inside the sandbox
    content = sandbox_cat(sandbox, str(markers.tmp_file))
    assert content in ("via-filename", "via-path")
    assert httpx.get(server.url + "/health").status_code == 204


def test_failed_uploads_leave_no_temporary_files(sandbox: Sandbox) -> None:
    run_root(sandbox, f"mkdir -p {HOME}/full/sub && touch {HOME}/full/sub/x && chown -R user {HOME}/full")
    failures = [
        (f"{HOME}/full", "user"),  # a non-empty directory
        ("/etc/nope", "user"),  # no permission
        (f"{HOME}/.bashrc/child", "user"),  # a parent is a file
        ("/proc/sys/kernel/hostname", "root"),  # a pseudo filesystem
        ("/sys/kernel/nope", "root"),  # read-only
    ]
    hostname = socket.gethostname()
    for path, user in failures:
        refused(lambda path=path, user=user: sandbox.files.write(path, "x", user=user))  # type: ignore[arg-type]
    _, out, _ = run_root(
        sandbox, f"find /etc /home /root /tmp -name '.sandboxd-upload-*' 2>/dev/null; ls -A {HOME}/full"
    )
    assert ".sandboxd-upload-" not in out, out
    assert out.split() == ["sub"]
    assert socket.gethostname() == hostname
    assert run_root(sandbox, "hostname")[1].strip() == sandbox.sandbox_id


def test_writes_never_reach_the_template_rootfs(sandbox: Sandbox, server: Server) -> None:
    lowers, _ = overlay_dirs(server, sandbox.sandbox_id)
    rootfs = lowers[-1]
    assert (rootfs / "etc" / "os-release").exists(), rootfs
    watched = [
        rootfs / "etc" / "os-release",
        rootfs / "etc" / "passwd",
        rootfs / "usr" / "bin" / "python3",
        rootfs / "etc",
    ]
    before = {p: file_state(p) for p in watched}
    etc_before = sorted(os.listdir(rootfs / "etc"))
    sandbox.files.write("/etc/os-release", "tampered", user="root")
    sandbox.files.write("/etc/new-from-sdk", "x", user="root")
    sandbox.files.write("/../../../../etc/passwd", "root:x:0:0::/root:/bin/sh\n", user="root")
    sandbox.files.make_dir("/usr/new-dir", user="root")
    sandbox.files.remove("/usr/bin/python3", user="root")
    sandbox.files.rename("/etc/hostname", "/etc/hostname.moved", user="root")
    # ...and through the host's spelling of the template path
    attempt(lambda: sandbox.files.write(f"/../../..{rootfs}/etc/os-release", "tampered", user="root"))
    attempt(lambda: sandbox.files.remove(f"/../../..{rootfs}/etc/passwd", user="root"))
    assert {p: file_state(p) for p in watched} == before
    assert sorted(os.listdir(rootfs / "etc")) == etc_before
    assert not (rootfs / "usr" / "new-dir").exists()
    # /etc/os-release is a symlink to ../usr/lib/os-release: the write goes through it, into the sandbox's own layer
    with upper_on_host(server, sandbox.sandbox_id) as upper:
        assert (upper / "usr" / "lib" / "os-release").read_text() == "tampered"


# -- odd paths ---------------------------------------------------------------------------------------
def test_nul_long_and_empty_paths(sandbox: Sandbox, server: Server) -> None:
    for bad in ("/etc/host\0name", "\0", f"{HOME}/\0/../../etc/shadow"):
        for op in (
            lambda p: sandbox.files.read(p),
            lambda p: sandbox.files.write(p, "x"),
            lambda p: sandbox.files.list(p),
            lambda p: sandbox.files.get_info(p),
            lambda p: sandbox.files.make_dir(p),
            lambda p: sandbox.files.remove(p),
            lambda p: sandbox.files.rename(f"{HOME}/.profile", p),
            lambda p: sandbox.files.watch_dir(p),
        ):
            fails_quickly(lambda op=op, bad=bad: op(bad))
        ok, got = attempt(lambda bad=bad: sandbox.files.exists(bad))
        assert not ok or got is False
    long_path = "/tmp/" + "a/" * 2100  # > 4096 bytes
    long_name = "/tmp/" + "n" * 300  # > NAME_MAX
    for bad in (long_path, long_name, "/" + "z" * 70000):
        fails_quickly(lambda bad=bad: sandbox.files.read(bad))
        fails_quickly(lambda bad=bad: sandbox.files.write(bad, "x"))
        fails_quickly(lambda bad=bad: sandbox.files.make_dir(bad))
        fails_quickly(lambda bad=bad: sandbox.files.get_info(bad))
        fails_quickly(lambda bad=bad: sandbox.files.list(bad))
    assert sandbox.files.exists(f"{HOME}/.profile")
    assert httpx.get(server.url + "/health").status_code == 204
    # an empty path is the user's home
    assert {e.name for e in sandbox.files.list("")} == {e.name for e in sandbox.files.list(HOME)}
    refused(lambda: sandbox.files.read(""))  # a directory


def test_tilde_is_the_users_home(sandbox: Sandbox) -> None:
    assert sandbox.files.write("~/tilde-user", "u").path == f"{HOME}/tilde-user"
    assert sandbox.files.write("~/tilde-root", "r", user="root").path == "/root/tilde-root"
    assert sandbox.files.get_info("~").path == HOME
    assert sandbox.files.get_info("~", user="root").path == "/root"
    assert sandbox.files.read("~/tilde-user") == "u"
    assert sandbox_cat(sandbox, "/root/tilde-root") == "r"
    assert sandbox.files.make_dir("~/tdir") is True
    assert sandbox.files.exists(f"{HOME}/tdir")
    # `user` reaching root's home through `~` and `..`: denied
    refused(lambda: sandbox.files.read("~/../../root/tilde-root"))
    refused(lambda: sandbox.files.list("~/../../root"))
    # `~name` is not expanded: it is a relative name in the home directory
    sandbox.files.write("~root/x", "not-root's")
    assert sandbox_cat(sandbox, f"{HOME}/~root/x") == "not-root's"
    assert sandbox_cat(sandbox, "/root/x") is None


# -- the file broker itself -------------------------------------------------------------------------
def broker_pids(sbx: Sandbox) -> list[int]:
    _, out, _ = run_root(sbx, "grep -l '^sandbox-files$' /proc/[0-9]*/comm 2>/dev/null | cut -d/ -f3")
    return [int(x) for x in out.split()]


def test_broker_process_cannot_be_hijacked_from_inside(sandbox: Sandbox) -> None:
    sandbox.files.read("/etc/hostname")
    sandbox.files.read("/etc/hostname", user="root")
    pids = broker_pids(sandbox)
    assert pids, "expected the file brokers to be visible as sandbox processes"
    ptrace = (
        'python3 -c "import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); '
        'sys.exit(0 if l.ptrace(16, int(sys.argv[1]), 0, 0) == 0 else 1)"'
    )
    for pid in pids:
        for cmd in (
            f"ls /proc/{pid}/fd/",
            f"cat /proc/{pid}/environ",
            f"ls /proc/{pid}/root/",
            f"cat /proc/{pid}/mem",
            f"readlink -e /proc/{pid}/cwd",
            f"{ptrace} {pid}",
            f"cat /proc/{pid}/fd/2",
        ):
            for user in ("root", "user"):
                code, out, _ = run_as(sandbox, cmd, user)
                assert code != 0, f"'{cmd}' as {user} succeeded: {out[:200]}"
    # the sandbox can kill its own broker: that only costs it a new one
    run_root(sandbox, "kill -9 " + " ".join(map(str, pids)))
    time.sleep(0.2)
    results = [attempt(lambda: sandbox.files.read("/etc/hostname")) for _ in range(3)]
    assert results[-1] == (True, sandbox.sandbox_id + "\n"), results
    assert sandbox.is_running()


def test_broker_command_line_shows_no_host_paths(sandbox: Sandbox, server: Server) -> None:
    """The brokers run as processes of the sandbox: their argv must not tell it host paths or host PIDs."""
    sandbox.files.read("/etc/hostname")
    sandbox.files.read("/etc/hostname", user="root")
    _, out, _ = run_as(sandbox, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '", "user")
    assert str(server.data_dir) not in out, out
    assert "/sys/fs/cgroup" not in out, out
    for pid in host_pids_of(server, sandbox.sandbox_id):
        assert f"--pid {pid}" not in out


def test_broker_magic_links_do_not_expose_host_files(sandbox: Sandbox, server: Server) -> None:
    """The broker is a host binary running in the sandbox: its /proc/self/exe (and the server's readlink
    of any /proc magic link) must not hand the sandbox a host file or a host path."""
    helpers = {p.read_bytes() for p in (server.data_dir / "bin").glob("*")}
    assert helpers
    sandbox.files.read("/etc/hostname", user="root")  # both brokers running
    run_as(sandbox, f"ln -s /proc/self/exe {HOME}/exe-link; ln -s /proc/thread-self/exe {HOME}/exe-link2", "user")
    paths = ["/proc/self/exe", "/proc/thread-self/exe", f"{HOME}/exe-link", f"{HOME}/exe-link2"]
    paths += ["/proc/1/exe", "/proc/1/cwd", "/proc/1/root", "/proc/self/cwd", "/proc/self/root"]
    paths += [f"/proc/{pid}/exe" for pid in broker_pids(sandbox)]
    leaks = []
    for user in ("user", "root"):
        for p in paths:
            ok, got = attempt(lambda p=p, user=user: sandbox.files.read(p, format="bytes", user=user))
            if ok and bytes(got) in helpers:
                leaks.append(f"read {p} as {user}: the host's {len(got)}-byte helper binary")
            ok, info = attempt(lambda p=p, user=user: sandbox.files.get_info(p, user=user))
            if ok and str(server.data_dir) in str(info.symlink_target):
                leaks.append(f"stat {p} as {user}: symlink_target {info.symlink_target}")
        ok, entries = attempt(lambda user=user: sandbox.files.list("/proc/self/map_files", user=user))
        for e in entries if ok else []:
            if str(server.data_dir) in str(e.symlink_target):
                leaks.append(f"list /proc/self/map_files as {user}: {e.symlink_target}")
                break
    assert not leaks, "\n".join(leaks)


def test_stopped_broker_is_not_reported_as_a_dead_sandbox(sandbox: Sandbox) -> None:
    """A sandbox process can SIGSTOP its own file broker (same uid). The request then fails (after the
    server's broker timeout), but it must not tell the client that the sandbox is gone."""
    from e2b.exceptions import SandboxNotRunningException

    sandbox.files.read("/etc/hostname")
    pids = broker_pids(sandbox)
    assert pids
    code, _, err = run_as(sandbox, "kill -STOP " + " ".join(map(str, pids)), "user")
    assert code == 0, err
    # root's broker is a different process: unaffected (and started only now)
    assert sandbox.files.read("/etc/hostname", user="root").strip() == sandbox.sandbox_id
    start = time.monotonic()
    ok, got = attempt(lambda: sandbox.files.read("/etc/hostname", request_timeout=45))
    took = time.monotonic() - start
    assert took < 40, f"a stopped broker held the request for {took:.0f}s"
    assert sandbox.is_running()
    # the next request gets a fresh broker
    assert sandbox.files.read("/etc/hostname").strip() == sandbox.sandbox_id
    assert ok or not isinstance(got, SandboxNotRunningException), f"a live sandbox was reported dead: {got}"


# -- async SDK ---------------------------------------------------------------------------------------
async def test_async_traversal_and_symlinks_stay_inside(async_sandbox: AsyncSandbox, markers: HostMarkers) -> None:
    sbx = async_sandbox
    hn = await sbx.files.read("/home/user/../../../../../etc/hostname")
    assert hn.strip() == sbx.sandbox_id
    await sbx.commands.run(f"ln -s {markers.tmp_file} {HOME}/m && ln -s {markers.tmp_dir} {HOME}/d")
    for user in ("user", "root"):
        for p in (f"{HOME}/m", f"{HOME}/d/inner", *escapes(str(markers.tmp_file))):
            await arefused(sbx.files.read(p, user=user))  # type: ignore[arg-type]
        for p in (f"{HOME}/d/inner", f"/../../..{markers.tmp_file}", f"{HOME}/../../..{markers.data_file}"):
            assert await sbx.files.exists(p, user=user) is False  # type: ignore[arg-type]
        await arefused(sbx.files.list(f"{HOME}/d", user=user))  # type: ignore[arg-type]
    for user in ("user", "root"):
        for p in (f"{HOME}/m", f"{HOME}/d/inner", f"/../..{markers.tmp_dir}/inner"):
            try:
                await sbx.files.write(p, "async-pwn", user=user)  # type: ignore[arg-type]
            except Exception:
                pass
            try:
                await sbx.files.remove(p, user=user)  # type: ignore[arg-type]
            except Exception:
                pass
    markers.assert_untouched()


async def test_async_watch_through_symlink_sees_only_the_sandbox(
    async_sandbox: AsyncSandbox, markers: HostMarkers
) -> None:
    import asyncio

    sbx = async_sandbox
    await sbx.commands.run(f"ln -s {markers.tmp_dir} {HOME}/hostdir && ln -s /tmp {HOME}/tmplink")
    await arefused(sbx.files.watch_dir(f"{HOME}/hostdir", on_event=lambda e: None))
    events: list[str] = []
    handle = await sbx.files.watch_dir(f"{HOME}/tmplink", on_event=lambda e: events.append(e.name))
    try:
        (markers.tmp_dir / "host-event").write_text("host")
        await sbx.files.write("/tmp/sandbox-event", "x")
        for _ in range(50):
            if "sandbox-event" in events:
                break
            await asyncio.sleep(0.1)
        assert "sandbox-event" in events
        assert "host-event" not in events
    finally:
        await handle.stop()
        (markers.tmp_dir / "host-event").unlink()


async def test_async_other_sandbox_with_crossed_token(async_sandbox: AsyncSandbox, server: Server) -> None:
    other = await AsyncSandbox.create(template="base", timeout=60)
    try:
        await other.files.write("/tmp/other-secret", "other-secret")
        headers = {"E2b-Sandbox-Id": other.sandbox_id, "X-Access-Token": async_sandbox._envd_access_token or ""}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            r = await http.get("/files", params={"path": "/tmp/other-secret", "username": "root"}, headers=headers)
            assert r.status_code == 401 and "other-secret" not in r.text
            url = async_sandbox.download_url("/tmp/other-secret")
            r = await http.get(url, headers={"E2b-Sandbox-Id": other.sandbox_id})
            assert r.status_code == 401
            r = await http.get(url)
            assert r.status_code == 404  # the URL is for async_sandbox, which has no such file
        with pytest.raises(FileNotFoundException):
            await async_sandbox.files.read("/tmp/other-secret")
        assert await other.files.read("/tmp/other-secret") == "other-secret"
    finally:
        await other.kill()
