"""Alembic environment: plain SQL migrations over psycopg 3. The URL comes from the config
(set by `tokenledger migrate`) or DATABASE_URL."""

import os

from alembic import context
from sqlalchemy import create_engine, pool

url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "")
if not url:
    raise SystemExit("no database: set DATABASE_URL or run `tokenledger migrate`")
if url.startswith("postgresql://") or url.startswith("postgres://"):
    url = "postgresql+psycopg://" + url.split("://", 1)[1]

if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
