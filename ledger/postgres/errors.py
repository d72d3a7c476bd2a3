"""The one place where database errors become ledger errors.

Failover-class errors (the server is read-only, shutting down, not accepting connections, or
the connection was lost mid-transaction) and an exhausted pool are `StoreUnavailable`: the
transaction did not commit, and a retry on a healthy primary succeeds. A lost race
(serialization failure, deadlock, duplicate key) is `Conflict`, which the ledger retries.
Anything else is a bug and stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from ledger.errors import Conflict, StoreUnavailable

_CONFLICTS = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)
_UNAVAILABLE = (
    psycopg.OperationalError,  # connection lost, admin shutdown, cannot connect now, …
    psycopg.InterfaceError,  # the connection was closed under us
    pg_errors.ReadOnlySqlTransaction,  # a demoted or read-only primary (failover)
)


def translate(exc: Exception) -> Exception:
    """The ledger error for a database error (or `exc` itself when it is none of those)."""
    if isinstance(exc, _CONFLICTS):
        return Conflict(f"the transaction lost a race and changed nothing: {exc}")
    if isinstance(exc, PoolTimeout):
        return StoreUnavailable(f"no database connection available: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"database unavailable: {exc}")
    return exc


@contextmanager
def translated() -> Iterator[None]:
    """Raise database errors inside the block as ledger errors."""
    try:
        yield
    except (psycopg.Error, PoolTimeout) as exc:
        new = translate(exc)
        if new is exc:
            raise
        raise new from exc
