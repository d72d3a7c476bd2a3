"""The stream heads advance once per stream and statement, not once per event.

Migration 0014's row trigger on `events` ran an UPDATE of `event_stream_heads` for every
event: a batch of 100 holds and their 100 commits on 100 users paid 200 of them, half the
time its insert of events took. A statement-level trigger sees the statement's events at
once (a transition table) and checks, per stream, what the row trigger checked per event:
the versions appended form a run without a repeat or a gap, a stream that starts here starts
at 1 (a second first version fails on the heads' key, as before), and every other stream's
head stands at the version before its run — it is then moved to the run's last, in one
UPDATE. Two writers appending one version still race on the head's row lock: the second
waits, then finds the head moved and fails with unique_violation (a lost race, retried).
The versions of one statement no longer need to come in ascending order.

The trigger is the parent's: a statement naming a partition does not fire it, as it does
not fire the append-only statement trigger. The service role cannot name a partition.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION events_advance_streams() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    bad record;
BEGIN
    -- Each stream's versions in the statement: a run without a repeat or a gap.
    SELECT a.tenant_id, a.user_id, a.conversation_id, min(a.version) AS lo INTO bad
      FROM appended a GROUP BY 1, 2, 3
    HAVING count(DISTINCT a.version) <> count(*) OR max(a.version) - min(a.version) + 1 <> count(*)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'stream %/%/% appends a repeated or missing version from %',
            bad.tenant_id, bad.user_id, bad.conversation_id, bad.lo
            USING ERRCODE = 'unique_violation';
    END IF;
    -- A stream that starts here: a second first version fails on the heads' key.
    INSERT INTO event_stream_heads
    SELECT a.tenant_id, a.user_id, a.conversation_id, max(a.version) FROM appended a
     GROUP BY 1, 2, 3 HAVING min(a.version) = 1;
    -- Every other stream moves from the version before its run to the run's last; a head
    -- that is elsewhere (a gap, or a writer that appended first) does not move.
    WITH runs AS (
        SELECT a.tenant_id, a.user_id, a.conversation_id, min(a.version) AS lo, max(a.version) AS hi
          FROM appended a GROUP BY 1, 2, 3 HAVING min(a.version) > 1
    ), moved AS (
        UPDATE event_stream_heads h SET version = r.hi FROM runs r
         WHERE h.tenant_id = r.tenant_id AND h.user_id = r.user_id
           AND h.conversation_id = r.conversation_id AND h.version = r.lo - 1
        RETURNING h.tenant_id, h.user_id, h.conversation_id
    )
    SELECT r.tenant_id, r.user_id, r.conversation_id, r.lo INTO bad FROM runs r
     WHERE NOT EXISTS (SELECT FROM moved m WHERE m.tenant_id = r.tenant_id
                       AND m.user_id = r.user_id AND m.conversation_id = r.conversation_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'stream %/%/% is not at version % - 1', bad.tenant_id, bad.user_id,
            bad.conversation_id, bad.lo USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION events_advance_streams() FROM PUBLIC;

DROP TRIGGER events_gapless_versions ON events;
DROP FUNCTION events_advance_stream();
CREATE TRIGGER events_gapless_versions AFTER INSERT ON events
    REFERENCING NEW TABLE AS appended FOR EACH STATEMENT EXECUTE FUNCTION events_advance_streams();
"""

DOWNGRADE = r"""
DROP TRIGGER events_gapless_versions ON events;
DROP FUNCTION events_advance_streams();
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
CREATE TRIGGER events_gapless_versions BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_advance_stream();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
