"""Idempotency keys expire: the pruner deletes those older than the retention window, oldest
first, through this index. The service role may delete keys (and nothing else it could not
before): a key is a request record, not a projection of the log.

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
-- UPDATE: an expired key written again replaces its row; DELETE: the pruner.
GRANT UPDATE, DELETE ON idempotency_keys TO tokenledger_app;
"""

DOWNGRADE = """
REVOKE UPDATE, DELETE ON idempotency_keys FROM tokenledger_app;
DROP INDEX idempotency_keys_created_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
