"""Where a new sandbox goes: among the nodes whose lease runs, those with a warm (pooled) sandbox of its template
first; then by policy — `spread` (the fewest sandboxes first, then the most memory available; a node holding the
template counts LOCALITY_SLACK sandboxes fewer: it is preferred until it has that many more than another, which
then fetches the template, cluster/layers.py) or `binpack` (the nodes holding the template first, then the rest;
within each the most sandboxes first, while a node has memory left) — counting the creates this replica sent since
each node last reported (leases are a beat old: a burst must not land on one node). A snapshot (a lease says
which of its templates are: `pinned`) goes to the nodes holding it first whatever the policy. The first choice is
tried first; the next ones are where a create goes when a node refuses or fails."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

from sandboxd.state.sql import Node

Policy = Literal["spread", "binpack"]
MIN_FREE_MB = 256  # binpack: a node with less memory available is not filled further
LOCALITY_SLACK = 2  # spread: sandboxes a node holding the template may have beyond another before that one wins


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

        pinned = any(name in (n.capacity.get("pinned") or ()) for n in alive)
        if policy == "spread" and not pinned:
            warm = [n for n in alive if tier(n) == 0]
            rest = [n for n in alive if tier(n) != 0]
            return order(warm, policy, sent) + _spread(rest, sent, lambda n: LOCALITY_SLACK if tier(n) == 1 else 0)
        tiers = [[n for n in alive if tier(n) == t] for t in (0, 1, 2)]
        return [n for group in tiers for n in order(group, policy, sent)]

    def load(n: Node) -> int:
        return _load(n, sent)

    def free(n: Node) -> int:
        return int(n.capacity.get("memoryAvailableMB", 0))

    if policy == "binpack":
        roomy = [n for n in alive if free(n) >= MIN_FREE_MB]
        full = [n for n in alive if free(n) < MIN_FREE_MB]
        return sorted(roomy, key=lambda n: (-load(n), n.node_id)) + sorted(full, key=lambda n: (-free(n), n.node_id))
    return _spread(alive, sent, lambda n: 0)


def _load(n: Node, sent: Counter[str]) -> int:
    return int(n.capacity.get("sandboxes", 0)) + sent[n.node_id]


def _spread(nodes: Sequence[Node], sent: Counter[str], bonus: Callable[[Node], int]) -> list[Node]:
    """The least loaded first (less `bonus`), then the most memory available."""
    return sorted(
        nodes, key=lambda n: (_load(n, sent) - bonus(n), -int(n.capacity.get("memoryAvailableMB", 0)), n.node_id)
    )
