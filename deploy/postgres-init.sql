-- Database roles for tokenledger: run once per database, as a superuser (or a role with
-- CREATEROLE that owns the database), with psql 15 or newer. Re-running it is harmless.
--
--   compose:  the postgres image runs it from /docker-entrypoint-initdb.d at first start, in
--             $POSTGRES_DB, with the passwords below in its environment.
--   elsewhere: TOKENLEDGER_OWNER_PASSWORD=… TOKENLEDGER_APP_PASSWORD=… \
--             TOKENLEDGER_CONTEXT_PASSWORD=… TOKENLEDGER_READER_PASSWORD=… \
--             psql "$ADMIN_URL" -f deploy/postgres-init.sql
--
-- Roles (migrations/versions/0004_roles.py defines the privileges of the two group roles):
--   tokenledger_owner   LOGIN  owns the schema; `tokenledger migrate` runs as it
--   tokenledger_ledger  LOGIN  member of tokenledger_app: the ledger's DATABASE_URL
--                              (may append events, never change or remove them)
--   tokenledger_context LOGIN  member of tokenledger_app: the context service's DATABASE_URL,
--                              for its memory table (context_memory_facts) and to look its
--                              callers' API keys up (TOKENLEDGER_AUTH on); it reaches the
--                              ledger itself over gRPC only
--   tokenledger_usage   LOGIN  member of tokenledger_reader: read-only reports and replicas

\set ON_ERROR_STOP on
-- An unset variable leaves :'name' unexpanded, and the statement using it fails: no role is
-- ever created with an empty or default password by accident.
\getenv owner_password TOKENLEDGER_OWNER_PASSWORD
\getenv app_password TOKENLEDGER_APP_PASSWORD
\getenv context_password TOKENLEDGER_CONTEXT_PASSWORD
\getenv reader_password TOKENLEDGER_READER_PASSWORD

-- Group roles. Migration 0004 creates them too when missing, but the owner has no CREATEROLE.
SELECT 'CREATE ROLE tokenledger_app NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_app') \gexec
SELECT 'CREATE ROLE tokenledger_reader NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_reader') \gexec

-- Login roles.
SELECT 'CREATE ROLE tokenledger_owner'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_owner') \gexec
SELECT 'CREATE ROLE tokenledger_ledger'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_ledger') \gexec
SELECT 'CREATE ROLE tokenledger_context'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_context') \gexec
SELECT 'CREATE ROLE tokenledger_usage'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenledger_usage') \gexec
ALTER ROLE tokenledger_owner LOGIN NOSUPERUSER NOCREATEROLE PASSWORD :'owner_password';
ALTER ROLE tokenledger_ledger LOGIN NOSUPERUSER NOCREATEROLE PASSWORD :'app_password';
ALTER ROLE tokenledger_context LOGIN NOSUPERUSER NOCREATEROLE PASSWORD :'context_password';
ALTER ROLE tokenledger_usage LOGIN NOSUPERUSER NOCREATEROLE PASSWORD :'reader_password';
GRANT tokenledger_app TO tokenledger_ledger;
GRANT tokenledger_app TO tokenledger_context;
GRANT tokenledger_reader TO tokenledger_usage;

-- The owner creates the tables (and so owns them); since PostgreSQL 15 nobody else may create
-- in the public schema.
ALTER SCHEMA public OWNER TO tokenledger_owner;

-- The service roles' grants (including SELECT on alembic_version, which `tokenledger serve`
-- reads to check the schema revision) come with the migrations (0004_roles).
