"""`sandboxd sandbox ...`: look at sandboxes through the server's API (no back door): `diff` shows what a
sandbox changed against its template or snapshot, or writes the changes as a tar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def add_parsers(ssub: argparse._SubParsersAction, server_options: argparse.ArgumentParser) -> None:
    p = ssub.add_parser(
        "diff", parents=[server_options], help="what a sandbox added, modified and deleted (or --tar FILE)"
    )
    p.add_argument("sandbox_id")
    p.add_argument("--tar", type=Path, default=None, help="write the changes as a tar to FILE ('-': stdout)")
    p.add_argument("--limit", type=int, default=10_000, help="at most this many paths (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")


def main(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    import httpx

    if not api_key:
        err.print("sandboxd: no API key: pass --api-key or set E2B_API_KEY")
        return 2
    headers = {"X-API-KEY": api_key}
    path = f"/sandboxes/{args.sandbox_id}/diff"
    params: dict[str, str | int] = {"limit": args.limit}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            if args.tar is not None:
                with client.stream("GET", path, params={**params, "format": "tar"}) as r:
                    if r.status_code != 200:
                        r.read()
                        return _failed(r)
                    if str(args.tar) == "-":
                        _copy(r, sys.stdout.buffer)
                        return 0
                    with open(args.tar, "wb") as out:
                        size = _copy(r, out)
                    err.print(f"wrote {args.tar} ({size / 1e6:.1f} MB)")
                    return 0
            r = client.get(path, params=params)
    except httpx.TransportError as e:
        err.print(f"sandboxd: cannot reach the server at {url} ({e}): is `sandboxd serve` running? (--url)")
        return 1
    if r.status_code != 200:
        return _failed(r)
    body = r.json()
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    for mark, key, style in (("+", "added", "green"), ("~", "modified", "yellow"), ("-", "deleted", "red")):
        for p in body[key]:
            console.print(f"[{style}]{mark} {escape(p)}[/{style}]")
    if body.get("truncated"):
        err.print(f"(more changes than --limit {args.limit}: the list stops there)")
    return 0


def _copy(r: object, out: IO[bytes]) -> int:
    import httpx

    assert isinstance(r, httpx.Response)
    size = 0
    for chunk in r.iter_bytes():
        out.write(chunk)
        size += len(chunk)
    return size


def _failed(r: object) -> int:
    import httpx

    assert isinstance(r, httpx.Response)
    try:
        message = r.json().get("message", r.text)
    except ValueError:
        message = r.text
    err.print(f"sandboxd: {message} ({r.status_code})")
    return 1
