"""envd filesystem service and /files through the official SDK (sync and async) and plain HTTP."""

from __future__ import annotations

import gzip
import io
import time
import urllib.error
import urllib.request

import httpx
import pytest
from e2b import AsyncSandbox, FilesystemEventType, FileType, Sandbox
from e2b.exceptions import FileNotFoundException, InvalidArgumentException, SandboxException

from conftest import Server


def test_write_and_read_text_bytes_stream(sandbox: Sandbox) -> None:
    info = sandbox.files.write("notes/hello.txt", "héllo\nwörld")
    assert (info.name, info.path, info.type) == ("hello.txt", "/home/user/notes/hello.txt", FileType.FILE)
    assert sandbox.files.read("notes/hello.txt") == "héllo\nwörld"
    assert sandbox.files.read("/home/user/notes/hello.txt", format="bytes") == "héllo\nwörld".encode()
    assert b"".join(sandbox.files.read("~/notes/hello.txt", format="stream")) == "héllo\nwörld".encode()
    # written as the requesting user, parent directories created
    assert sandbox.commands.run("stat -c '%U %a' notes notes/hello.txt").stdout == "user 755\nuser 644\n"


def test_write_bytes_file_objects_iterables_and_many(sandbox: Sandbox) -> None:
    blob = bytes(range(256)) * 1000
    sandbox.files.write("b.bin", blob)
    sandbox.files.write("f.bin", io.BytesIO(blob))
    sandbox.files.write("i.bin", iter([blob[:1000], blob[1000:]]))
    for name in ("b.bin", "f.bin", "i.bin"):
        assert sandbox.files.read(name, format="bytes") == blob
    infos = sandbox.files.write_files(
        [
            {"path": "many/a.txt", "data": "A"},
            {"path": "/home/user/many/deep/b.txt", "data": b"B"},
            {"path": "many/c.txt", "data": io.BytesIO(b"C")},
        ]
    )
    assert [i.path for i in infos] == ["/home/user/many/a.txt", "/home/user/many/deep/b.txt", "/home/user/many/c.txt"]
    assert sandbox.commands.run("cat many/a.txt many/deep/b.txt many/c.txt").stdout == "ABC"


def test_overwrite_keeps_mode_and_gzip_both_ways(sandbox: Sandbox) -> None:
    sandbox.files.write("run.sh", "echo one")
    sandbox.commands.run("chmod 755 run.sh")
    sandbox.files.write("run.sh", "echo two", gzip=True)
    assert sandbox.commands.run("./run.sh; stat -c %a run.sh").stdout == "two\n755\n"
    assert sandbox.files.read("run.sh", gzip=True) == "echo two"
    sandbox.files.write("octet.txt", "raw body", use_octet_stream=True)
    assert sandbox.files.read("octet.txt") == "raw body"


def test_large_file_roundtrip(sandbox: Sandbox) -> None:
    data = bytes(range(256)) * (32 * 1024 * 4)  # 32 MiB
    sandbox.files.write("big.bin", data)
    assert sandbox.commands.run("stat -c %s big.bin").stdout == f"{len(data)}\n"
    got = bytearray()
    for chunk in sandbox.files.read("big.bin", format="stream"):
        got += chunk
    assert got == data


def test_stat_list_exists_make_dir_rename_remove(sandbox: Sandbox) -> None:
    sandbox.commands.run(
        "mkdir -p tree/a/b && echo x > tree/a/b/f && echo y > tree/top && ln -s top tree/link "
        "&& ln -s nowhere tree/dangling"
    )
    info = sandbox.files.get_info("tree/top")
    assert (info.type, info.size, info.mode, info.permissions) == (FileType.FILE, 2, 0o644, "-rw-r--r--")
    assert (info.owner, info.group) == ("user", "user")
    d = sandbox.files.get_info("tree")
    assert d.type == FileType.DIR and d.permissions.startswith("d")
    link = sandbox.files.get_info("tree/link")
    # as envd: the target resolved to an absolute path; the link's own size and 'L' permissions string
    assert link.type == FileType.SYMLINK and link.symlink_target == "/home/user/tree/top"
    assert link.size == 3 and link.permissions == "Lrwxrwxrwx" and link.mode == 0o644
    dangling = sandbox.files.get_info("tree/dangling")
    assert dangling.symlink_target == "/home/user/tree/dangling" and dangling.mode == 0  # names itself
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info("tree/missing")
    assert sandbox.files.exists("tree/a") and not sandbox.files.exists("tree/missing")

    one = {e.path for e in sandbox.files.list("tree")}
    # a dangling link has no type (envd: unknown), and the SDK leaves such entries out of a listing
    assert one == {"/home/user/tree/" + n for n in ("a", "top", "link")}
    three = [e.path for e in sandbox.files.list("tree", depth=3)]
    # depth first in name order, as envd (a directory's entries follow it)
    assert three == ["/home/user/tree/" + p for p in ("a", "a/b", "a/b/f", "link", "top")], three
    with pytest.raises(FileNotFoundException):
        sandbox.files.list("nope")

    assert sandbox.files.make_dir("tree/new/nested") is True
    assert sandbox.files.make_dir("tree/new/nested") is False
    moved = sandbox.files.rename("tree/top", "tree/elsewhere/top2")
    assert moved.path == "/home/user/tree/elsewhere/top2"
    assert sandbox.files.read("tree/elsewhere/top2") == "y\n"
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename("tree/ghost", "tree/x")
    sandbox.files.remove("tree/a")
    assert not sandbox.files.exists("tree/a")
    sandbox.files.remove("tree/does-not-exist")  # not an error


def test_read_errors(sandbox: Sandbox) -> None:
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("missing.txt")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("/home")  # a directory
    sandbox.commands.run("echo secret > /root/only-root && chmod 600 /root/only-root", user="root")
    with pytest.raises(SandboxException):
        sandbox.files.read("/root/only-root")
    assert sandbox.files.read("/root/only-root", user="root") == "secret\n"
    assert sandbox.files.write("~/r.txt", "as root", user="root").path == "/root/r.txt"


def test_write_without_permission_answers_as_envd(sandbox: Sandbox) -> None:
    """envd answers a write it cannot do with a 500 and the OS error in Go's words; the SDK shows it."""
    with pytest.raises(SandboxException) as e:
        sandbox.files.write("/root/nope.txt", "x")
    assert str(e.value).startswith("500: error opening file: open /root/nope.txt: permission denied"), e.value
    with pytest.raises(SandboxException) as e:
        sandbox.files.write("/root/new-dir/nope.txt", "x")
    assert str(e.value).startswith("500: error ensuring directories: mkdir /root/new-dir: permission denied"), e.value
    # parents the user may create are created, owned by the user, as envd does
    assert sandbox.files.write("deep/er/f.txt", "ok").path == "/home/user/deep/er/f.txt"
    assert sandbox.commands.run("stat -c %U /home/user/deep/er").stdout == "user\n"


def test_metadata_round_trip(sandbox: Sandbox) -> None:
    sandbox.files.write("m.txt", "x", metadata={"owner": "agent-7", "purpose": "test"})
    assert sandbox.files.get_info("m.txt").metadata == {"owner": "agent-7", "purpose": "test"}
    sandbox.files.write("m.txt", "y", metadata={"only": "this"})  # replaces all
    assert sandbox.files.get_info("m.txt").metadata == {"only": "this"}
    listed = {e.name: e for e in sandbox.files.list(".")}
    assert listed["m.txt"].metadata == {"only": "this"}
    # the write result carries the metadata written, for one file and for many
    info = sandbox.files.write("w.txt", "z", metadata={"k": "v"})
    assert info.metadata == {"k": "v"}
    many = sandbox.files.write_files([{"path": "w1", "data": "1"}, {"path": "w2", "data": "2"}], metadata={"a": "b"})
    assert [w.metadata for w in many] == [{"a": "b"}, {"a": "b"}]
    assert sandbox.files.write("plain.txt", "p").metadata in (None, {})
    # an overwrite without metadata leaves none (as envd)
    sandbox.files.write("m.txt", "again")
    assert sandbox.files.get_info("m.txt").metadata in (None, {})


def _raw(server: Server, sandbox: Sandbox) -> httpx.Client:
    return httpx.Client(
        base_url=server.url,
        timeout=60,
        headers={
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sandbox._envd_access_token,
        },
    )


def test_http_range_and_errors(sandbox: Sandbox, server: Server) -> None:
    sandbox.files.write("r.txt", "0123456789")
    with _raw(server, sandbox) as c:
        r = c.get("/files", params={"path": "r.txt"}, headers={"Range": "bytes=2-5"})
        assert r.status_code == 206 and r.content == b"2345" and r.headers["content-range"] == "bytes 2-5/10"
        r = c.get("/files", params={"path": "r.txt"}, headers={"Range": "bytes=-3"})
        assert r.content == b"789"
        assert c.get("/files", params={"path": "r.txt"}, headers={"Range": "bytes=50-"}).status_code == 416
        r = c.get("/files", params={"path": "nope.txt"})
        assert r.status_code == 404 and "does not exist" in r.json()["message"]
        r = c.get("/files", params={"path": "/home/user"})
        assert r.status_code == 400 and "is a directory" in r.json()["message"]
        r = c.post("/files", params={"path": "x"}, content=b"data", headers={"Content-Type": "text/csv"})
        assert r.status_code == 400
        r = c.post("/files", content=b"data", headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 400 and "path" in r.json()["message"]
        r = c.post(
            "/files",
            params={"path": "g.txt"},
            content=gzip.compress(b"zipped"),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 200 and r.json()[0]["path"] == "/home/user/g.txt"
        assert sandbox.files.read("g.txt") == "zipped"
        r = c.post(
            "/files",
            params={"path": "bad.txt"},
            content=b"not gzip",
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 400 and not sandbox.files.exists("bad.txt")
        assert not [e for e in sandbox.files.list(".") if e.name.startswith(".sandboxd-upload-")]


def test_out_of_disk_is_507_and_leaves_nothing(sandbox: Sandbox, server: Server) -> None:
    # /dev/shm in a sandbox is a 64 MiB tmpfs: a 70 MiB upload cannot fit.
    sandbox.files.write("/dev/shm/keep.txt", "old content")
    with _raw(server, sandbox) as c:
        r = c.post(
            "/files",
            params={"path": "/dev/shm/keep.txt"},
            content=b"\0" * (70 << 20),
            headers={"Content-Type": "application/octet-stream"},
        )
    assert r.status_code == 507 and "disk space" in r.json()["message"]
    assert sandbox.files.read("/dev/shm/keep.txt") == "old content"  # the old file is untouched
    assert sandbox.commands.run("ls -a /dev/shm").stdout.split() == [".", "..", "keep.txt"]


def test_signed_urls(sandbox: Sandbox, server: Server) -> None:
    up = sandbox.upload_url("signed/up.txt")
    assert "E2b-Sandbox-Id" not in up and "signature=" in up
    r = httpx.post(up, files={"file": ("up.txt", b"via signed url")})
    assert r.status_code == 200, r.text
    assert sandbox.files.read("signed/up.txt") == "via signed url"
    down = sandbox.download_url("signed/up.txt")
    with urllib.request.urlopen(down) as resp:  # a plain client, no headers at all
        assert resp.read() == b"via signed url"
    # a valid signature for reading does not allow writing, nor reading another path
    assert (
        httpx.post(
            down.replace("up.txt", "up.txt"), content=b"x", headers={"Content-Type": "application/octet-stream"}
        ).status_code
        == 401
    )
    assert httpx.get(down.replace("up.txt", "other.txt")).status_code == 401
    with_exp = sandbox.download_url("signed/up.txt", use_signature_expiration=60)
    assert httpx.get(with_exp).content == b"via signed url"
    root_url = sandbox.download_url("/root/.bashrc", user="root")
    assert httpx.get(root_url).status_code == 200


def test_expired_signature_exact_body(sandbox: Sandbox) -> None:
    sandbox.files.write("e.txt", "x")
    url = sandbox.download_url("e.txt", use_signature_expiration=-10)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url)
    assert exc.value.code == 401
    assert exc.value.read() == b'{"code":401,"message":"signature is already expired"}'


def _events(handle, want: int, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += handle.get_new_events()
        time.sleep(0.05)
    return got


def test_watch_events_sync(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("w")
    h = sandbox.files.watch_dir("w")
    sandbox.commands.run("echo 1 > w/a; echo 2 >> w/a; mv w/a w/b; chmod 600 w/b; rm w/b")
    events = _events(h, 6)
    kinds = [(e.name, e.type) for e in events]
    for expected in [
        ("a", FilesystemEventType.CREATE),
        ("a", FilesystemEventType.WRITE),
        ("a", FilesystemEventType.RENAME),
        ("b", FilesystemEventType.CREATE),
        ("b", FilesystemEventType.CHMOD),
        ("b", FilesystemEventType.REMOVE),
    ]:
        assert expected in kinds, kinds
    # uploads show the final name, never the temporary file, with the events envd's write makes: a new
    # file is created, given its owner, written; a replaced one is given its owner and written
    sandbox.files.write("w/up.txt", "x")
    assert [(e.name, e.type) for e in _events(h, 3)] == [
        ("up.txt", FilesystemEventType.CREATE),
        ("up.txt", FilesystemEventType.CHMOD),
        ("up.txt", FilesystemEventType.WRITE),
    ]
    sandbox.files.write("w/up.txt", "again")
    assert [(e.name, e.type) for e in _events(h, 2)] == [
        ("up.txt", FilesystemEventType.CHMOD),
        ("up.txt", FilesystemEventType.WRITE),
    ]
    h.stop()
    with pytest.raises(SandboxException):
        h.get_new_events()


def test_watch_recursive_entries_and_missing(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("rw/sub")
    h = sandbox.files.watch_dir("rw", recursive=True, include_entry=True)
    sandbox.commands.run("mkdir rw/sub/new && echo hi > rw/sub/new/deep.txt")
    deadline = time.monotonic() + 5
    events: list = []
    while not any(e.name == "sub/new/deep.txt" for e in events) and time.monotonic() < deadline:
        events += h.get_new_events()
        time.sleep(0.05)
    deep = [e for e in events if e.name == "sub/new/deep.txt" and e.type == FilesystemEventType.CREATE]
    assert deep, [(e.name, e.type) for e in events]
    assert deep[0].entry is not None and deep[0].entry.path == "/home/user/rw/sub/new/deep.txt"
    h.stop()
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir("no/such/dir")


async def test_async_files_and_watch(async_sandbox: AsyncSandbox) -> None:
    files = async_sandbox.files
    await files.write("as/one.txt", "1")
    assert await files.read("as/one.txt") == "1"
    assert (await files.get_info("as/one.txt")).size == 1
    assert [e.name for e in await files.list("as")] == ["one.txt"]
    assert await files.exists("as/one.txt")
    seen: list = []
    handle = await files.watch_dir("as", on_event=seen.append)
    await files.write("as/two.txt", "2")
    await async_sandbox.commands.run("rm as/one.txt")
    deadline = time.monotonic() + 5
    while (
        len(
            {(e.name, e.type) for e in seen}
            & {("two.txt", FilesystemEventType.WRITE), ("one.txt", FilesystemEventType.REMOVE)}
        )
        < 2
    ):
        assert time.monotonic() < deadline, seen
        await __import__("asyncio").sleep(0.05)
    await handle.stop()
    await files.remove("as")
    assert not await files.exists("as")
    with pytest.raises(FileNotFoundException):
        await files.watch_dir("missing-dir", on_event=seen.append)


async def test_100_concurrent_small_reads_and_writes_across_10_sandboxes(server: Server) -> None:
    import asyncio

    sandboxes = await asyncio.gather(*(AsyncSandbox.create(template="base", timeout=120) for _ in range(10)))
    try:

        async def roundtrip(i: int) -> None:
            sbx = sandboxes[i % 10]
            payload = f"payload {i} ".encode() * (i + 1)
            await sbx.files.write(f"/home/user/c/{i}.txt", payload)
            assert await sbx.files.read(f"/home/user/c/{i}.txt", format="bytes") == payload

        await asyncio.gather(*(roundtrip(i) for i in range(100)))
        counts = await asyncio.gather(*(s.commands.run("ls /home/user/c | wc -l") for s in sandboxes))
        assert [c.stdout.strip() for c in counts] == ["10"] * 10
    finally:
        await asyncio.gather(*(s.kill() for s in sandboxes))


def _vm_kib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def test_big_transfers_stream_with_bounded_server_memory(sandbox: Sandbox, server: Server, tmp_path) -> None:
    size = 256 << 20
    blob = tmp_path / "blob"
    with open(blob, "wb") as f:
        block = bytes(range(256)) * 4096
        for _ in range(size // len(block)):
            f.write(block)
    pid = server.proc.pid
    base = _vm_kib(pid, "VmRSS")
    open(f"/proc/{pid}/clear_refs", "w").write("5")  # reset the peak (VmHWM)
    with open(blob, "rb") as f:
        sandbox.files.write("big-upload.bin", f)
    up_peak = _vm_kib(pid, "VmHWM") - base
    open(f"/proc/{pid}/clear_refs", "w").write("5")
    got = 0
    for chunk in sandbox.files.read("big-upload.bin", format="stream"):
        got += len(chunk)
    down_peak = _vm_kib(pid, "VmHWM") - base
    assert got == size
    assert (
        sandbox.commands.run("md5sum big-upload.bin").stdout.split()[0]
        == __import__("hashlib").md5(blob.read_bytes()).hexdigest()
    )
    # a 256 MiB transfer must not be held in the server's memory
    assert up_peak < 64 * 1024 and down_peak < 64 * 1024, (up_peak, down_peak)
