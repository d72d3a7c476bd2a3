"""Operator corrections in the usage projection: BalanceAdjusted events are counted in
usage_hourly (`adjusted_tokens`, signed, and `adjustments`), so finance sees usage and its
corrections side by side. Existing adjustments are counted from the log here, exactly as
ledger/usage.py counts them, so the projection still equals its rebuild.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE usage_hourly
    ADD COLUMN adjusted_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN adjustments     bigint NOT NULL DEFAULT 0;

-- A BalanceAdjusted event keeps its signed tokens in `amount`.
INSERT INTO usage_hourly (tenant_id, hour, user_id, conversation_id, model,
    input_tokens, output_tokens, cached_input_tokens, reservations, commits, rollbacks,
    expiries, late_commits, usage_records, overage_tokens, adjusted_tokens, adjustments)
SELECT tenant_id, date_trunc('hour', occurred_at, 'UTC'), user_id, conversation_id, model,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, sum(amount), count(*)
FROM events
WHERE event_type = 'BalanceAdjusted'
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (tenant_id, hour, user_id, conversation_id, model) DO UPDATE
    SET adjusted_tokens = EXCLUDED.adjusted_tokens, adjustments = EXCLUDED.adjustments;
"""

DOWNGRADE = """
-- Rows that only counted adjustments go with the columns.
DELETE FROM usage_hourly
WHERE adjustments > 0 AND reservations = 0 AND commits = 0 AND rollbacks = 0 AND expiries = 0
    AND late_commits = 0 AND usage_records = 0;
ALTER TABLE usage_hourly DROP COLUMN adjusted_tokens, DROP COLUMN adjustments;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
