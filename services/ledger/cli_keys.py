"""`tokenledger keys create|list|revoke`: the identities callers authenticate with (API keys
and registered client certificates). Straight on the database (DATABASE_URL, or the embedded
one), as the schema owner: the services' own role may only read the table.

`create` prints the API key once, alone on stdout (so `KEY=$(tokenledger keys create …)`
works); only its hash is stored, so it cannot be shown again. Nothing here ever prints a
secret or a hash afterwards."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from ledger.errors import Conflict, StoreUnavailable
from ledger.postgres.errors import translated
from services.ledger.config import Settings
from services.platform import db
from services.platform.auth import ALL_TENANTS, ROLES, new_key
from services.platform.config import ConfigError
from services.platform.key_cache import revocation_bound_s
from services.platform.observability import configure_logging

_BOUND_MS = round(revocation_bound_s * 1000)
name_chars_max = 128
cert_cn_chars_max = 64  # ub-common-name (RFC 5280)


def add_commands(sub: Any) -> None:
    keys = sub.add_parser(
        "keys", help="create, list or revoke API keys and client certificate identities"
    ).add_subparsers(dest="keys_command", required=True)

    create = keys.add_parser("create", help="a new API key (printed once) or cert identity")
    create.add_argument(
        "--tenant", required=True, help=f"the tenant it may act on, or '{ALL_TENANTS}' for all"
    )
    create.add_argument(
        "--role", action="append", choices=ROLES, required=True, help="repeat for several"
    )
    create.add_argument("--name", required=True, help="who or what holds it, e.g. context-svc")
    create.add_argument(
        "--cert-cn",
        default="",
        help="register a client certificate's subject CN (TOKENLEDGER_AUTH=mtls) instead of "
        "creating an API key",
    )
    create.set_defaults(run=cmd_create)

    listing = keys.add_parser("list", help="every key: id, tenant, roles, name, state")
    listing.add_argument("--tenant", default="", help="only this tenant's keys")
    listing.set_defaults(run=cmd_list)

    revoke = keys.add_parser(
        "revoke", help=f"refuse a key in every process (within {_BOUND_MS} ms)"
    )
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_revoke)


def _connect() -> psycopg.Connection[Any]:
    settings = Settings.from_env()
    # Logs (the embedded database's start) go to stderr: stdout carries only the key.
    configure_logging(settings.log_format, settings.log_level)
    url = settings.database_url or db.embedded_url(settings.data_dir)
    return psycopg.connect(url, autocommit=True)


def _fail(message: str) -> int:
    print(f"tokenledger keys: {message}", file=sys.stderr)
    return 2


def cmd_create(args: argparse.Namespace) -> int:
    roles = sorted(set(args.role))
    tenant, name, cn = args.tenant.strip(), args.name.strip(), args.cert_cn.strip()
    if not tenant or not name:
        return _fail("--tenant and --name must not be empty")
    if len(name) > name_chars_max or len(cn) > cert_cn_chars_max:
        return _fail(f"--name is at most {name_chars_max}, --cert-cn {cert_cn_chars_max} chars")
    key = new_key()
    try:
        with translated(), _connect() as conn:
            conn.execute(
                "INSERT INTO api_keys (key_id, tenant_id, roles, name, secret_sha256, cert_cn)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (key.key_id, tenant, roles, name, None if cn else key.secret_sha256, cn or None),
            )
    except Conflict:  # one row in autocommit: only a unique key (the live CN) can refuse it
        return _fail(f"a live identity for CN {cn!r} exists; revoke it first")
    except (StoreUnavailable, psycopg.Error, ConfigError) as exc:
        return _fail(_explain(exc))
    what = f"certificate CN={cn!r}" if cn else "API key"
    print(
        f"created {what} {key.key_id} for tenant {tenant!r}, roles {','.join(roles)}"
        + ("" if cn else "; the key above is shown only now: store it as a secret"),
        file=sys.stderr,
    )
    print(key.key_id if cn else key.token)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    try:
        with translated(), _connect() as conn:
            rows = conn.execute(
                "SELECT key_id, tenant_id, roles, name, cert_cn, created_at, revoked_at"
                " FROM api_keys WHERE %(tenant)s = '' OR tenant_id = %(tenant)s"
                " ORDER BY created_at, key_id",
                {"tenant": args.tenant},
            ).fetchall()
    except (StoreUnavailable, psycopg.Error, ConfigError) as exc:
        return _fail(_explain(exc))
    header = ("KEY ID", "TENANT", "ROLES", "NAME", "KIND", "CREATED", "REVOKED")
    table = [header] + [
        (
            key_id,
            tenant,
            ",".join(roles),
            name,
            f"cert CN={cn}" if cn else "api key",
            created.strftime("%Y-%m-%d %H:%M:%SZ"),
            revoked.strftime("%Y-%m-%d %H:%M:%SZ") if revoked else "",
        )
        for key_id, tenant, roles, name, cn, created, revoked in rows
    ]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    try:
        with translated(), _connect() as conn:
            row = conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL"
                " RETURNING tenant_id, name",
                (args.key_id,),
            ).fetchone()
    except (StoreUnavailable, psycopg.Error, ConfigError) as exc:
        return _fail(_explain(exc))
    if row is None:
        return _fail(f"no live key {args.key_id!r} (unknown, or already revoked)")
    print(
        f"revoked {args.key_id} ({row[1]}, tenant {row[0]!r}): "
        f"refused in every process within {_BOUND_MS} ms"
    )
    return 0


def _explain(exc: Exception) -> str:
    """What went wrong, for an operator. An unreachable database is StoreUnavailable
    (ledger/postgres/errors.py); these are set-up mistakes, which it leaves as they are."""
    if isinstance(exc, pg_errors.UndefinedTable):
        return "no api_keys table: run `tokenledger migrate` first"
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return "permission denied: manage keys as the schema owner, not the service's role"
    return str(exc).strip()
