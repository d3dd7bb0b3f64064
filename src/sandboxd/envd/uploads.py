"""A journal of uploads in flight, so that a crash of the server leaves no temporary file in a sandbox.

An upload is written to `.sandboxd-upload-<random>` beside its target and renamed over it when complete
(files_http.py). Before the temporary file is made, an entry naming it (and the user who wrote it) goes
into `<sandbox state dir>/uploads/`; the entry goes when the file has been renamed or removed. A server
that starts after a crash removes, in each sandbox it re-adopts, the files its journal still names; in a
sandbox it finds paused (its broker frozen, or its processes on disk), those entries are set aside
(`INTERRUPTED`) and their files removed when it runs again (`SandboxManager.after_resume`). An entry whose file
could not be removed stays, for the next try.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.core.users import lookup_user

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

log = logging.getLogger("sandboxd.envd")
JOURNAL = "uploads"
INTERRUPTED = "interrupted"  # in the journal: entries of uploads a crash cut while the sandbox was paused


def begin(state_dir: Path, user: str, tmp: str) -> Path:
    journal = state_dir / JOURNAL
    journal.mkdir(mode=0o700, exist_ok=True)
    entry = journal / secrets.token_hex(8)
    entry.write_text(json.dumps({"user": user, "path": tmp}))
    return entry


def end(entry: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry)


async def clean_interrupted(manager: SandboxManager) -> int:
    """Remove the temporary files of uploads a crashed server left in its sandboxes; returns how many.
    A sandbox stopped with its files kept (a filesystem pause) is cleaned when it boots again."""
    removed = 0
    for sandbox in list(manager.sandboxes.values()):
        if sandbox.record.state == "running":
            removed += await clean_sandbox(manager, sandbox)
        else:  # (no broker can run in it now: when it runs again)
            set_aside(sandbox.handle.state_dir)
    return removed


def set_aside(state_dir: Path) -> None:
    """The journal's entries, as uploads cut short: removed at the sandbox's next resume."""
    journal = state_dir / JOURNAL
    if not journal.is_dir():
        return
    aside = journal / INTERRUPTED
    aside.mkdir(mode=0o700, exist_ok=True)
    for entry in journal.iterdir():
        if entry.is_file():
            os.rename(entry, aside / entry.name)


async def clean_sandbox(manager: SandboxManager, sandbox: Sandbox, only_set_aside: bool = False) -> int:
    """Remove the temporary files of the sandbox's uploads that were cut short (by a crash, or by a pause
    that ended its processes), or (`only_set_aside`) those `set_aside` at start; returns how many."""
    from sandboxd.envd import fs  # the brokers, which resolve paths inside the sandbox as the user

    removed = 0
    journal = sandbox.handle.state_dir / JOURNAL
    dirs = [journal / INTERRUPTED] if only_set_aside else [journal, journal / INTERRUPTED]
    for entry in sorted(e for d in dirs if d.is_dir() for e in d.iterdir() if e.is_file()):
        try:
            record = json.loads(entry.read_text())
            user = lookup_user(str(manager.runtime.root_path(sandbox.handle)), record["user"], sandbox.handle.uid_base)
            if user is not None:
                with contextlib.suppress(FileNotFoundError):
                    await fs.brokers_of(manager, sandbox).get(user).unlink(record["path"])
                    removed += 1
        except Exception:  # (its entry stays: tried again at the next start or resume)
            log.exception("cleaning the interrupted upload %s of sandbox %s failed", entry, sandbox.id)
            continue
        end(entry)
    return removed
