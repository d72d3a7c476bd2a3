"""Database roles: the service runs as `tokenledger_app`, which may append events but never
change or remove them; `tokenledger_reader` may only read (read replicas, usage queries).

Roles belong to the cluster, not the database, so they are created only when missing and are
left in place on downgrade (other databases of the cluster may use them). The owner of the
tables is whoever runs the migrations; grant the service's login role `tokenledger_app`
(e.g. `CREATE ROLE ledger_svc LOGIN IN ROLE tokenledger_app`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_app') THEN
        CREATE ROLE tokenledger_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_reader') THEN
        CREATE ROLE tokenledger_reader NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO tokenledger_app, tokenledger_reader;

-- The log: append and read, nothing else (the trigger also refuses changes, for everyone).
GRANT SELECT, INSERT ON events TO tokenledger_app;
-- Projections change in place; idempotency keys are written once.
GRANT SELECT, INSERT, UPDATE ON accounts, reservations, rate_limits, usage_hourly
    TO tokenledger_app;
GRANT SELECT, INSERT ON idempotency_keys TO tokenledger_app;

GRANT SELECT ON events, accounts, reservations, rate_limits, usage_hourly, idempotency_keys
    TO tokenledger_reader;

-- A service that does not migrate checks at start that the schema is at its revision.
GRANT SELECT ON alembic_version TO tokenledger_app, tokenledger_reader;
"""

DOWNGRADE = """
REVOKE ALL ON events, accounts, reservations, rate_limits, usage_hourly, idempotency_keys,
    alembic_version FROM tokenledger_app, tokenledger_reader;
REVOKE USAGE ON SCHEMA public FROM tokenledger_app, tokenledger_reader;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
