"""Placement (cluster/placement.py), the rule alone, on leases as nodes write them: dead nodes never chosen;
`spread` the least loaded first (then the most memory), `binpack` the fullest with room first; a template's warm
nodes first, then those holding it, then the rest; creates sent since the leases were read counted."""

from __future__ import annotations

from collections import Counter

from sandboxd.cluster.placement import order
from sandboxd.state.sql import Node


def node(name: str, sandboxes: int, free_mb: int, alive: bool = True, **extra: object) -> Node:
    capacity = {"sandboxes": sandboxes, "memoryAvailableMB": free_mb, **extra}
    return Node(name, f"http://{name}.invalid", capacity, 0.0, 10.0, alive)


def ids(nodes: list[Node]) -> list[str]:
    return [n.node_id for n in nodes]


def test_spread_and_binpack() -> None:
    nodes = [node("a", 5, 1000), node("b", 2, 500), node("c", 2, 900), node("dead", 0, 9999, alive=False)]
    assert ids(order(nodes, "spread")) == ["c", "b", "a"]  # (fewest first; a tie: more memory first)
    assert ids(order(nodes, "spread", Counter({"c": 1}))) == ["b", "c", "a"]  # (creates in flight count)
    full = node("full", 9, 100)
    assert ids(order([*nodes, full], "binpack")) == ["a", "b", "c", "full"]  # (fullest with room; no room: last)
    assert order([node("x", 0, 1, alive=False)], "spread") == []


def test_a_templates_warm_nodes_then_those_holding_it() -> None:
    nodes = [
        node("plain", 0, 1000, templates=["base"]),
        node("holds", 5, 1000, templates=["base", "data-science", "ds-id"]),
        node("warm", 9, 1000, templates=["base", "data-science", "ds-id"], warm={"data-science": 1, "ds-id": 1}),
    ]
    assert ids(order(nodes, "spread", template="data-science")) == ["warm", "holds", "plain"]
    assert ids(order(nodes, "spread", template="ds-id:v2")) == ["warm", "holds", "plain"]  # (a tag: its name)
    # its one warm sandbox promised to a create already: it is only a node holding the template now
    assert ids(order(nodes, "spread", Counter({"warm": 1}), template="data-science")) == ["holds", "warm", "plain"]
    assert ids(order(nodes, "spread", template="base")) == ["plain", "holds", "warm"]  # (all hold it: by load)
    assert ids(order(nodes, "spread", template="unknown")) == ["plain", "holds", "warm"]
