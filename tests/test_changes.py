"""GET /sandboxes/{id}/diff (beyond E2B): what a sandbox added, modified and deleted against its template
or the snapshot it was made from, as JSON and as a tar (owners as the sandbox sees them, a manifest of
the deletions)."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
from e2b import Sandbox

from conftest import Server


def _diff(server: Server, sandbox_id: str, **params: str) -> httpx.Response:
    r = httpx.get(
        f"{server.url}/sandboxes/{sandbox_id}/diff", params=params, headers={"X-API-KEY": server.api_key}, timeout=60
    )
    assert r.status_code == 200, r.text
    return r


def test_a_sandboxs_changes_against_its_template_and_its_snapshot(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    child = None
    snap = None
    try:
        assert _diff(server, sbx.sandbox_id).json() == {"added": [], "modified": [], "deleted": [], "truncated": False}
        sbx.files.write("/home/user/work/new.txt", "new\n")
        changes = (
            "echo more >> /etc/issue; rm /etc/motd; "
            "rm -rf /etc/sudoers.d && mkdir /etc/sudoers.d && touch /etc/sudoers.d/fresh"  # a replaced directory
        )
        assert sbx.commands.run(changes, user="root").exit_code == 0
        got = _diff(server, sbx.sandbox_id).json()
        assert {"/home/user/work", "/home/user/work/new.txt"} <= set(got["added"])
        assert "/etc/issue" in got["modified"] and "/etc/sudoers.d/fresh" in got["added"] + got["modified"]
        assert {"/etc/motd", "/etc/sudoers.d/user"} <= set(got["deleted"])
        assert not any(p in str(got) for p in ("/etc/hostname", "/etc/resolv.conf")), "per-start files listed"

        tar = tarfile.open(fileobj=io.BytesIO(_diff(server, sbx.sandbox_id, format="tar").content))
        member = tar.getmember("home/user/work/new.txt")
        assert (member.uid, member.gid) == (1000, 1000) and tar.extractfile(member).read() == b"new\n"  # type: ignore[union-attr]
        assert tar.getmember("etc/issue").uid == 0
        manifest = json.loads(tar.extractfile(".sandboxd-changes.json").read())  # type: ignore[union-attr]
        assert "/etc/motd" in manifest["deleted"]

        limited = _diff(server, sbx.sandbox_id, limit="1").json()
        assert limited["truncated"] is True

        snap = sbx.create_snapshot(mode="filesystem")
        child = Sandbox.create(template=snap.snapshot_id, timeout=60)
        assert _diff(server, child.sandbox_id).json()["added"] == []  # against the snapshot: nothing yet
        child.files.write("/home/user/work/child.txt", "c")
        assert _diff(server, child.sandbox_id).json()["added"] == ["/home/user/work/child.txt"]
    finally:
        if child is not None:
            child.kill()
        sbx.kill()
        if snap is not None:
            Sandbox.delete_snapshot(snap.snapshot_id)


def test_bad_diff_requests_are_refused(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        headers = {"X-API-KEY": server.api_key}
        for params in ({"format": "zip"}, {"limit": "many"}):
            r = httpx.get(f"{server.url}/sandboxes/{sbx.sandbox_id}/diff", params=params, headers=headers)
            assert r.status_code == 400, (params, r.text)
        assert httpx.get(f"{server.url}/sandboxes/nosuch/diff", headers=headers).status_code == 404
        assert httpx.get(f"{server.url}/sandboxes/{sbx.sandbox_id}/diff").status_code == 401
        sbx.pause(mode="filesystem")
        r = httpx.get(f"{server.url}/sandboxes/{sbx.sandbox_id}/diff", headers=headers)
        assert r.status_code == 409 and "resume" in r.json()["message"]
    finally:
        sbx.kill()


def test_the_cli_shows_a_sandboxs_changes_and_writes_their_tar(server: Server, tmp_path: object) -> None:
    import subprocess
    from pathlib import Path

    from conftest import SANDBOXD

    sbx = Sandbox.create(template="base", timeout=60)
    try:
        sbx.files.write("/home/user/cli.txt", "via the cli\n")
        sbx.commands.run("rm /etc/motd", user="root")
        base = [SANDBOXD, "sandbox", "diff", sbx.sandbox_id, "--url", server.url, "--api-key", server.api_key]
        r = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "+ /home/user/cli.txt" in r.stdout and "- /etc/motd" in r.stdout
        out = Path(str(tmp_path)) / "changes.tar"
        r = subprocess.run([*base, "--tar", str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert tarfile.open(out).extractfile("home/user/cli.txt").read() == b"via the cli\n"  # type: ignore[union-attr]
        r = subprocess.run([*base[:3], "nosuchsandbox", *base[4:]], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "not found" in r.stderr
    finally:
        sbx.kill()
