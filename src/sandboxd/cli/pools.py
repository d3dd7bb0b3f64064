"""`sandboxd pool ...`: the warm pools through the server's API (no back door): `show` (each template's limits,
target, idle sandboxes, hits and misses), `set TEMPLATE --min N --max M` (the autoscaler keeps its target between
them), `reset TEMPLATE` (the server's --pool-size / --pool-max again)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from sandboxd.cli.output import console, err, failed, unreachable


def add_parsers(psub: argparse._SubParsersAction, server_options: argparse.ArgumentParser) -> None:
    p = psub.add_parser("show", parents=[server_options], help="each template's pool (or one template's)")
    p.add_argument("template", nargs="?", default=None)
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    p = psub.add_parser("set", parents=[server_options], help="a template's pool keeps MIN to MAX idle sandboxes")
    p.add_argument("template")
    p.add_argument("--min", type=int, required=True, help="idle sandboxes kept at least, once the template is used")
    p.add_argument("--max", type=int, required=True, help="the most the autoscaler may keep when demand is high")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    p = psub.add_parser("reset", parents=[server_options], help="a template's pool follows the server's defaults")
    p.add_argument("template")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")


def main(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    import httpx

    if not api_key:
        err.print("sandboxd: no API key: pass --api-key or set E2B_API_KEY")
        return 2
    try:
        with httpx.Client(base_url=url, headers={"X-API-KEY": api_key}, timeout=60) as client:
            if args.pool_command == "show":
                r = client.get(f"/pools/{args.template}" if args.template else "/pools")
            elif args.pool_command == "set":
                r = client.put(f"/pools/{args.template}", json={"min": args.min, "max": args.max})
            else:
                r = client.delete(f"/pools/{args.template}")
    except httpx.TransportError as e:
        return unreachable(url, e)
    if r.status_code != 200:
        return failed(r)
    body: Any = r.json()
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    pools = body if isinstance(body, list) else [body]
    if not pools:
        console.print("no pools yet (a template's pool starts with its first sandbox, or `sandboxd pool set`)")
        return 0
    table = Table("template", "min", "max", "target", "idle", "hits", "misses", box=None)
    for p in pools:
        name = p["templateID"] + ("" if p["custom"] else " [dim](defaults)[/dim]")
        table.add_row(name, *(str(p[k]) for k in ("min", "max", "target", "idle", "hits", "misses")))
    console.print(table)
    return 0
