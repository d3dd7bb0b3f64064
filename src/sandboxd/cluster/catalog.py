"""The cluster's catalog of templates (the state's `template_names` and `template_tags`): which template a name means
and which build each of its tags means, for every node. A node's templates dir is its own copy; the catalog is what
the nodes follow:

- a build of a new name asks the catalog for the name first: one node names it, and another node building the same
  new name at that moment builds another version of *that* template (the same ID), not a second template;
- a build that finishes, and tags assigned or removed through the API, are told to the catalog;
- a create on a node whose copy says otherwise (the template rebuilt or retagged elsewhere) has its tag point at the
  build the catalog names — fetched first if the node lacks it (cluster/layers.py) — and a tag removed elsewhere
  removed here;
- a deleted template is forgotten.

What a name means is read at most once a second per name on a node (CACHE_SECONDS): a rebuild is followed within that.
Built-in templates (every node's setup builds them) and snapshots (their node's, or fetched whole) are not catalogued.
"""

from __future__ import annotations

import logging
import time

from sandboxd.state.sql import State

log = logging.getLogger("sandboxd.cluster")

CACHE_SECONDS = 1.0


class Catalog:
    def __init__(self, state: State) -> None:
        self.state = state
        self._told: dict[str, tuple[float, tuple[str, dict[str, tuple[str, str]]] | None]] = {}

    def name(self, name: str, proposed: str) -> str:
        """The template ID `name` means in the cluster: `proposed` if no node named it first."""
        ident = self.state.name_template(name, proposed)
        if ident != proposed:
            log.info("template name %r is template %s in the cluster (named by another node first)", name, ident)
        return ident

    def known(self, name: str) -> str | None:
        """The template ID `name` means in the cluster, if a node named it (its build may still be under way)."""
        return self.state.template_named(name)

    def tagged(self, ident: str, tags: list[str], build: str) -> None:
        self.state.tag_template(ident, tags, build)
        self._told.clear()

    def untagged(self, ident: str, tags: list[str]) -> None:
        self.state.untag_template(ident, tags)
        self._told.clear()

    def forget(self, ident: str, names: list[str]) -> None:
        self.state.forget_template(ident)
        self._told.clear()

    def tags(self, name: str) -> tuple[str, dict[str, tuple[str, str]]] | None:
        """(the template `name` means, tag -> (build, the node that holds it)) as the catalog says, or None (not
        catalogued: a built-in template, a snapshot, one made before the catalog, or no template)."""
        now = time.monotonic()
        kept = self._told.get(name)
        if kept is not None and now - kept[0] < CACHE_SECONDS:
            return kept[1]
        told = self.state.template_tags(name)
        if len(self._told) > 10_000:
            self._told.clear()
        self._told[name] = (now, told)
        return told
