"""`tokenledger price set|list|import`: a tenant's model prices over the API.

Prices are typed in currency units per million tokens ("2.50" is 2,500,000 micro-units) and
parsed as decimals: no float touches money. `import` reads the default table LiteLLM ships in
its pinned package (litellm/model_prices_and_context_window_backup.json, USD per token); it is
never fetched.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from ledger import limits
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.platform.auth import ClientAuth

MICROS = 1_000_000
LITELLM_PRICE_FILE = "model_prices_and_context_window_backup.json"
CALL_TIMEOUT_S = 60


class PriceInputError(ValueError):
    """A price the user typed or the price file holds that cannot be used."""


def add_commands(sub: Any, target_default: str) -> None:
    price = sub.add_parser("price", help="set, list or import model prices").add_subparsers(
        dest="price_command", required=True
    )

    def parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = price.add_parser(name, help=help_text)
        p.add_argument("--target", default=target_default, help="the ledger's address")
        p.add_argument("--tenant", required=True)
        p.add_argument("--json", action="store_true", help="JSON output")
        return p

    set_ = parser("set", "set one model's price (per million tokens, in currency units)")
    set_.add_argument("model")
    set_.add_argument("--currency", required=True, help="ISO 4217, e.g. USD")
    set_.add_argument("--input", required=True, help="per million input tokens, e.g. 2.50")
    set_.add_argument("--output", required=True, help="per million output tokens")
    set_.add_argument("--cached-input", help="per million cached input tokens (default: input)")
    set_.add_argument("--from", dest="effective_from", help="ISO time it takes effect (now)")
    set_.add_argument("--idempotency-key", default="", help="to make a retry safe")
    set_.set_defaults(run=cmd_set)
    list_ = parser("list", "the tenant's prices, by model, oldest first")
    list_.add_argument("--model", default="")
    list_.set_defaults(run=cmd_list)
    imp = parser("import", "set prices from the price table in the installed litellm package")
    imp.add_argument("--models", default="*", help="comma-separated globs (default: all)")
    imp.add_argument("--idempotency-key", default="", help="to make a retry safe")
    imp.set_defaults(run=cmd_import)


def per_mtok_micros(text: str, field: str) -> int:
    """'2.50' (currency units per million tokens) as micro-units per million tokens."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise PriceInputError(f"{field}: {text!r} is not a number (e.g. 2.50)") from None
    micros = value * MICROS
    if not value.is_finite() or value < 0 or micros != micros.to_integral_value():
        raise PriceInputError(f"{field}: {text!r} must be 0 or more, with at most 6 decimals")
    if micros > limits.price_micros_per_mtok_max:
        bound = money_text(limits.price_micros_per_mtok_max)
        raise PriceInputError(f"{field}: {text} is above {bound} per million tokens")
    return int(micros)


def money_text(micros: int) -> str:
    """Micro-units as currency units with six decimals, trailing zeros kept to two."""
    sign, whole = ("-" if micros < 0 else ""), abs(micros)
    units, fraction = divmod(whole, MICROS)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{units:,}.{digits}"


def _time(text: str | None) -> timestamp_pb2.Timestamp | None:
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise PriceInputError(f"--from: {text!r} is not an ISO time") from None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at if at.tzinfo else at.replace(tzinfo=UTC))
    return stamp


def _stub(target: str) -> Any:
    return ClientAuth.from_env().channel(target)


def _key(given: str, prefix: str) -> str:
    return given or f"{prefix}-{uuid.uuid4().hex}"


def cmd_set(args: argparse.Namespace) -> int:
    try:
        entry = pb.Price(
            model=args.model,
            currency=args.currency,
            input_micros_per_mtok=per_mtok_micros(args.input, "--input"),
            output_micros_per_mtok=per_mtok_micros(args.output, "--output"),
            cached_input_micros_per_mtok=per_mtok_micros(
                args.cached_input or args.input, "--cached-input"
            ),
            effective_from=_time(args.effective_from),
        )
    except PriceInputError as exc:
        print(f"tokenledger price set: {exc}", file=sys.stderr)
        return 2
    request = pb.SetPricesRequest(
        idempotency_key=_key(args.idempotency_key, "price-set"),
        tenant_id=args.tenant,
        prices=[entry],
    )
    with _stub(args.target) as channel:
        reply = pb_grpc.LedgerServiceStub(channel).SetPrices(request, timeout=CALL_TIMEOUT_S)
    if args.json:
        print(json_format.MessageToJson(reply, indent=2))
        return 0
    for p in reply.prices:
        print(f"{args.tenant}: {_price_line(p)}")
    return 0


def _price_line(p: pb.Price) -> str:
    since = p.effective_from.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
    return (
        f"{p.model} from {since}: {p.currency} {money_text(p.input_micros_per_mtok)} input, "
        f"{money_text(p.output_micros_per_mtok)} output, "
        f"{money_text(p.cached_input_micros_per_mtok)} cached input per 1M tokens"
    )


def cmd_list(args: argparse.Namespace) -> int:
    request = pb.ListPricesRequest(tenant_id=args.tenant, model=args.model)
    with _stub(args.target) as channel:
        reply = pb_grpc.LedgerServiceStub(channel).ListPrices(request, timeout=CALL_TIMEOUT_S)
    if args.json:
        print(json_format.MessageToJson(reply, indent=2))
        return 0
    if not reply.prices:
        print(f"{args.tenant} has no prices: usage is recorded without cost (flagged unpriced)")
        return 0
    for p in reply.prices:
        print(_price_line(p))
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
        raise PriceInputError(
            "the default price table ships in the litellm package, which is not installed: "
            "pip install 'tokenledger[integrations]' (it is never downloaded at run time)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(LITELLM_PRICE_FILE)
    if not path.is_file():
        raise PriceInputError(f"{path} is missing from the installed litellm package")
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
    return [Decimal(k) * MICROS * MICROS for k in numbers]


def _chunks(items: list[pb.Price]) -> Iterator[list[pb.Price]]:
    step = limits.prices_per_call_max
    for i in range(0, len(items), step):
        yield items[i : i + step]


def cmd_import(args: argparse.Namespace) -> int:
    try:
        table = litellm_prices(litellm_price_file(), args.models.split(","))
    except PriceInputError as exc:
        print(f"tokenledger price import: {exc}", file=sys.stderr)
        return 2
    if not table.prices:
        print(f"tokenledger price import: no model matches {args.models!r}", file=sys.stderr)
        return 2
    base = _key(args.idempotency_key, "price-import")
    with _stub(args.target) as channel:
        stub = pb_grpc.LedgerServiceStub(channel)
        for i, chunk in enumerate(_chunks(table.prices)):
            request = pb.SetPricesRequest(
                idempotency_key=f"{base}:{i}", tenant_id=args.tenant, prices=chunk
            )
            stub.SetPrices(request, timeout=CALL_TIMEOUT_S)
    summary = {"tenant": args.tenant, "prices": len(table.prices), "source": table.source,
               "rounded": table.rounded}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.tenant}: {len(table.prices)} model prices set from {table.source} "
            f"(USD; {table.rounded} given finer than a micro-unit per 1M tokens, rounded)"
        )
    return 0
