"""Budget alerts: the thresholds an account watches and those already crossed in its period
(projections of BudgetAlertsSet and BudgetThresholdCrossed, two new event types).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE accounts
    ADD COLUMN alert_thresholds jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN alerts_fired     jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN alerts_period    date  NOT NULL DEFAULT '1970-01-01';

ALTER TABLE events DROP CONSTRAINT events_event_type_check;
ALTER TABLE events ADD CONSTRAINT events_event_type_check CHECK (event_type IN (
    'QuotaSet', 'TokensGranted', 'TokensReserved', 'ReservationCommitted',
    'ReservationRolledBack', 'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted',
    'RateLimitSet', 'BudgetAlertsSet', 'BudgetThresholdCrossed'));
"""

DOWNGRADE = """
ALTER TABLE events DROP CONSTRAINT events_event_type_check;
ALTER TABLE events ADD CONSTRAINT events_event_type_check CHECK (event_type IN (
    'QuotaSet', 'TokensGranted', 'TokensReserved', 'ReservationCommitted',
    'ReservationRolledBack', 'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted',
    'RateLimitSet'));

ALTER TABLE accounts
    DROP COLUMN alert_thresholds,
    DROP COLUMN alerts_fired,
    DROP COLUMN alerts_period;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
