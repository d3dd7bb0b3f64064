"""Where a new sandbox goes: among the nodes whose lease runs, those with a warm (pooled) sandbox of its template
first, then those holding the template, then the rest; within each, by policy — `spread` (the fewest sandboxes
first, then the most memory available) or `binpack` (the most sandboxes first, while a node has memory left) —
counting the creates this replica sent since each node last reported (leases are a beat old: a burst must not
land on one node). The first choice is tried first; the next ones are where a create goes when a node refuses or
fails."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from sandboxd.state.sql import Node

Policy = Literal["spread", "binpack"]
MIN_FREE_MB = 256  # binpack: a node with less memory available is not filled further


def order(
    nodes: Sequence[Node], policy: Policy, sent: Counter[str] | None = None, template: str | None = None
) -> list[Node]:
    """The alive nodes, best first (for a sandbox of `template`, when given)."""
    sent = sent or Counter()
    alive = [n for n in nodes if n.alive]
    if template:
        name = template.split(":", 1)[0]  # (a tag: the template's name is what leases tell)

        def tier(n: Node) -> int:
            warm = n.capacity.get("warm") or {}
            if isinstance(warm, dict) and int(warm.get(name, 0) or 0) > sent[n.node_id]:
                return 0
            return 1 if name in (n.capacity.get("templates") or ()) else 2

        tiers = [[n for n in alive if tier(n) == t] for t in (0, 1, 2)]
        return [n for group in tiers for n in order(group, policy, sent)]

    def load(n: Node) -> int:
        return int(n.capacity.get("sandboxes", 0)) + sent[n.node_id]

    def free(n: Node) -> int:
        return int(n.capacity.get("memoryAvailableMB", 0))

    if policy == "binpack":
        roomy = [n for n in alive if free(n) >= MIN_FREE_MB]
        full = [n for n in alive if free(n) < MIN_FREE_MB]
        return sorted(roomy, key=lambda n: (-load(n), n.node_id)) + sorted(full, key=lambda n: (-free(n), n.node_id))
    return sorted(alive, key=lambda n: (load(n), -free(n), n.node_id))
