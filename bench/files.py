"""File transfer suite of the benchmark: big-file throughput, server memory, small-file round trips.

sandboxd (official SDK: `files.write` / `files.read(format="stream")`) beside two floors measured in the
same run on the same disk: a plain `cp`, and a local HTTP transfer of the same bytes (a minimal
Starlette app under uvicorn, streamed with httpx). Called by run.py; see bench/README.md.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

BLOCK = 1 << 20
FLOOR_APP = textwrap.dedent(
    """
    import os
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    DIR = os.environ["FLOOR_DIR"]

    async def upload(request):
        with open(os.path.join(DIR, request.path_params["name"]), "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
        return Response(status_code=200)

    async def download(request):
        path = os.path.join(DIR, request.path_params["name"])
        def gen():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
        return StreamingResponse(gen(), headers={"Content-Length": str(os.path.getsize(path))})

    app = Starlette(routes=[Route("/f/{name}", upload, methods=["POST"]), Route("/f/{name}", download)])
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_reset(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM)


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _make_blob(path: Path, mib: int) -> None:
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 251 :] + block[: i % 251])  # not one repeated block, not compressible


def _timed(fn: Callable[[], object]) -> float:
    # Every transfer starts with no dirty pages: otherwise whichever runs later pays for the writeback
    # of the one before (measured: 6 GB/s into an empty page cache, ~450 MB/s once throttled).
    os.sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _stats(xs: list[float]) -> dict[str, Any]:
    xs = sorted(xs)
    if not xs:
        return {"n": 0, "p50": None, "p95": None}
    return {
        "n": len(xs),
        "p50": statistics.median(xs),
        "p95": xs[min(len(xs) - 1, round(0.95 * len(xs)) - 1)],
        "samples": [round(x, 4) for x in xs],
    }


class FloorServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        app_file = directory / "floor_app.py"
        app_file.write_text(FLOOR_APP)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(directory),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
                "floor_app:app",
            ],
            env={**os.environ, "FLOOR_DIR": str(directory / "data")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                httpx.get(self.url + "/f/none", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the floor HTTP server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_files(server_pid: int, workdir: Path, mib: int, n_small: int, deadline_left: Callable[[], float]) -> dict:
    """Runs the file suite against the sandboxd whose env vars (E2B_*) are set; returns rows for the table."""
    from e2b import Sandbox

    workdir.mkdir(parents=True, exist_ok=True)
    blob = workdir / "blob"
    _make_blob(blob, mib)
    size_mb = mib * BLOCK / 1e6
    out: dict[str, Any] = {"mib": mib}
    sbx = Sandbox.create(template="base", timeout=max(120, int(deadline_left()) + 60))
    floor_dir = workdir / "floor"
    floor_dir.mkdir(exist_ok=True)
    (floor_dir / "data").mkdir(exist_ok=True)
    floor: FloorServer | None = None
    try:
        # -- sandboxd: big upload / download through the SDK --------------------------------------
        base_rss = _rss_mib(server_pid)
        _peak_rss_reset(server_pid)
        with open(blob, "rb") as f:
            up = _timed(lambda: sbx.files.write("/home/user/blob", f, request_timeout=600))
        out["up_peak_rss_mib"] = _peak_rss_mib(server_pid) - base_rss
        got = 0

        def download() -> None:
            nonlocal got
            for chunk in sbx.files.read("/home/user/blob", format="stream", request_timeout=600):
                got += len(chunk)

        _peak_rss_reset(server_pid)
        down = _timed(download)
        out["down_peak_rss_mib"] = _peak_rss_mib(server_pid) - base_rss
        assert got == mib * BLOCK, f"downloaded {got} bytes, expected {mib * BLOCK}"
        out["up_mbs"], out["down_mbs"] = size_mb / up, size_mb / down
        sbx.commands.run("rm -f /home/user/blob")

        # -- floors: cp on the same disk, local HTTP ----------------------------------------------
        copy = workdir / "blob.copy"
        out["cp_mbs"] = size_mb / _timed(lambda: subprocess.run(["cp", str(blob), str(copy)], check=True))
        copy.unlink()
        floor = FloorServer(floor_dir)
        with httpx.Client(timeout=600) as client:

            def floor_up() -> None:
                with open(blob, "rb") as f:
                    client.post(f"{floor.url}/f/blob", content=iter(lambda: f.read(BLOCK), b"")).raise_for_status()

            def floor_down() -> None:
                n = 0
                with client.stream("GET", f"{floor.url}/f/blob") as r:
                    for chunk in r.iter_bytes(BLOCK):
                        n += len(chunk)
                assert n == mib * BLOCK

            out["http_up_mbs"] = size_mb / _timed(floor_up)
            out["http_down_mbs"] = size_mb / _timed(floor_down)

            # -- small files: write 1 KiB then read it back ---------------------------------------
            small = os.urandom(1024)
            sbx_rt: list[float] = []
            floor_rt: list[float] = []
            for i in range(5):
                sbx.files.write(f"/home/user/s{i}", small)
                sbx.files.read(f"/home/user/s{i}", format="bytes")
            for i in range(n_small):
                if deadline_left() < 30:
                    break
                t = time.perf_counter()
                sbx.files.write(f"/home/user/small{i}", small)
                assert sbx.files.read(f"/home/user/small{i}", format="bytes") == small
                sbx_rt.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                client.post(f"{floor.url}/f/small{i}", content=small).raise_for_status()
                assert client.get(f"{floor.url}/f/small{i}").content == small
                floor_rt.append((time.perf_counter() - t) * 1000)
            out["small_sandboxd"], out["small_floor"] = _stats(sbx_rt), _stats(floor_rt)
    finally:
        sbx.kill()
        if floor is not None:
            floor.stop()
        for p in [blob, *floor_dir.glob("*"), *(floor_dir / "data").glob("*")]:
            if p.is_file():
                p.unlink()
    return out


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, sandboxd, floor, ratio, note) for the printed table."""

    def r(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "—"

    mib = res.get("mib", 0)
    small, small_floor = res.get("small_sandboxd", {}), res.get("small_floor", {})
    return [
        (
            f"upload {mib} MiB (MB/s)",
            f"{res['up_mbs']:.0f}",
            f"{res['http_up_mbs']:.0f}",
            r(res["up_mbs"], res["http_up_mbs"]),
            f"cp on the same disk: {res['cp_mbs']:.0f} MB/s",
        ),
        (
            f"download {mib} MiB (MB/s)",
            f"{res['down_mbs']:.0f}",
            f"{res['http_down_mbs']:.0f}",
            r(res["down_mbs"], res["http_down_mbs"]),
            "",
        ),
        (
            "server peak RSS growth, upload (MiB)",
            f"{res['up_peak_rss_mib']:.0f}",
            "—",
            "—",
            "bounded: not the file size",
        ),
        ("server peak RSS growth, download (MiB)", f"{res['down_peak_rss_mib']:.0f}", "—", "—", ""),
        (
            "1 KiB write + read round trip p50 (ms)",
            f"{small.get('p50') or 0:.2f}",
            f"{small_floor.get('p50') or 0:.2f}",
            r(small.get("p50"), small_floor.get("p50")),
            f"p95 {small.get('p95') or 0:.2f} / {small_floor.get('p95') or 0:.2f}",
        ),
    ]
