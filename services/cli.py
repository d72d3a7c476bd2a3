"""`tokenledger`: serve the ledger, migrate the schema, or run a demo round trip."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from services.ledger import cli as ledger_cli
from services.ledger import cli_keys, cli_reports, export_nats, web
from services.ledger.config import Settings
from services.platform.config import ConfigError
from services.platform.observability import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="migrate, then serve the ledger (embedded db if no DATABASE_URL)")
    sub.add_parser("migrate", help="bring the database schema to the newest revision")
    sub.add_parser(
        "context-serve", help="serve the context service (ledger: $TOKENLEDGER_LEDGER_TARGET)"
    )
    demo = sub.add_parser("demo", help="reserve -> commit -> balance against a running server")
    target = os.environ.get("TOKENLEDGER_TARGET", ledger_cli.DEFAULT_TARGET)
    demo.add_argument("--target", default=target)
    cli_reports.add_commands(sub, target)
    cli_keys.add_commands(sub)
    export_nats.add_command(sub)
    web.add_command(sub)
    args = parser.parse_args(argv)
    if args.command == "context-serve":
        from services.context.server import main as context_main

        return context_main()
    if hasattr(args, "run"):
        try:
            return int(args.run(args))
        except grpc.RpcError as exc:
            print(f"tokenledger: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"tokenledger: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        return ledger_cli.cmd_serve(settings)
    if args.command == "migrate":
        return ledger_cli.cmd_migrate(settings)
    return ledger_cli.cmd_demo(args.target)


if __name__ == "__main__":
    sys.exit(main())
