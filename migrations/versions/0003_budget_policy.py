"""Budget policy: rolling periods, time zones, soft limits, grants, rate limits, adjustments.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE events DROP CONSTRAINT events_event_type_check;
ALTER TABLE events ADD CONSTRAINT events_event_type_check CHECK (event_type IN (
    'QuotaSet', 'TokensGranted', 'TokensReserved', 'ReservationCommitted',
    'ReservationRolledBack', 'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted',
    'RateLimitSet'));

-- A quota's policy, and what rolling periods and grants need: hourly usage buckets
-- ([[hour since epoch, tokens], ...] for the last week) and the unspent grants.
ALTER TABLE accounts DROP CONSTRAINT accounts_period_check;
ALTER TABLE accounts
    ADD CONSTRAINT accounts_period_check CHECK (period IN ('none', 'day', 'month', 'rolling')),
    ADD COLUMN window_hours       integer NOT NULL DEFAULT 0 CHECK (window_hours >= 0),
    ADD COLUMN time_zone          text    NOT NULL DEFAULT 'UTC',
    ADD COLUMN soft_limit_percent integer NOT NULL DEFAULT 0
        CHECK (soft_limit_percent BETWEEN 0 AND 100),
    ADD COLUMN grant_order        text    NOT NULL DEFAULT 'quota_first'
        CHECK (grant_order IN ('quota_first', 'grants_first')),
    ADD COLUMN recent             jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN grants             jsonb   NOT NULL DEFAULT '[]';

-- GCRA limiters: per account (any level) and model ('' = every model). Each *_tat is the
-- theoretical arrival time of the next unit, in ticks of 1/per_minute microsecond since the
-- epoch (exact at any rate; numeric, as it outgrows bigint). Updated in the hold's transaction.
CREATE TABLE rate_limits (
    tenant_id           text        NOT NULL,
    user_id             text        NOT NULL,
    conversation_id     text        NOT NULL,
    model               text        NOT NULL,
    tokens_per_minute   bigint      NOT NULL CHECK (tokens_per_minute >= 0),
    requests_per_minute bigint      NOT NULL CHECK (requests_per_minute >= 0),
    tokens_tat          numeric     NOT NULL,
    requests_tat        numeric     NOT NULL,
    PRIMARY KEY (tenant_id, user_id, conversation_id, model)
);
"""

DOWNGRADE = """
DROP TABLE rate_limits;
ALTER TABLE accounts DROP CONSTRAINT accounts_period_check;
ALTER TABLE accounts
    DROP COLUMN window_hours, DROP COLUMN time_zone, DROP COLUMN soft_limit_percent,
    DROP COLUMN grant_order, DROP COLUMN recent, DROP COLUMN grants,
    ADD CONSTRAINT accounts_period_check CHECK (period IN ('none', 'day', 'month'));
ALTER TABLE events DROP CONSTRAINT events_event_type_check;
ALTER TABLE events ADD CONSTRAINT events_event_type_check CHECK (event_type IN (
    'QuotaSet', 'TokensGranted', 'TokensReserved', 'ReservationCommitted',
    'ReservationRolledBack', 'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted'));
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
