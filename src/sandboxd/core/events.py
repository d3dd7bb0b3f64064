"""What happens to sandboxes and templates, as it happens: creates, pauses, resumes, ends and template builds,
each with its outcome and how long it took, for whoever listens (the Prometheus exporter,
telemetry/prometheus.py). Listeners run in the caller's task and must be quick; one that fails is logged and
the caller goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sandboxd.core.errors import SandboxdError

log = logging.getLogger("sandboxd.events")

# outcomes besides "ok": the request was refused as wrong (4xx), over a limit (429), or it failed (5xx, other errors)
REJECTED, LIMIT, FAILED, CANCELLED = "rejected", "limit", "failed", "cancelled"
UNKNOWN_TEMPLATE = "(unknown)"  # the label of a request naming no template there is (never the name it gave)


@dataclass
class Event:
    kind: str  # "create", "pause", "resume", "end" or "build"
    template: str = UNKNOWN_TEMPLATE  # the template's name (a fork's: its source's template)
    outcome: str = "ok"  # or REJECTED, LIMIT, FAILED, CANCELLED; for "end", why it ended (core/endings.py's kinds)
    seconds: float = 0.0
    mode: str = ""  # create: "pool" or "new"; pause and resume: "memory", "disk" or "filesystem"
    sandbox_id: str = ""
    detail: str = ""  # what a person reading the sandbox's log wants to know (why it ended, why unhealthy)
    started: float = field(default_factory=time.monotonic, repr=False)


def outcome_of(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return CANCELLED
    if isinstance(error, SandboxdError) and error.status == 429:
        return LIMIT
    if isinstance(error, SandboxdError) and 400 <= error.status < 500:
        return REJECTED
    return FAILED


class Events:
    def __init__(self) -> None:
        self._listeners: list[Callable[[Event], None]] = []

    def listen(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("an event listener failed on %s", event)

    @contextmanager
    def timed(self, kind: str, template: str = UNKNOWN_TEMPLATE, mode: str = "") -> Iterator[Event]:
        """An event emitted when the block ends, with its duration and outcome (from the exception that ended it,
        if one did); the block fills in what it learns on the way (the template, the mode, the sandbox)."""
        event = Event(kind, template, mode=mode)
        try:
            yield event
        except BaseException as e:
            event.outcome = outcome_of(e)
            raise
        finally:
            event.seconds = time.monotonic() - event.started
            self.emit(event)
