"""Snapshots of a sandbox's files (core/snapshots.py) with the official SDK: a template-like source that
new sandboxes start from, sharing its layers and diverging on their own; listed, deleted; a snapshot
with memory is refused with a message that says what works."""

from __future__ import annotations

import secrets

import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from conftest import Server, held_top_layer


def _lowers(server: Server, sandbox_id: str) -> str:
    return held_top_layer(sandbox_id)


def test_a_filesystem_snapshot_starts_new_sandboxes_that_diverge(server: Server) -> None:
    src = Sandbox.create(template="base", timeout=120)
    made: list[Sandbox] = []
    name = f"snap-{secrets.token_hex(3)}"
    snapshot_id = None
    try:
        src.files.write("/home/user/notes.txt", "from the source\n")
        src.commands.run("rm /etc/motd; echo made > /etc/by-root", user="root")
        bg = src.commands.run("sleep 1000", background=True)
        with pytest.raises(SandboxException) as refused:
            src.create_snapshot()  # with memory: E2B's default
        assert "filesystem" in str(refused.value)

        snap = src.create_snapshot(name=name, mode="filesystem")
        snapshot_id = snap.snapshot_id
        assert name in snap.names
        assert any(p.pid == bg.pid for p in src.commands.list()), "the source stopped running"
        src.files.write("/home/user/notes.txt", "changed after the snapshot\n")

        made = [Sandbox.create(template=snapshot_id, timeout=60) for _ in range(2)]
        for child in made:
            assert child.files.read("/home/user/notes.txt") == "from the source\n"
            assert child.commands.run("test -e /etc/motd || echo deleted").stdout == "deleted\n"
            assert child.commands.run("stat -c '%U %s' /etc/by-root").stdout == "root 5\n"
            assert child.commands.run("whoami; pgrep -x sleep || echo none").stdout == "user\nnone\n"
        assert _lowers(server, made[0].sandbox_id) == _lowers(server, made[1].sandbox_id)  # shared, not copied
        made[0].files.write("/home/user/notes.txt", "child 0\n")
        assert made[1].files.read("/home/user/notes.txt") == "from the source\n"

        assert snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=src.sandbox_id).next_items()]
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == [snapshot_id]
        again = src.create_snapshot(name=name, mode="filesystem")  # the same name: a new build of it
        assert again.snapshot_id == snapshot_id
        assert Sandbox.create(template=name, timeout=60).files.read("/home/user/notes.txt") == (
            "changed after the snapshot\n"
        )
    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            assert Sandbox.delete_snapshot(snapshot_id) is True
    with pytest.raises(SandboxException):
        Sandbox.create(template=name, timeout=30)
