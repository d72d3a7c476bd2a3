"""Alembic environment: plain SQL migrations over psycopg 3. The database is any libpq
connection string (URL or key=value), from the `database_url` option (set by
`tokenledger migrate`) or DATABASE_URL."""

import os

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

conninfo = context.config.get_main_option("database_url") or os.environ.get("DATABASE_URL", "")
if not conninfo:
    raise SystemExit("no database: set DATABASE_URL or run `tokenledger migrate`")

if context.is_offline_mode():
    context.configure(dialect_name="postgresql", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(
        "postgresql+psycopg://", poolclass=pool.NullPool, creator=lambda: psycopg.connect(conninfo)
    )
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
