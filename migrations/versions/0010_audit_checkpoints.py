"""Audit checkpoints: what a verification found at a log position, so that the next one need
only read what was appended since.

A checkpoint of a tenant records, at a position of its log, the number of events up to it,
and for each kind of state an audit rebuilds (stream heads, accounts, reservations, usage
rows, rate limiters) how many rows the rebuild held and an additive digest of them; it is
hash-chained to the tenant's previous checkpoint like an event to its predecessor. Its rows
(`audit_checkpoint_rows`) are the state that changed since the previous checkpoint, so that
a later verification can start from it: the state at checkpoint n is, per key, the row of
the highest seq <= n (a NULL value: the key had gone).

Both tables are as protected as `events`: a statement trigger refuses UPDATE, DELETE and
TRUNCATE for everyone, and the service role may only INSERT and SELECT. `tenant_id` leads
every key, like every other table's, so the tables shard with their tenant.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE audit_checkpoints (
    tenant_id    text        NOT NULL,
    seq          bigint      NOT NULL CHECK (seq >= 1),
    -- The last event position folded; events after it are the next verification's.
    position     bigint      NOT NULL,
    events       bigint      NOT NULL CHECK (events >= 0),
    taken_at     timestamptz NOT NULL,
    -- {"stream": {"rows": n, "sum": hex}, "account": ..., ...}: the digest of every kind.
    state        jsonb       NOT NULL,
    -- How many rows this checkpoint added to audit_checkpoint_rows, and their sha256.
    delta_rows   bigint      NOT NULL,
    delta_digest bytea       NOT NULL,
    prev_hash    bytea       NOT NULL,
    hash         bytea       NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);

CREATE TABLE audit_checkpoint_rows (
    tenant_id text   NOT NULL,
    seq       bigint NOT NULL,
    kind      text   NOT NULL,
    key       text   NOT NULL,
    value     text,
    -- Lookups go by key, newest checkpoint first (the state at a checkpoint). No foreign key
    -- to audit_checkpoints (the schema has none, for Citus): the rows are written in the
    -- checkpoint's transaction, and its delta_rows and delta_digest say which belong to it.
    PRIMARY KEY (tenant_id, kind, key, seq)
);

-- Append-only, like events: statement-level, so even a change matching no row is refused.
CREATE FUNCTION audit_checkpoints_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_refuse_change();
CREATE TRIGGER audit_checkpoint_rows_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_checkpoint_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_refuse_change();

-- The service takes checkpoints (TOKENLEDGER_CHECKPOINT_EVERY_EVENTS) and reads them; it may
-- not change them. Readers (a replica's auditors) read them.
GRANT SELECT, INSERT ON audit_checkpoints, audit_checkpoint_rows TO tokenledger_app;
GRANT SELECT ON audit_checkpoints, audit_checkpoint_rows TO tokenledger_reader;
"""

DOWNGRADE = """
DROP TABLE audit_checkpoint_rows;
DROP TABLE audit_checkpoints;
DROP FUNCTION audit_checkpoints_refuse_change();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
