"""The database: DATABASE_URL, or an embedded PostgreSQL (pgserver) under the data dir; the
alembic migrations; and the connection pool."""

from __future__ import annotations

import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import psycopg
import structlog
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

import migrations
from ledger import codec

log = structlog.get_logger("tokenledger.db")

EMBEDDED_DATABASE = "tokenledger"


def embedded_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under `data_dir`/pg and return its URL. The
    server stops when the last process using it exits."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset; pgserver copes with /tmp.
        warnings.simplefilter("ignore")
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(  # type: ignore[attr-defined]
            data_dir.resolve() / "pg", cleanup_mode="stop"
        )
    exists = server.psql("SELECT 1 FROM pg_database WHERE datname = 'tokenledger';")
    if "(1 row)" not in exists:
        server.psql("CREATE DATABASE tokenledger;")
    url: str = server.get_uri(EMBEDDED_DATABASE)
    log.info("embedded postgresql", data_dir=str(data_dir / "pg"))
    return url


class SchemaError(RuntimeError):
    """The database's schema is not the revision this code needs."""


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("database_url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the schema to the newest revision."""
    command.upgrade(_config(url), "head")


def check_schema(url: str) -> None:
    """Refuse to serve a database that is not at this code's revision: a service that does not
    migrate (its role may not) must not run against an older or newer schema."""
    head = ScriptDirectory.from_config(_config(url)).get_current_head()
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    current = row[0] if row else None
    if current != head:
        raise SchemaError(
            f"the database is at schema revision {current or 'none'}, this code needs {head}: "
            "run `tokenledger migrate` as the schema owner first"
        )


recheck_idle_s = 1.0
"""A pooled connection idle longer than this is checked (one round trip) before it is lent."""


class _Freshness:
    """When each pooled connection last came back to the pool in good order. The pool checks a
    connection before lending it only when it has been idle longer than `recheck_idle_s`: one
    that finished a transaction a moment ago works, and checking it anyway cost every call a
    round trip. A connection that died within that second (the database restarted) fails its
    next use instead, which the caller gets as UNAVAILABLE with RetryInfo (StoreUnavailable);
    the pool then replaces it."""

    def __init__(self) -> None:
        self._returned: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def returned(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        returned = self._returned.get(conn)
        if returned is None or time.monotonic() - returned > recheck_idle_s:
            await AsyncConnectionPool.check_connection(conn)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(codec.json_loads, conn)


def make_pool(url: str, size_max: int) -> AsyncConnectionPool[Any]:
    """A pool of autocommit-off connections returning rows as dicts, reading json and jsonb
    through `codec.json_loads`; opened by the caller."""
    freshness = _Freshness()
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=size_max,
        kwargs={"row_factory": dict_row},
        timeout=5.0,
        open=False,
        configure=_configure,
        check=freshness.check,
        reset=freshness.returned,
    )
