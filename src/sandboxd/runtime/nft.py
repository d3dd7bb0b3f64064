"""nftables through libnftables (Debian's `libnftables1`, installed with `nftables`), in process.

One call runs a whole script as one transaction: it applies completely or not at all, which is what
makes a policy update atomic. `nft -f` would cost a process per change; this costs ~0.2 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading


class NftError(Exception):
    """nftables refused a script (the message is nft's own)."""


_LIB_NAMES = ("libnftables.so.1", ctypes.util.find_library("nftables") or "")


def _load() -> ctypes.CDLL:
    for name in _LIB_NAMES:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        return lib
    raise NftError("libnftables is not installed: apt install nftables (scripts/setup.sh does)")


class Nft:
    """A libnftables context. Calls are serialized (a context is not thread-safe)."""

    def __init__(self) -> None:
        self._lib = _load()
        self._ctx = self._lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, script: str) -> str:
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return out

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
