"""Idempotency keys expire: the pruner deletes those older than the retention window, through
this index. The service role still may not DELETE keys: it prunes only through
`prune_idempotency_keys`, which deletes expired ones (a SECURITY DEFINER function owned by
the schema's owner, with a fixed search_path). It may UPDATE a key: an expired key written
again replaces its row.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
GRANT UPDATE ON idempotency_keys TO tokenledger_app;

-- Up to `batch_max` keys created before `before`, skipping rows a writer holds.
CREATE FUNCTION prune_idempotency_keys(before timestamptz, batch_max integer)
RETURNS integer LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH gone AS (
        DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM idempotency_keys WHERE created_at < before
            LIMIT batch_max FOR UPDATE SKIP LOCKED))
        RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;
REVOKE ALL ON FUNCTION prune_idempotency_keys(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION prune_idempotency_keys(timestamptz, integer) TO tokenledger_app;
"""

DOWNGRADE = """
DROP FUNCTION prune_idempotency_keys(timestamptz, integer);
REVOKE UPDATE ON idempotency_keys FROM tokenledger_app;
DROP INDEX idempotency_keys_created_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
