"""An older official SDK release (v1 create/connect paths, `secure` flag, API-key format check) still works."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Server

OLD_SDK_VENV = Path(os.environ.get("SANDBOXD_OLD_SDK_VENV", "/opt/sandboxd/venv-e2b-2.45"))


def test_e2b_2_45_smoke(server: Server) -> None:
    python = OLD_SDK_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: scripts/setup.sh --dev installs e2b==2.45.1 there")
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('e2b'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == "2.45.1"
    ci_version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('e2b-code-interpreter'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if ci_version != "2.9.2":
        pytest.fail(f"e2b-code-interpreter 2.9.2 is missing from {OLD_SDK_VENV}: run scripts/setup.sh --dev")
    env = {**os.environ, "E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url, "E2B_API_KEY": server.api_key}
    r = subprocess.run(
        [python, str(Path(__file__).parent / "compat" / "old_sdk_smoke.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
