"""Small packages that tests and benchmarks install in sandboxes with no outside network."""

from __future__ import annotations

import zipfile
from pathlib import Path


def make_wheel(directory: Path, name: str = "sbxdemo", body: str = "ANSWER = 42\n") -> Path:
    """A minimal pure-Python wheel `<name>-1.0-py3-none-any.whl` (pip installs it from a file or an index)."""
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: sandboxd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel
