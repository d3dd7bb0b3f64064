"""Teams' limits: how many sandboxes a team may have at once and how many it may create per minute, each team's own
(`PUT /admin/teams/{team}/limits`, kept in the state's settings) or the server's defaults (`--team-max-sandboxes`,
`--team-creates-per-minute`; 0: none). A create over either is refused with 429 and Retry-After, before any work.
Counted in the state (state/sql.py's admit_create), so that in a cluster every API replica enforces the same
numbers; the all-in-one server enforces them itself, a cluster's nodes leave it to the replicas. The operator's key
is never limited.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from sandboxd.core.errors import BadRequest, LimitReached
from sandboxd.core.teams import Caller, check_team
from sandboxd.state.sql import State

PREFIX = "team-limits:"
MAX_VALUE = 1_000_000


class TeamLimitReached(LimitReached):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass(frozen=True)
class Limits:
    maxSandboxes: int = 0
    createsPerMinute: int = 0


class TeamQuotas:
    def __init__(self, state: State, max_sandboxes: int = 0, creates_per_minute: int = 0) -> None:
        self.state = state
        self.defaults = Limits(max(0, max_sandboxes), max(0, creates_per_minute))

    def limits(self, team: str) -> tuple[Limits, bool]:
        """The team's limits, and whether they are its own (else the server's defaults)."""
        raw = self.state.get_setting(PREFIX + check_team(team))
        if raw is None:
            return self.defaults, False
        return Limits(**json.loads(raw)), True

    def set_limits(self, team: str, body: Any) -> Limits:
        check_team(team)
        if not isinstance(body, dict) or set(body) - {"maxSandboxes", "createsPerMinute"}:
            raise BadRequest("limits are {maxSandboxes, createsPerMinute}: whole numbers, 0 for none")
        values = {}
        for name in ("maxSandboxes", "createsPerMinute"):
            value = body.get(name, getattr(self.defaults, name))
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VALUE:
                raise BadRequest(f"{name} must be a whole number from 0 (none) to {MAX_VALUE}")
            values[name] = value
        limits = Limits(**values)
        self.state.set_setting(PREFIX + team, json.dumps(asdict(limits)))
        return limits

    def reset(self, team: str) -> None:
        self.state.delete_setting(PREFIX + check_team(team))

    def admit(self, caller: Caller) -> None:
        """One more create for the caller's team, or TeamLimitReached (429) saying which limit and when to retry."""
        if caller.admin:
            return
        limits, _ = self.limits(caller.team)
        if not limits.maxSandboxes and not limits.createsPerMinute:
            return
        refused = self.state.admit_create(caller.team, limits.maxSandboxes, limits.createsPerMinute)
        if refused is None:
            return
        kind, wait = refused
        which = (
            f"its limit of {limits.maxSandboxes} sandboxes at once: end one first"
            if kind == "sandboxes"
            else f"its limit of {limits.createsPerMinute} creates per minute: retry in {math.ceil(wait)} s"
        )
        raise TeamLimitReached(f"team '{caller.team}' is at {which} (or ask the operator to raise it)", wait)
