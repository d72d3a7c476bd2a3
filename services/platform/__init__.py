"""Shared by both servers, knowing neither: never imports services.ledger or services.context.

Auth, guards, interceptors, the status details of errors, shared settings, the database
helpers, logging/tracing/metrics set-up and the serve loop. Of `ledger/` it imports only pure
modules (tests/unit/test_import_rules.py)."""
