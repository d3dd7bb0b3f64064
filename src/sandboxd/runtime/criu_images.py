"""CRIU's images of a snapshot, staged for a new sandbox (runtime/namespaces.py, `create(..., from_images=)`).

A snapshot's images were written for the uid range of the sandbox it was taken of; the user namespace CRIU
makes at a restore maps the sandbox's ids onto the range its `userns-*.img` names (every other image holds ids
as seen inside the sandbox). So the new sandbox gets its own copy of that image, its maps moved onto the new
range; the memory pages (the bulk) are hard links to the snapshot's, read only by the restore.

An image is CRIU's common magic, the image's own magic, then entries, each a little-endian u32 size and a
protocol buffers message (`images/userns.proto`: repeated extents {first, lower_first, count} for uids (1) and
gids (2)). Only that message is parsed here, bounded: an image that is not what it should be is refused.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

COMMON_MAGIC = 0x54564319
USERNS_MAGIC = 0x55474906
MAX_USERNS_IMAGE = 64 << 10  # a handful of extents: anything larger is not CRIU's
SHARED_PREFIXES = ("pages-",)  # the memory: linked, not copied


class ImageError(ValueError):
    pass


def _varint(data: bytes, off: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if off >= len(data) or shift > 63:
            raise ImageError("a truncated or overlong varint")
        b = data[off]
        off += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, off
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a message of varints and length-delimited fields."""
    out: list[tuple[int, int, int | bytes]] = []
    off = 0
    while off < len(data):
        tag, off = _varint(data, off)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, off = _varint(data, off)
            out.append((number, wire, value))
        elif wire == 2:
            size, off = _varint(data, off)
            if off + size > len(data):
                raise ImageError("a field runs past its message")
            out.append((number, wire, data[off : off + size]))
            off += size
        else:
            raise ImageError(f"unexpected wire type {wire}")
    return out


def _encode(fields: list[tuple[int, int, int | bytes]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _put_varint(number << 3 | wire)
        if isinstance(value, int):
            out += _put_varint(value)
        else:
            out += _put_varint(len(value)) + value
    return bytes(out)


def rebase_userns(data: bytes, old_base: int, new_base: int, span: int) -> bytes:
    """A `userns-*.img` whose maps onto [old_base, old_base + span) are moved onto new_base."""
    if len(data) > MAX_USERNS_IMAGE or len(data) < 8:
        raise ImageError("not a user namespace image (its size)")
    if struct.unpack_from("<II", data) != (COMMON_MAGIC, USERNS_MAGIC):
        raise ImageError("not a user namespace image (its magic)")
    out, off = bytearray(data[:8]), 8
    while off < len(data):
        if off + 4 > len(data):
            raise ImageError("a truncated entry")
        (size,) = struct.unpack_from("<I", data, off)
        entry = data[off + 4 : off + 4 + size]
        if len(entry) != size:
            raise ImageError("a truncated entry")
        off += 4 + size
        fields: list[tuple[int, int, int | bytes]] = []
        for number, wire, value in _fields(entry):
            if number in (1, 2) and isinstance(value, bytes):  # an extent of the uid or gid map
                extent = dict((n, v) for n, _, v in _fields(value))
                lower, count = extent.get(2), extent.get(3)
                if not isinstance(lower, int) or not isinstance(count, int):
                    raise ImageError("an extent without lower_first or count")
                if not (old_base <= lower and lower + count <= old_base + span):
                    raise ImageError(f"an extent ({lower}, {count}) outside the snapshot's uid range")
                value = _encode(
                    [
                        (n, w, new_base + v - old_base if n == 2 and isinstance(v, int) else v)
                        for n, w, v in _fields(value)
                    ]
                )
            fields.append((number, wire, value))
        body = _encode(fields)
        out += struct.pack("<I", len(body)) + body
    return bytes(out)


def stage(source: Path, dest: Path, old_base: int, new_base: int, span: int) -> None:
    """A copy of a snapshot's images in `dest` for a sandbox whose uid range starts at new_base."""
    dest.mkdir(mode=0o700)
    for entry in os.scandir(source):
        if not entry.is_file(follow_symlinks=False):
            continue
        target = dest / entry.name
        if entry.name.startswith("userns-"):
            data = Path(entry.path).read_bytes()
            target.write_bytes(rebase_userns(data, old_base, new_base, span))
        elif entry.name.startswith(SHARED_PREFIXES):
            # Read by the restored processes themselves, in the new sandbox's user namespace, through this
            # directory only (its own, 0700): readable to them whoever wrote it (shared by every such sandbox).
            os.chmod(entry.path, 0o644)
            os.link(entry.path, target)
            continue
        elif entry.name.endswith(".img"):
            shutil.copyfile(entry.path, target)
        else:
            continue
        os.chown(target, new_base, new_base)
    os.chown(dest, new_base, new_base)  # (CRIU, run as the sandbox's uid, writes its log there)
