"""`sandboxd keys ...`: teams' API keys through the server's API (no back door; the server's own key is needed):
`create --team T [--name N]` (the key is printed once: only its hash is kept), `list [--team T]`, `revoke ID`.
A key of team T sees only T's sandboxes, snapshots and volumes (core/teams.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from sandboxd.cli.output import console, err, failed, unreachable


def add_parsers(ksub: argparse._SubParsersAction, server_options: argparse.ArgumentParser) -> None:
    p = ksub.add_parser("create", parents=[server_options], help="a new API key for a team (printed once)")
    p.add_argument("--team", default="default", help="the key's team (made by its first key; default: default)")
    p.add_argument("--name", default="key", help="what the key is for (shown by `keys list`)")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    p = ksub.add_parser("list", parents=[server_options], help="the API keys (never the keys themselves)")
    p.add_argument("--team", default=None, help="only this team's")
    p.add_argument("--json", action="store_true", help="print the JSON the server answers")
    p = ksub.add_parser("revoke", parents=[server_options], help="delete an API key: it stops working at once")
    p.add_argument("key_id", metavar="ID", help="the key's ID (from `keys list`)")


def main(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    import httpx

    if not api_key:
        err.print("sandboxd: no API key: pass --api-key or set E2B_API_KEY (keys need the server's own key)")
        return 2
    try:
        with httpx.Client(base_url=url, headers={"X-API-KEY": api_key}, timeout=60) as client:
            if args.keys_command == "create":
                r = client.post(f"/admin/teams/{args.team}/api-keys", json={"name": args.name})
            elif args.keys_command == "list":
                r = client.get("/api-keys", params={"team": args.team} if args.team else None)
            else:
                r = client.delete(f"/api-keys/{args.key_id}")
    except httpx.TransportError as e:
        return unreachable(url, e)
    if r.status_code not in (200, 201, 204):
        return failed(r)
    if args.keys_command == "revoke":
        err.print(f"revoked {args.key_id}")
        return 0
    body: Any = r.json()
    if args.json:
        print(json.dumps(body, indent=1))
        return 0
    if args.keys_command == "create":
        err.print(f"team {body['teamID']}, key {body['id']} ({body['name']}): keep it now, it is not shown again")
        print(body["key"])
        return 0
    if not body:
        console.print("no team keys yet (`sandboxd keys create --team T`); the server's own key is `sandboxd api-key`")
        return 0
    table = Table("id", "team", "name", "key", "created", "last used", box=None)
    for k in body:
        shown = f"e2b_{k['mask']['maskedValuePrefix']}…{k['mask']['maskedValueSuffix']}"
        table.add_row(k["id"], k["teamID"], k["name"], shown, k["createdAt"] or "", k["lastUsed"] or "never")
    console.print(table)
    return 0
