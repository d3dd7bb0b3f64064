"""sandboxd.fleet: what programs that run many sandboxes need, client-side, on the official `e2b` SDK (so it
works against sandboxd or E2B alike): a pool of sandboxes to lend and take back (pool.py), a load balancer over
the user's sandboxes (balancer.py) and a monitor that replaces the broken ones (health.py), calls that survive a
restart without being done twice (retry.py). Async first, with synchronous faces."""

from sandboxd.fleet.balancer import LoadBalancer, NoSandboxes
from sandboxd.fleet.errors import FleetError, PoolClosed, PoolExhausted
from sandboxd.fleet.health import HealthMonitor
from sandboxd.fleet.pool import AsyncSandboxPool, SandboxPool
from sandboxd.fleet.retry import RetriesExhausted, retrying, retrying_sync

__all__ = [
    "AsyncSandboxPool",
    "FleetError",
    "HealthMonitor",
    "LoadBalancer",
    "NoSandboxes",
    "PoolClosed",
    "PoolExhausted",
    "RetriesExhausted",
    "SandboxPool",
    "retrying",
    "retrying_sync",
]
