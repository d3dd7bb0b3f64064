"""Builds and locates the small C helper (`sbxhelper`) that creates sandboxes and execs into them.

The binary is compiled on first use from the source next to this file and cached by the hash of that
source, so an upgrade of sandboxd rebuilds it and nothing stale is ever run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("sbxhelper.c")


class HelperBuildError(RuntimeError):
    pass


def helper_path(cache_dir: Path) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = Path(cache_dir) / f"sbxhelper-{digest}"
    if target.exists():
        return target
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HelperBuildError("no C compiler found: install build-essential (scripts/setup.sh does)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    cmd = [cc, "-O2", "-Wall", "-Wno-format-truncation", "-o", str(tmp), str(SOURCE), "-lseccomp"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        hint = " (is libseccomp-dev installed?)" if "seccomp" in res.stderr else ""
        raise HelperBuildError(f"building sbxhelper failed{hint}:\n{res.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    for old in target.parent.glob("sbxhelper-*"):
        if old != target:
            old.unlink(missing_ok=True)
    return target
