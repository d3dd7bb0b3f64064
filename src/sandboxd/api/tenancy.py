"""Who is calling (the Caller api/app.py's ApiKeyAuth put in the request's scope) and what a team's key may
reach beyond its sandboxes: another team's snapshot or volume is not found (404), another team's template cannot
be changed (403). The rules themselves are core/teams.py's."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from sandboxd.core.errors import NotFound
from sandboxd.core.manager import SandboxManager
from sandboxd.core.teams import OPERATOR, TEMPLATE, VOLUME, Caller, Teams
from sandboxd.templates.store import TemplateStore
from sandboxd.volumes.errors import VolumeError

CALLER = "sandboxd.caller"  # the request scope's key for who is calling


def caller_of(request: Request) -> Caller:
    caller = request.scope.get(CALLER)
    return caller if isinstance(caller, Caller) else OPERATOR


def sees_template(store: TemplateStore, teams: Teams, caller: Caller, ident: str) -> bool:
    """False for another team's snapshot (a template anyone may use otherwise)."""
    return caller.admin or not store.meta(ident).get("snapshot") or caller.sees(teams.owner(TEMPLATE, ident))


def visible_template(manager: SandboxManager, teams: Teams, caller: Caller, name: str) -> bool:
    """sees_template() for a template's name (one that names none: visible, the create says it is not found)."""
    ident, _ = manager.templates.resolve(name)
    return ident is None or sees_template(manager.templates, teams, caller, ident)


def check_create(
    manager: SandboxManager, teams: Teams, caller: Caller, template: str, volume_mounts: list[Any] | None
) -> None:
    """A team's create: from its own snapshots only, mounting its own volumes only."""
    if not visible_template(manager, teams, caller, template):
        raise NotFound(f"template '{template[:120]}' not found")
    for mount in volume_mounts or []:
        ref = mount.get("name") if isinstance(mount, dict) else None
        if not isinstance(ref, str) or manager.volumes is None:
            continue  # (core/volume_mounts.py refuses it)
        try:
            vol = manager.volumes.get(ref)
        except VolumeError:
            continue
        if not caller.sees(teams.owner(VOLUME, vol.volume_id)):
            raise NotFound(f"volume {ref[:80]!r} not found")
