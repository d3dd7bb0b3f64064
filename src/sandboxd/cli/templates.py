"""`sandboxd template ...`: build from a Dockerfile through a running server's template API (the same path
the SDKs take), import an image from an OCI layout or a `docker save` archive, list, remove, prune, logs."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape

from sandboxd.cli.output import unreachable
from sandboxd.templates import builtin, images
from sandboxd.templates.dockerfile import DockerfileError, convert
from sandboxd.templates.store import TemplateError, TemplateStore

console = Console(stderr=True, highlight=False)
BUILD_NETWORK_TRIES = 5
logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines are not the build's progress


def add_parsers(tsub: argparse._SubParsersAction, server_options: argparse.ArgumentParser) -> None:
    p = tsub.add_parser(
        "build",
        parents=[server_options],
        help="build a template: a built-in one by name, or yours from a Dockerfile (-f) through the server",
    )
    p.add_argument("names", nargs="*", help="built-in templates to build (base, code-interpreter-v1)")
    p.add_argument("-f", "--file", type=Path, help="Dockerfile of a template of yours")
    p.add_argument("--name", help="your template's name (with -f)")
    p.add_argument("--tag", action="append", default=[], help="tag the build (repeatable)")
    p.add_argument("--context", type=Path, default=None, help="build context (default: the Dockerfile's directory)")
    p.add_argument("--cpus", type=int, default=None, help="the template's CPUs")
    p.add_argument("--memory-mb", type=int, default=None, help="the template's memory in MiB")
    p.add_argument("--ready-cmd", default=None, help="ready command (default for a CMD: `sleep 20`, as E2B)")
    p.add_argument("--no-cache", action="store_true", help="run every step again")
    p.add_argument("--force", action="store_true", help="rebuild a built-in template even if it is current")
    p.add_argument("context_dir", nargs="?", type=Path, help=argparse.SUPPRESS)
    dirs = argparse.ArgumentParser(add_help=False)  # --data-dir, --templates-dir (the server's)
    for action in server_options._actions:
        if action.dest in ("data_dir", "templates_dir"):
            dirs._add_action(action)
    p = tsub.add_parser(
        "import", parents=[dirs], help="make a template of an image: oci:DIR[:TAG] or docker-archive:FILE"
    )
    p.add_argument("source")
    p.add_argument("--name", required=True)
    p.add_argument("--tag", action="append", default=[])
    p = tsub.add_parser("list", parents=[dirs], help="templates: names, tags, size (--layers: each layer)")
    p.add_argument("--layers", action="store_true")
    p = tsub.add_parser("rm", parents=[dirs], help="remove templates of yours (their layers go at the next prune)")
    p.add_argument("names", nargs="+")
    tsub.add_parser("prune", parents=[dirs], help="remove layers that no template and no sandbox uses")
    p = tsub.add_parser("logs", parents=[dirs], help="the log of a template's last build")
    p.add_argument("name")


# -- build from a Dockerfile, through the server ---------------------------------------------------------
def _files(context: Path, src: str) -> list[Path]:
    base = context.resolve()
    matches = sorted(base.glob(src)) if any(c in src for c in "*?[") else [base / src]
    out: list[Path] = []
    for m in matches:
        if not m.exists() and not m.is_symlink():
            continue
        if base not in m.resolve().parents and m.resolve() != base and not m.is_symlink():
            raise SystemExit(f"sandboxd: COPY {src}: outside the build context {context}")
        out.append(m)
        if m.is_dir() and not m.is_symlink():
            out += sorted(p for p in m.rglob("*"))
    if not out:
        raise SystemExit(f"sandboxd: COPY {src}: no such file in the build context {context}")
    return out


def _archive(context: Path, src: str, dest: str) -> tuple[str, IO[bytes]]:
    """(sha256 of what is copied, a temporary file holding a tar.gz of it with names relative to the
    context). Gzip's fastest level: the server unpacks it at once, and a big COPY is not kept waiting."""
    digest = hashlib.sha256(f"COPY {src} {dest}".encode())
    out = tempfile.TemporaryFile()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        for path in _files(context, src):
            rel = os.path.relpath(path, context)
            st = path.lstat()
            digest.update(f"{rel}\0{st.st_mode}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                with open(path, "rb") as f:
                    for chunk in _chunks(f):
                        digest.update(chunk)
            tar.add(path, arcname=rel, recursive=False)
    out.seek(0)
    return digest.hexdigest(), out


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(1 << 20):
        yield chunk


def submit(
    url: str,
    api_key: str,
    name: str,
    request: dict[str, Any],
    start: dict[str, Any],
    context: Path,
    copies: list[tuple[str, str]],
) -> int:
    """A build through the server's template API, as the SDKs do it: request (name, tags, resources),
    upload each COPY step's files (in step order, `copies`), start, print the log as it comes."""
    import httpx

    started = time.monotonic()
    client = httpx.Client(base_url=url, headers={"X-API-KEY": api_key}, timeout=60)
    try:
        r = client.post("/v3/templates", json={"name": name, **request})
    except httpx.TransportError as e:
        return unreachable(url, e)
    if r.status_code != 202:
        console.print(f"sandboxd: {r.json().get('message', r.text)}")
        return 1
    tid, bid = r.json()["templateID"], r.json()["buildID"]
    pending = iter(copies)
    for step in start["steps"]:
        if step["type"] != "COPY":
            continue
        src, dest = next(pending)
        files_hash, data = _archive(context, src, dest)
        with data:
            step["filesHash"] = files_hash
            link = client.get(f"/templates/{tid}/files/{files_hash}").json()
            if not link.get("present"):
                size = os.fstat(data.fileno()).st_size
                up = httpx.put(link["url"], content=_chunks(data), timeout=3600)
                if up.status_code >= 300:
                    console.print(f"sandboxd: uploading {src} failed: {up.text}")
                    return 1
                console.print(f"[dim]uploaded {src} ({size / 1e6:.1f} MB)[/dim]")
    r = client.post(f"/v2/templates/{tid}/builds/{bid}", json=start)
    if r.status_code >= 300:
        console.print(f"sandboxd: {r.json().get('message', r.text)}")
        return 1
    offset, status = 0, {}
    while True:
        status = client.get(f"/templates/{tid}/builds/{bid}/status", params={"logsOffset": offset}).json()
        for entry in status["logEntries"]:
            _print_entry(entry)
        offset += len(status["logEntries"])
        if status["status"] in ("ready", "error") and not status["logEntries"]:
            break
        if status["status"] not in ("ready", "error"):
            time.sleep(0.2)
    took = time.monotonic() - started
    if status["status"] == "error":
        console.print(f"[red]build failed[/red] after {took:.1f} s: {status.get('reason', {}).get('message', '')}")
        return 1
    console.print(f"[green]built[/green] {name} ({tid}) in {took:.1f} s")
    return 0


def build_dockerfile(args: argparse.Namespace, url: str, api_key: str) -> int:
    if not args.name:
        console.print("sandboxd: --name is required with -f")
        return 2
    try:
        conv = convert(args.file.read_text())
    except (OSError, DockerfileError) as e:
        console.print(f"sandboxd: {args.file}: {e}")
        return 2
    context = args.context or args.context_dir or args.file.parent
    request: dict[str, Any] = {"tags": args.tag[1:]}
    if args.cpus:
        request["cpuCount"] = args.cpus
    if args.memory_mb:
        request["memoryMB"] = args.memory_mb
    for step in conv.steps:
        step["force"] = bool(args.no_cache)
    start: dict[str, Any] = {"fromImage": conv.from_image, "force": bool(args.no_cache), "steps": conv.steps}
    if conv.start_cmd:
        start["startCmd"] = conv.start_cmd
    if args.ready_cmd is not None or conv.ready_cmd:
        start["readyCmd"] = args.ready_cmd if args.ready_cmd is not None else conv.ready_cmd
    name = args.name + (f":{args.tag[0]}" if args.tag else "")
    return submit(url, api_key, name, request, start, context, conv.copies)


def build_builtin(store: TemplateStore, name: str, data_dir: Path, force: bool = False) -> int:
    """A built-in template (templates/builtin.py), made with the template builder through a server of its
    own: the template it is built on first (when that is not current), its Python packages installed on the
    host (cached), then its steps. Nothing is done when the last build came from the same recipe."""
    recipe = builtin.RECIPES[name]
    store.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(store.dir, 0o700)  # templates' files are owned by sandbox uids: no host user may reach them
    parent = recipe.get("from_template")
    parent_build = ""
    if parent:
        status = build_builtin(store, parent, data_dir)
        if status:
            return status
        parent_build = store.get(parent).digest
    digest = builtin.recipe_digest(recipe, parent_build)
    if not force:
        with contextlib.suppress(TemplateError):
            if store.get(name).recipe == digest:
                console.print(f"[{name}] up to date (recipe {digest})", markup=False)
                return 0
    console.print(f"[{name}] building: {recipe['description']}", markup=False)
    steps: list[dict[str, Any]] = [{"type": "RUN", "args": [cmd, "root"], "force": force} for cmd in recipe["run"]]
    copies: list[tuple[str, str]] = []
    cache = data_dir / "cache"
    if recipe.get("pip"):
        site = _host_packages(cache, name, recipe["pip"])
        if site is None:
            return 1
        steps.append({"type": "COPY", "args": [site.name, recipe["pip_target"], "root", ""], "force": force})
        copies.append((site.name, recipe["pip_target"]))
    start: dict[str, Any] = {"force": force, "steps": steps, "recipe": digest}
    start["fromTemplate" if parent else "fromImage"] = parent or recipe["from_image"]
    for key, field in (("start_cmd", "startCmd"), ("ready_cmd", "readyCmd"), ("service", "service")):
        if recipe.get(key):
            start[field] = recipe[key]
    request = {k: recipe[f] for k, f in (("cpuCount", "cpu_count"), ("memoryMB", "memory_mb")) if f in recipe}
    with _server_for_build(data_dir, store.dir) as (url, key):
        status = submit(url, key, name, request, start, cache, copies)
    if status == 0:
        ident = store.get(name).name
        shutil.rmtree(store.dir / ident / "files", ignore_errors=True)  # the upload: the host's cache has it
        removed = store.prune(ident)
        if removed:
            console.print(f"[{name}] removed {len(removed)} old build(s) no sandbox uses", markup=False)
    return status


def _host_packages(cache: Path, name: str, pins: list[str]) -> Path | None:
    """`pip install --target` of `pins` with this install's Python (the template checks its python3 is the
    same version), cached by the pins: the directory a COPY step puts into the template."""
    key = hashlib.sha256(json.dumps([pins, sys.version_info[:2], builtin.RECIPE_VERSION]).encode()).hexdigest()[:16]
    site, done = cache / f"pip-{name}-{key}", cache / f"pip-{name}-{key}.complete"
    if done.is_file():
        return site
    for stale in [*cache.glob(f"pip-{name}-*"), *cache.glob(f"wheels-{name}-*")]:  # of earlier recipes
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    console.print(f"[{name}] pip on the host: {' '.join(pins)}", markup=False)
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
            str(site),
            *pins,
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        console.print(f"sandboxd: installing the Python packages of {name} failed:\n{res.stderr[-2000:]}")
        shutil.rmtree(site, ignore_errors=True)
        return None
    done.write_text("")
    return site


@contextlib.contextmanager
def _server_for_build(data_dir: Path, templates: Path) -> Iterator[tuple[str, str]]:
    """A server of the build's own (data in <data-dir>/builder, log beside it) that may build built-in
    templates, with networking (apt in the build's sandboxes) on a range of its own: the first of a few
    that does not overlap the host's networks (a running `sandboxd serve` included)."""
    import httpx

    from sandboxd.state.db import StateDB

    own = data_dir / "builder"
    own.parent.mkdir(parents=True, exist_ok=True)
    first = os.getpid() % 200
    for attempt in range(BUILD_NETWORK_TRIES):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_path = own.with_suffix(".log")
        argv = [
            str(Path(sys.executable).with_name("sandboxd")),  # this install's, whatever PATH says
            "serve",
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            *("--data-dir", str(own), "--templates-dir", str(templates)),
            *("--network-cidr", f"10.212.{first + attempt + 1}.0/24", "--network-cidr6", "off"),
            *("--pool-size", "0", "--destroy-on-exit", "--builtin-builds"),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 204:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"sandboxd: the build's own server did not start: see {log_path}")
                time.sleep(0.1)
            else:
                if "overlaps" in log_path.read_text(errors="replace"):
                    continue  # that range is taken: the next one
                raise SystemExit(f"sandboxd: the build's own server exited ({proc.returncode}): see {log_path}")
            yield f"http://127.0.0.1:{port}", StateDB(own / "state.db", create=False).api_key()[0]
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
    raise SystemExit(f"sandboxd: no free network range for the build's own server: see {log_path}")


def _print_entry(e: dict[str, Any]) -> None:
    message = escape(e["message"])
    if e["level"] == "error":
        console.print(f"[red]{message}[/red]")
    elif message.startswith("CACHED"):
        console.print(f"[dim]{message}[/dim]")
    elif e["message"].startswith("[") and "]" in e["message"][:12]:
        console.print(f"[bold]{message}[/bold]")
    elif e["level"] != "debug":
        console.print(f"  {message}")


# -- host-side commands ---------------------------------------------------------------------------------
def import_image(store: TemplateStore, source: str, name: str, tags: list[str]) -> int:
    if not source.startswith(("oci:", "docker-archive:")):
        console.print("sandboxd: the source must be oci:DIR[:TAG] or docker-archive:FILE")
        return 2
    started = time.monotonic()
    try:
        ident = store.claim(name)
        layout = images.pull(source, None, store.dir / ".oci", lambda t: console.print(t))
        layers, config = images.read_layout(layout, "img")
        top = images.import_layers(layout, layers, store.layers, lambda t: console.print(t))
    except (images.ImageError, TemplateError) as e:
        console.print(f"sandboxd: {e}")
        return 1
    build_id = __import__("uuid").uuid4().hex
    size = sum(layer.size_bytes for layer in store.layers.chain(top)) if top else 0
    meta = {
        "top": top,
        "base": str(images.empty_root(store.layers)),
        "env": config.env,
        "default_user": config.user.split(":")[0] or "root",
        "default_workdir": config.workdir or "/",
        "start_cmd": "",
        "ready_cmd": "",
        "built_at": time.time(),
        "size_bytes": size,
    }
    store.add_version(ident, build_id, meta, tags or ["default"])
    console.print(
        f"imported {source} as {name} ({ident}): {len(layers)} layers, {size / 1e6:.1f} MB, "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0


def list_templates(store: TemplateStore, layers: bool) -> int:
    seen: set[str] = set()
    for ident in store.names():
        try:
            t = store.get(ident)
        except TemplateError as e:
            print(f"{ident}\t(damaged: {e})")
            continue
        names = ",".join(store.meta(ident).get("names", [ident]))
        tags = ",".join(sorted(store.tags(ident)))
        chain = store.layers.chain(t.top_layer) if t.top_layer else []
        own = sum(layer.size_bytes for layer in chain if layer.key not in seen)
        seen.update(layer.key for layer in chain)
        size = t.size_bytes if not chain else own
        print(f"{names}\t{ident}\ttags={tags}\t{len(chain)} layers\t{size / 1e6:.1f} MB")
        if layers:
            for layer in chain:
                print(f"    {layer.key[:16]}  {layer.size_bytes / 1e6:8.1f} MB  {layer.step[:90]}")
    return 0


def logs(store: TemplateStore, name: str) -> int:
    ident, _ = store.resolve(name)
    builds = sorted((store.dir / (ident or "-") / "builds").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if ident is None or not builds:
        console.print(f"sandboxd: no builds of '{name}'")
        return 1
    build = json.loads(builds[-1].read_text())
    for e in build.get("logEntries", []):
        print(f"{e['timestamp']} {e['level']:5} {e['message']}")
    reason = build.get("reason")
    print(f"status: {build.get('status')}" + (f" ({reason.get('message')})" if reason else ""))
    return 0


def main(args: argparse.Namespace, store: TemplateStore, url: str, api_key: str | None) -> int:
    cmd = args.template_command
    if cmd == "import":
        return import_image(store, args.source, args.name, args.tag)
    if cmd == "list":
        return list_templates(store, args.layers)
    if cmd == "rm":
        for name in args.names:
            ident, _ = store.resolve(name)
            if ident is None or not (store.dir / ident / "meta.json").is_file():
                console.print(f"sandboxd: '{name}' is not a template of yours")
                return 1
            store.delete(ident)
            console.print(f"removed {name} ({ident})")
        return 0
    if cmd == "prune":
        count, size = store.prune_layers()
        console.print(f"removed {count} unused layer(s), {size / 1e6:.1f} MB")
        return 0
    if cmd == "logs":
        return logs(store, args.name)
    if cmd == "build" and args.file is not None:
        if not api_key:
            console.print("sandboxd: no API key: pass --api-key or set E2B_API_KEY")
            return 2
        return build_dockerfile(args, url, api_key)
    print(f"sandboxd: unknown template command {cmd}", file=sys.stderr)
    return 2
