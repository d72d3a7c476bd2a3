"""Caller identities: API keys (a stored hash of the secret) and registered mTLS client
certificates, each with a tenant scope ('*' for every tenant) and roles.

The key id is looked up on every call without knowing the tenant, so this table has no
tenant_id in its primary key; distributed by Citus it becomes a reference table (small, rarely
written, replicated to every node).

The services only read it: tokenledger_app gets SELECT and nothing else, so a compromised
service can neither mint nor un-revoke a key. Keys are created and revoked by an operator
(`tokenledger keys …`) as the schema owner. tokenledger_reader gets nothing: even hashes are
no business of read replicas or reports.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE api_keys (
    key_id        text        PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{16}$'),
    tenant_id     text        NOT NULL CHECK (tenant_id <> ''),
    roles         text[]      NOT NULL CHECK (
                      cardinality(roles) > 0
                      AND roles <@ ARRAY['writer', 'reader', 'auditor', 'admin']::text[]),
    name          text        NOT NULL,
    -- sha256 of the secret. The secret is 256 random bits, not a password: nobody can guess
    -- it, so a slow password hash (bcrypt, argon2) would add nothing but tens of ms to each
    -- call, which looks the key up every time. A leaked table still yields no usable key.
    secret_sha256 bytea       CHECK (length(secret_sha256) = 32),
    -- Or a client certificate's subject CN (mTLS): authenticated by the TLS handshake.
    cert_cn       text        CHECK (cert_cn <> ''),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CHECK ((secret_sha256 IS NULL) <> (cert_cn IS NULL))
);
-- One live identity per certificate name; a revoked one may be registered anew.
CREATE UNIQUE INDEX api_keys_live_cert_cn ON api_keys (cert_cn)
    WHERE cert_cn IS NOT NULL AND revoked_at IS NULL;

GRANT SELECT ON api_keys TO tokenledger_app;
"""

DOWNGRADE = """
DROP TABLE api_keys;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
