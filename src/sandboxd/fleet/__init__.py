"""sandboxd.fleet: what programs that run many sandboxes need, client-side, on the official `e2b` SDK (so it
works against sandboxd or E2B alike): a pool of sandboxes to lend and take back (pool.py). Async first
(`AsyncSandboxPool`), with a synchronous face (`SandboxPool`)."""

from sandboxd.fleet.errors import FleetError, PoolClosed, PoolExhausted
from sandboxd.fleet.pool import AsyncSandboxPool, SandboxPool

__all__ = ["AsyncSandboxPool", "FleetError", "PoolClosed", "PoolExhausted", "SandboxPool"]
