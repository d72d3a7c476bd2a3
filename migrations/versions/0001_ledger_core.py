"""Ledger core: the append-only event log and its inline projections.

Every primary and unique key starts with tenant_id, so the schema can be distributed by tenant
(Citus) without change, and no foreign key crosses tenants.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
-- The log. One stream per account (tenant_id, user_id, conversation_id) with a gapless
-- version and a hash chain; `position` orders all events; `xid` lets followers read only
-- below the oldest running transaction, so an event that commits late is never skipped.
CREATE TABLE events (
    tenant_id           text        NOT NULL,
    user_id             text        NOT NULL,
    conversation_id     text        NOT NULL,
    version             bigint      NOT NULL CHECK (version > 0),
    position            bigint      GENERATED ALWAYS AS IDENTITY,
    event_type          text        NOT NULL CHECK (event_type IN (
                            'QuotaSet', 'TokensGranted', 'TokensReserved',
                            'ReservationCommitted', 'ReservationRolledBack',
                            'ReservationExpired', 'UsageRecorded', 'BalanceAdjusted')),
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    model               text        NOT NULL,
    reservation_id      text        NOT NULL,
    amount              bigint      NOT NULL,
    input_tokens        bigint      NOT NULL CHECK (input_tokens >= 0),
    output_tokens       bigint      NOT NULL CHECK (output_tokens >= 0),
    cached_input_tokens bigint      NOT NULL CHECK (cached_input_tokens >= 0),
    idempotency_key     text        NOT NULL,
    actor               text        NOT NULL,
    trace_id            text        NOT NULL,
    data                jsonb       NOT NULL,
    xid                 xid8        NOT NULL DEFAULT pg_current_xact_id(),
    prev_hash           bytea       NOT NULL CHECK (length(prev_hash) = 32),
    hash                bytea       NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (tenant_id, user_id, conversation_id, version)
);
CREATE UNIQUE INDEX events_tenant_position ON events (tenant_id, position);
CREATE INDEX events_reservation ON events (tenant_id, reservation_id)
    WHERE reservation_id <> '';

-- Append-only, enforced here and not only in code. Statement-level, so that even an UPDATE or
-- DELETE matching no row is refused.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Inline projection: one row per account, updated in the transaction that appends its events.
-- Usage is kept for every period kind so a quota's period can change without losing usage.
CREATE TABLE accounts (
    tenant_id       text        NOT NULL,
    user_id         text        NOT NULL,
    conversation_id text        NOT NULL,
    quota_limit     bigint      CHECK (quota_limit >= 0),
    period          text        NOT NULL DEFAULT 'none' CHECK (period IN ('none', 'day', 'month')),
    held            bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    used_total      bigint      NOT NULL DEFAULT 0,
    used_day        bigint      NOT NULL DEFAULT 0,
    day_start       date        NOT NULL DEFAULT '1970-01-01',
    used_month      bigint      NOT NULL DEFAULT 0,
    month_start     date        NOT NULL DEFAULT '1970-01-01',
    stream_version  bigint      NOT NULL DEFAULT 0,
    head_hash       bytea       NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id, conversation_id),
    CHECK (user_id <> '' OR conversation_id = '')
);

CREATE TABLE reservations (
    tenant_id           text        NOT NULL,
    reservation_id      text        NOT NULL,
    user_id             text        NOT NULL,
    conversation_id     text        NOT NULL,
    model               text        NOT NULL,
    amount              bigint      NOT NULL CHECK (amount > 0),
    state               text        NOT NULL
                            CHECK (state IN ('held', 'committed', 'rolled_back', 'expired')),
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    labels              jsonb       NOT NULL,
    input_tokens        bigint,
    output_tokens       bigint,
    cached_input_tokens bigint,
    late                boolean     NOT NULL DEFAULT false,
    ended_at            timestamptz,
    -- The balance returned when the reservation ended, so a repeated commit or rollback
    -- returns the first response.
    ended_balance       jsonb,
    PRIMARY KEY (tenant_id, reservation_id)
);
CREATE INDEX reservations_overdue ON reservations (expires_at) WHERE state = 'held';
CREATE INDEX reservations_tenant_overdue ON reservations (tenant_id, expires_at)
    WHERE state = 'held';

-- First request and response per idempotency key, for exactly-once retries.
CREATE TABLE idempotency_keys (
    tenant_id       text        NOT NULL,
    idempotency_key text        NOT NULL,
    operation       text        NOT NULL,
    request         jsonb       NOT NULL,
    response        jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key)
);
"""

DOWNGRADE = """
DROP TABLE idempotency_keys;
DROP TABLE reservations;
DROP TABLE accounts;
DROP TABLE events;
DROP FUNCTION events_refuse_change();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
