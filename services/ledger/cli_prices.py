"""`tokenledger price set|list|import`: a tenant's model prices over the API.

Prices are typed in currency units per million tokens ("2.50" is 2,500,000 micro-units) and
parsed as decimals: no float touches money. `import` reads the default table LiteLLM ships in
its pinned package (litellm/model_prices_and_context_window_backup.json, USD per token); it is
never fetched.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib.metadata
import importlib.util
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

from ledger import limits
from ledger.money import TOKENS_PER_PRICE_UNIT
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger import money_text
from services.ledger.cli_admin import (
    CliError,
    account,
    connect,
    future_time,
    key_arg,
    model_arg,
    run_command,
    send_write,
    show_json,
    to_stamp,
)

LITELLM_PRICE_FILE = "model_prices_and_context_window_backup.json"
per_mtok = money_text.parser(limits.price_micros_per_mtok_max)


def add_commands(sub: Any, target_default: str) -> None:
    price = sub.add_parser("price", help="set, list or import model prices").add_subparsers(
        dest="price_command", required=True
    )

    def command(name: str, help_text: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = price.add_parser(name, help=help_text)
        p.add_argument("tenant", type=_tenant, help="the tenant whose prices these are")
        p.add_argument("--target", default=target_default, help="the ledger's address")
        p.add_argument("--json", action="store_true", help="the response as JSON")
        p.set_defaults(run=functools.partial(run_command, run))
        return p

    set_ = command("set", "set a model's price, per million tokens in currency units", _set)
    set_.add_argument("model", type=model_arg)
    set_.add_argument("--currency", required=True, help="ISO 4217, e.g. USD")
    set_.add_argument("--input", type=per_mtok, required=True, help="e.g. 2.50")
    set_.add_argument("--output", type=per_mtok, required=True)
    set_.add_argument("--cached-input", type=per_mtok, help="default: the input price")
    set_.add_argument("--from", dest="effective_from", type=future_time, help="ISO time (now)")
    set_.add_argument("--idempotency-key", type=key_arg, help="a retry with it writes once")
    list_ = command("list", "the tenant's prices, by model, oldest first", _list)
    list_.add_argument("--model", type=model_arg, help="only this model")
    imp = command("import", "set prices from the table in the installed litellm package", _import)
    imp.add_argument("--models", default="*", help="comma-separated globs (default: all)")
    imp.add_argument("--idempotency-key", type=key_arg, help="a retry with it writes once")


def _tenant(text: str) -> str:
    return str(account(text).tenant_id) if "/" not in text else _not_tenant(text)


def _not_tenant(text: str) -> str:
    raise argparse.ArgumentTypeError(f"{text!r}: prices are a tenant's, name the tenant alone")


def _set(args: argparse.Namespace) -> int:
    entry = pb.Price(
        model=args.model,
        currency=args.currency,
        input_micros_per_mtok=args.input,
        output_micros_per_mtok=args.output,
        cached_input_micros_per_mtok=args.input if args.cached_input is None else args.cached_input,
    )
    if args.effective_from is not None:
        entry.effective_from.CopyFrom(to_stamp(args.effective_from))
    with connect(args.target) as client:
        reply = send_write(client.set_prices, args, {"tenant_id": args.tenant, "prices": [entry]})
    if args.json:
        return show_json(reply)
    for p in reply.prices:
        print(f"price set: {args.tenant}: {price_line(p)}")
    return 0


def price_line(p: pb.Price) -> str:
    since = p.effective_from.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M UTC")
    per = money_text.text_of
    return (
        f"{p.model} from {since}: {p.currency} {per(p.input_micros_per_mtok)} input, "
        f"{per(p.output_micros_per_mtok)} output, {per(p.cached_input_micros_per_mtok)} "
        "cached input per 1M tokens"
    )


def _list(args: argparse.Namespace) -> int:
    with connect(args.target) as client:
        reply = client.list_prices(tenant_id=args.tenant, model=args.model or "")
    if args.json:
        return show_json(reply)
    if not reply.prices:
        print(f"{args.tenant} has no prices: its usage is recorded without cost, flagged unpriced")
    for p in reply.prices:
        print(price_line(p))
    return 0


@dataclass(frozen=True)
class ImportedTable:
    prices: list[pb.Price]
    source: str
    rounded: int
    """Prices the file gives more finely than a micro-unit per million tokens."""


def litellm_price_file() -> Path:
    """The price table inside the installed litellm package (not imported: it is large)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise CliError(
            "the default price table ships in the litellm package, which is not installed: "
            "pip install 'tokenledger[integrations]' (it is never downloaded at run time)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(LITELLM_PRICE_FILE)
    if not path.is_file():
        raise CliError(f"{path} is missing from the installed litellm package")
    return path


def litellm_prices(path: Path, patterns: list[str]) -> ImportedTable:
    """USD per token, read as decimals, to micro-units per million tokens (rounded half to
    even where the file is finer). Cached input without its own price is billed as input."""
    table = json.loads(path.read_text(), parse_float=Decimal)
    prices, rounded = [], 0
    for model, spec in sorted(table.items()):
        if model == "sample_spec" or not isinstance(spec, dict):
            continue
        if not any(fnmatch.fnmatchcase(model, p) for p in patterns):
            continue
        exact = _per_mtok(spec)
        if exact is None:
            continue
        whole = [int(e.to_integral_value()) for e in exact]
        rounded += any(w != e for w, e in zip(whole, exact, strict=True))
        if len(model) > limits.model_chars_max or min(whole) < 0:
            continue
        prices.append(
            pb.Price(
                model=model,
                currency="USD",
                input_micros_per_mtok=whole[0],
                output_micros_per_mtok=whole[1],
                cached_input_micros_per_mtok=whole[2],
            )
        )
    version = importlib.metadata.version("litellm")
    return ImportedTable(prices, f"litellm {version} {path.name}", rounded)


def _per_mtok(spec: dict[str, Any]) -> list[Decimal] | None:
    """Input, output and cached-input prices of a LiteLLM entry, in micro-units per million
    tokens; None when it has no input or output price (an image or embedding model)."""
    kinds = [spec.get(k) for k in ("input_cost_per_token", "output_cost_per_token")]
    kinds.append(spec.get("cache_read_input_token_cost", kinds[0]))
    numbers = [k for k in kinds if isinstance(k, Decimal | int)]
    if len(numbers) < len(kinds):
        return None
    return [Decimal(k) * money_text.MICROS * TOKENS_PER_PRICE_UNIT for k in numbers]


def _chunks(items: list[pb.Price]) -> Iterator[list[pb.Price]]:
    step = limits.prices_per_call_max
    for i in range(0, len(items), step):
        yield items[i : i + step]


def _import(args: argparse.Namespace) -> int:
    table = litellm_prices(litellm_price_file(), args.models.split(","))
    if not table.prices:
        raise CliError(f"no model of {table.source} matches {args.models!r}")
    base = args.idempotency_key or f"price-import-{uuid.uuid4().hex}"
    with connect(args.target) as client:
        for i, chunk in enumerate(_chunks(table.prices)):
            args.idempotency_key = f"{base}:{i}"
            send_write(client.set_prices, args, {"tenant_id": args.tenant, "prices": chunk})
    summary = {"tenant": args.tenant, "prices": len(table.prices), "source": table.source,
               "rounded": table.rounded}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{args.tenant}: {len(table.prices)} model prices set from {table.source} (USD; "
        f"{table.rounded} given finer than a micro-unit per 1M tokens were rounded)"
    )
    return 0
