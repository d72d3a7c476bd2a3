"""Usage projection per hour, and indexes for user replays and log followers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = """
-- Usage per tenant, UTC hour, user, conversation and model, updated in the transaction that
-- appends the events it counts (and rebuildable from them: ledger/usage.py).
CREATE TABLE usage_hourly (
    tenant_id           text        NOT NULL,
    hour                timestamptz NOT NULL,
    user_id             text        NOT NULL,
    conversation_id     text        NOT NULL,
    model               text        NOT NULL,
    input_tokens        bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    cached_input_tokens bigint      NOT NULL,
    reservations        bigint      NOT NULL,
    commits             bigint      NOT NULL,
    rollbacks           bigint      NOT NULL,
    expiries            bigint      NOT NULL,
    late_commits        bigint      NOT NULL,
    usage_records       bigint      NOT NULL,
    overage_tokens      bigint      NOT NULL,
    PRIMARY KEY (tenant_id, hour, user_id, conversation_id, model),
    CHECK (date_trunc('hour', hour) = hour)
);

-- ReplayHistory of one user in log order.
CREATE INDEX events_tenant_user_position ON events (tenant_id, user_id, position);

-- Followers read in (transaction id, position) order below the snapshot's xmin.
CREATE INDEX events_xid_position ON events (xid, position);
"""

DOWNGRADE = """
DROP INDEX events_xid_position;
DROP INDEX events_tenant_user_position;
DROP TABLE usage_hourly;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
