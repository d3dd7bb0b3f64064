"""`sandboxd nodes [--json]`: a cluster's nodes (GET /admin/nodes, the server's own key), from any node or replica."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from sandboxd.cli.output import console, err, failed, unreachable


def main(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    import httpx

    if not api_key:
        err.print("sandboxd: no API key: pass --api-key or set E2B_API_KEY (the nodes need the server's own key)")
        return 2
    try:
        r = httpx.get(f"{url}/admin/nodes", headers={"X-API-KEY": api_key}, timeout=30)
    except httpx.TransportError as e:
        return unreachable(url, e)
    if r.status_code == 404 and "no such endpoint" in r.text:
        err.print(f"sandboxd: the server at {url} is not part of a cluster (it was started without --database)")
        return 1
    if r.status_code != 200:
        return failed(r)
    nodes = r.json()
    if args.json:
        print(json.dumps(nodes, indent=1))
        return 0
    table = Table(box=None, pad_edge=False)
    for col in ("NODE", "URL", "LEASE", "SANDBOXES", "WARM", "CPUS", "MEM FREE", "TEMPLATES"):
        table.add_column(
            col, justify="right" if col in ("SANDBOXES", "WARM", "CPUS", "MEM FREE", "TEMPLATES") else "left"
        )
    for n in nodes:
        left = n["leaseLeftSeconds"]
        lease = f"alive ({left:.0f} s)" if n["alive"] else f"lost ({-left:.0f} s ago)"
        table.add_row(
            n["nodeID"],
            n["url"],
            lease,
            str(n["sandboxes"]),
            str(n["warm"]),
            str(n["cpus"]),
            f"{n['memoryAvailableMB']} MiB",
            str(n["templates"]),
        )
    console.print(table)
    alive = sum(1 for n in nodes if n["alive"])
    err.print(f"{alive} of {len(nodes)} node(s) alive")
    return 0
