"""envd's `/files`: download (Range, gzip) and upload (multipart or raw, gzip), streamed both ways.

Data never sits whole in memory: downloads are read from the descriptor in 1 MiB pieces, uploads are
parsed as they arrive and written in pieces. An upload goes to a temporary file next to its target
and is renamed over it only when complete, so a failed upload (a dropped connection, a full disk)
leaves the old file, if any, untouched and no partial file behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import os
import posixpath
import secrets
import stat
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.core.users import User, lookup_user
from sandboxd.envd import fs, uploads, watch
from sandboxd.fdio import ThreadFd, pipe_chunks
from sandboxd.runtime.broker import Broker, BrokerGone, BrokerTimeout

READ_CHUNK = 1 << 20
MAX_LOGGED = 100  # files of one upload named in the sandbox's log
MAX_UNSIZED = 64 << 20  # a size-0 file (procfs) is read to EOF, but no further than this
WRITE_BATCH = 1 << 20
WRITE_QUEUE = 4


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def signature(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{username}:{token}" + (f":{expiration}" if expiration is not None else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def signature_matches(request_query: dict[str, str], operation: str, token: str) -> bool:
    given = request_query.get("signature")
    if not given:
        return False
    exp_raw = request_query.get("signature_expiration")
    expiration = int(exp_raw) if exp_raw and exp_raw.lstrip("-").isdigit() else None
    expected = signature(request_query.get("path", ""), operation, request_query.get("username", ""), token, expiration)
    return hmac.compare_digest(given, expected)


def wants_gzip(accept_encoding: str) -> bool:
    """Compress only when gzip is the client's explicit choice: offered alone (the SDK's `gzip=True`
    sends exactly `gzip`), or with identity refused. A client that merely accepts several codings
    (httpx's default `gzip, deflate`) gets the bytes as they are: compressing arbitrary binary files
    costs far more CPU than loopback bandwidth it saves (measured: 60 MB/s instead of ~1 GB/s)."""
    codings: dict[str, float] = {}
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name:
            codings[name.lower()] = q
    if codings.get("gzip", 0) <= 0:
        return False
    others = {k for k, q in codings.items() if q > 0 and k not in ("gzip", "identity")}
    return not others or codings.get("identity", 1.0) == 0


def operation_of(method: str) -> str:
    return "write" if method == "POST" else "read"


def _http_error(e: OSError, path: str, doing: str = "error opening file: open") -> JSONResponse:
    """The answer to a failed file operation. `doing`: what failed, in envd's words, for the errors that
    envd answers with a 500 and the OS error (a user without permission, as envd says it)."""
    shown = fs.display_path(path)
    match e.errno:
        case errno.ENOENT:
            return error(404, f"path '{shown}' does not exist")
        case errno.EACCES | errno.EPERM:
            # envd's own text and status ("error opening file: open /root/x: permission denied", 500);
            # it reaches the SDKs as the same SandboxException with the same message.
            reason = (e.strerror or "permission denied").lower()
            return error(500, f"{doing} {shown}: {reason}")
        case errno.EISDIR:
            return error(400, f"path '{shown}' is a directory")
        case errno.ENOTDIR:
            return error(400, f"a parent of '{shown}' is not a directory")
        case errno.ENOSPC | errno.EDQUOT:
            return error(507, f"not enough disk space in the sandbox to write '{shown}'")
        case errno.ELOOP:
            return error(400, f"too many levels of symbolic links in '{shown}'")
        case errno.ENAMETOOLONG | errno.EINVAL:
            return error(400, f"invalid path '{shown[:200]}'")
        case errno.ENXIO:
            return error(400, f"path '{shown}' is not a regular file")
        case _:
            return error(500, f"{e.strerror or e}: '{shown}'")


def _log_written(manager: SandboxManager, sandbox: Sandbox, written: list[dict[str, Any]], user: str) -> None:
    """The files an upload wrote, in the sandbox's log (core/sandbox_logs.py)."""
    for w in written[:MAX_LOGGED]:
        path = str(w.get("path", ""))
        manager.logs.add(sandbox.id, "info", f"file written by {user}: {path}", path=path, user=user)


class FilesEndpoint:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send, sandbox: Sandbox) -> None:
        request = Request(scope, receive)
        query = dict(request.query_params)
        # Either the sandbox's access token, or a signature made with it (download_url / upload_url).
        token = request.headers.get("x-access-token")
        if token is None or not hmac.compare_digest(token, sandbox.record.envd_token):
            if not query.get("signature"):
                await error(401, "missing X-Access-Token or signature")(scope, receive, send)
                return
            exp = query.get("signature_expiration")
            if exp is not None:
                if not exp.lstrip("-").isdigit():
                    await error(400, "signature_expiration must be a unix timestamp")(scope, receive, send)
                    return
                if int(exp) < time.time():
                    await error(401, "signature is already expired")(scope, receive, send)
                    return
            if not signature_matches(query, operation_of(request.method), sandbox.record.envd_token):
                await error(401, "invalid signature")(scope, receive, send)
                return
        name = query.get("username") or sandbox.record.default_user
        user = lookup_user(str(self.manager.runtime.root_path(sandbox.handle)), name, sandbox.handle.uid_base)
        if user is None:
            await error(401, f"invalid username: '{name}'")(scope, receive, send)
            return
        try:
            broker = fs.brokers_of(self.manager, sandbox).get(user)
            if request.method in ("GET", "HEAD"):
                response = await self.download(request, query, user, broker)
            elif request.method == "POST":
                response = await self.upload(request, query, user, broker, sandbox)
            else:
                response = error(405, f"method {request.method} is not allowed on /files")
        except BrokerTimeout as e:
            response = error(504, str(e))
        except BrokerGone as e:
            if sandbox.killed.is_set():
                response = JSONResponse(
                    {"sandboxId": sandbox.id, "message": "The sandbox was not found", "code": 502}, status_code=502
                )
            else:
                response = error(500, str(e))
        await response(scope, receive, send)

    # -- download --------------------------------------------------------------------------------
    async def download(self, request: Request, query: dict[str, str], user: User, broker: Broker) -> Response:
        if "path" not in query:
            return error(400, "the 'path' query parameter is required")
        path = fs.resolve(query["path"], user)
        try:
            fd = await broker.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            return _http_error(e, path)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                os.close(fd)
                return error(400, f"path '{fs.display_path(path)}' is a directory")
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return error(400, f"path '{fs.display_path(path)}' is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        size = st.st_size
        unsized = size == 0  # procfs and sysfs files say 0 and have content: stream them to EOF
        filename = posixpath.basename(path)
        headers = {
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}",
            "Accept-Ranges": "bytes",
            "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(st.st_mtime)),
        }
        start, end = 0, size
        status = 200
        range_header = None if unsized else request.headers.get("range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                os.close(fd)
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        gzip = not range_header and wants_gzip(request.headers.get("accept-encoding", ""))
        if gzip:
            headers["Content-Encoding"] = "gzip"
        elif not unsized:
            headers["Content-Length"] = str(end - start)
        if unsized:
            end = MAX_UNSIZED
        if request.method == "HEAD":
            os.close(fd)
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        return StreamingResponse(
            _read_range(fd, start, end, gzip),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    # -- upload ----------------------------------------------------------------------------------
    async def upload(
        self, request: Request, query: dict[str, str], user: User, broker: Broker, sandbox: Sandbox
    ) -> Response:
        metadata = {k[len("x-metadata-") :]: v for k, v in request.headers.items() if k.startswith("x-metadata-")}
        body = _decoded_body(request)
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        written: list[dict[str, str]] = []
        if ctype == b"multipart/form-data":
            boundary = params.get(b"boundary")
            if not boundary:
                return error(400, "multipart/form-data without a boundary")
            try:
                async for filename, chunks in _multipart_files(body, boundary):
                    target = query.get("path") or filename
                    if not target:
                        return error(400, "each file part needs a filename, or give the 'path' query parameter")
                    path = fs.resolve(target, user)
                    result = await self._write(broker, path, chunks, metadata, user, sandbox.handle.state_dir)
                    if isinstance(result, Response):
                        return result
                    written.append(result)
            except _BadBody as e:
                return error(400, str(e))
            if not written:
                return error(400, "no part named 'file' in the multipart body")
        elif ctype in (b"application/octet-stream", b""):
            if not query.get("path"):
                return error(400, "the 'path' query parameter is required for an application/octet-stream upload")
            path = fs.resolve(query["path"], user)
            try:
                result = await self._write(broker, path, body, metadata, user, sandbox.handle.state_dir)
            except _BadBody as e:
                return error(400, str(e))
            if isinstance(result, Response):
                return result
            written.append(result)
        else:
            return error(
                400,
                f"unsupported Content-Type {ctype.decode(errors='replace')!r}: use multipart/form-data "
                "or application/octet-stream",
            )
        _log_written(self.manager, sandbox, written, user.name)
        return JSONResponse(written)

    async def _write(
        self,
        broker: Broker,
        path: str,
        chunks: AsyncIterator[bytes],
        metadata: dict[str, str],
        user: User,
        sandbox_dir: Path,
    ) -> dict[str, Any] | Response:
        if path.endswith("/"):
            return error(400, f"path '{path}' names a directory, not a file")
        with contextlib.suppress(OSError):
            # like envd, a write goes through symlinks to their target (resolved inside the sandbox)
            path = await broker.realpath(path)
        parent = posixpath.dirname(path) or "/"
        tmp = posixpath.join(parent, f".sandboxd-upload-{secrets.token_hex(6)}")
        journal = uploads.begin(sandbox_dir, user.name, tmp)
        doing = "error ensuring directories: mkdir"
        try:
            await broker.makedirs(parent)
            doing = "error opening file: open"
            fd = await broker.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            uploads.end(journal)
            # drain the body so the client gets our answer rather than a reset
            async for _ in chunks:
                pass
            return _http_error(e, parent if doing.startswith("error ensuring") else path, doing)
        ok = False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return error(400, f"cannot write '{fs.display_path(path)}'")
            await _pipe_to_fd(chunks, fd)
            replaced = await self._carry_over(broker, path, fd, metadata, user)
            watch.note_upload(posixpath.basename(tmp), replaced, os.fstat(fd).st_size)  # for watchers' events
            await broker.rename(tmp, path)
            ok = True
        except OSError as e:
            return _http_error(e, path)
        finally:
            os.close(fd)
            gone = ok
            if not ok:
                try:
                    await broker.unlink(tmp)
                    gone = True
                except FileNotFoundError:
                    gone = True
                except (OSError, BrokerGone):  # its sandbox stopped: the journal keeps it for its next boot
                    pass
            if gone:
                uploads.end(journal)
        result: dict[str, Any] = {"name": posixpath.basename(path), "type": "file", "path": fs.display_path(path)}
        if metadata:
            result["metadata"] = metadata  # as envd: the write result reflects the metadata written
        return result

    @staticmethod
    async def _carry_over(broker: Broker, path: str, fd: int, metadata: dict[str, str], user: User) -> bool:
        """The metadata sent (if any) goes on the new file: an overwrite without metadata leaves none, as
        on envd. The old file's permission bits stay. Returns whether a file is being replaced."""
        if metadata:
            fs.write_metadata(fd, metadata)
        try:
            old = await broker.open(path, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            st = os.fstat(old)
            if stat.S_ISREG(st.st_mode):
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o777)
            return True
        finally:
            os.close(old)


class _BadBody(Exception):
    pass


async def _pipe_to_fd(chunks: AsyncIterator[bytes], fd: int) -> None:
    """The body to `fd` while it arrives (fdio.pipe_chunks: WRITE_BATCH bytes at a time, WRITE_QUEUE
    batches queued), through a descriptor of the writer's own: if we are cancelled while its thread
    writes, the close waits for that write, and nothing goes through a number the server reuses."""
    guard = ThreadFd(os.dup(fd))
    try:
        await pipe_chunks(chunks, guard.write_all, WRITE_BATCH, WRITE_QUEUE)
    finally:
        guard.close()


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    end = min(end, size)
    if start >= size or start >= end:
        return None
    return start, end


async def _read_range(fd: int, start: int, end: int, gzip: bool) -> AsyncIterator[bytes]:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if gzip else None  # fast level: speed over ratio
    guard = ThreadFd(fd)  # a cancelled download's close waits for its read in progress (fdio.py)
    try:
        offset = start
        while offset < end:
            data = await asyncio.to_thread(guard.pread, min(READ_CHUNK, end - offset), offset)
            if not data:
                break
            offset += len(data)
            if compressor is not None:
                data = compressor.compress(data)
                if not data:
                    continue
            yield data
        if compressor is not None:
            yield compressor.flush()
    finally:
        guard.close()


async def _decoded_body(request: Request) -> AsyncIterator[bytes]:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip"):
        raise _BadBody(f"unsupported Content-Encoding {encoding!r}: use gzip or none")
    inflater = zlib.decompressobj(47) if encoding == "gzip" else None
    async for chunk in request.stream():
        if inflater is None:
            if chunk:
                yield chunk
            continue
        try:
            # bounded output per step, so a small bomb cannot balloon memory
            data = inflater.decompress(chunk, READ_CHUNK)
            while data:
                yield data
                data = inflater.decompress(inflater.unconsumed_tail, READ_CHUNK) if inflater.unconsumed_tail else b""
        except zlib.error as e:
            raise _BadBody(f"the gzip body is corrupt: {e}") from None
    if inflater is not None and not inflater.eof:
        raise _BadBody("the gzip body ended early")


async def _multipart_files(
    body: AsyncIterator[bytes], boundary: bytes
) -> AsyncIterator[tuple[str, AsyncIterator[bytes]]]:
    """Yields (filename, data chunks) for each part named `file`, parsing as the body arrives."""
    events: list[tuple[str, object]] = []
    header: dict[str, bytes] = {}
    field: list[bytes] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        name = b"".join(field).decode("latin-1").lower()
        header[name] = header.get(name, b"") + data[start:end]

    def on_header_end() -> None:
        field.clear()

    def on_headers_finished() -> None:
        events.append(("begin", dict(header)))
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        events.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        events.append(("end", None))

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    body_iter = body.__aiter__()
    done = False

    async def more() -> bool:
        nonlocal done
        if done:
            return False
        try:
            chunk = await body_iter.__anext__()
        except StopAsyncIteration:
            done = True
            parser.finalize()
            return bool(events)
        try:
            parser.write(chunk)
        except Exception as e:
            raise _BadBody(f"malformed multipart body: {e}") from None
        return True

    while True:
        while not events:
            if not await more():
                return
        kind, value = events.pop(0)
        if kind != "begin":
            continue
        headers: dict[str, bytes] = value  # type: ignore[assignment]
        _, disp = parse_options_header(headers.get("content-disposition", b""))
        is_file = disp.get(b"name") == b"file"
        filename = disp.get(b"filename", b"").decode(errors="surrogateescape")

        async def part_data() -> AsyncIterator[bytes]:
            while True:
                while not events:
                    if not await more():
                        raise _BadBody("the multipart body ended inside a part")
                kind, value = events[0]
                if kind == "begin":
                    return
                events.pop(0)
                if kind == "end":
                    return
                yield value  # type: ignore[misc]

        if is_file:
            yield filename, part_data()
        else:
            async for _ in part_data():
                pass
