"""The context service's memory: key facts of a conversation (a name, a number, a decision)
that PrepareContext puts back into the prompt as one system message, so that they survive
when the turns that stated them are windowed out or summarized.

Its own table: the ledger's tables neither reference it nor are referenced by it, and the
ledger never reads it. The key is (tenant, user, conversation, fact key), tenant first, so it
distributes by tenant like the rest. A fact is replaced in place when set again (newer values
replace older ones; `set_at` is when it was last confirmed), so the table is a state, not a
log. The bounds (facts per conversation, bytes per fact) are checked by the service and, for
the bytes, here too.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE context_memory_facts (
    tenant_id       text        NOT NULL CHECK (tenant_id <> ''),
    user_id         text        NOT NULL CHECK (user_id <> ''),
    conversation_id text        NOT NULL CHECK (conversation_id <> ''),
    fact_key        text        NOT NULL CHECK (fact_key <> '' AND octet_length(fact_key) <= 64),
    fact_value      text        NOT NULL CHECK (octet_length(fact_value) <= 1024),
    -- The index of the message the fact came from in the request that set it; -1: none.
    source_index    integer     NOT NULL DEFAULT -1 CHECK (source_index >= -1),
    set_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id, conversation_id, fact_key)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON context_memory_facts TO tokenledger_app;
GRANT SELECT ON context_memory_facts TO tokenledger_reader;
"""

DOWNGRADE = """
DROP TABLE context_memory_facts;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
