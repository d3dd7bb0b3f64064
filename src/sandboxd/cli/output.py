"""What the CLI's commands print: tables and results on stdout (`console`), messages on stderr (`err`), and how a
request that went wrong is said (the exit status: 1)."""

from __future__ import annotations

import sys

from rich.console import Console

# (piped: wide enough for whole IDs and times, never cut with an ellipsis)
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)


def failed(r: object) -> int:
    """The server refused: its message and status said."""
    import httpx

    assert isinstance(r, httpx.Response)
    try:
        message = r.json().get("message", r.text)
    except ValueError:
        message = r.text
    err.print(f"sandboxd: {message} ({r.status_code})")
    return 1


def unreachable(url: str, e: Exception) -> int:
    """No answer from the server at `url`: said, with what to check."""
    err.print(f"sandboxd: cannot reach the server at {url} ({e}): is `sandboxd serve` running? (--url)")
    return 1
