"""`tokenledger balance`, `quota set`, `grant`, `adjust` and `rate-limit set`: an operator's
writes and the live balance, over the API of a running ledger (`--target`, else
TOKENLEDGER_TARGET; the API key from TOKENLEDGER_LEDGER_API_KEY).

Each prints a short answer, or with `--json` the response as JSON. A write sends a fresh
idempotency key unless `--idempotency-key` gives one, so a script that retries with its own
key writes once. Anything wrong with the input is refused before the ledger is called: one
line on stderr, exit code 2, nothing written. Money is typed in currency units ("2.50") and
kept in the ledger's micro-units; prices are `tokenledger price` (cli_prices.py)."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from ledger import limits
from ledger.validation import ID_PATTERN, KEY_PATTERN, MODEL_PATTERN
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import LedgerClient, LedgerError
from services.client.errors import ClientError
from services.client.requests import new_idempotency_key
from services.ledger import money_text
from services.platform.auth import ClientAuth
from services.platform.config import ConfigError

CONNECT_TIMEOUT_S = 1.0
"""How long a command waits for the ledger to accept a connection before saying it is not
there: a ledger on loopback or in the same network answers in milliseconds."""
PERIODS = {
    "none": pb.PERIOD_NONE,
    "day": pb.PERIOD_DAY,
    "month": pb.PERIOD_MONTH,
    "rolling": pb.PERIOD_ROLLING,
}
GRANT_ORDERS = {
    "quota-first": pb.GRANT_ORDER_QUOTA_FIRST,
    "grants-first": pb.GRANT_ORDER_GRANTS_FIRST,
}
WINDOW_HOURS_MAX = 168
_DURATION = re.compile(r"([0-9]{1,6})([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


class CliError(Exception):
    """A command that cannot go on; its message is the one line the user sees."""


@dataclass(frozen=True)
class Account:
    """TENANT[/USER[/CONVERSATION]], as the ledger's requests name an account."""

    tenant_id: str
    user_id: str = ""
    conversation_id: str = ""

    def fields(self) -> dict[str, str]:
        return {
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "conversation_id": self.conversation_id,
        }


# --- argument types: each refuses a bad value with a message argparse shows as one line ----


def account(text: str) -> Account:
    parts = text.split("/")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not TENANT[/USER[/CONVERSATION]] (at most two '/')"
        )
    for what, part in zip(("tenant", "user", "conversation"), parts, strict=False):
        if not ID_PATTERN.fullmatch(part) or len(part) > limits.id_chars_max:
            raise argparse.ArgumentTypeError(
                f"{text!r}: the {what} {part!r} is not an id (1-{limits.id_chars_max} of "
                "A-Z a-z 0-9 . _ : @ + = -, starting with a letter or digit)"
            )
    return Account(*parts)


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high:,}")
        return value

    return parse


def _limit(text: str) -> int | None:
    if text == "none":
        return None
    return _bounded(0, limits.limit_tokens_max)(text)


def _tokens(text: str) -> int:
    return _bounded(-limits.amount_tokens_max, limits.amount_tokens_max)(text)


money = money_text.parser(limits.money_micros_max)
signed_money = money_text.parser(limits.money_micros_max, signed=True)


def _reason(text: str) -> str:
    reason = text.strip()
    if not reason or len(reason) > limits.reason_chars_max:
        raise argparse.ArgumentTypeError(f"give a reason of 1-{limits.reason_chars_max} characters")
    return reason


def key_arg(text: str) -> str:
    if not KEY_PATTERN.fullmatch(text) or len(text) > limits.idempotency_key_chars_max:
        raise argparse.ArgumentTypeError(
            f"1-{limits.idempotency_key_chars_max} printable ASCII characters, no spaces"
        )
    return text


def model_arg(text: str) -> str:
    if not MODEL_PATTERN.fullmatch(text) or len(text) > limits.model_chars_max:
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name")
    return text


def future_time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO time, e.g. 2027-01-31T00:00:00Z"
        ) from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if at <= datetime.now(UTC):
        raise argparse.ArgumentTypeError(f"{text} is not in the future")
    return at


def _from_now(text: str) -> datetime:
    match = _DURATION.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90m, 12h or 7d")
    seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return datetime.now(UTC) + timedelta(seconds=seconds)


# --- the commands ---------------------------------------------------------------------------


def add_commands(sub: Any, target_default: str) -> None:
    def command(parent: Any, name: str, help_text: str, run: Callable[..., int]) -> Any:
        p = parent.add_parser(name, help=help_text)
        p.add_argument("--target", default=target_default, help="the ledger's address")
        p.add_argument("--json", action="store_true", help="the response as JSON")
        p.set_defaults(run=functools.partial(run_command, run))
        return p

    def write(parent: Any, name: str, help_text: str, run: Callable[..., int]) -> Any:
        p = command(parent, name, help_text, run)
        p.add_argument("account", type=account, help="TENANT[/USER[/CONVERSATION]]")
        p.add_argument(
            "--idempotency-key",
            type=key_arg,
            help="the write's key (default: a new one); a retry with the same key writes once",
        )
        return p

    balance = command(sub, "balance", "the live balance of an account and its ancestors", _balance)
    balance.add_argument("account", type=account, help="TENANT[/USER[/CONVERSATION]]")

    quota = sub.add_parser("quota", help="set an account's limit").add_subparsers(
        dest="quota_command", required=True
    )
    q = write(quota, "set", "set (or with --limit none clear) an account's limit", _quota_set)
    q.add_argument("--limit", type=_limit, required=True, help="tokens per period, or none")
    q.add_argument("--period", choices=PERIODS, help="required with a limit; none: all time")
    q.add_argument("--window-hours", type=_bounded(1, WINDOW_HOURS_MAX), default=0,
                   help="the window of --period rolling")  # fmt: skip
    q.add_argument("--time-zone", default="", help="IANA zone of days and months (default UTC)")
    q.add_argument("--soft-limit-percent", type=_bounded(0, 100), default=0,
                   help="warn past this share of the limit (0: never)")  # fmt: skip
    q.add_argument("--grant-order", choices=GRANT_ORDERS, help="default: quota-first")
    q.add_argument("--money-limit", type=money, help="the same period's limit in money, e.g. 50.00")

    grant = write(sub, "grant", "add tokens to one account", _grant)
    grant.add_argument("amount", type=_bounded(0, limits.amount_tokens_max), help="tokens")
    grant.add_argument("--money", type=money, help="money to add too, e.g. 5.00")
    grant.add_argument("--reason", type=_reason, required=True, help="recorded in the event")
    expiry = grant.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", type=future_time, help="ISO time the rest lapses")
    expiry.add_argument("--expires-in", type=_from_now, help="e.g. 90m, 12h, 7d")

    adjust = write(sub, "adjust", "correct an account's usage (> 0 charges, < 0 credits)", _adjust)
    adjust.add_argument("tokens", type=_tokens, help="tokens to charge, or credit if negative")
    adjust.add_argument("--money", type=signed_money, help="money to charge (or credit if < 0)")
    adjust.add_argument("--reason", type=_reason, required=True, help="recorded in the event")

    rate = sub.add_parser("rate-limit", help="set an account's rate limits").add_subparsers(
        dest="rate_limit_command", required=True
    )
    per_minute = _bounded(0, limits.requests_per_minute_max)
    r = write(rate, "set", "tokens and requests per minute (0: no limit)", _rate_limit_set)
    r.add_argument("--tokens-per-minute", type=per_minute, help="0: no limit")
    r.add_argument("--requests-per-minute", type=per_minute, help="0: no limit")
    r.add_argument("--model", type=model_arg, help="one model (default: all)")


def _balance(args: argparse.Namespace) -> int:
    with connect(args.target) as client:
        reply = client.get_balance(**args.account.fields())
    if args.json:
        return show_json(reply)
    for line in balance_lines(reply):
        print(line)
    return 0


def _quota_set(args: argparse.Namespace) -> int:
    period = _period(args)
    fields: dict[str, Any] = {
        **args.account.fields(),
        "period": period,
        "window_hours": args.window_hours,
        "time_zone": args.time_zone,
        "soft_limit_percent": args.soft_limit_percent,
        "grant_order": GRANT_ORDERS.get(args.grant_order, pb.GRANT_ORDER_UNSPECIFIED),
    }
    if args.limit is not None:
        fields["limit"] = args.limit
    if args.money_limit is not None:
        fields["money_limit_micros"] = args.money_limit
    with connect(args.target) as client:
        reply = send_write(client.set_quota, args, fields)
    if args.json:
        return show_json(reply)
    print(f"quota set: {balance_line(reply.balance)}")
    return 0


def _period(args: argparse.Namespace) -> pb.Period.ValueType:
    """The period the options name, or CliError when they do not fit together."""
    if args.period is None and args.limit is not None:
        raise CliError("--period is required with a limit: day, month, rolling or none")
    period = PERIODS[args.period or "none"]
    if (period == pb.PERIOD_ROLLING) != bool(args.window_hours):
        raise CliError("--window-hours (1-168) goes with --period rolling, and only with it")
    return period


def _grant(args: argparse.Namespace) -> int:
    if not (args.amount or args.money):
        raise CliError("grant 0 tokens and no --money changes nothing")
    fields: dict[str, Any] = {**args.account.fields(), "amount": args.amount}
    fields["reason"] = args.reason
    fields["money_micros"] = args.money or 0
    until = args.expires_at or args.expires_in
    if until is not None:
        fields["expires_at"] = to_stamp(until)
    with connect(args.target) as client:
        reply = send_write(client.grant_tokens, args, fields)
    if args.json:
        return show_json(reply)
    lapses = f", unused by {_when(fields['expires_at'])}" if until else ""
    money = f" and {money_text.text_of(args.money)} in money" if args.money else ""
    print(f"granted {args.amount} tokens{money}{lapses}: {balance_line(reply.balance)}")
    return 0


def _adjust(args: argparse.Namespace) -> int:
    if not (args.tokens or args.money):
        raise CliError("0 tokens and no --money change nothing: > 0 charges, < 0 credits")
    fields = {**args.account.fields(), "tokens": args.tokens, "reason": args.reason,
              "money_micros": args.money or 0}  # fmt: skip
    with connect(args.target) as client:
        reply = send_write(client.adjust_balance, args, fields)
    if args.json:
        return show_json(reply)
    done = f"charged {args.tokens}" if args.tokens >= 0 else f"credited {-args.tokens}"
    money = f" and {money_text.text_of(args.money)} in money" if args.money else ""
    print(f"{done} tokens{money}: {balance_line(reply.balance)}")
    return 0


def _rate_limit_set(args: argparse.Namespace) -> int:
    if args.tokens_per_minute is None and args.requests_per_minute is None:
        raise CliError("give --tokens-per-minute, --requests-per-minute or both (0: no limit)")
    fields = {
        **args.account.fields(),
        "model": args.model or "",
        "tokens_per_minute": args.tokens_per_minute or 0,
        "requests_per_minute": args.requests_per_minute or 0,
    }
    with connect(args.target) as client:
        reply = send_write(client.set_rate_limit, args, fields)
    if args.json:
        return show_json(reply)
    limit = reply.rate_limit
    where = _name(limit.tenant_id, limit.user_id, limit.conversation_id)
    model = f"model {limit.model}" if limit.model else "all models"
    tokens = _per_minute(limit.tokens_per_minute, "tokens")
    calls = _per_minute(limit.requests_per_minute, "requests")
    print(f"rate limit set: {where}, {model}: {tokens}, {calls}")
    return 0


def _per_minute(value: int, what: str) -> str:
    return f"{value} {what}/min" if value else f"{what} unlimited"


# --- talking to the ledger ------------------------------------------------------------------


def connect(target: str) -> closing[LedgerClient]:
    """A client of the ledger at `target` with the caller's credentials, once the ledger has
    accepted a connection; CliError at once when nobody answers there."""
    try:
        auth = ClientAuth.from_env()
        client = LedgerClient(
            target,
            api_key=auth.api_key or None,
            root_certificates=auth.tls_ca,
            client_certificate=auth.tls_cert,
            client_key=auth.tls_key,
        )
    except (ConfigError, ClientError) as exc:
        raise CliError(str(exc)) from None
    try:
        grpc.channel_ready_future(client.channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        client.close()
        raise CliError(
            f"no ledger at {target}: start it with `make run`, or set TOKENLEDGER_TARGET"
        ) from None
    return closing(client)


def send_write(
    call: Callable[..., Message], args: argparse.Namespace, fields: dict[str, Any]
) -> Any:
    """One write with the caller's key or a fresh one; a call whose outcome is unknown says
    how to retry it safely."""
    key = args.idempotency_key or new_idempotency_key()
    try:
        return call(idempotency_key=key, **fields)
    except LedgerError as exc:
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise CliError(
                f"{exc.code.name}: {exc.message}; it may or may not have been written: "
                f"retry with --idempotency-key {key}"
            ) from None
        raise


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`command(args)`, its failures as one line on stderr and exit code 2."""
    try:
        return command(args)
    except CliError as exc:
        message = str(exc)
    except LedgerError as exc:
        message = f"{exc.code.name}: {exc.message}"
    print(f"tokenledger: {message}", file=sys.stderr)
    return 2


def show_json(message: Message) -> int:
    print(json_format.MessageToJson(message, indent=None))
    return 0


# --- what a balance says --------------------------------------------------------------------


def balance_lines(reply: pb.GetBalanceResponse) -> list[str]:
    """The ancestors (tenant first), the account, and what a Reserve there could get now."""
    lines = [balance_line(b, reply.currency) for b in (*reply.ancestors, reply.balance)]
    room = reply.reservable if reply.HasField("reservable") else "no limit"
    return [*lines, f"reservable now: {room}"]


def balance_line(b: pb.Balance, currency: str = "") -> str:
    """One account on one line (its money after a '|'); an account without a limit says so
    instead of zeros."""
    scope = "conversation" if b.conversation_id else "user" if b.user_id else "tenant"
    figures = [f"used {b.used}", f"held {b.held}"]
    if b.granted:
        figures.append(f"granted {b.granted}")
    if b.HasField("available"):
        figures.append(f"available {b.available}")
    if b.HasField("resets_at") and b.HasField("limit"):
        figures.append(f"resets at {_when(b.resets_at)}")
    name = _name(b.tenant_id, b.user_id, b.conversation_id)
    line = f"{scope} {name}: {describe_limit(b)}; {', '.join(figures)}"
    return line + money_line(b.money, currency) if b.HasField("money") else line


def money_line(m: pb.MoneyBalance, currency: str) -> str:
    def cash(micros: int) -> str:
        return money_text.with_currency(micros, currency)

    limit = f"limit {cash(m.limit_micros)}" if m.HasField("limit_micros") else "no money limit"
    figures = [limit, f"spent {cash(m.used_micros)}", f"held {cash(m.held_micros)}"]
    if m.granted_micros:
        figures.append(f"granted {cash(m.granted_micros)}")
    if m.HasField("available_micros"):
        figures.append(f"available {cash(m.available_micros)}")
    return " | money: " + ", ".join(figures)


def describe_limit(b: pb.Balance) -> str:
    if not b.HasField("limit"):
        return "no limit"
    per = {
        pb.PERIOD_DAY: f"a day ({b.time_zone or 'UTC'})",
        pb.PERIOD_MONTH: f"a month ({b.time_zone or 'UTC'})",
        pb.PERIOD_ROLLING: f"per {b.window_hours} h rolling",
    }.get(b.period, "in all")
    extra = f", soft at {b.soft_limit_percent} %" if b.soft_limit_percent else ""
    if b.grant_order == pb.GRANT_ORDER_GRANTS_FIRST:
        extra += ", grants first"
    return f"limit {b.limit} {per}{extra}"


def _name(tenant: str, user: str, conversation: str) -> str:
    return "/".join(p for p in (tenant, user, conversation) if p)


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M UTC")


def to_stamp(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out
