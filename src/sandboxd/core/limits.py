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


class LimitExceeded(Exception):
    """A request went over one of the RequestLimits; the message names the limit."""


class BadJSON(ValueError):
    pass


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether a parsed JSON value nests containers deeper than `max_depth` (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
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
