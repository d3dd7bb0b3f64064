"""Bounds on what a client may make the server parse, and the bounded JSON reader that enforces them.

Every request body is hostile input. Two things are bounded *before* a document reaches a parser
written in C or Rust: its size (read at most `max_*_bytes`, after decompression) and its nesting depth.
The depth matters because protobuf-py's native JSON reader recurses without a limit: a Connect message
of 100,000 `[` crashes the whole server process (tests/security/test_requests.py). Python's own
`json` module is safe (it raises RecursionError), so it reads the document first; the depth is then
measured without recursion, and only a document within the bounds is handed to protobuf.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    # One Connect message to envd (process/filesystem RPCs; a StreamInput chunk is one message).
    # gRPC's customary 4 MiB: stdin data travels base64-encoded, so ~3 MiB of input per message.
    max_message_bytes: int = 4 * MiB
    # One control-plane JSON body (create, connect, timeout): metadata and env vars fit easily.
    max_body_bytes: int = 1 * MiB
    # Nesting of any JSON document the server parses. envd's deepest message nests 4 objects.
    max_json_depth: int = 32
    # A request's head (request line + headers): its size, and the time from its first byte to its last.
    max_head_bytes: int = 64 * 1024
    head_timeout_s: float = 30.0


class LimitExceeded(Exception):
    """A request went over one of the RequestLimits; the message names the limit."""


class BadJSON(ValueError):
    pass


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether a parsed JSON value nests containers deeper than `max_depth` (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def load_bounded_json(raw: bytes | bytearray | str, max_depth: int) -> Any:
    """`json.loads`, refusing documents nested deeper than `max_depth` (LimitExceeded) and invalid
    JSON (BadJSON). Never recurses in C beyond the interpreter's recursion limit."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise LimitExceeded(f"the JSON document nests deeper than the limit of {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BadJSON(str(e)) from None
    if json_depth_exceeds(value, max_depth):
        raise LimitExceeded(f"the JSON document nests deeper than the limit of {max_depth} levels")
    return value


def _host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 32768


@dataclass(frozen=True)
class HostLimits:
    """What all sandboxes of one server may take of the host together. Admission (create answers 429
    naming the limit) counts the limits given to sandboxes, pooled ones included; the kernel enforces
    the real totals on the server's cgroup group (memory and PIDs of all its sandboxes together)."""

    max_sandboxes: int
    # Sum of the sandboxes' memory limits. Limits are ceilings that idle sandboxes do not use, so the
    # default commits up to twice the host's RAM; actual use is capped by the kernel at `memory_cap_mb`.
    max_committed_memory_mb: int
    memory_cap_mb: int
    # Sum of the sandboxes' PID limits: half of the host's PID space (kernel.pid_max) by default, so the
    # host's own services can always fork.
    max_total_pids: int
    # The server process itself (its own cgroup): a backstop, requests are bounded well below it.
    server_memory_mb: int = 4096

    @classmethod
    def for_host(cls, **overrides: int | None) -> HostLimits:
        ram = _host_memory_mb()
        defaults = {
            "max_sandboxes": 1024,
            "max_committed_memory_mb": 2 * ram,
            "memory_cap_mb": max(ram - max(1024, ram // 10), ram // 2),
            "max_total_pids": _pid_max() // 2,
        }
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**defaults)
