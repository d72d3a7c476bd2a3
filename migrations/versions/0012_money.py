"""Money: prices per model, costs in the usage projection, budgets in money.

- `prices`: the price points a tenant's PriceSet events set (a projection of the log, like
  the others), keyed tenant first. Micro-units of the tenant's currency per million tokens,
  by kind; a point is in force from `effective_from` until the model's next one.
- `accounts.money`: the account's money side (ledger/model.py Account.money) as JSON, like
  `ended_balance`; NULL while no money concerns the account.
- `reservations.money` (micro-units held) and `cost` (what the commit cost; NULL: unpriced
  or not committed).
- `events`: PriceSet joins the event types the log accepts.
- `usage_hourly`: `cost_micros`, `unpriced_tokens`, `adjusted_micros`. No price existed before
  this revision, so every token counted so far was unpriced: the backfill says so, exactly as
  ledger/usage.py counts an event without a cost, so the projection still equals its rebuild.

Every money column is an integer (bigint): no float touches money.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE prices (
    tenant_id             text        NOT NULL,
    model                 text        NOT NULL,
    effective_from        timestamptz NOT NULL,
    currency              text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    input_per_mtok        bigint      NOT NULL CHECK (input_per_mtok >= 0),
    output_per_mtok       bigint      NOT NULL CHECK (output_per_mtok >= 0),
    cached_input_per_mtok bigint      NOT NULL CHECK (cached_input_per_mtok >= 0),
    PRIMARY KEY (tenant_id, model, effective_from)
);

ALTER TABLE accounts ADD COLUMN money jsonb;

ALTER TABLE reservations
    ADD COLUMN money bigint NOT NULL DEFAULT 0 CHECK (money >= 0),
    ADD COLUMN cost  bigint CHECK (cost >= 0);

ALTER TABLE usage_hourly
    ADD COLUMN cost_micros     bigint NOT NULL DEFAULT 0,
    ADD COLUMN unpriced_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN adjusted_micros bigint NOT NULL DEFAULT 0;

UPDATE usage_hourly SET unpriced_tokens = input_tokens + output_tokens + cached_input_tokens
WHERE input_tokens + output_tokens + cached_input_tokens <> 0;

GRANT SELECT, INSERT, UPDATE ON prices TO tokenledger_app;
GRANT SELECT ON prices TO tokenledger_reader;

ALTER TABLE events DROP CONSTRAINT events_event_type_check;
ALTER TABLE events ADD CONSTRAINT events_event_type_check CHECK (event_type IN (
    'QuotaSet', 'TokensGranted', 'TokensReserved', 'ReservationCommitted',
    'ReservationRolledBack', 'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted',
    'RateLimitSet', 'BudgetAlertsSet', 'BudgetThresholdCrossed', 'PriceSet'));
"""

DOWNGRADE = """
ALTER TABLE events DROP CONSTRAINT events_event_type_check;
ALTER TABLE events ADD CONSTRAINT events_event_type_check CHECK (event_type IN (
    'QuotaSet', 'TokensGranted', 'TokensReserved', 'ReservationCommitted',
    'ReservationRolledBack', 'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted',
    'RateLimitSet', 'BudgetAlertsSet', 'BudgetThresholdCrossed'));
ALTER TABLE usage_hourly
    DROP COLUMN cost_micros, DROP COLUMN unpriced_tokens, DROP COLUMN adjusted_micros;
ALTER TABLE reservations DROP COLUMN money, DROP COLUMN cost;
ALTER TABLE accounts DROP COLUMN money;
DROP TABLE prices;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
