"""`sandboxd serve | template build|list | api-key`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sandboxd import __version__
from sandboxd.server import DEFAULT_DATA_DIR


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="state, sandboxes (default %(default)s)")
    p.add_argument("--templates-dir", type=Path, default=None, help="built templates (default DATA_DIR/templates)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandboxd", description="Self-hosted sandboxes that speak the E2B protocol.")
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the server")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p_serve.add_argument("--port", type=int, default=3000, help="port (default %(default)s)")
    _add_dirs(p_serve)
    p_serve.add_argument("--default-timeout", type=int, default=300, help="sandbox lifetime in s if not given")
    p_serve.add_argument(
        "--memory-mb",
        type=int,
        default=None,
        help="memory limit per sandbox in MiB (default: the template's, else 512)",
    )
    p_serve.add_argument(
        "--disk-mb",
        type=int,
        default=None,
        help="each sandbox's own disk (space and inodes) in MiB (default: the template's, else 10240; 0 = no quota)",
    )
    p_serve.add_argument(
        "--max-disk-mb",
        type=int,
        default=None,
        help="largest diskSizeMB a create may ask for (default: the template's default disk)",
    )
    p_serve.add_argument("--cpus", type=float, default=1.0, help="CPU quota per sandbox, in CPUs (default 1)")
    p_serve.add_argument("--pids", type=int, default=512, help="process limit per sandbox (default 512)")
    p_serve.add_argument(
        "--pool-size",
        type=int,
        default=2,
        help="idle sandboxes kept created per recently used template (default 2; 0 = none)",
    )
    p_serve.add_argument(
        "--keep-sandboxes",
        action="store_true",
        help="on shutdown leave sandboxes running, to be re-adopted by the next start",
    )
    p_serve.add_argument(
        "--prewarm",
        default="base,code-interpreter-v1",
        help="templates whose pool is filled at start (comma-separated; default %(default)s)",
    )
    p_serve.add_argument(
        "--no-favordynmods",
        action="store_true",
        help="leave the host's cgroup2 mount options alone (execs then take a few ms longer)",
    )
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    p_tpl = sub.add_parser("template", help="build and list templates")
    tsub = p_tpl.add_subparsers(dest="template_command", required=True)
    p_build = tsub.add_parser("build", help="build a built-in template (cached: rebuilt only when it changed)")
    p_build.add_argument("names", nargs="+", metavar="NAME")
    p_build.add_argument("--force", action="store_true", help="rebuild even if the cached build is current")
    _add_dirs(p_build)
    p_list = tsub.add_parser("list", help="list built templates")
    _add_dirs(p_list)

    p_key = sub.add_parser("api-key", help="print the server's API key (created on first use)")
    _add_dirs(p_key)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(name)s %(message)s")

    if args.command == "serve":
        from sandboxd.core.manager import Settings
        from sandboxd.runtime.quota import MIN_DISK_MB

        for name in ("disk_mb", "max_disk_mb"):
            value = getattr(args, name)
            if value is not None and value != 0 and value < MIN_DISK_MB:
                parser.error(f"--{name.replace('_', '-')} must be 0 (no quota) or at least {MIN_DISK_MB} MiB")
        from sandboxd.server import ServerConfig, serve

        settings = Settings(
            default_timeout=args.default_timeout,
            memory_mb=args.memory_mb,
            disk_mb=args.disk_mb,
            max_disk_mb=args.max_disk_mb,
            cpu_count=args.cpus,
            pids=args.pids,
            pool_size=args.pool_size,
            prewarm=tuple(t for t in args.prewarm.split(",") if t),
        )
        serve(
            ServerConfig(
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                templates_dir=args.templates_dir,
                keep_sandboxes=args.keep_sandboxes,
                favor_dynmods=not args.no_favordynmods,
                settings=settings,
            )
        )
        return 0
    if args.command == "template":
        from sandboxd.templates.specs import BUILTIN
        from sandboxd.templates.store import TemplateError, TemplateStore

        store = TemplateStore(args.templates_dir or args.data_dir / "templates")
        if args.template_command == "list":
            for name in store.names():
                t = store.get(name)
                print(f"{name}\t{t.digest}\t{t.size_bytes / 1e6:.0f} MB")
            return 0
        for name in args.names:
            if name not in BUILTIN:
                print(f"sandboxd: unknown template '{name}'; built-in templates: {', '.join(BUILTIN)}", file=sys.stderr)
                return 2
            try:
                if not args.force and store.is_current(BUILTIN[name]):
                    print(f"[{name}] up to date (cached build {store.get(name).digest})", file=sys.stderr)
                    continue
                store.ensure(name, force=args.force)
            except TemplateError as e:
                print(f"sandboxd: {e}", file=sys.stderr)
                return 1
        return 0
    if args.command == "api-key":
        from sandboxd.state.db import StateDB

        print(StateDB(args.data_dir / "state.db").api_key()[0])
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
