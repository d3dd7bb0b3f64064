"""The fleet library's errors: each says what happened and what to do."""


class FleetError(Exception):
    """Base of sandboxd.fleet's errors."""


class PoolExhausted(FleetError):
    """Every sandbox of a pool is lent and none came back in time."""


class PoolClosed(FleetError):
    """The pool was closed."""
