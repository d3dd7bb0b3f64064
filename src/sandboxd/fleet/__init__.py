"""sandboxd.fleet: what programs that run many sandboxes need, client-side, on the official `e2b` SDK (so it
works against sandboxd or E2B alike): a pool of sandboxes to lend and take back (pool.py), a load balancer over
the user's sandboxes (balancer.py) and a monitor that replaces the broken ones (health.py), an autoscaler that sizes
a pool from its sandboxes' CPU use (autoscaler.py), each kind of task sent to its template's pool (affinity.py),
calls that survive a restart without being done twice (retry.py). Async first, with synchronous faces."""

from sandboxd.fleet.affinity import NoTemplate, TemplateAffinity
from sandboxd.fleet.autoscaler import AutoScaler, Decision, Rule
from sandboxd.fleet.balancer import LoadBalancer, NoSandboxes
from sandboxd.fleet.errors import FleetError, PoolClosed, PoolExhausted
from sandboxd.fleet.health import HealthMonitor
from sandboxd.fleet.pool import AsyncSandboxPool, SandboxPool
from sandboxd.fleet.retry import RetriesExhausted, retrying, retrying_sync

__all__ = [
    "AsyncSandboxPool",
    "AutoScaler",
    "Decision",
    "FleetError",
    "HealthMonitor",
    "LoadBalancer",
    "NoSandboxes",
    "NoTemplate",
    "PoolClosed",
    "PoolExhausted",
    "RetriesExhausted",
    "Rule",
    "SandboxPool",
    "TemplateAffinity",
    "retrying",
    "retrying_sync",
]
