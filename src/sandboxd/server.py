"""Assembles the server: state, templates, runtime, manager, control plane, envd, router, lifespan."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import Receive, Scope, Send

from sandboxd.api.app import build_control_plane
from sandboxd.api.nodes import node_routes
from sandboxd.cluster.bucket import Bucket, BucketError
from sandboxd.cluster.catalog import Catalog
from sandboxd.cluster.layers import LayerShare
from sandboxd.cluster.membership import BEAT_SECONDS, LEASE_SECONDS, Membership
from sandboxd.cluster.moving import Moving
from sandboxd.cluster.signatures import signature_routes
from sandboxd.cluster.tls import ClusterTLS
from sandboxd.core import workload_identity
from sandboxd.core.builds import TemplateBuilds
from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import SandboxManager, Settings
from sandboxd.core.quotas import TeamQuotas
from sandboxd.core.teams import TEMPLATE, Teams
from sandboxd.dashboard.app import dashboard_routes
from sandboxd.envd import uploads
from sandboxd.envd.app import SandboxGone, build_envd_app
from sandboxd.envd.checkpointing import EnvdAtCheckpoint
from sandboxd.envd.process_service import end_streams_for_shutdown
from sandboxd.listeners import Listener
from sandboxd.network.dns import Resolver, host_resolvers
from sandboxd.network.egress import EgressProxy
from sandboxd.routing.http_protocol import BoundedHttpToolsProtocol
from sandboxd.routing.proxy import PortProxy
from sandboxd.routing.router import ENVD_PORT, Router
from sandboxd.runtime.base import RuntimeError_
from sandboxd.runtime.cgroups import CgroupError
from sandboxd.runtime.identity import IdentityError
from sandboxd.runtime.namespaces import NamespaceRuntime
from sandboxd.runtime.native import HelperBuildError
from sandboxd.runtime.network import DEFAULT_CIDR, PROXY_MARK, PROXY_PORT
from sandboxd.state import open_state
from sandboxd.telemetry.prometheus import Exporter, Requests
from sandboxd.templates.images import Registry
from sandboxd.templates.store import TemplateError, TemplateStore
from sandboxd.volumes.store import DEFAULT_SIZE_MB as DEFAULT_VOLUME_MB
from sandboxd.volumes.store import MAX_VOLUMES, VolumeStore

log = logging.getLogger("sandboxd")

DEFAULT_DATA_DIR = Path("/var/lib/sandboxd")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: Path = DEFAULT_DATA_DIR
    templates_dir: Path | None = None
    database: str | None = None  # PostgreSQL (a URL or conninfo) instead of data_dir/state.db (state/)
    advertise_url: str | None = None  # where other nodes reach this one (default: its own address and port)
    lease_seconds: float = LEASE_SECONDS  # a node: how long its lease lasts, and how often it renews it
    heartbeat_seconds: float = BEAT_SECONDS
    role: str = "all"  # "node": a cluster's node (teams' limits are its API replicas' to enforce)
    cluster_token: str | None = None  # a node: only requests carrying it (its API replicas') are served
    cluster_tls: ClusterTLS | None = None  # a node: mutual TLS on cluster_port for its replicas and the other nodes
    cluster_port: int | None = None
    # a node: s3://BUCKET/PREFIX where the cluster's templates are put (cluster/bucket.py)
    layer_bucket: str | None = None
    s3_endpoint: str | None = None
    team_max_sandboxes: int = 0  # teams' limits unless their own (core/quotas.py); 0: none
    team_creates_per_minute: int = 0
    # On shutdown, leave sandboxes running for the next start to re-adopt (an upgrade or restart must
    # not cost users their sandboxes); False destroys them (`--destroy-on-exit`).
    keep_sandboxes: bool = True
    # With keep_sandboxes: write them to disk first (`--pause-on-exit`), to outlive a host reboot with their memory.
    pause_on_exit: bool = False
    favor_dynmods: bool = True  # remount cgroup2 with favordynmods (see runtime/cgroups.py)
    uid_base: int | None = None  # first host uid of the sandboxes' ranges (None: runtime/identity.py's default)
    network_cidr: str | None = DEFAULT_CIDR  # the sandboxes' addresses (runtime/network.py); None: no network
    network_cidr6: str | None = "auto"  # their IPv6 range: "auto" (a ULA /64 when the host has IPv6), None: none
    dns: list[str] | None = None  # where the sandboxes' resolver forwards (None: the host's /etc/resolv.conf)
    domain: str | None = None  # --domain: {port}-{id}.DOMAIN and api.DOMAIN over TLS (routing/tls.py)
    egress_ca_file: str | None = None  # more CAs the egress proxy trusts for intercepted hosts' servers
    registry: str | None = None  # where template builds pull images from
    registry_insecure: bool = False
    builtin_builds: bool = False  # the server `sandboxd template build` starts: may build built-in templates
    tls_port: int = 443
    volume_size_mb: int = DEFAULT_VOLUME_MB  # a new volume's size unless its create says (volumes/store.py)
    max_volumes: int = MAX_VOLUMES
    # /metrics: a series per sandbox for its CPU, memory and disk (off: a fleet of thousands, telemetry/prometheus.py)
    metrics_per_sandbox: bool = True

    @property
    def issuer(self) -> str:
        """The URL relying parties know this server by (workload identity tokens' `iss`)."""
        if self.domain:
            return f"https://api.{self.domain}" + ("" if self.tls_port == 443 else f":{self.tls_port}")
        host = "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    settings: Settings = field(default_factory=Settings)
    limits: RequestLimits = field(default_factory=RequestLimits)

    @property
    def template_path(self) -> Path:
        return self.templates_dir or self.data_dir / "templates"


class App:
    """The ASGI application plus the objects behind it."""

    def __init__(self, config: ServerConfig) -> None:
        if os.geteuid() != 0:
            raise SystemExit("sandboxd serve must run as root (it creates namespaces, mounts and cgroups)")
        self.config = config
        if config.template_path.is_dir():
            os.chmod(config.template_path, 0o700)  # installs made before this was enforced
        self.db = open_state(config.data_dir, config.database)
        self.api_key, self.key_created = self.db.api_key()
        self.templates = TemplateStore(config.template_path)
        self.runtime = NamespaceRuntime(
            config.data_dir,
            favor_dynmods=config.favor_dynmods,
            uid_base=config.uid_base,
            network_cidr=config.network_cidr,
            network_cidr6=config.network_cidr6,
        )
        try:
            self._assemble(config)
        except BaseException:
            self.runtime.close()  # its gateway and table go (nothing runs yet)
            raise

    def _assemble(self, config: ServerConfig) -> None:
        config.settings.domain = config.domain
        self.manager = SandboxManager(self.runtime, self.templates, self.db, config.settings)
        self.manager.net.identity = workload_identity.Issuer(config.data_dir, config.issuer)
        self.builds = TemplateBuilds(self.manager, self.templates)
        self.builds.builtin_builds = config.builtin_builds
        self.manager.after_boot_again.append(lambda sandbox: uploads.clean_sandbox(self.manager, sandbox))
        self.manager.after_resume.append(lambda sandbox: uploads.clean_sandbox(self.manager, sandbox, True))
        self.manager.checkpoint_parts.append(EnvdAtCheckpoint(self.manager.runtime))
        self.manager.volumes = VolumeStore(
            config.data_dir / "volumes", self.db, config.volume_size_mb, config.max_volumes
        )
        if config.registry:
            self.builds.registry = Registry(config.registry, config.registry_insecure)
        self.resolver: Resolver | None = None
        self.egress: EgressProxy | None = None
        if self.runtime.net is not None:
            gateway = self.runtime.net.gateway
            upstream = config.dns if config.dns is not None else host_resolvers()
            self.resolver = Resolver(gateway, upstream, self.manager.net.policy_for)
            self.egress = EgressProxy(
                gateway,
                PROXY_PORT,
                self.manager.net.policy_for,
                upstream,
                PROXY_MARK,
                ca_for=self.manager.net.ca_for,
                upstream_ca_file=config.egress_ca_file,
                fill=self.manager.net.fill,
            )
            self.manager.net.on_policy_change.append(self.egress.policy_changed)
        h = self.manager.host_limits
        self.runtime.set_host_limits(h.memory_cap_mb, h.max_total_pids, h.server_memory_mb)
        proxy = PortProxy(self.manager)
        self.manager.checkpoint_parts.append(proxy)
        self.exporter = Exporter(self.manager, self.builds, per_sandbox=config.metrics_per_sandbox)
        self.teams = Teams(self.db, self.api_key)
        own = {"::": "[::1]", "0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1"}.get(config.host, config.host)
        # a server whose state is shared (PostgreSQL) is a node of a cluster: leases, lost nodes, their return
        self.membership = (
            Membership(
                self.manager,
                self.db,
                config.advertise_url or self._own_url(own, config),
                lease=config.lease_seconds,
                beat=config.heartbeat_seconds,
            )
            if config.database
            else None
        )
        self.layers = (
            LayerShare(
                self.manager.templates,
                self.db,
                self.api_key,
                config.cluster_token,
                config.cluster_tls,
                Bucket(config.layer_bucket, config.s3_endpoint) if config.layer_bucket else None,
            )
            if self.membership
            else None
        )
        if self.layers is not None:
            self.manager.fetch_template = self.layers.ensure
            self.builds.on_delete.append(self.layers.forget)
            # which template a name means, which build a tag means: the cluster's (cluster/catalog.py)
            catalog = self.layers.catalog = self.manager.catalog = Catalog(self.db)
            self.builds.on_delete.append(catalog.forget)
        # with a bucket, a sandbox paused to its files or to disk outlives its node (cluster/moving.py)
        self.moving = (
            Moving(self.manager, self.db, self.layers, lambda ident, team: self.teams.set_owner(TEMPLATE, ident, team))
            if self.layers and self.layers.bucket
            else None
        )
        if self.moving is not None:
            self.manager.before_files_pause.append(self.moving.keep_image)
            self.manager.before_disk_pause.append(self.moving.keep_memory_image)
            self.layers.before_push.append(self.moving.collect)  # type: ignore[union-attr]
        control = build_control_plane(
            self.manager,
            self.teams,
            config.limits,
            self.builds,
            self.exporter,
            [
                *dashboard_routes(f"http://{own}:{config.port}"),
                *(self.layers.routes() if self.layers else []),
                *(signature_routes(self.manager) if self.layers else []),
                *(node_routes(self.db) if self.layers else []),
                *(self.moving.routes() if self.moving else []),
            ],
            TeamQuotas(self.db, config.team_max_sandboxes, config.team_creates_per_minute),
            enforce_quotas=config.role == "all",  # (a cluster's nodes: its API replicas enforce them)
        )
        self.router = Router(
            self.manager,
            Requests(control, self.exporter, "control"),
            {ENVD_PORT: Requests(build_envd_app(self.manager, config.limits), self.exporter, "envd")},
            proxy,
            domain=config.domain,
            cluster_token=config.cluster_token,
        )
        # More listeners of the same app (the TLS one of --domain), served in the lifespan's loop.
        self.extra_servers: list[tuple[Any, socket.socket]] = []
        self._extra_tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def _own_url(own: str, config: ServerConfig) -> str:
        """Where the cluster reaches this node: its cluster listener with mutual TLS, else its port."""
        if config.cluster_tls is not None and config.cluster_port is not None:
            return f"https://{own}:{config.cluster_port}"
        return f"http://{own}:{config.port}"

    def drain(self) -> None:
        """SIGTERM/SIGINT: refuse new requests (503) and stop refilling pools; open streams then end
        (uvicorn waits a few seconds for them) and the lifespan shutdown keeps or destroys sandboxes."""
        log.info("shutting down: refusing new requests")
        self.router.draining = True
        self.manager.begin_shutdown()
        end_streams_for_shutdown(self.manager, sandboxes_kept=self.config.keep_sandboxes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.router(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for service in (self.resolver, self.egress):
                        if service is not None:
                            await service.start()
                    if self.membership is not None:  # (its sandboxes declared lost while it was away: its own)
                        await asyncio.to_thread(self.membership.revive)
                    await self.manager.start()
                    if self.membership is not None:
                        await self.membership.start()
                    if self.layers is not None:
                        await self.layers.start()
                    for server, sock in self.extra_servers:
                        self._extra_tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
                    cleaned = await uploads.clean_interrupted(self.manager)
                    if cleaned:
                        log.info("removed %d temporary file(s) of uploads a crash interrupted", cleaned)
                except Exception as e:
                    for service in (self.resolver, self.egress):
                        if service is not None:
                            service.close()
                    self.runtime.close()  # removes only what no kept sandbox uses
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                self._announce()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for server, _ in self.extra_servers:
                    server.should_exit = True
                if self._extra_tasks:
                    await asyncio.wait(self._extra_tasks, timeout=10)
                for service in (self.resolver, self.egress):
                    if service is not None:
                        service.close()
                await self.builds.stop()
                if self.layers is not None:
                    await self.layers.stop()
                if self.membership is not None:
                    await self.membership.stop(release=not self.config.keep_sandboxes)
                await self.manager.stop(destroy=not self.config.keep_sandboxes, to_disk=self.config.pause_on_exit)
                if self.manager.volumes is not None:
                    self.manager.volumes.close()
                self.db.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _announce(self) -> None:
        c = self.config
        host = "localhost" if c.host in ("127.0.0.1", "0.0.0.0", "::") else c.host
        url = f"http://{host}:{c.port}"
        names = self.templates.names()
        lines = [
            f"sandboxd listening on {url} (data in {c.data_dir})",
            f"templates: {', '.join(names) if names else 'none — run `sandboxd template build base`'}",
            f"API key{' (new)' if self.key_created else ''}: {self.api_key}",
            f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={self.api_key}",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)


class DataDirLocked(SystemExit):
    pass


def prepare_data_dir(data_dir: Path) -> Path:
    """Create the data directory if needed, readable by root only: it holds the API key, every
    sandbox's files (whose setuid bits must never be reachable by host users) and the templates."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    return data_dir


def lock_data_dir(data_dir: Path) -> int:
    """Hold `<data>/sandboxd.lock` for the life of the process: one server per data directory.

    A second server would re-adopt the first one's sandboxes, sweep its pool and destroy its sandboxes
    on exit. The lock is an flock on a close-on-exec descriptor, so it goes with the process, however
    it ends, and no sandbox helper inherits it."""
    path = data_dir / "sandboxd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(
            f"sandboxd: another sandboxd (PID {holder}) is serving the data directory {data_dir}: stop it "
            "first, or give this server its own --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def bind_listener(host: str, port: int, option: str = "--host/--port") -> socket.socket:
    """Bind the API port before anything is announced, so that a port in use fails the start cleanly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        what = "is in use by another program" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
        raise SystemExit(f"sandboxd: {host}:{port} {what}; choose another with {option}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class _QuietSandboxGone(logging.Filter):
    """A stream cut on purpose because its sandbox was killed (envd/app.py, SandboxGone) is no error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SandboxGone)


def serve(config: ServerConfig) -> None:
    import uvicorn

    logging.getLogger("uvicorn.error").addFilter(_QuietSandboxGone())

    if os.geteuid() != 0:
        raise SystemExit("sandboxd serve must run as root (it creates namespaces, mounts and cgroups)")
    os.umask(0o077)  # state.db, logs, sandbox state: nothing the server writes is for other host users
    # Every process stream holds pipes: take all the descriptors the host allows (per-sandbox caps on
    # streams and requests keep one tenant from using them up).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    prepare_data_dir(config.data_dir)
    lock_fd = lock_data_dir(config.data_dir)
    sock = bind_listener(config.host, config.port)
    tls_sock = bind_listener(config.host, config.tls_port, "--tls-port") if config.domain else None
    cluster_sock = (
        bind_listener(config.host, config.cluster_port, "--cluster-port")
        if config.cluster_tls is not None and config.cluster_port is not None
        else None
    )
    try:
        app = App(config)
    except (RuntimeError_, IdentityError, CgroupError, HelperBuildError, TemplateError, BucketError) as e:
        sock.close()
        raise SystemExit(f"sandboxd: cannot start: {e}") from None
    protocol = type(
        "Protocol",
        (BoundedHttpToolsProtocol,),
        {"max_head_bytes": config.limits.max_head_bytes, "head_timeout": config.limits.head_timeout_s},
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Shut down gracefully (sandboxes kept or destroyed, state closed), then exit 0: uvicorn would
            # otherwise re-raise the signal after its shutdown and report death by SIGTERM.
            if not self.should_exit:
                try:
                    asyncio.get_running_loop().call_soon_threadsafe(app.drain)
                except RuntimeError:  # no loop yet: nothing to drain
                    pass
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            self._captured_signals.clear()

    uconfig = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        loop="auto",
        http=protocol,  # httptools with bounds on the request head (size, time)
        timeout_keep_alive=650,
        timeout_graceful_shutdown=5,
    )

    def listener(**tls: Any) -> uvicorn.Config:
        """Another listener of the app over TLS (the main one owns the lifespan)."""
        return uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            http=protocol,
            timeout_keep_alive=650,
            timeout_graceful_shutdown=5,
            **tls,
        )

    if config.domain and tls_sock is not None:
        from sandboxd.routing.tls import LocalCA

        chain, key = LocalCA(config.data_dir).server_cert(config.domain)
        app.extra_servers.append((Listener(listener(ssl_certfile=str(chain), ssl_keyfile=str(key))), tls_sock))
    if config.cluster_tls is not None and cluster_sock is not None:
        app.extra_servers.append((Listener(listener(**config.cluster_tls.uvicorn_options())), cluster_sock))
    try:
        _Server(uconfig).run(sockets=[sock])
    finally:
        os.close(lock_fd)
