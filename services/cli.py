"""`tokenledger`: serve the ledger, migrate the schema, run both services, run a demo round
trip, administer accounts, audit and report."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, cast

import grpc

from services import run as run_both
from services.ledger import cli as ledger_cli
from services.ledger import cli_admin, cli_keys, cli_prices, cli_reports, export_nats, web
from services.ledger.config import Settings
from services.platform.config import ConfigError
from services.platform.observability import configure_logging


class _Parser(argparse.ArgumentParser):
    """Refuses bad arguments in one line (what is wrong, where to read more), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="tokenledger", description=__doc__)
    # Its parsers are _Parsers (argparse makes them of the parent's class); typed as the base,
    # which the commands' add_command functions take.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True),
    )
    sub.add_parser("serve", help="migrate, then serve the ledger (embedded db if no DATABASE_URL)")
    sub.add_parser("migrate", help="bring the database schema to the newest revision")
    sub.add_parser(
        "context-serve", help="serve the context service (ledger: $TOKENLEDGER_LEDGER_TARGET)"
    )
    demo = sub.add_parser("demo", help="reserve -> commit -> balance against a running server")
    target = os.environ.get("TOKENLEDGER_TARGET", ledger_cli.DEFAULT_TARGET)
    demo.add_argument("--target", default=target)
    demo.add_argument("--json", action="store_true", help="each response as a JSON line")
    demo.set_defaults(run=lambda args: ledger_cli.cmd_demo(args.target, args.json))
    run_both.add_command(sub)
    cli_admin.add_commands(sub, target)
    cli_prices.add_commands(sub, target)
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
    return ledger_cli.cmd_migrate(settings)


if __name__ == "__main__":
    sys.exit(main())
