"""The one error table (services/platform/errors.py TABLE): every refusal class of the ledger
and of the servers has exactly one row, and every row gives the code, ErrorInfo reason and
details the README's "Errors" tables document. A new refusal class without a row fails here,
not as INTERNAL at run time."""

from __future__ import annotations

import gc
import importlib
import pkgutil
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

import services
from ledger import errors
from ledger.model import Account, AccountKey, Reservation, ReserveResult, State
from services.ledger.convert import advice, reserve_response
from services.platform.errors import (
    TABLE,
    CallRefused,
    Code,
    ContextOverGrant,
    ContextOverWindow,
    Detail,
    InternalError,
    InvalidRequest,
    LedgerUnavailable,
    MemoryFull,
    MemoryUnavailable,
    PermissionDenied,
    Relayed,
    ServerDeadlineExceeded,
    ShuttingDown,
    TokenizationFailed,
    TokenizerUnavailable,
    TooManyCalls,
    Unauthenticated,
    UnknownModel,
    refusal,
    to_status,
)

README = Path(__file__).resolve().parents[2] / "README.md"
ABSTRACT = {errors.LedgerError, errors.Refusal, CallRefused}
"""Bases never raised themselves."""

LEVEL = errors.RefusingLevel("tenant", "acme", limit=100, held=10, used=90, available=0)
SAMPLES: dict[type[Exception], errors.LedgerError | CallRefused] = {
    errors.InvalidArgument: errors.InvalidArgument([errors.FieldViolation("amount", "is 0")]),
    errors.BudgetExhausted: errors.BudgetExhausted(
        200, LEVEL, 0, datetime(2026, 1, 11, tzinfo=UTC)
    ),
    errors.RateLimited: errors.RateLimited("tokens", "acme", "gpt-x", 100, 200, 50, 1.5),
    errors.ReservationNotFound: errors.ReservationNotFound("acme", "r1"),
    errors.ReservationEnded: errors.ReservationEnded("r1", "rolled back", "cannot commit"),
    errors.CheckpointRefused: errors.CheckpointRefused("tenant 'acme' has no checkpoint yet"),
    errors.PriceMissing: errors.PriceMissing("gpt-4o", "acme/alice"),
    errors.PriceRefused: errors.PriceRefused("billed in USD", currency="USD"),
    errors.IdempotencyKeyReused: errors.IdempotencyKeyReused("k1", "amount", 1, 2),
    errors.StoreUnavailable: errors.StoreUnavailable("database unavailable: read-only"),
    errors.Conflict: errors.Conflict("the transaction lost a race and changed nothing"),
    Unauthenticated: Unauthenticated("invalid API key"),
    PermissionDenied: PermissionDenied(
        "Reserve needs the role writer", metadata={"rpc": "Reserve", "required_roles": "writer"}
    ),
    TooManyCalls: TooManyCalls(
        "key:k1 has 2 calls in flight",
        metadata={"caller": "key:k1", "in_flight": "2", "calls_max": "2"},
        retry_after_s=0.2,
    ),
    ServerDeadlineExceeded: ServerDeadlineExceeded(
        "the call set no deadline", metadata={"deadline_s": "30", "source": "server default"}
    ),
    InvalidRequest: InvalidRequest("model: is required", violations=[("model", "is required")]),
    ShuttingDown: ShuttingDown("server is shutting down; retry elsewhere"),
    InternalError: InternalError("internal error; see server log"),
    UnknownModel: UnknownModel(
        "model: unknown model 'x'",
        metadata={"model": "x", "families": "openai"},
        violations=[("model", "unknown model 'x'")],
    ),
    ContextOverWindow: ContextOverWindow("short by 10", metadata={"limited_by": "WINDOW"}),
    ContextOverGrant: ContextOverGrant("short by 10", metadata={"limited_by": "BUDGET"}),
    LedgerUnavailable: LedgerUnavailable(
        "the ledger could not be reached",
        metadata={"ledger_status": "UNAVAILABLE"},
        retry_after_s=1,
    ),
    TokenizerUnavailable: TokenizerUnavailable("cannot count: no rank file"),
    TokenizationFailed: TokenizationFailed("cannot count: the tokenizer failed"),
    MemoryFull: MemoryFull(
        "conversation 'c' would hold 65 facts", metadata={"facts_max": "64", "facts_after": "65"}
    ),
    MemoryUnavailable: MemoryUnavailable("no database for the memory"),
}
DETAIL_NAMES = {
    Detail.BAD_REQUEST: error_details_pb2.BadRequest,
    Detail.QUOTA_FAILURE: error_details_pb2.QuotaFailure,
    Detail.RETRY_INFO: error_details_pb2.RetryInfo,
}


def _subclasses(base: type[Exception]) -> Iterator[type[Exception]]:
    for sub in base.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _import_every_service_module() -> None:
    """So that a refusal class declared anywhere under services/ is found."""
    for info in pkgutil.walk_packages(services.__path__, "services."):
        if not info.name.startswith("services._gen"):
            importlib.import_module(info.name)


def refusal_classes() -> set[type[Exception]]:
    _import_every_service_module()
    found = {*_subclasses(errors.LedgerError), *_subclasses(CallRefused)}
    return found - ABSTRACT


def test_every_refusal_class_has_a_row_and_every_row_a_class() -> None:
    classes = refusal_classes()
    assert not sorted(c.__qualname__ for c in classes - TABLE.keys()), "refusals without a row"
    assert set(TABLE) <= classes
    assert len(classes) >= 22  # 8 of the ledger, 14 of the servers


def test_a_new_class_without_a_row_is_caught() -> None:
    """A subclass does not inherit its parent's row: it would end INTERNAL, so it fails here."""

    class Throttled(errors.RateLimited):
        pass

    try:
        assert Throttled in refusal_classes() - TABLE.keys()
        assert refusal(Throttled("tokens", "a", "", 1, 2, 0, None)) is None
    finally:
        del Throttled
        gc.collect()  # out of __subclasses__, so that no other test sees it


def _readme_rows() -> dict[str, tuple[set[str], set[str]]]:
    """reason -> (codes, detail message names) of every row of the README's error tables."""
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"`[A-Z_]+`", cells[0]):
            continue
        codes = set(re.findall(r"`([A-Z_]+)`", cells[1]))
        if not codes <= {c.value for c in Code}:
            continue  # not an error table
        details = set(re.findall(r"`(BadRequest|QuotaFailure|RetryInfo)`", cells[-1]))
        rows[cells[0].strip("`")] = (codes, details)
    return rows


def _details(exc: errors.LedgerError | CallRefused) -> tuple[str, set[str]]:
    """The ErrorInfo reason and the other detail types of the status a refusal gets."""
    _, status = to_status(exc)
    reason, names = "", set()
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
            assert info.domain == "tokenledger.dev"
        else:
            names.add(detail.TypeName().rsplit(".", 1)[-1])
    return reason, names


@pytest.mark.parametrize("kind", [k for k in TABLE if k is not Relayed], ids=lambda k: k.__name__)
def test_each_row_is_what_the_readme_documents(kind: type[Exception]) -> None:
    """Code, ErrorInfo reason and details of a sample of each kind, against the README row of
    its reason; the row's declared details are exactly the README's."""
    rows = _readme_rows()
    sample = SAMPLES[kind]
    row = TABLE[kind]
    code, status = to_status(sample)
    reason, names = _details(sample)
    assert reason == sample.reason and reason in rows, f"README has no row for {reason}"
    documented_codes, documented_details = rows[reason]
    assert row.code is not None and row.code.value in documented_codes
    assert code is grpc.StatusCode[row.code.value] and status.code == code.value[0]
    declared = {DETAIL_NAMES[d].DESCRIPTOR.name for d in DETAIL_NAMES if d in row.details}
    assert declared == documented_details
    assert names == declared  # each sample carries what its row may carry
    assert status.message == str(sample)[:256]


def test_every_readme_reason_has_a_kind_and_all_its_codes_are_used() -> None:
    rows = _readme_rows()
    assert len(rows) >= 18
    for reason, (codes, _) in rows.items():
        kinds = [k for k in TABLE if k is not Relayed and SAMPLES[k].reason == reason]
        assert kinds, f"README documents {reason}, which no kind has"
        assert {TABLE[k].code.value for k in kinds if TABLE[k].code} == codes, reason


def test_a_relayed_refusal_keeps_the_other_services_code_and_details_under_our_message() -> None:
    budget = SAMPLES[errors.BudgetExhausted]
    _, upstream = to_status(budget)
    asked = "the ledger refused to reserve 200 tokens: …"
    relayed = Relayed(Code.RESOURCE_EXHAUSTED, asked, upstream.SerializeToString())
    code, status = to_status(relayed)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.message == asked
    assert list(status.details) == list(upstream.details)
    assert _details(relayed) == ("BUDGET_EXHAUSTED", {"QuotaFailure"})


def test_retry_info_and_messages_are_bounded_in_one_place() -> None:
    rate = errors.RateLimited("tokens", "acme", "", 100, 200, 0, None)  # never fits: no retry
    assert _details(rate) == ("RATE_LIMITED", {"QuotaFailure"})
    long = InvalidRequest("x" * 10_000, violations=[("f", "y" * 10_000)] * 100)
    _, status = to_status(long)
    assert len(status.message) == 256
    assert status.ByteSize() < 8_192
    retry = error_details_pb2.RetryInfo()
    store = to_status(SAMPLES[errors.StoreUnavailable])[1].details
    assert any(d.Unpack(retry) for d in store) and retry.retry_delay.seconds == 1


def test_anything_else_is_no_refusal() -> None:
    """The boundary ends those INTERNAL (and logs them): the base classes too."""
    assert refusal(ValueError("bug")) is None
    assert refusal(errors.LedgerError("no reason")) is None
    assert refusal(SAMPLES[errors.Conflict]) is SAMPLES[errors.Conflict]


def test_advice_is_one_value_for_refusals_and_for_suggestions() -> None:
    """The cheaper-model advice of a refusal's metadata and of a partial grant's Suggestion
    come from the same advice()."""
    advised = advice({"gpt-x": "gpt-mini"}, "gpt-x")
    refused = errors.BudgetExhausted(200, LEVEL, 0)
    refused.advise(advised.metadata())
    assert refused.metadata()["cheaper_model"] == "gpt-mini"
    assert refused.metadata()["compact_context"] == "true"
    assert advice({"gpt-x": "gpt-mini"}, "other").metadata() == {"compact_context": "true"}
    key = AccountKey("acme", "alice")
    at = datetime(2026, 1, 10, tzinfo=UTC)
    held = Reservation("r1", key, "gpt-x", 50, State.HELD, at, at)
    granted = ReserveResult(held, Account(key), requested=200, reservable=50)
    suggestion = reserve_response(granted, advised).suggestion
    assert (suggestion.cheaper_model, suggestion.compact_context) == ("gpt-mini", True)
    assert suggestion.max_amount_now == 50
