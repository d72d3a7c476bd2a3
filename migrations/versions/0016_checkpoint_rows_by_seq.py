"""Checkpoint rows by checkpoint (issue #20): an index on (tenant_id, seq).

`audit_checkpoint_rows`' primary key is (tenant_id, kind, key, seq): it serves the look-up of a
key's state at a checkpoint. Reading one checkpoint's own rows (to digest them: every
verification from a checkpoint does, and a full one does for each checkpoint) found them only
by scanning every row of the tenant's checkpoints: 1.35M rows on the bench's 1.21M log, for the
70,001 of the last checkpoint. This index reads just those.

`CREATE INDEX` without CONCURRENTLY blocks writes to the table while it builds, that is, the
taking of checkpoints: on a large existing table, build it by hand with CONCURRENTLY first
(this statement then no-ops).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS audit_checkpoint_rows_by_seq "
        "ON audit_checkpoint_rows (tenant_id, seq)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX audit_checkpoint_rows_by_seq")
