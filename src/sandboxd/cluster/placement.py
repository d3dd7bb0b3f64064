"""Where a new sandbox goes: among the nodes whose lease runs, by policy — `spread` (the fewest sandboxes first,
then the most memory available) or `binpack` (the most sandboxes first, while a node has memory left) — counting
the creates this replica sent since each node last reported (leases are a beat old: a burst must not land on one
node). The first choice is tried first; the next ones are where a create goes when a node refuses or fails."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from sandboxd.state.sql import Node

Policy = Literal["spread", "binpack"]
MIN_FREE_MB = 256  # binpack: a node with less memory available is not filled further


def order(nodes: Sequence[Node], policy: Policy, sent: Counter[str] | None = None) -> list[Node]:
    """The alive nodes, best first."""
    sent = sent or Counter()
    alive = [n for n in nodes if n.alive]

    def load(n: Node) -> int:
        return int(n.capacity.get("sandboxes", 0)) + sent[n.node_id]

    def free(n: Node) -> int:
        return int(n.capacity.get("memoryAvailableMB", 0))

    if policy == "binpack":
        roomy = [n for n in alive if free(n) >= MIN_FREE_MB]
        full = [n for n in alive if free(n) < MIN_FREE_MB]
        return sorted(roomy, key=lambda n: (-load(n), n.node_id)) + sorted(full, key=lambda n: (-free(n), n.node_id))
    return sorted(alive, key=lambda n: (load(n), -free(n), n.node_id))
