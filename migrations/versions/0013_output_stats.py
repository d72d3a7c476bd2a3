"""Output statistics (issue #17, predictive output holds): what GetOutputStats reads.

The data is already kept: every reservation that carries usage has its `output_tokens` in
the `reservations` projection — committed ones, and expired ones committed late (their
usage arrives as UsageRecorded, the row stays `expired` with `late`). What is missing is a
way to read the most recent of them per (tenant, user, model) and per (tenant, model)
without scanning the tenant: two partial indexes, tenant first (as every key here, so they
distribute with the table), newest first, carrying `output_tokens` so that the query is an
index-only scan. Rows without usage (held, rolled back, expired without a late commit) are
not in them, so they cost nothing until a commit writes their usage.

Written rows pay two more index entries per commit (the commit's UPDATE is not a HOT update
already: it changes `state`, which the held-reservation indexes' predicates name).
`CREATE INDEX` without CONCURRENTLY blocks writes to the table while it builds: on a large
existing table, build them by hand with CONCURRENTLY first (these statements then no-op).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE INDEX IF NOT EXISTS reservations_output_by_user
    ON reservations (tenant_id, user_id, model, created_at DESC) INCLUDE (output_tokens)
    WHERE output_tokens IS NOT NULL;
CREATE INDEX IF NOT EXISTS reservations_output_by_model
    ON reservations (tenant_id, model, created_at DESC) INCLUDE (output_tokens)
    WHERE output_tokens IS NOT NULL;
"""

DOWNGRADE = """
DROP INDEX reservations_output_by_model;
DROP INDEX reservations_output_by_user;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
