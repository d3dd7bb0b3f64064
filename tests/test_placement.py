"""Placement (cluster/placement.py), the rule alone, on leases as nodes write them: dead nodes never chosen;
`spread` the least loaded first (then the most memory), `binpack` the fullest with room first; a template's warm
nodes first; under `spread` those holding it preferred within a slack of load (a snapshot: always), under
`binpack` first; creates sent since the leases were read counted."""

from __future__ import annotations

from collections import Counter

from sandboxd.cluster.placement import LOCALITY_SLACK, order
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
    assert ids(order(nodes, "binpack", template="data-science")) == ["warm", "holds", "plain"]
    assert ids(order(nodes, "binpack", template="ds-id:v2")) == ["warm", "holds", "plain"]  # (a tag: its name)
    # its one warm sandbox promised to a create already: it is only a node holding the template now
    assert ids(order(nodes, "binpack", Counter({"warm": 1}), template="data-science")) == ["warm", "holds", "plain"]
    assert ids(order(nodes, "spread", template="data-science")) == ["warm", "plain", "holds"]  # (5 > 0 + slack)
    assert ids(order(nodes, "spread", template="base")) == ["plain", "holds", "warm"]  # (all hold it: by load)
    assert ids(order(nodes, "spread", template="unknown")) == ["plain", "holds", "warm"]


def test_spread_prefers_a_node_holding_the_template_within_a_slack() -> None:
    holds = node("holds", 3, 1000, templates=["made"])
    other = node("other", 3, 1000, templates=["base"])
    empty = node("empty", 3 - LOCALITY_SLACK, 1000, templates=["base"])
    assert ids(order([other, holds], "spread", template="made")) == ["holds", "other"]
    assert ids(order([empty, holds], "spread", template="made")) == ["empty", "holds"]  # (a tie: more memory, name)
    # a burst: the holder first, then, as its load grows past the slack, the others (which then fetch the template)
    sent: Counter[str] = Counter()
    picks = []
    for _ in range(6):
        first = order([holds, other], "spread", sent, template="made")[0]
        sent[first.node_id] += 1
        picks.append(first.node_id)
    assert picks[:LOCALITY_SLACK] == ["holds"] * LOCALITY_SLACK and "other" in picks
    assert ids(order([other, holds], "binpack", template="made")) == ["holds", "other"]  # (binpack: holders first)
    # a snapshot (pinned by the node holding it) goes there whatever the load
    snap = node("snap", 50, 1000, templates=["my-snap"], pinned=["my-snap"])
    assert ids(order([other, snap], "spread", template="my-snap")) == ["snap", "other"]
