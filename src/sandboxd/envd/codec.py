"""Connect codecs for envd with the request bounds of core/limits.py applied before protobuf parses."""

from __future__ import annotations

from typing import TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec
from connectrpc.errors import ConnectError
from protobuf import Message

from sandboxd.core.limits import BadJSON, LimitExceeded, RequestLimits, load_bounded_json

M = TypeVar("M", bound=Message)


class BoundedJSONCodec:
    """ProtoJSON, but the document is first read by Python's `json` (depth-safe) and its nesting
    checked: protobuf-py's native JSON reader has no depth limit and crashes the process on deep input.
    Unknown fields are ignored, as connectrpc's default JSON codec does."""

    def __init__(self, limits: RequestLimits) -> None:
        self._max_depth = limits.max_json_depth

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return message.to_json().encode()

    def decode(self, data: bytes | bytearray, message_class: type[M]) -> M:
        if not data:
            return message_class()
        try:
            load_bounded_json(data, self._max_depth)
        except LimitExceeded as e:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"request message refused: {e}") from None
        except BadJSON as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"request message is not valid JSON: {e}") from None
        try:
            return message_class.from_json(data, ignore_unknown_fields=True)
        except (ValueError, TypeError, RecursionError) as e:
            what = message_class.__name__
            raise ConnectError(Code.INVALID_ARGUMENT, f"request message does not fit {what}: {e}") from None


def envd_codecs(limits: RequestLimits) -> list[Codec]:
    return [proto_binary_codec(), BoundedJSONCodec(limits)]
