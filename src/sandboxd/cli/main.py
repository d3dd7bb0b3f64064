"""`sandboxd serve | template build|import|list|rm|prune|logs | sandbox ... | pool ... | keys ... | nodes | api-key |
ca | completion`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sandboxd import __version__
from sandboxd.cli import keys as keys_cli
from sandboxd.cli import nodes as nodes_cli
from sandboxd.cli import pools as pool_cli
from sandboxd.cli import sandboxes as sandbox_cli
from sandboxd.cli import templates as template_cli
from sandboxd.cluster import BEAT_SECONDS, LEASE_SECONDS
from sandboxd.core.limits import MiB, RequestLimits
from sandboxd.core.tenant_limits import TenantLimits
from sandboxd.runtime.network import DEFAULT_CIDR
from sandboxd.server import DEFAULT_DATA_DIR


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="state, sandboxes (default %(default)s)")
    p.add_argument("--templates-dir", type=Path, default=None, help="built templates (default DATA_DIR/templates)")
    p.add_argument(
        "--database",
        default=os.environ.get("SANDBOXD_DATABASE"),
        help="PostgreSQL for the state (postgresql://... or a libpq conninfo; default $SANDBOXD_DATABASE, else "
        "DATA_DIR/state.db)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Every command and option (deploy/'s manifests are checked against it)."""
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
        "--volume-size-mb",
        type=int,
        default=10240,
        help="the size (quota) of a new volume unless its create says (sizeMB); images are sparse (default: 10240)",
    )
    p_serve.add_argument(
        "--max-volumes",
        type=int,
        default=256,
        help="volumes this server keeps at most (each is a loop-mounted image while it exists; default: 256)",
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
        help="idle sandboxes kept created per recently used template, at least (default 2; 0 = none)",
    )
    p_serve.add_argument(
        "--pool-max",
        type=int,
        default=None,
        help="idle sandboxes the autoscaler may keep per template when creates come fast (default: 4 x "
        "--pool-size; --pool-size 0 and no --pool-max: no pools); a template's own limits: `sandboxd pool set`",
    )
    p_serve.add_argument(
        "--pool-cooldown",
        type=float,
        default=60.0,
        help="seconds without a pool miss before a grown pool shrinks a step (default 60)",
    )
    p_serve.add_argument(
        "--health-interval",
        type=float,
        default=10.0,
        help="seconds between health checks: idle pooled sandboxes alive (else made again), and templates' "
        "probes (probeCmd) in every sandbox (default 10; 0 = none)",
    )
    p_serve.add_argument(
        "--pool-memory-mb",
        type=int,
        default=None,
        help="idle pooled sandboxes' memory limits together at most, in MiB (default: a quarter of --max-memory-mb)",
    )
    p_serve.add_argument(
        "--max-sandbox-memory-mb",
        type=int,
        default=16384,
        help="the most memory a create may ask for in metadata sandboxd.memory_mb (default %(default)s)",
    )
    p_serve.add_argument(
        "--criu",
        default=None,
        help="CRIU binary for pauses to disk (default: the newest build of scripts/build-criu.sh in "
        "/var/lib/sandboxd/tools, if any; 'none': pauses stay in memory)",
    )
    p_serve.add_argument(
        "--checkpoint-after",
        default="60",
        help="seconds a sandbox stays paused in memory before its processes are written to disk, freeing their "
        "memory (default 60; 'never': pauses stay in memory; needs CRIU)",
    )
    p_serve.add_argument(
        "--max-builds", type=int, default=2, help="template builds that run at once; more wait (default 2)"
    )
    p_serve.add_argument(
        "--ended-retention",
        type=int,
        default=3600,
        help="seconds an ended sandbox stays listed (state=killed) and explained (why and when it ended) "
        "(default %(default)s)",
    )
    p_serve.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        help="seconds a template's ready command may take to succeed, at create and at build (default 120)",
    )
    p_serve.add_argument(
        "--max-sandboxes", type=int, default=None, help="sandboxes (running, paused, pooled) at most (default 1024)"
    )
    p_serve.add_argument(
        "--max-memory-mb",
        type=int,
        default=None,
        help="sum of the sandboxes' memory limits at most, in MiB (default: twice the host's RAM)",
    )
    p_serve.add_argument(
        "--max-total-pids",
        type=int,
        default=None,
        help="sum of the sandboxes' process limits at most (default: half of kernel.pid_max)",
    )
    p_serve.add_argument(
        "--server-memory-mb",
        type=int,
        default=None,
        help="memory limit of the server process's own cgroup, in MiB (default 4096)",
    )
    p_serve.add_argument(
        "--keep-sandboxes",
        action="store_true",
        help="on shutdown leave sandboxes running, to be re-adopted by the next start (the default)",
    )
    p_serve.add_argument(
        "--destroy-on-exit",
        action="store_true",
        help="on shutdown (SIGTERM/SIGINT) destroy every sandbox instead of keeping them for the next start",
    )
    p_serve.add_argument(
        "--pause-on-exit",
        action="store_true",
        help="on shutdown write every sandbox to disk (CRIU) so that it outlives a host reboot with its memory; "
        "the next start resumes those that were running (one that cannot go to disk is left running)",
    )
    p_serve.add_argument(
        "--no-metrics-per-sandbox",
        action="store_true",
        help="GET /metrics without a series per sandbox (CPU, memory, disk): for fleets of thousands of sandboxes",
    )
    p_serve.add_argument(
        "--max-message-mb",
        type=float,
        default=RequestLimits.max_message_bytes / MiB,
        help="largest envd (Connect) request message in MiB, after decompression (default %(default)g)",
    )
    p_serve.add_argument(
        "--max-body-kb",
        type=int,
        default=RequestLimits.max_body_bytes // 1024,
        help="largest control-plane JSON body in KiB (default %(default)d)",
    )
    p_serve.add_argument(
        "--head-timeout",
        type=float,
        default=RequestLimits.head_timeout_s,
        help="seconds a client may take to send a request's headers (default %(default)g)",
    )
    p_serve.add_argument(
        "--max-json-depth",
        type=int,
        default=RequestLimits.max_json_depth,
        help="deepest nesting of any JSON document a client sends (default %(default)d)",
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
    limits = TenantLimits()
    p_serve.add_argument(
        "--max-output-buffer-kib",
        type=int,
        default=limits.output_buffer_bytes // 1024,
        help="output kept per process while no client is attached; when full, the process blocks on its "
        "pipe until one connects (default %(default)s)",
    )
    p_serve.add_argument(
        "--max-kept-processes",
        type=int,
        default=limits.kept_processes,
        help="processes per sandbox that outlive the server process (a restart or crash): their output is "
        "kept on disk and the next start takes them over; 0 = none (default %(default)s)",
    )
    p_serve.add_argument(
        "--max-process-streams",
        type=int,
        default=limits.process_streams,
        help="open process streams (Start/Connect) per sandbox (default %(default)s)",
    )
    p_serve.add_argument(
        "--max-watchers",
        type=int,
        default=limits.watchers,
        help="watchers (WatchDir streams + CreateWatcher) per sandbox (default %(default)s)",
    )
    p_serve.add_argument(
        "--max-watched-dirs",
        type=int,
        default=limits.watched_dirs,
        help="directories watched per sandbox, over all its (recursive) watches (default %(default)s)",
    )
    p_serve.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=limits.concurrent_requests,
        help="envd requests in flight per sandbox, streams above not counted (default %(default)s)",
    )
    p_serve.add_argument(
        "--stalled-stream-seconds",
        type=float,
        default=limits.stalled_stream_seconds,
        help="a stream that reads nothing this long while it holds back other streams of the same process "
        "is dropped (default %(default)s)",
    )
    p_serve.add_argument(
        "--uid-base",
        type=int,
        default=None,
        help="first host uid of the sandboxes' uid ranges (1024 ranges of 65536; default: 2^30 plus a band "
        "chosen by the data dir)",
    )
    p_serve.add_argument(
        "--network-cidr",
        default=DEFAULT_CIDR,
        help="the private IPv4 range sandboxes get their addresses from; it must not overlap the host's "
        "networks, nor another sandboxd server's on this host (default %(default)s)",
    )
    p_serve.add_argument(
        "--network-cidr6",
        default="auto",
        help="the IPv6 range sandboxes get their addresses from: 'auto' (a unique-local /64 of this server's, "
        "when the host has an IPv6 default route), 'off', or a private /64 or bigger (default %(default)s)",
    )
    p_serve.add_argument(
        "--dns",
        default=None,
        help="comma-separated IPv4 addresses of the DNS servers the sandboxes' resolver forwards to "
        "(default: the host's, from /etc/resolv.conf); a sandbox's own network.dnsServers come first",
    )
    p_serve.add_argument(
        "--domain",
        default=None,
        help="serve sandboxes' ports as https://{port}-{id}.DOMAIN (and the API as https://api.DOMAIN) on "
        "--tls-port, with a certificate from the server's own CA (`sandboxd ca export`); point *.DOMAIN at "
        "this host in DNS",
    )
    p_serve.add_argument(
        "--egress-ca-file",
        default=None,
        help="PEM file of CAs the egress proxy trusts (beside the host's) when it forwards the TLS requests "
        "of hosts with network.rules",
    )
    p_serve.add_argument(
        "--registry",
        default=None,
        metavar="HOST[:PORT]",
        help="the OCI registry template builds pull images from (from_image); no other registry is reached",
    )
    # the server `sandboxd template build` starts for a built-in template: it may build over one
    p_serve.add_argument("--builtin-builds", action="store_true", help=argparse.SUPPRESS)
    p_serve.add_argument(
        "--registry-insecure", action="store_true", help="reach --registry over plain HTTP (a registry on loopback)"
    )
    p_serve.add_argument("--tls-port", type=int, default=443, help="HTTPS port for --domain (default %(default)s)")
    p_serve.add_argument(
        "--role",
        choices=["all", "node", "api"],
        default="all",
        help="all: the whole server (default); node: the same, a node of the cluster --database names; api: an API "
        "replica of that cluster (no sandboxes of its own: it routes to the nodes)",
    )
    p_serve.add_argument(
        "--placement",
        choices=["spread", "binpack"],
        default="spread",
        help="--role api: where creates go (fewest sandboxes first, or fullest first)",
    )
    p_serve.add_argument(
        "--team-max-sandboxes",
        type=int,
        default=0,
        help="sandboxes a team's key may have at once, unless the team has its own limit (0: none; the operator's "
        "key: never limited)",
    )
    p_serve.add_argument(
        "--team-creates-per-minute",
        type=int,
        default=0,
        help="creates per minute a team's key may make, unless the team has its own limit (0: none)",
    )
    p_serve.add_argument(
        "--cluster-token",
        default=os.environ.get("SANDBOXD_CLUSTER_TOKEN"),
        help="a cluster's shared secret (default $SANDBOXD_CLUSTER_TOKEN): API replicas send it, nodes serve only "
        "requests that carry it",
    )
    for flag, what in (
        ("ca", "the cluster's CA certificate (PEM): the certificates of nodes and replicas it signed are trusted"),
        ("cert", "this process's certificate (PEM), signed by the cluster's CA, for TLS server and client use"),
        ("key", "its private key (PEM)"),
    ):
        p_serve.add_argument(
            f"--cluster-{flag}",
            default=os.environ.get(f"SANDBOXD_CLUSTER_{flag.upper()}"),
            help=f"mutual TLS in a cluster (optional; all three or none): {what} "
            f"(default $SANDBOXD_CLUSTER_{flag.upper()})",
        )
    p_serve.add_argument(
        "--cluster-port",
        type=int,
        default=None,
        help="a node with --cluster-ca/-cert/-key: the port its replicas and the other nodes reach it at, over TLS "
        "with a client certificate the CA signed (its advertised URL: https://HOST:PORT)",
    )
    p_serve.add_argument(
        "--lease",
        type=float,
        default=LEASE_SECONDS,
        metavar="SECONDS",
        help="a node: how long its lease in the cluster's state lasts; a node silent this long is declared lost "
        "(default %(default)s; larger clusters: longer, fewer commits)",
    )
    p_serve.add_argument(
        "--heartbeat",
        type=float,
        default=BEAT_SECONDS,
        metavar="SECONDS",
        help="a node: how often it renews its lease (default %(default)s; at most a third of --lease)",
    )
    p_serve.add_argument(
        "--layer-bucket",
        default=os.environ.get("SANDBOXD_LAYER_BUCKET"),
        help="a node: s3://BUCKET/PREFIX, an S3-compatible bucket where the cluster's templates are put, so a node can "
        "fetch one when no node holding it is alive (default $SANDBOXD_LAYER_BUCKET; credentials as boto3 finds them)",
    )
    p_serve.add_argument(
        "--s3-endpoint",
        default=os.environ.get("SANDBOXD_S3_ENDPOINT"),
        help="the S3-compatible store's URL, for --layer-bucket elsewhere than AWS (default $SANDBOXD_S3_ENDPOINT)",
    )
    p_serve.add_argument(
        "--advertise-url",
        default=None,
        help="with --database: where the cluster's other servers reach this node (default: its own host and port)",
    )
    p_serve.add_argument(
        "--no-network",
        action="store_true",
        help="sandboxes get no network but their own loopback",
    )
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p_serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line (time, level, logger, message and fields; a request's line has its "
        "method, route, status, ms and sandbox_id)",
    )

    p_tpl = sub.add_parser("template", help="build, import, list, remove and prune templates")
    tsub = p_tpl.add_subparsers(dest="template_command", required=True)
    server_options = argparse.ArgumentParser(add_help=False)
    _add_dirs(server_options)
    server_options.add_argument(
        "--url", default=os.environ.get("E2B_API_URL"), help="the server (default $E2B_API_URL, else localhost:3000)"
    )
    server_options.add_argument(
        "--api-key", default=os.environ.get("E2B_API_KEY"), help="default $E2B_API_KEY, else the data dir's key"
    )
    template_cli.add_parsers(tsub, server_options)

    p_sbx = sub.add_parser("sandbox", help="look at sandboxes through the server's API")
    ssub = p_sbx.add_subparsers(dest="sandbox_command", required=True)
    sandbox_cli.add_parsers(ssub, server_options)

    p_pool = sub.add_parser("pool", help="the warm pools: show, set a template's limits, reset")
    psub = p_pool.add_subparsers(dest="pool_command", required=True)
    pool_cli.add_parsers(psub, server_options)

    p_keys = sub.add_parser("keys", help="teams' API keys: create, list, revoke (with the server's own key)")
    ksub = p_keys.add_subparsers(dest="keys_command", required=True)
    keys_cli.add_parsers(ksub, server_options)

    p_nodes = sub.add_parser(
        "nodes", parents=[server_options], help="a cluster's nodes: address, lease, load (with the server's own key)"
    )
    p_nodes.add_argument("--json", action="store_true", help="print the JSON the server answers")

    p_key = sub.add_parser("api-key", help="print the server's API key (created on first use)")
    _add_dirs(p_key)

    p_ca = sub.add_parser("ca", help="the server's certificate authority (for --domain)")
    ca_sub = p_ca.add_subparsers(dest="ca_command", required=True)
    p_export = ca_sub.add_parser("export", help="print the CA certificate (PEM), to trust it elsewhere")
    _add_dirs(p_export)
    p_install = ca_sub.add_parser("install", help="add the CA to this host's trust store (update-ca-certificates)")
    _add_dirs(p_install)

    p_done = sub.add_parser("completion", help='shell completion: eval "$(sandboxd completion bash)" (zsh, fish too)')
    p_done.add_argument("shell", choices=["bash", "zsh", "fish"], nargs="?", default="bash")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    import argcomplete  # (completes when the shell asks: _ARGCOMPLETE set; else nothing)

    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command == "completion":
        from argcomplete.shell_integration import shellcode

        print(shellcode(["sandboxd"], shell=args.shell))
        return 0
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(name)s %(message)s")
    if getattr(args, "log_format", "text") == "json":
        from sandboxd.telemetry.jsonlog import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())

    if args.command == "serve":
        if args.role != "all" and not args.database:
            parser.error(f"--role {args.role} needs the cluster's state: --database postgresql://...")
        from sandboxd.cluster.tls import ClusterTLS, ClusterTLSError

        try:
            cluster_tls = ClusterTLS.from_args(args.cluster_ca, args.cluster_cert, args.cluster_key)
        except ClusterTLSError as e:
            parser.error(str(e))
        if cluster_tls is not None and args.role != "api" and args.cluster_port is None:
            parser.error(
                "a node with mutual TLS (--cluster-ca/-cert/-key) needs --cluster-port: where the cluster "
                "reaches it over TLS"
            )
        if not 0 < 3 * args.heartbeat <= args.lease <= 3600:
            parser.error(
                f"--heartbeat {args.heartbeat:g} and --lease {args.lease:g}: a lease of up to 3600 s, renewed at "
                "least three times within it (a beat missed is not a node lost)"
            )
        if args.layer_bucket and not (args.database and args.role != "api"):
            parser.error("--layer-bucket is where a cluster's nodes put their templates: give it to nodes (--database)")
        if args.cluster_port is not None and cluster_tls is None:
            parser.error("--cluster-port is the port of a node's mutual TLS: give --cluster-ca/-cert/-key too")
        if args.role == "api":
            from sandboxd.cluster.replica import serve as serve_replica

            serve_replica(
                args.host,
                args.port,
                args.database,
                args.placement,
                max(0, args.team_max_sandboxes),
                max(0, args.team_creates_per_minute),
                args.cluster_token or None,
                args.domain.lower().strip(".") if args.domain else None,
                args.tls_port,
                args.data_dir,
                cluster_tls,
            )
            return 0
        from sandboxd.core.limits import HostLimits
        from sandboxd.core.manager import Settings
        from sandboxd.runtime.quota import MIN_DISK_MB

        for name in ("disk_mb", "max_disk_mb"):
            value = getattr(args, name)
            if value is not None and value != 0 and value < MIN_DISK_MB:
                parser.error(f"--{name.replace('_', '-')} must be 0 (no quota) or at least {MIN_DISK_MB} MiB")
        from sandboxd.volumes.store import MAX_SIZE_MB, MIN_SIZE_MB

        if not MIN_SIZE_MB <= args.volume_size_mb <= MAX_SIZE_MB:
            parser.error(f"--volume-size-mb must be from {MIN_SIZE_MB} to {MAX_SIZE_MB}")
        if args.egress_ca_file:
            import ssl

            try:
                ssl.create_default_context().load_verify_locations(args.egress_ca_file)
            except (OSError, ssl.SSLError) as e:
                parser.error(f"--egress-ca-file {args.egress_ca_file}: not a readable PEM file of CAs ({e})")
        if args.pause_on_exit and args.destroy_on_exit:
            parser.error("--pause-on-exit keeps the sandboxes (on disk), --destroy-on-exit destroys them: pick one")
        from sandboxd.server import ServerConfig, serve

        settings = Settings(
            default_timeout=args.default_timeout,
            memory_mb=args.memory_mb,
            disk_mb=args.disk_mb,
            max_disk_mb=args.max_disk_mb,
            cpu_count=args.cpus,
            pids=args.pids,
            pool_size=args.pool_size,
            pool_max=args.pool_max,
            pool_cooldown=args.pool_cooldown,
            pool_memory_mb=args.pool_memory_mb,
            health_interval=max(0.0, args.health_interval),
            criu=_criu(parser, args.criu),
            checkpoint_after=_seconds_or_never(parser, "--checkpoint-after", args.checkpoint_after),
            ready_timeout=args.ready_timeout,
            ended_retention=args.ended_retention,
            max_builds=max(1, args.max_builds),
            max_memory_mb=args.max_sandbox_memory_mb,
            prewarm=tuple(t for t in args.prewarm.split(",") if t),
            host=HostLimits.for_host(
                max_sandboxes=args.max_sandboxes,
                max_committed_memory_mb=args.max_memory_mb,
                max_total_pids=args.max_total_pids,
                server_memory_mb=args.server_memory_mb,
            ),
            tenant=TenantLimits(
                output_buffer_bytes=args.max_output_buffer_kib * 1024,
                process_streams=args.max_process_streams,
                watchers=args.max_watchers,
                watched_dirs=args.max_watched_dirs,
                concurrent_requests=args.max_concurrent_requests,
                stalled_stream_seconds=args.stalled_stream_seconds,
                kept_processes=max(0, args.max_kept_processes),
            ),
        )
        serve(
            ServerConfig(
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                templates_dir=args.templates_dir,
                database=args.database,
                advertise_url=args.advertise_url,
                role=args.role,
                cluster_token=args.cluster_token or None,
                cluster_tls=cluster_tls,
                cluster_port=args.cluster_port,
                layer_bucket=args.layer_bucket or None,
                lease_seconds=args.lease,
                heartbeat_seconds=args.heartbeat,
                s3_endpoint=args.s3_endpoint or None,
                team_max_sandboxes=max(0, args.team_max_sandboxes),
                team_creates_per_minute=max(0, args.team_creates_per_minute),
                keep_sandboxes=not args.destroy_on_exit,
                pause_on_exit=args.pause_on_exit,
                metrics_per_sandbox=not args.no_metrics_per_sandbox,
                volume_size_mb=args.volume_size_mb,
                max_volumes=max(0, args.max_volumes),
                favor_dynmods=not args.no_favordynmods,
                uid_base=args.uid_base,
                network_cidr=None if args.no_network else args.network_cidr,
                network_cidr6=None if args.network_cidr6 == "off" else args.network_cidr6,
                dns=None if args.dns is None else [d for d in args.dns.split(",") if d],
                domain=args.domain.lower().strip(".") if args.domain else None,
                tls_port=args.tls_port,
                egress_ca_file=args.egress_ca_file,
                registry=args.registry,
                registry_insecure=args.registry_insecure,
                builtin_builds=args.builtin_builds,
                settings=settings,
                limits=RequestLimits(
                    max_message_bytes=int(args.max_message_mb * MiB),
                    max_body_bytes=args.max_body_kb * 1024,
                    max_json_depth=args.max_json_depth,
                    head_timeout_s=args.head_timeout,
                ),
            )
        )
        return 0
    if args.command == "template":
        from sandboxd.templates.builtin import RECIPES
        from sandboxd.templates.images import ImageError, debian_base, debian_rootfs
        from sandboxd.templates.store import TemplateStore

        templates_dir = args.templates_dir or args.data_dir / "templates"
        if args.template_command == "list":
            if not templates_dir.is_dir():
                print(
                    f"sandboxd: no templates directory {templates_dir}: build one with `sandboxd template build "
                    f"base --data-dir {args.data_dir}`, or pass the --data-dir/--templates-dir your server uses",
                    file=sys.stderr,
                )
                return 2
        print(f"templates dir: {templates_dir}", file=sys.stderr)
        store = TemplateStore(templates_dir)
        if args.template_command != "build" or args.file is not None:
            api_key = getattr(args, "api_key", None)
            known = getattr(args, "database", None) or (args.data_dir / "state.db").is_file()
            if args.template_command == "build" and not api_key and known:
                from sandboxd.state import open_state

                api_key = open_state(args.data_dir, getattr(args, "database", None), create=False).api_key()[0]
            return template_cli.main(args, store, getattr(args, "url", None) or "http://127.0.0.1:3000", api_key)
        if not args.names:
            print("sandboxd: name built-in templates to build, or give a Dockerfile with -f", file=sys.stderr)
            return 2
        for name in args.names:
            debian = debian_base(name) if ":" in name else None
            if debian is not None:  # a Debian root filesystem that from_debian_image() builds on, made now
                prefix = f"[{name}]"

                def say(text: str, prefix: str = prefix) -> None:
                    print(prefix, text, file=sys.stderr)

                try:
                    debian_rootfs(store.dir, *debian, say)
                except ImageError as e:
                    print(f"sandboxd: {e}", file=sys.stderr)
                    return 1
                print(f"[{name}] ready (cached in {store.dir / '.debian'})", file=sys.stderr)
                continue
            if name not in RECIPES:
                known = ", ".join(RECIPES)
                print(f"sandboxd: unknown template '{name}'; built-in templates: {known}", file=sys.stderr)
                return 2
            status = template_cli.build_builtin(store, name, args.data_dir, force=args.force)
            if status:
                return status
        return 0
    if args.command in ("sandbox", "pool", "keys", "nodes"):
        api_key = args.api_key
        if not api_key and (args.database or (args.data_dir / "state.db").is_file()):
            from sandboxd.state import open_state

            api_key = open_state(args.data_dir, args.database, create=False).api_key()[0]
        run = {"sandbox": sandbox_cli.main, "pool": pool_cli.main, "keys": keys_cli.main, "nodes": nodes_cli.main}[
            args.command
        ]
        return run(args, args.url or "http://127.0.0.1:3000", api_key)
    if args.command == "api-key":
        from sandboxd.state import open_state

        db_path = args.data_dir / "state.db"
        if args.database:
            print("state: PostgreSQL (--database)", file=sys.stderr)
            print(open_state(args.data_dir, args.database).api_key()[0])
            return 0
        if not db_path.is_file():
            print(
                f"sandboxd: no server state in {args.data_dir} (no state.db): start `sandboxd serve --data-dir "
                f"{args.data_dir}` once to create the API key, or pass the --data-dir your server uses",
                file=sys.stderr,
            )
            return 2
        print(f"data dir: {args.data_dir}", file=sys.stderr)
        print(open_state(args.data_dir, create=False).api_key()[0])
        return 0
    if args.command == "ca":
        from sandboxd.routing.tls import CertError, LocalCA

        if not args.data_dir.is_dir():
            print(f"sandboxd: no data dir {args.data_dir}: pass the --data-dir your server uses", file=sys.stderr)
            return 2
        ca = LocalCA(args.data_dir)
        if args.ca_command == "export":
            sys.stdout.write(ca.pem())
            return 0
        try:
            target = ca.install()
        except (CertError, OSError) as e:
            print(f"sandboxd: installing the CA failed: {e}", file=sys.stderr)
            return 1
        print(f"installed {target} (update-ca-certificates ran)", file=sys.stderr)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())


def _seconds_or_never(parser: argparse.ArgumentParser, flag: str, value: str) -> float | None:
    if value == "never":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        parser.error(f"{flag} {value}: a number of seconds >= 0, or 'never'")
    return seconds


CRIU_BUILDS = "/var/lib/sandboxd/tools/criu-*/criu"  # (scripts/build-criu.sh)


def _criu(parser: argparse.ArgumentParser, given: str | None) -> Path | None:
    if given == "none":
        return None
    if given is None:
        import glob

        builds = sorted(glob.glob(CRIU_BUILDS))
        return Path(builds[-1]) if builds else None
    if not os.access(given, os.X_OK):
        parser.error(f"--criu {given}: not an executable file (build one with scripts/build-criu.sh)")
    return Path(given).resolve()
