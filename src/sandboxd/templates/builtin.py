"""Built-in templates made with the template builder, exactly as users' templates are: their build
requests (E2B's JSON, as the SDKs send it) go through a server's template API. `sandboxd template
build httpbin` sends one (to `--url`, or to a server of its own that it starts for the build)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sandboxd.templates.specs import BUILTIN

RECIPES: dict[str, dict[str, Any]] = {
    # An HTTP echo service (PyPI's httpbin, under gunicorn) on port 80, started by its start command.
    "httpbin": {
        "from_template": "base",
        "pip": ["httpbin==0.10.4", "gunicorn==27.0.1"],
        "start_cmd": "gunicorn --bind 0.0.0.0:80 --workers 2 --access-logfile - httpbin:app",
        "ready_cmd": '[ -n "$(ss -Htln sport = :80)" ]',
        "cpu_count": 1,
        "memory_mb": 512,
    },
}


def recipe_digest(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def names() -> list[str]:
    return [*BUILTIN, *RECIPES]
