"""`sandboxd sandbox ...`: sandboxes through the server's API (no back door): `list`, `create`, `info`, `kill`,
`pause`, `resume`, `metrics`, `logs [-f]`, and `diff` (what a sandbox changed against its template or snapshot,
or the changes as a tar); `exec`, `shell` and `cp` go through envd with the official SDK (cli/shell.py). Tables
by default, `--json` for scripts; the exit status says what happened (0 done, 1 refused or failed, 2 misused;
`exec` passes on the command's own)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from rich.markup import escape
from rich.table import Table

from sandboxd.cli.output import console, err, failed, unreachable


def add_parsers(ssub: argparse._SubParsersAction, server_options: argparse.ArgumentParser) -> None:
    from sandboxd.cli import shell

    p = ssub.add_parser("list", parents=[server_options], help="running and paused sandboxes")
    p.add_argument("--state", default="running,paused", help="running, paused and/or killed (default %(default)s)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="only those with it")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    p = ssub.add_parser("create", parents=[server_options], help="a new sandbox; prints its ID")
    p.add_argument("template", nargs="?", default="base")
    p.add_argument("--timeout", type=int, default=300, help="seconds it lives (default %(default)s)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    for name, what in (("info", "a sandbox's details"), ("metrics", "a sandbox's usage samples")):
        p = ssub.add_parser(name, parents=[server_options], help=what)
        p.add_argument("sandbox_id")
        p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    p = ssub.add_parser("kill", parents=[server_options], help="end sandboxes")
    p.add_argument("sandbox_id", nargs="+")
    p = ssub.add_parser("pause", parents=[server_options], help="pause a sandbox (frozen in memory)")
    p.add_argument("sandbox_id")
    p.add_argument("--to-disk", action="store_true", help="written to disk (CRIU) before this returns")
    p.add_argument("--files-only", action="store_true", help="its processes end, its files stay")
    p = ssub.add_parser("resume", parents=[server_options], help="resume a paused sandbox")
    p.add_argument("sandbox_id")
    p.add_argument("--timeout", type=int, default=300, help="seconds it lives from now (default %(default)s)")
    p = ssub.add_parser("logs", parents=[server_options], help="a sandbox's log; -f follows it")
    p.add_argument("sandbox_id")
    p.add_argument("-f", "--follow", action="store_true", help="print new entries as they come, until it ends")
    p.add_argument("--level", choices=["debug", "info", "warn", "error"], default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per entry")
    shell.add_parsers(ssub, server_options)
    p = ssub.add_parser(
        "diff", parents=[server_options], help="what a sandbox added, modified and deleted (or --tar FILE)"
    )
    p.add_argument("sandbox_id")
    p.add_argument("--tar", type=Path, default=None, help="write the changes as a tar to FILE ('-': stdout)")
    p.add_argument("--limit", type=int, default=10_000, help="at most this many paths (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")


def main(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    import httpx

    from sandboxd.cli import shell

    if not api_key:
        err.print("sandboxd: no API key: pass --api-key or set E2B_API_KEY")
        return 2
    if args.sandbox_command in shell.COMMANDS:
        return shell.main(args, url, api_key)
    if args.sandbox_command != "diff":
        try:
            with httpx.Client(base_url=url, headers={"X-API-KEY": api_key}, timeout=120) as client:
                return COMMANDS[args.sandbox_command](args, client)
        except httpx.TransportError as e:
            return unreachable(url, e)
        except KeyboardInterrupt:
            return 130
    headers = {"X-API-KEY": api_key}
    path = f"/sandboxes/{args.sandbox_id}/diff"
    params: dict[str, str | int] = {"limit": args.limit}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            if args.tar is not None:
                with client.stream("GET", path, params={**params, "format": "tar"}) as r:
                    if r.status_code != 200:
                        r.read()
                        return failed(r)
                    if str(args.tar) == "-":
                        _copy(r, sys.stdout.buffer)
                        return 0
                    with open(args.tar, "wb") as out:
                        size = _copy(r, out)
                    err.print(f"wrote {args.tar} ({size / 1e6:.1f} MB)")
                    return 0
            r = client.get(path, params=params)
    except httpx.TransportError as e:
        return unreachable(url, e)
    if r.status_code != 200:
        return failed(r)
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


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"sandboxd: {what} must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _answer(r: Any, want: int = 200) -> Any:
    """The JSON body of a `want` answer, or None after saying what the server refused and why."""
    if r.status_code != want:
        failed(r)
        return None
    return r.json() if r.content else {}


def _shown(args: argparse.Namespace, r: Any) -> Any:
    """The JSON body of a 200 to show as a table, or the exit status when done: refused (said why, 1) or
    printed as JSON (--json, 0)."""
    body = _answer(r)
    if body is None:
        return 1
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    return body


def _list(args: argparse.Namespace, client: Any) -> int:
    params: dict[str, str] = {"state": args.state}
    if args.metadata:
        params["metadata"] = "&".join(f"{k}={v}" for k, v in _pairs(args.metadata, "--metadata").items())
    body = _shown(args, client.get("/v2/sandboxes", params=params))
    if isinstance(body, int):
        return body
    table = Table("sandbox", "template", "state", "started", "ends", "cpus", "memory MB", box=None)
    for s in body:
        state = s["state"] + (f" ({s['health']['status']})" if "health" in s else "")
        table.add_row(
            s["sandboxID"],
            s.get("alias") or s["templateID"],
            state,
            s["startedAt"],
            s["endAt"],
            str(s["cpuCount"]),
            str(s["memoryMB"]),
        )
    console.print(table if body else "no sandboxes")
    return 0


def _create(args: argparse.Namespace, client: Any) -> int:
    req = {"templateID": args.template, "timeout": args.timeout, "metadata": _pairs(args.metadata, "--metadata")}
    req["envVars"] = _pairs(args.env, "--env")
    body = _answer(client.post("/v2/sandboxes", json=req), 201)
    if body is None:
        return 1
    print(json.dumps(body, indent=1) if args.json else body["sandboxID"])
    return 0


def _info(args: argparse.Namespace, client: Any) -> int:
    body = _shown(args, client.get(f"/sandboxes/{args.sandbox_id}"))
    if isinstance(body, int):
        return body
    table = Table(box=None, show_header=False)
    for key in (
        "sandboxID",
        "templateID",
        "alias",
        "state",
        "pauseMode",
        "pausedTo",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "metadata",
        "health",
    ):
        if key in body:
            value = body[key]
            table.add_row(key, escape(json.dumps(value) if isinstance(value, dict) else str(value)))
    console.print(table)
    return 0


def _kill(args: argparse.Namespace, client: Any) -> int:
    status = 0
    for ident in args.sandbox_id:
        r = client.delete(f"/sandboxes/{ident}")
        if r.status_code == 204:
            console.print(f"killed {ident}")
        else:
            status = failed(r)
    return status


def _pause(args: argparse.Namespace, client: Any) -> int:
    if args.to_disk and args.files_only:
        err.print("sandboxd: --to-disk keeps its memory (on disk), --files-only does not: pick one")
        return 2
    body = {"toDisk": True} if args.to_disk else {"memory": False} if args.files_only else {}
    r = client.post(f"/sandboxes/{args.sandbox_id}/pause", json=body)
    if r.status_code != 204:
        return failed(r)
    console.print(f"paused {args.sandbox_id}")
    return 0


def _resume(args: argparse.Namespace, client: Any) -> int:
    r = client.post(f"/v2/sandboxes/{args.sandbox_id}/connect", json={"timeout": args.timeout})
    if r.status_code not in (200, 201):
        return failed(r)
    console.print(f"{'resumed' if r.status_code == 201 else 'running'} {args.sandbox_id}")
    return 0


def _metrics(args: argparse.Namespace, client: Any) -> int:
    body = _shown(args, client.get(f"/sandboxes/{args.sandbox_id}/metrics"))
    if isinstance(body, int):
        return body
    table = Table("time", "cpu %", "memory MB", "of MB", "disk MB", "of MB", box=None)
    for m in body:
        table.add_row(
            m["timestamp"],
            f"{m['cpuUsedPct']:.1f}",
            str(m["memUsed"] >> 20),
            str(m["memTotal"] >> 20),
            str(m["diskUsed"] >> 20),
            str(m["diskTotal"] >> 20),
        )
    console.print(table)
    return 0


def _logs(args: argparse.Namespace, client: Any) -> int:
    path, cursor = f"/v2/sandboxes/{args.sandbox_id}/logs", 0
    shown: set[str] = set()  # entries of the cursor's millisecond printed already (more may come in it)
    while True:
        params: dict[str, str | int] = {"cursor": cursor, **({"level": args.level} if args.level else {})}
        body = _answer(client.get(path, params=params))
        if body is None:
            return 1
        for e in body["logs"]:
            key = json.dumps(e, sort_keys=True)
            if key in shown:
                continue
            if _ms(e["timestamp"]) > cursor:
                cursor, shown = _ms(e["timestamp"]), set()
            shown.add(key)
            if args.json:
                print(json.dumps(e), flush=True)
            else:
                style = {"warn": "yellow", "error": "red"}.get(e["level"], "")
                line = f"{e['timestamp']} {e['level']:5} {escape(e['message'])}"
                console.print(f"[{style}]{line}[/{style}]" if style else line)
        if not args.follow:
            return 0
        if client.get(f"/sandboxes/{args.sandbox_id}").status_code == 404:
            return 0  # it ended (its last entries printed above)
        time.sleep(1)


def _ms(timestamp: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)


COMMANDS: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "list": _list,
    "create": _create,
    "info": _info,
    "kill": _kill,
    "pause": _pause,
    "resume": _resume,
    "metrics": _metrics,
    "logs": _logs,
}


def _copy(r: object, out: IO[bytes]) -> int:
    import httpx

    assert isinstance(r, httpx.Response)
    size = 0
    for chunk in r.iter_bytes():
        out.write(chunk)
        size += len(chunk)
    return size
