"""Every change to `api_keys` is announced: a trigger sends NOTIFY on `tokenledger_keys` with
the key id, delivered when the changing transaction commits. The services cache the keys their
callers use and empty that cache on each notification (services/platform/key_cache.py), so a
revocation made by any means (`tokenledger keys revoke`, or plain SQL) reaches every process
without a read per call. A statement-level trigger would do too; a row-level one names the key
in the payload ('*' for a TRUNCATE).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tokenledger_keys', COALESCE(NEW.key_id, OLD.key_id, '*'));
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_notify
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify();
CREATE TRIGGER api_keys_notify_truncate
    AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION api_keys_notify();
"""

DOWNGRADE = """
DROP TRIGGER api_keys_notify_truncate ON api_keys;
DROP TRIGGER api_keys_notify ON api_keys;
DROP FUNCTION api_keys_notify();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
