"""Malformed requests, over the real gRPC API against a real database.

For every RPC, a request with a malformed field is refused with INVALID_ARGUMENT, ErrorInfo
reason "INVALID_ARGUMENT" and BadRequest violations naming exactly the malformed fields, and
appends no event. Each case starts from a valid base request of its RPC and varies only the
fields in its table row. Well-formed ids of reservations that do not exist are NOT_FOUND instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from ledger import limits
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import RpcFailure, call_fails, event_count, new_id

M = TypeVar("M", bound=Message)

AMOUNT_MAX = limits.amount_tokens_max
INT64_MAX = 2**63 - 1
LOOKUP_RPCS = ("Commit", "Rollback", "GetReservation")
"""RPCs that name an existing reservation: valid requests for unknown ids are NOT_FOUND."""


# --- valid base requests ----------------------------------------------------------------------


def unknown_reservation_id() -> str:
    """Shaped like the ids Reserve issues, but never issued."""
    return "rsv_" + uuid.uuid4().hex


def _reserve(tenant: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        model="gpt-4o-mini",
        amount=1_000,
        ttl_seconds=60,
        labels={"team": "search", "env": "test"},
    )


def _commit(tenant: str) -> pb.CommitRequest:
    return pb.CommitRequest(
        tenant_id=tenant,
        reservation_id=unknown_reservation_id(),
        usage=pb.Usage(input_tokens=10, output_tokens=20, cached_input_tokens=5),
    )


def _rollback(tenant: str) -> pb.RollbackRequest:
    return pb.RollbackRequest(
        tenant_id=tenant, reservation_id=unknown_reservation_id(), reason="client cancelled"
    )


def _get_reservation(tenant: str) -> pb.GetReservationRequest:
    return pb.GetReservationRequest(tenant_id=tenant, reservation_id=unknown_reservation_id())


def _get_balance(tenant: str) -> pb.GetBalanceRequest:
    return pb.GetBalanceRequest(tenant_id=tenant, user_id="alice")


def _set_quota(tenant: str) -> pb.SetQuotaRequest:
    return pb.SetQuotaRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        limit=50_000,
        period=pb.PERIOD_DAY,
    )


def _record_usage(tenant: str) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        model="gpt-4o-mini",
        usage=pb.Usage(input_tokens=10, output_tokens=20),
    )


BASES: dict[str, Callable[[str], Message]] = {
    "Reserve": _reserve,
    "Commit": _commit,
    "Rollback": _rollback,
    "GetReservation": _get_reservation,
    "GetBalance": _get_balance,
    "SetQuota": _set_quota,
    "RecordUsage": _record_usage,
}


def varied(base: M, changes: dict[str, Any]) -> M:
    """A copy of `base` with `changes` applied; None clears a field (unsets `usage`/`limit`)."""
    request = type(base)()
    request.CopyFrom(base)
    for name, value in changes.items():
        if value is None:
            request.ClearField(name)
        elif isinstance(value, dict):
            entries = getattr(request, name)
            entries.clear()
            entries.update(value)
        elif isinstance(value, Message):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def request_for(rpc: str, changes: dict[str, Any]) -> Message:
    """The base request of `rpc` for a fresh tenant, varied by `changes`."""
    return varied(BASES[rpc](new_id("t")), changes)


# --- observing the server ---------------------------------------------------------------------


def call(stub: pb_grpc.LedgerServiceStub, rpc: str) -> Callable[[Message], Any]:
    method: Callable[[Message], Any] = getattr(stub, rpc)
    return method


def assert_refused(
    stub: pb_grpc.LedgerServiceStub,
    database_url: str,
    rpc: str,
    request: Message,
    fields: tuple[str, ...],
) -> RpcFailure:
    """`request` is INVALID_ARGUMENT with violations of exactly `fields`, and writes nothing."""
    before = event_count(database_url)
    failure = call_fails(call(stub, rpc), request)
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT, failure
    assert failure.reason == "INVALID_ARGUMENT", failure
    assert sorted(field for field, _ in failure.field_violations) == sorted(fields), failure
    assert all(description for _, description in failure.field_violations), failure
    assert event_count(database_url) == before
    return failure


# --- case tables ------------------------------------------------------------------------------


def bad(rpc: str, name: str, changes: dict[str, Any], *fields: str) -> Any:
    """A table row: `changes` to the base request of `rpc` must be refused naming `fields`
    (by default the one field changed)."""
    return pytest.param(rpc, changes, fields or tuple(changes), id=f"{rpc}:{name}")


def bad_ids(rpc: str, field: str, *, required: bool) -> list[Any]:
    """Malformed values of an id field: missing (when required), disallowed characters, and
    one character over limits.id_chars_max."""
    rows = [
        bad(rpc, f"{field}-with-space", {field: "has space"}),
        bad(rpc, f"{field}-with-slash", {field: "a/b"}),
        bad(rpc, f"{field}-with-semicolon", {field: "a;drop"}),
        bad(rpc, f"{field}-leading-dash", {field: "-abc"}),
        bad(rpc, f"{field}-non-ascii", {field: "zoë"}),
        bad(rpc, f"{field}-over-max-length", {field: "a" * (limits.id_chars_max + 1)}),
    ]
    if required:
        rows.insert(0, bad(rpc, f"{field}-missing", {field: ""}))
    return rows


def bad_idempotency_keys(rpc: str) -> list[Any]:
    over = "k" * (limits.idempotency_key_chars_max + 1)
    return [
        bad(rpc, "idempotency_key-missing", {"idempotency_key": ""}),
        bad(rpc, "idempotency_key-with-space", {"idempotency_key": "retry 1"}),
        bad(rpc, "idempotency_key-non-ascii", {"idempotency_key": "ключ"}),
        bad(rpc, "idempotency_key-over-max-length", {"idempotency_key": over}),
    ]


def bad_models(rpc: str) -> list[Any]:
    return [
        bad(rpc, "model-missing", {"model": ""}),
        bad(rpc, "model-with-space", {"model": "gpt 4o"}),
        bad(rpc, "model-leading-slash", {"model": "/gpt-4o"}),
        bad(rpc, "model-over-max-length", {"model": "m" * (limits.model_chars_max + 1)}),
    ]


def bad_usages(rpc: str) -> list[Any]:
    """Each token count negative, and above limits.amount_tokens_max."""
    rows = []
    for kind in ("input_tokens", "output_tokens", "cached_input_tokens"):
        field = f"usage.{kind}"
        rows += [
            bad(rpc, f"{field}-negative", {"usage": pb.Usage(**{kind: -1})}, field),
            bad(rpc, f"{field}-above-max", {"usage": pb.Usage(**{kind: AMOUNT_MAX + 1})}, field),
        ]
    return rows


MANY_LABELS = {f"k{i}": "v" for i in range(limits.labels_count_max + 1)}
LONG_LABEL_KEY = "k" * (limits.label_key_chars_max + 1)
LONG_LABEL_VALUE = "v" * (limits.label_value_chars_max + 1)

MALFORMED_FIELDS = [
    # Reserve
    *bad_idempotency_keys("Reserve"),
    *bad_ids("Reserve", "tenant_id", required=True),
    *bad_ids("Reserve", "user_id", required=True),
    *bad_ids("Reserve", "conversation_id", required=False),
    bad(
        "Reserve",
        "conversation_id-without-user_id",
        {"user_id": "", "conversation_id": "conv-1"},
        "user_id",
        "conversation_id",
    ),
    *bad_models("Reserve"),
    bad("Reserve", "amount-zero", {"amount": 0}),
    bad("Reserve", "amount-negative", {"amount": -1}),
    bad("Reserve", "amount-above-max", {"amount": AMOUNT_MAX + 1}),
    bad("Reserve", "amount-int64-max", {"amount": INT64_MAX}),
    bad("Reserve", "ttl_seconds-negative", {"ttl_seconds": -1}),
    bad("Reserve", "ttl_seconds-above-max", {"ttl_seconds": limits.reservation_ttl_s_max + 1}),
    bad("Reserve", "labels-too-many", {"labels": MANY_LABELS}),
    bad("Reserve", "label-key-upper-case", {"labels": {"Team": "search"}}, "labels"),
    bad("Reserve", "label-key-with-space", {"labels": {"my team": "search"}}, "labels"),
    bad("Reserve", "label-key-empty", {"labels": {"": "search"}}, "labels"),
    bad("Reserve", "label-key-over-max-length", {"labels": {LONG_LABEL_KEY: "x"}}, "labels"),
    bad(
        "Reserve",
        "label-value-over-max-length",
        {"labels": {"team": LONG_LABEL_VALUE}},
        "labels[team]",
    ),
    # Commit
    *bad_ids("Commit", "tenant_id", required=True),
    *bad_ids("Commit", "reservation_id", required=True),
    bad("Commit", "usage-missing", {"usage": None}),
    *bad_usages("Commit"),
    # Rollback
    *bad_ids("Rollback", "tenant_id", required=True),
    *bad_ids("Rollback", "reservation_id", required=True),
    bad("Rollback", "reason-over-max-length", {"reason": "r" * (limits.reason_chars_max + 1)}),
    # GetReservation
    *bad_ids("GetReservation", "tenant_id", required=True),
    *bad_ids("GetReservation", "reservation_id", required=True),
    # GetBalance
    *bad_ids("GetBalance", "tenant_id", required=True),
    *bad_ids("GetBalance", "user_id", required=False),
    *bad_ids("GetBalance", "conversation_id", required=False),
    bad(
        "GetBalance",
        "conversation_id-without-user_id",
        {"user_id": "", "conversation_id": "conv-1"},
        "conversation_id",
    ),
    # SetQuota
    *bad_idempotency_keys("SetQuota"),
    *bad_ids("SetQuota", "tenant_id", required=True),
    *bad_ids("SetQuota", "user_id", required=False),
    *bad_ids("SetQuota", "conversation_id", required=False),
    bad(
        "SetQuota",
        "conversation_id-without-user_id",
        {"user_id": "", "conversation_id": "conv-1"},
        "conversation_id",
    ),
    bad("SetQuota", "period-unspecified", {"period": pb.PERIOD_UNSPECIFIED}),
    bad("SetQuota", "period-unknown-value", {"period": 99}),
    bad(
        "SetQuota",
        "period-unspecified-when-clearing-limit",
        {"limit": None, "period": pb.PERIOD_UNSPECIFIED},
        "period",
    ),
    bad("SetQuota", "limit-negative", {"limit": -1}),
    bad("SetQuota", "limit-above-max", {"limit": limits.limit_tokens_max + 1}),
    # RecordUsage
    *bad_idempotency_keys("RecordUsage"),
    *bad_ids("RecordUsage", "tenant_id", required=True),
    *bad_ids("RecordUsage", "user_id", required=True),
    *bad_ids("RecordUsage", "conversation_id", required=False),
    bad(
        "RecordUsage",
        "conversation_id-without-user_id",
        {"user_id": "", "conversation_id": "conv-1"},
        "user_id",
        "conversation_id",
    ),
    *bad_models("RecordUsage"),
    bad("RecordUsage", "usage-missing", {"usage": None}),
    bad("RecordUsage", "usage-all-zero", {"usage": pb.Usage()}),
    bad(
        "RecordUsage",
        "usage-summing-to-zero-with-a-negative",
        {"usage": pb.Usage(input_tokens=5, output_tokens=-5)},
        "usage",
        "usage.output_tokens",
    ),
    *bad_usages("RecordUsage"),
]


@pytest.mark.parametrize(("rpc", "changes", "fields"), MALFORMED_FIELDS)
def test_malformed_field_is_invalid_argument_naming_it_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub,
    database_url: str,
    rpc: str,
    changes: dict[str, Any],
    fields: tuple[str, ...],
) -> None:
    """One malformed field: INVALID_ARGUMENT, a violation naming exactly it, no event."""
    assert_refused(stub, database_url, rpc, request_for(rpc, changes), fields)


CONTROL_CHARACTERS = {
    "NUL": "\x00",
    "TAB": "\t",
    "LF": "\n",
    "CR": "\r",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "C1-NEL": "\x85",
    "C1-CSI": "\x9b",
}
STRING_FIELDS = [
    ("Reserve", "idempotency_key"),
    ("Reserve", "tenant_id"),
    ("Reserve", "user_id"),
    ("Reserve", "conversation_id"),
    ("Reserve", "model"),
    ("Reserve", "label-key"),
    ("Reserve", "label-value"),
    ("Commit", "reservation_id"),
    ("Rollback", "reason"),
    ("GetBalance", "user_id"),
    ("SetQuota", "idempotency_key"),
    ("RecordUsage", "model"),
]


def with_control_character(rpc: str, field: str, char: str) -> tuple[dict[str, Any], str]:
    """The change putting `char` inside `field`, and the field the violation must name."""
    value = f"ok{char}ok"
    if field == "label-key":
        return {"labels": {value: "x"}}, "labels"
    if field == "label-value":
        return {"labels": {"team": value}}, "labels[team]"
    return {field: value}, field


@pytest.mark.parametrize(
    ("rpc", "field", "char"),
    [
        pytest.param(rpc, field, char, id=f"{rpc}:{field}-{name}")
        for rpc, field in STRING_FIELDS
        for name, char in CONTROL_CHARACTERS.items()
    ],
)
def test_control_character_in_a_string_field_is_refused(
    stub: pb_grpc.LedgerServiceStub, database_url: str, rpc: str, field: str, char: str
) -> None:
    """A C0, DEL or C1 control character inside any string field is INVALID_ARGUMENT."""
    changes, named = with_control_character(rpc, field, char)
    assert_refused(stub, database_url, rpc, request_for(rpc, changes), (named,))


@pytest.mark.parametrize(
    ("rpc", "changes", "fields"),
    [
        pytest.param(
            "Reserve",
            {
                "idempotency_key": "",
                "tenant_id": "bad tenant",
                "user_id": "",
                "conversation_id": "conv-1",
                "model": "m" * (limits.model_chars_max + 1),
                "amount": 0,
                "ttl_seconds": -5,
                "labels": MANY_LABELS,
            },
            (
                "idempotency_key",
                "tenant_id",
                "user_id",
                "conversation_id",
                "model",
                "amount",
                "ttl_seconds",
                "labels",
            ),
            id="Reserve",
        ),
        pytest.param(
            "Commit",
            {
                "tenant_id": "",
                "reservation_id": "no such id",
                "usage": pb.Usage(input_tokens=-1, output_tokens=-2, cached_input_tokens=-3),
            },
            (
                "tenant_id",
                "reservation_id",
                "usage.input_tokens",
                "usage.output_tokens",
                "usage.cached_input_tokens",
            ),
            id="Commit",
        ),
        pytest.param(
            "Rollback",
            {"tenant_id": "a b", "reservation_id": "", "reason": "r\x00"},
            ("tenant_id", "reservation_id", "reason"),
            id="Rollback",
        ),
        pytest.param(
            "GetBalance",
            {"tenant_id": "", "user_id": "", "conversation_id": "conv 1"},
            ("tenant_id", "conversation_id", "conversation_id"),
            id="GetBalance",
        ),
        pytest.param(
            "SetQuota",
            {"idempotency_key": "a b", "limit": -1, "period": pb.PERIOD_UNSPECIFIED},
            ("idempotency_key", "limit", "period"),
            id="SetQuota",
        ),
        pytest.param(
            "RecordUsage",
            {"tenant_id": "", "model": "", "usage": pb.Usage()},
            ("tenant_id", "model", "usage"),
            id="RecordUsage",
        ),
    ],
)
def test_every_malformed_field_of_one_request_is_reported_together(
    stub: pb_grpc.LedgerServiceStub,
    database_url: str,
    rpc: str,
    changes: dict[str, Any],
    fields: tuple[str, ...],
) -> None:
    """Several malformed fields in one request: one violation per field, all in one error."""
    assert_refused(stub, database_url, rpc, request_for(rpc, changes), fields)


# --- the other documented codes ---------------------------------------------------------------


def assert_not_found(
    stub: pb_grpc.LedgerServiceStub, database_url: str, rpc: str, request: Message
) -> None:
    before = event_count(database_url)
    failure = call_fails(call(stub, rpc), request)
    assert failure.code is grpc.StatusCode.NOT_FOUND, failure
    assert failure.reason == "RESERVATION_NOT_FOUND", failure
    assert failure.field_violations == [], failure
    assert event_count(database_url) == before


@pytest.mark.parametrize("rpc", LOOKUP_RPCS)
def test_unknown_reservation_id_is_not_found_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub, database_url: str, rpc: str
) -> None:
    """A well-formed id no reservation has: NOT_FOUND, RESERVATION_NOT_FOUND, no event."""
    assert_not_found(stub, database_url, rpc, request_for(rpc, {}))


@pytest.mark.parametrize("rpc", LOOKUP_RPCS)
def test_reservation_of_another_tenant_is_not_found_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub, database_url: str, rpc: str
) -> None:
    """A reservation id is only found in its own tenant; elsewhere it is NOT_FOUND."""
    held = stub.Reserve(_reserve(new_id("owner"))).reservation
    assert held.state == pb.RESERVATION_STATE_HELD
    request = request_for(rpc, {"reservation_id": held.reservation_id})
    assert_not_found(stub, database_url, rpc, request)
    still = stub.GetReservation(
        pb.GetReservationRequest(tenant_id=held.tenant_id, reservation_id=held.reservation_id)
    )
    assert still.reservation.state == pb.RESERVATION_STATE_HELD


# --- the bounds are exact ---------------------------------------------------------------------


def at_max(prefix: str, chars_max: int) -> str:
    """A fresh, valid value of exactly `chars_max` characters."""
    return new_id(prefix).ljust(chars_max, "x")


def fine(rpc: str, name: str, changes: Callable[[], dict[str, Any]]) -> Any:
    return pytest.param(rpc, changes, id=f"{rpc}:{name}")


AT_THE_LIMITS = [
    fine("Reserve", "amount-one", lambda: {"amount": 1}),
    fine("Reserve", "amount-max", lambda: {"amount": AMOUNT_MAX}),
    fine("Reserve", "ttl_seconds-zero-means-default", lambda: {"ttl_seconds": 0}),
    fine("Reserve", "ttl_seconds-max", lambda: {"ttl_seconds": limits.reservation_ttl_s_max}),
    fine(
        "Reserve",
        "labels-max-count",
        lambda: {"labels": {f"k{i}": "v" for i in range(limits.labels_count_max)}},
    ),
    fine("Reserve", "labels-none", lambda: {"labels": {}}),
    fine(
        "Reserve",
        "label-key-and-value-max-length",
        lambda: {
            "labels": {
                "k" * limits.label_key_chars_max: "é" * limits.label_value_chars_max,
                "a.b_c-9": "",
            }
        },
    ),
    fine(
        "Reserve",
        "strings-max-length",
        lambda: {
            "idempotency_key": at_max("key", limits.idempotency_key_chars_max),
            "tenant_id": at_max("t", limits.id_chars_max),
            "user_id": "u" * limits.id_chars_max,
            "conversation_id": "c" * limits.id_chars_max,
            "model": "openai/gpt-4o".ljust(limits.model_chars_max, "x"),
        },
    ),
    fine(
        "Reserve",
        "ids-with-every-allowed-punctuation",
        lambda: {"user_id": "a._:@+=-z", "conversation_id": "rsv_like-id"},
    ),
    fine(
        "Commit",
        "usage-max-and-ids-max-length",
        lambda: {
            "tenant_id": at_max("t", limits.id_chars_max),
            "reservation_id": "r" * limits.id_chars_max,
            "usage": pb.Usage(
                input_tokens=AMOUNT_MAX, output_tokens=AMOUNT_MAX, cached_input_tokens=AMOUNT_MAX
            ),
        },
    ),
    fine("Commit", "usage-all-zero", lambda: {"usage": pb.Usage()}),
    fine("Rollback", "reason-empty", lambda: {"reason": ""}),
    fine("Rollback", "reason-max-length", lambda: {"reason": "é" * limits.reason_chars_max}),
    fine(
        "GetReservation",
        "reservation_id-max-length",
        lambda: {"reservation_id": "r" * limits.id_chars_max},
    ),
    fine("GetBalance", "tenant-account", lambda: {"user_id": ""}),
    fine("GetBalance", "conversation-account", lambda: {"conversation_id": "conv-1"}),
    fine("SetQuota", "limit-zero", lambda: {"limit": 0}),
    fine("SetQuota", "limit-max", lambda: {"limit": limits.limit_tokens_max}),
    fine("SetQuota", "limit-unset-clears", lambda: {"limit": None, "period": pb.PERIOD_NONE}),
    fine("SetQuota", "tenant-account", lambda: {"user_id": "", "period": pb.PERIOD_MONTH}),
    fine(
        "RecordUsage",
        "usage-max",
        lambda: {
            "usage": pb.Usage(
                input_tokens=AMOUNT_MAX, output_tokens=AMOUNT_MAX, cached_input_tokens=AMOUNT_MAX
            )
        },
    ),
    fine("RecordUsage", "usage-one-token", lambda: {"usage": pb.Usage(cached_input_tokens=1)}),
]


@pytest.mark.parametrize(("rpc", "changes"), AT_THE_LIMITS)
def test_values_at_the_limits_are_accepted(
    stub: pb_grpc.LedgerServiceStub,
    database_url: str,
    rpc: str,
    changes: Callable[[], dict[str, Any]],
) -> None:
    """Each bound is exact: values on it pass validation (so the refusals above are at +1)."""
    request = request_for(rpc, changes())
    if rpc in LOOKUP_RPCS:
        # Validation passed when the lookup is what refuses the call.
        assert_not_found(stub, database_url, rpc, request)
        return
    response = call(stub, rpc)(request)
    charged = response.reservation if rpc == "Reserve" else response.balance
    assert charged.tenant_id == request.tenant_id  # type: ignore[attr-defined]
