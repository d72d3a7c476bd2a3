"""Monthly partitions of `events` by `occurred_at`, stream heads that keep versions gapless,
and the record of verified archives.

PostgreSQL 15 cannot turn a table into a partitioned one, so the log is copied: a partitioned
table of the same columns (LIKE keeps their order, defaults, checks and identity) receives
every row in position order with its position, the identity sequence continues after the
largest, and the names are swapped.

- A partitioned table's unique keys must contain the partition key, so (stream, version) can
  no longer be unique across the table. `event_stream_heads` holds each stream's last version,
  and a trigger on every insert advances it from version - 1 to version (or creates it at 1):
  of two transactions appending the same version, the second waits for the first's row lock
  and then finds the head moved on, and fails with unique_violation, as the primary key did
  (the ledger retries it as a lost race). It also refuses a gap, which the key never did. The
  function is SECURITY DEFINER: the service role appends events but cannot touch the heads.
- Append-only on every partition: a row trigger on the parent is cloned onto each partition
  (UPDATE, DELETE), and `events_create_partitions` gives each partition it makes the statement
  trigger the parent has (TRUNCATE, and changes that match no row), since a statement trigger
  of the parent does not fire for a statement that names a partition.
- `events_create_partitions(from, months)` makes the missing monthly partitions; the migration
  covers the log's months up to three ahead, the server's sweeper keeps three ahead. A DEFAULT
  partition takes anything else, so an insert never fails for want of a partition.
- `audit_archives`: one row per verified archive of a tenant (`tokenledger audit archive`),
  append-only like the checkpoints. Partitions are dropped only when every event in them lies
  in a recorded archive of its tenant (ledger/postgres/archive.py).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_FUNCTIONS = r"""
-- SECURITY DEFINER: the service's sweeper calls it, and only the owner may add partitions. The
-- lock timeout keeps a CREATE that waits behind a long reader from queueing every writer.
CREATE FUNCTION events_create_partitions(first_month date, months integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '2s' AS $$
DECLARE
    lo date;
    hi date;
    name text;
    made integer := 0;
BEGIN
    IF months NOT BETWEEN 0 AND 120 THEN
        RAISE EXCEPTION 'months must be 0 to 120, not %', months;
    END IF;
    FOR i IN 0 .. months - 1 LOOP
        lo := date_trunc('month', first_month)::date + make_interval(months => i);
        hi := lo + interval '1 month';
        name := 'events_' || to_char(lo, 'YYYY_MM');
        CONTINUE WHEN to_regclass(name) IS NOT NULL;
        -- Rows of that month already in the default partition would make CREATE fail; they
        -- stay where they are (still readable, still protected).
        CONTINUE WHEN EXISTS (SELECT 1 FROM events_default
                              WHERE occurred_at >= lo AND occurred_at < hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                       name, lo, hi);
        EXECUTE format('CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE '
                       'ON %I FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change()', name);
        made := made + 1;
    END LOOP;
    RETURN made;
END
$$;

CREATE FUNCTION events_advance_stream() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF NEW.version = 1 THEN
        INSERT INTO event_stream_heads VALUES (NEW.tenant_id, NEW.user_id, NEW.conversation_id, 1);
    ELSE
        UPDATE event_stream_heads SET version = NEW.version
         WHERE tenant_id = NEW.tenant_id AND user_id = NEW.user_id
           AND conversation_id = NEW.conversation_id AND version = NEW.version - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'stream %/%/% is not at version % - 1', NEW.tenant_id, NEW.user_id,
                NEW.conversation_id, NEW.version USING ERRCODE = 'unique_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION events_advance_stream() FROM PUBLIC;
REVOKE ALL ON FUNCTION events_create_partitions(date, integer) FROM PUBLIC;

-- The row form of events_refuse_change, for the clone on every partition.
CREATE FUNCTION events_refuse_row_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;
"""

_TABLES = r"""
CREATE TABLE audit_archives (
    tenant_id       text        NOT NULL,
    seq             bigint      NOT NULL CHECK (seq >= 1),
    -- Every event of the tenant that occurred before this month is in this archive or an
    -- earlier one; the archive ends at its checkpoint's position (and may hold later events).
    before_month    date        NOT NULL,
    checkpoint_seq  bigint      NOT NULL,
    first_position  bigint      NOT NULL,
    last_position   bigint      NOT NULL,
    events          bigint      NOT NULL CHECK (events >= 0),
    -- {"[tenant,user,conversation]": "version:hash"}: every stream's head at last_position.
    heads           jsonb       NOT NULL,
    manifest_sha256 bytea       NOT NULL,
    file_sha256     bytea       NOT NULL,
    -- Where the archive was written (the operator keeps it; verification needs the file).
    file_name       text        NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
CREATE TRIGGER audit_archives_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_archives
    FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_refuse_change();
GRANT SELECT ON audit_archives TO tokenledger_app, tokenledger_reader;

CREATE TABLE event_stream_heads (
    tenant_id       text   NOT NULL,
    user_id         text   NOT NULL,
    conversation_id text   NOT NULL,
    version         bigint NOT NULL CHECK (version > 0),
    PRIMARY KEY (tenant_id, user_id, conversation_id)
);
INSERT INTO event_stream_heads
SELECT tenant_id, user_id, conversation_id, max(version) FROM events GROUP BY 1, 2, 3;

ALTER TABLE events RENAME TO events_unpartitioned;
CREATE TABLE events (LIKE events_unpartitioned INCLUDING ALL EXCLUDING INDEXES)
    PARTITION BY RANGE (occurred_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events_default
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
"""

_MOVE = r"""
-- Every month of the log (up to ten years back; older rows go to the default), three ahead.
WITH span AS (
    SELECT greatest(date_trunc('month', coalesce(min(occurred_at), now())),
                    date_trunc('month', now()) - interval '116 months') AS first_month
    FROM events_unpartitioned
)
SELECT events_create_partitions(first_month::date, (SELECT count(*) FROM generate_series(
    first_month, date_trunc('month', now()), '1 month'))::integer + 3)
FROM span;

INSERT INTO events OVERRIDING SYSTEM VALUE SELECT * FROM events_unpartitioned ORDER BY position;
SELECT setval(pg_get_serial_sequence('events', 'position'),
              coalesce((SELECT max(position) FROM events_unpartitioned), 0) + 1, false);
DROP TABLE events_unpartitioned;

-- Every key starts with the tenant; (stream, version) is unique through event_stream_heads.
ALTER TABLE events ADD PRIMARY KEY (tenant_id, user_id, conversation_id, version, occurred_at);
CREATE INDEX events_tenant_position ON events (tenant_id, position);
CREATE INDEX events_reservation ON events (tenant_id, reservation_id) WHERE reservation_id <> '';
CREATE INDEX events_tenant_user_position ON events (tenant_id, user_id, position);
CREATE INDEX events_xid_position ON events (xid, position);

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_append_only_rows BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_row_change();
CREATE TRIGGER events_gapless_versions BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_advance_stream();

GRANT SELECT, INSERT ON events TO tokenledger_app;
GRANT SELECT ON events, event_stream_heads TO tokenledger_reader;
GRANT SELECT ON event_stream_heads TO tokenledger_app;
GRANT EXECUTE ON FUNCTION events_create_partitions(date, integer) TO tokenledger_app;
"""

_NAME_SEQUENCE = """
DO $$
BEGIN
    EXECUTE format('ALTER SEQUENCE %s RENAME TO events_position_seq',
                   pg_get_serial_sequence('events', 'position'));
END
$$;
"""

DOWNGRADE = r"""
DROP TABLE audit_archives;

ALTER TABLE events RENAME TO events_partitioned;
CREATE TABLE events (LIKE events_partitioned INCLUDING ALL EXCLUDING INDEXES);
INSERT INTO events OVERRIDING SYSTEM VALUE SELECT * FROM events_partitioned ORDER BY position;
SELECT setval(pg_get_serial_sequence('events', 'position'),
              coalesce((SELECT max(position) FROM events_partitioned), 0) + 1, false);
DROP TABLE events_partitioned;
ALTER TABLE events ADD PRIMARY KEY (tenant_id, user_id, conversation_id, version);
CREATE UNIQUE INDEX events_tenant_position ON events (tenant_id, position);
CREATE INDEX events_reservation ON events (tenant_id, reservation_id) WHERE reservation_id <> '';
CREATE INDEX events_tenant_user_position ON events (tenant_id, user_id, position);
CREATE INDEX events_xid_position ON events (xid, position);
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
GRANT SELECT, INSERT ON events TO tokenledger_app;
GRANT SELECT ON events TO tokenledger_reader;

DROP FUNCTION events_create_partitions(date, integer);
DROP FUNCTION events_advance_stream();
DROP FUNCTION events_refuse_row_change();
DROP TABLE event_stream_heads;
"""


def upgrade() -> None:
    op.execute(_TABLES)
    op.execute(_FUNCTIONS)
    op.execute(_MOVE)
    # The new identity sequence took a free name while the old table held its own.
    op.execute(_NAME_SEQUENCE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
    op.execute(_NAME_SEQUENCE)
