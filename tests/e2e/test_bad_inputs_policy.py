"""Malformed requests to the budget-policy API, over real gRPC against a real database.

Covers Reserve.min_amount, the policy fields of SetQuota (rolling window, time zone, soft
limit, grant order), and every field of SetRateLimit, GrantTokens and AdjustBalance. As in
test_bad_inputs.py: each case starts from a valid base request of its RPC and varies only the
fields in its table row; a refusal is INVALID_ARGUMENT with ErrorInfo reason
"INVALID_ARGUMENT", BadRequest violations naming exactly the malformed fields, and no event
appended. Values on each bound are accepted and append their event. Last, the idempotency of
the three new writes: a retry returns the first response and writes nothing; a key reused
with a different request is ALREADY_EXISTS naming the first differing field.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from ledger import limits
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.e2e.test_bad_inputs import (
    CONTROL_CHARACTERS,
    assert_refused,
    at_max,
    bad,
    bad_idempotency_keys,
    bad_ids,
    bad_models,
    call,
    varied,
)
from tests.support import RpcFailure, call_fails, event_count, new_id, stamp

Stub = pb_grpc.LedgerServiceStub

AMOUNT_MAX = limits.amount_tokens_max
TOKENS_MAX = limits.limit_tokens_max
RPM_MAX = limits.requests_per_minute_max
WINDOW_HOURS_MAX = 168
TIMESTAMP_SECONDS_MAX = 253_402_300_799
"""9999-12-31T23:59:59Z, the last second a google.protobuf.Timestamp may hold."""


# --- valid base requests ----------------------------------------------------------------------


def in_a_minute() -> timestamp_pb2.Timestamp:
    return stamp(datetime.now(UTC) + timedelta(minutes=1))


def in_a_day() -> timestamp_pb2.Timestamp:
    return stamp(datetime.now(UTC) + timedelta(days=1))


def _reserve(tenant: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        model="gpt-4o-mini",
        amount=1_000,
        min_amount=100,
        ttl_seconds=60,
    )


def _set_quota(tenant: str) -> pb.SetQuotaRequest:
    return pb.SetQuotaRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        limit=50_000,
        period=pb.PERIOD_DAY,
        time_zone="Europe/Berlin",
        soft_limit_percent=80,
        grant_order=pb.GRANT_ORDER_GRANTS_FIRST,
    )


def _set_rate_limit(tenant: str) -> pb.SetRateLimitRequest:
    return pb.SetRateLimitRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        model="gpt-4o-mini",
        tokens_per_minute=10_000,
        requests_per_minute=60,
    )


def _grant_tokens(tenant: str) -> pb.GrantTokensRequest:
    return pb.GrantTokensRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        amount=5_000,
        expires_at=in_a_day(),
        reason="launch promotion",
    )


def _adjust_balance(tenant: str) -> pb.AdjustBalanceRequest:
    return pb.AdjustBalanceRequest(
        idempotency_key=new_id("key"),
        tenant_id=tenant,
        user_id="alice",
        tokens=-500,
        reason="credit for the 2026-11-20 outage",
    )


BASES: dict[str, Callable[[str], Message]] = {
    "Reserve": _reserve,
    "SetQuota": _set_quota,
    "SetRateLimit": _set_rate_limit,
    "GrantTokens": _grant_tokens,
    "AdjustBalance": _adjust_balance,
}


def request_for(rpc: str, changes: dict[str, Any]) -> Message:
    """The base request of `rpc` for a fresh tenant, varied by `changes`."""
    return varied(BASES[rpc](new_id("t")), changes)


def tenant_events(url: str, tenant: str) -> list[str]:
    """The event types of a tenant's log, in log order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT event_type FROM events WHERE tenant_id = %s ORDER BY position", (tenant,)
        ).fetchall()
    return [str(row[0]) for row in rows]


EVENT_OF = {
    "Reserve": "TokensReserved",
    "SetQuota": "QuotaSet",
    "SetRateLimit": "RateLimitSet",
    "GrantTokens": "TokensGranted",
    "AdjustBalance": "BalanceAdjusted",
}


def assert_refused_naming(
    stub: Stub, database_url: str, rpc: str, request: Message, fields: set[str]
) -> RpcFailure:
    """Like assert_refused, but a field may carry more than one violation."""
    before = event_count(database_url)
    failure = call_fails(call(stub, rpc), request)
    assert failure.code is grpc.StatusCode.INVALID_ARGUMENT, failure
    assert failure.reason == "INVALID_ARGUMENT", failure
    assert {field for field, _ in failure.field_violations} == fields, failure
    assert all(description for _, description in failure.field_violations), failure
    assert event_count(database_url) == before
    return failure


# --- one malformed field ------------------------------------------------------------------------


def account_ids(rpc: str) -> list[Any]:
    """Malformed tenant/user/conversation ids of an RPC whose user is optional (the account
    may be the tenant's own), and a conversation without its user."""
    return [
        *bad_ids(rpc, "tenant_id", required=True),
        *bad_ids(rpc, "user_id", required=False),
        *bad_ids(rpc, "conversation_id", required=False),
        bad(
            rpc,
            "conversation_id-without-user_id",
            {"user_id": "", "conversation_id": "conv-1"},
            "conversation_id",
        ),
    ]


LONG_ZONE = "America/" + "X" * (limits.time_zone_chars_max - len("America/") + 1)
LONG_REASON = "r" * (limits.reason_chars_max + 1)
ROLLING = pb.PERIOD_ROLLING

MALFORMED_FIELDS = [
    # Reserve.min_amount
    bad("Reserve", "min_amount-negative", {"min_amount": -1}),
    bad("Reserve", "min_amount-int64-min", {"min_amount": -(2**63)}),
    bad("Reserve", "min_amount-above-amount", {"amount": 1_000, "min_amount": 1_001}, "min_amount"),
    bad(
        "Reserve",
        "min_amount-above-amount-at-max",
        {"amount": AMOUNT_MAX - 1, "min_amount": AMOUNT_MAX},
        "min_amount",
    ),
    # SetQuota: rolling window
    bad(
        "SetQuota",
        "window_hours-zero-rolling",
        {"period": ROLLING, "window_hours": 0},
        "window_hours",
    ),
    bad(
        "SetQuota",
        "window_hours-negative-rolling",
        {"period": ROLLING, "window_hours": -1},
        "window_hours",
    ),
    bad(
        "SetQuota",
        "window_hours-above-max-rolling",
        {"period": ROLLING, "window_hours": WINDOW_HOURS_MAX + 1},
        "window_hours",
    ),
    bad(
        "SetQuota",
        "window_hours-int32-max-rolling",
        {"period": ROLLING, "window_hours": 2**31 - 1},
        "window_hours",
    ),
    bad(
        "SetQuota",
        "window_hours-with-day",
        {"period": pb.PERIOD_DAY, "window_hours": 24},
        "window_hours",
    ),
    bad(
        "SetQuota",
        "window_hours-with-month",
        {"period": pb.PERIOD_MONTH, "window_hours": 1},
        "window_hours",
    ),
    bad(
        "SetQuota",
        "window_hours-with-none",
        {"period": pb.PERIOD_NONE, "window_hours": 1},
        "window_hours",
    ),
    bad("SetQuota", "window_hours-negative-with-day", {"window_hours": -1}),
    # SetQuota: time zone (a well-formed name of no zone; malformed names: TIME_ZONES_MALFORMED)
    bad("SetQuota", "time_zone-unknown", {"time_zone": "Mars/Olympus"}),
    bad("SetQuota", "time_zone-region-only", {"time_zone": "Europe"}),
    bad("SetQuota", "time_zone-unknown-three-parts", {"time_zone": "America/Argentina/Nowhere"}),
    # SetQuota: soft limit and grant order
    bad("SetQuota", "soft_limit_percent-negative", {"soft_limit_percent": -1}),
    bad("SetQuota", "soft_limit_percent-above-100", {"soft_limit_percent": 101}),
    bad("SetQuota", "grant_order-undefined", {"grant_order": 7}),
    bad("SetQuota", "grant_order-negative", {"grant_order": -1}),
    # SetRateLimit
    *bad_idempotency_keys("SetRateLimit"),
    *account_ids("SetRateLimit"),
    *[row for row in bad_models("SetRateLimit") if row.id != "SetRateLimit:model-missing"],
    bad("SetRateLimit", "tokens_per_minute-negative", {"tokens_per_minute": -1}),
    bad("SetRateLimit", "tokens_per_minute-above-max", {"tokens_per_minute": TOKENS_MAX + 1}),
    bad("SetRateLimit", "tokens_per_minute-int64-max", {"tokens_per_minute": 2**63 - 1}),
    bad("SetRateLimit", "requests_per_minute-negative", {"requests_per_minute": -1}),
    bad("SetRateLimit", "requests_per_minute-above-max", {"requests_per_minute": RPM_MAX + 1}),
    # GrantTokens
    *bad_idempotency_keys("GrantTokens"),
    *account_ids("GrantTokens"),
    bad("GrantTokens", "amount-zero", {"amount": 0}),
    bad("GrantTokens", "amount-negative", {"amount": -1}),
    bad("GrantTokens", "amount-above-max", {"amount": TOKENS_MAX + 1}),
    bad("GrantTokens", "amount-int64-max", {"amount": 2**63 - 1}),
    bad("GrantTokens", "reason-over-max-length", {"reason": LONG_REASON}),
    # AdjustBalance
    *bad_idempotency_keys("AdjustBalance"),
    *account_ids("AdjustBalance"),
    bad("AdjustBalance", "tokens-zero", {"tokens": 0}),
    bad("AdjustBalance", "tokens-charge-above-max", {"tokens": TOKENS_MAX + 1}),
    bad("AdjustBalance", "tokens-credit-above-max", {"tokens": -(TOKENS_MAX + 1)}),
    bad("AdjustBalance", "tokens-int64-min", {"tokens": -(2**63)}),
    bad("AdjustBalance", "reason-missing", {"reason": ""}),
    bad("AdjustBalance", "reason-over-max-length", {"reason": LONG_REASON}),
]


@pytest.mark.parametrize(("rpc", "changes", "fields"), MALFORMED_FIELDS)
def test_malformed_field_is_invalid_argument_naming_it_and_writes_nothing(
    stub: Stub, database_url: str, rpc: str, changes: dict[str, Any], fields: tuple[str, ...]
) -> None:
    """One malformed field: INVALID_ARGUMENT, a violation naming exactly it, no event."""
    assert_refused(stub, database_url, rpc, request_for(rpc, changes), fields)


def test_min_amount_above_the_amount_bound_is_refused_naming_only_min_amount(
    stub: Stub, database_url: str
) -> None:
    """min_amount above limits.amount_tokens_max is refused; it is then also above `amount`,
    so the one field may carry two violations, but no other field is named."""
    request = request_for("Reserve", {"amount": AMOUNT_MAX, "min_amount": AMOUNT_MAX + 1})
    assert_refused_naming(stub, database_url, "Reserve", request, {"min_amount"})


@pytest.mark.parametrize("offset_s", [-86_400, -1, 0], ids=["a-day-ago", "a-second-ago", "now"])
def test_grant_expiring_now_or_in_the_past_is_refused(
    stub: Stub, database_url: str, offset_s: int
) -> None:
    """expires_at must be in the future: a grant that lapses on arrival is malformed."""
    expires_at = stamp(datetime.now(UTC) + timedelta(seconds=offset_s))
    request = request_for("GrantTokens", {"expires_at": expires_at})
    assert_refused(stub, database_url, "GrantTokens", request, ("expires_at",))


@pytest.mark.parametrize(
    "expires_at",
    [
        timestamp_pb2.Timestamp(seconds=TIMESTAMP_SECONDS_MAX + 1),
        timestamp_pb2.Timestamp(seconds=2**62),
        timestamp_pb2.Timestamp(seconds=2_000_000_000, nanos=1_000_000_000),
        timestamp_pb2.Timestamp(seconds=2_000_000_000, nanos=-1),
    ],
    ids=["seconds-after-year-9999", "seconds-huge", "nanos-a-whole-second", "nanos-negative"],
)
def test_out_of_range_expires_at_is_invalid_argument(
    stub: Stub, database_url: str, expires_at: timestamp_pb2.Timestamp
) -> None:
    """A Timestamp protobuf itself calls invalid is a malformed field, not a server fault."""
    request = request_for("GrantTokens", {"expires_at": expires_at})
    assert_refused(stub, database_url, "GrantTokens", request, ("expires_at",))


STRING_FIELDS = [
    ("SetRateLimit", "idempotency_key"),
    ("SetRateLimit", "tenant_id"),
    ("SetRateLimit", "user_id"),
    ("SetRateLimit", "conversation_id"),
    ("SetRateLimit", "model"),
    ("GrantTokens", "idempotency_key"),
    ("GrantTokens", "user_id"),
    ("GrantTokens", "reason"),
    ("AdjustBalance", "tenant_id"),
    ("AdjustBalance", "conversation_id"),
    ("AdjustBalance", "reason"),
]


@pytest.mark.parametrize(
    ("rpc", "field", "char"),
    [
        pytest.param(rpc, field, char, id=f"{rpc}:{field}-{name}")
        for rpc, field in STRING_FIELDS
        for name, char in CONTROL_CHARACTERS.items()
    ],
)
def test_control_character_in_a_string_field_is_refused(
    stub: Stub, database_url: str, rpc: str, field: str, char: str
) -> None:
    """A C0, DEL or C1 control character inside any string field is INVALID_ARGUMENT (for
    time_zone: TIME_ZONES_MALFORMED)."""
    assert_refused(stub, database_url, rpc, request_for(rpc, {field: f"ok{char}ok"}), (field,))


# --- malformed time zones -----------------------------------------------------------------------

TIME_ZONES_MALFORMED = {
    "path-traversal": "../etc/passwd",
    "embedded-traversal": "Europe/../../etc/passwd",
    "absolute-path": "/usr/share/zoneinfo/UTC",
    "data-file": "zone.tab",
    "with-space": "Europe/ Berlin",
    "trailing-slash": "Europe/Berlin/",
    "empty-segment": "Europe//Berlin",
    "non-ascii": "Europe/Zürich",
    "utc-offset": "+02:00",
    "over-max-length": LONG_ZONE,
    **{f"control-{name}": f"Europe/Ber{char}lin" for name, char in CONTROL_CHARACTERS.items()},
}


@pytest.mark.parametrize("name", TIME_ZONES_MALFORMED.values(), ids=TIME_ZONES_MALFORMED.keys())
def test_malformed_time_zone_is_refused_naming_time_zone(
    stub: Stub, database_url: str, name: str
) -> None:
    """A name that is no well-formed IANA key (path tricks, spaces, offsets, too long, control
    characters) is INVALID_ARGUMENT naming time_zone and nothing else, and writes nothing."""
    request = request_for("SetQuota", {"time_zone": name})
    assert_refused_naming(stub, database_url, "SetQuota", request, {"time_zone"})


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "/usr/share/zoneinfo/UTC", "Europe/ Berlin", LONG_ZONE, "Europe/Ber\x00lin"],
    ids=["path-traversal", "absolute-path", "with-space", "over-max-length", "control-NUL"],
)
def test_malformed_time_zone_is_not_looked_up(stub: Stub, database_url: str, name: str) -> None:
    """The shape check is what keeps arbitrary paths away from the zoneinfo file lookup: a name
    failing it gets exactly one violation, and never the lookup's 'is not an IANA time zone'."""
    request = request_for("SetQuota", {"time_zone": name})
    failure = assert_refused(stub, database_url, "SetQuota", request, ("time_zone",))
    assert "not an IANA time zone" not in failure.field_violations[0][1], failure


# --- several malformed fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rpc", "changes", "fields"),
    [
        pytest.param(
            "Reserve",
            {"idempotency_key": "", "amount": 0, "min_amount": 5},
            ("idempotency_key", "amount", "min_amount"),
            id="Reserve:min_amount-above-a-bad-amount",
        ),
        pytest.param(
            "Reserve",
            {"model": "", "min_amount": -3},
            ("model", "min_amount"),
            id="Reserve:negative-min_amount",
        ),
        pytest.param(
            "SetQuota",
            {
                "period": ROLLING,
                "window_hours": 0,
                "time_zone": "Mars/Olympus",
                "soft_limit_percent": 101,
                "grant_order": 7,
            },
            ("window_hours", "time_zone", "soft_limit_percent", "grant_order"),
            id="SetQuota:policy-fields",
        ),
        pytest.param(
            "SetQuota",
            {
                "idempotency_key": "a b",
                "limit": -1,
                "period": pb.PERIOD_UNSPECIFIED,
                "window_hours": 5,
                "time_zone": "Atlantis/Capital",
                "soft_limit_percent": -1,
            },
            (
                "idempotency_key",
                "limit",
                "period",
                "window_hours",
                "time_zone",
                "soft_limit_percent",
            ),
            id="SetQuota:old-and-new-fields",
        ),
        pytest.param(
            "SetRateLimit",
            {
                "idempotency_key": "",
                "tenant_id": "bad tenant",
                "user_id": "",
                "conversation_id": "conv-1",
                "model": "/gpt",
                "tokens_per_minute": -1,
                "requests_per_minute": RPM_MAX + 1,
            },
            (
                "idempotency_key",
                "tenant_id",
                "conversation_id",
                "model",
                "tokens_per_minute",
                "requests_per_minute",
            ),
            id="SetRateLimit",
        ),
        pytest.param(
            "GrantTokens",
            {
                "idempotency_key": "ключ",
                "user_id": "a/b",
                "amount": 0,
                # A past expiry is judged after the key is looked up (a retry after the
                # expiry gets the first answer), so it is not among these.
                "expires_at": timestamp_pb2.Timestamp(seconds=1),
                "reason": "r\x00",
            },
            ("idempotency_key", "user_id", "amount", "reason"),
            id="GrantTokens",
        ),
        pytest.param(
            "AdjustBalance",
            {"tenant_id": "", "conversation_id": "c c", "tokens": 0, "reason": ""},
            ("tenant_id", "conversation_id", "tokens", "reason"),
            id="AdjustBalance",
        ),
    ],
)
def test_every_malformed_field_of_one_request_is_reported_together(
    stub: Stub, database_url: str, rpc: str, changes: dict[str, Any], fields: tuple[str, ...]
) -> None:
    """Several malformed fields in one request: one violation per field, all in one error."""
    assert_refused(stub, database_url, rpc, request_for(rpc, changes), fields)


# --- the bounds are exact -----------------------------------------------------------------------


def fine(rpc: str, name: str, changes: Callable[[], dict[str, Any]]) -> Any:
    return pytest.param(rpc, changes, id=f"{rpc}:{name}")


def year_9999() -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=TIMESTAMP_SECONDS_MAX, nanos=999_999_999)


AT_THE_LIMITS = [
    # Reserve.min_amount
    fine("Reserve", "min_amount-zero", lambda: {"min_amount": 0}),
    fine("Reserve", "min_amount-one", lambda: {"min_amount": 1}),
    fine("Reserve", "min_amount-equal-to-amount", lambda: {"amount": 1_000, "min_amount": 1_000}),
    fine("Reserve", "min_amount-max", lambda: {"amount": AMOUNT_MAX, "min_amount": AMOUNT_MAX}),
    # SetQuota
    fine("SetQuota", "rolling-1h", lambda: {"period": ROLLING, "window_hours": 1}),
    fine("SetQuota", "rolling-168h", lambda: {"period": ROLLING, "window_hours": WINDOW_HOURS_MAX}),
    fine(
        "SetQuota",
        "rolling-without-limit",
        lambda: {"period": ROLLING, "window_hours": 24, "limit": None},
    ),
    fine("SetQuota", "time_zone-empty-is-utc", lambda: {"time_zone": ""}),
    fine("SetQuota", "time_zone-utc", lambda: {"time_zone": "UTC"}),
    fine("SetQuota", "time_zone-asia-tokyo", lambda: {"time_zone": "Asia/Tokyo"}),
    fine(
        "SetQuota", "time_zone-three-parts", lambda: {"time_zone": "America/Argentina/Buenos_Aires"}
    ),
    fine("SetQuota", "time_zone-etc-offset", lambda: {"time_zone": "Etc/GMT+5"}),
    fine(
        "SetQuota",
        "time_zone-with-month",
        lambda: {"time_zone": "Pacific/Chatham", "period": pb.PERIOD_MONTH},
    ),
    fine("SetQuota", "soft_limit_percent-zero", lambda: {"soft_limit_percent": 0}),
    fine("SetQuota", "soft_limit_percent-100", lambda: {"soft_limit_percent": 100}),
    fine(
        "SetQuota", "grant_order-quota-first", lambda: {"grant_order": pb.GRANT_ORDER_QUOTA_FIRST}
    ),
    fine(
        "SetQuota", "grant_order-grants-first", lambda: {"grant_order": pb.GRANT_ORDER_GRANTS_FIRST}
    ),
    fine(
        "SetQuota", "grant_order-unspecified", lambda: {"grant_order": pb.GRANT_ORDER_UNSPECIFIED}
    ),
    # SetRateLimit
    fine("SetRateLimit", "model-empty-means-all", lambda: {"model": ""}),
    fine(
        "SetRateLimit",
        "both-zero-means-no-limit",
        lambda: {"tokens_per_minute": 0, "requests_per_minute": 0},
    ),
    fine(
        "SetRateLimit",
        "both-max",
        lambda: {"tokens_per_minute": TOKENS_MAX, "requests_per_minute": RPM_MAX},
    ),
    fine("SetRateLimit", "tenant-account", lambda: {"user_id": ""}),
    fine("SetRateLimit", "conversation-account", lambda: {"conversation_id": "conv-1"}),
    fine(
        "SetRateLimit",
        "strings-max-length",
        lambda: {
            "idempotency_key": at_max("key", limits.idempotency_key_chars_max),
            "tenant_id": at_max("t", limits.id_chars_max),
            "user_id": "u" * limits.id_chars_max,
            "conversation_id": "c" * limits.id_chars_max,
            "model": "openai/gpt-4o".ljust(limits.model_chars_max, "x"),
        },
    ),
    # GrantTokens
    fine("GrantTokens", "amount-one", lambda: {"amount": 1}),
    fine("GrantTokens", "amount-max", lambda: {"amount": TOKENS_MAX}),
    fine("GrantTokens", "expires_at-unset-never", lambda: {"expires_at": None}),
    fine("GrantTokens", "expires_at-in-a-minute", lambda: {"expires_at": in_a_minute()}),
    fine("GrantTokens", "expires_at-last-timestamp", lambda: {"expires_at": year_9999()}),
    fine("GrantTokens", "reason-empty", lambda: {"reason": ""}),
    fine("GrantTokens", "reason-max-length", lambda: {"reason": "é" * limits.reason_chars_max}),
    fine("GrantTokens", "tenant-account", lambda: {"user_id": ""}),
    fine("GrantTokens", "conversation-account", lambda: {"conversation_id": "conv-1"}),
    # AdjustBalance
    fine("AdjustBalance", "tokens-one", lambda: {"tokens": 1}),
    fine("AdjustBalance", "tokens-minus-one", lambda: {"tokens": -1}),
    fine("AdjustBalance", "tokens-charge-max", lambda: {"tokens": TOKENS_MAX}),
    fine("AdjustBalance", "tokens-credit-max", lambda: {"tokens": -TOKENS_MAX}),
    fine("AdjustBalance", "reason-one-character", lambda: {"reason": "x"}),
    fine("AdjustBalance", "reason-max-length", lambda: {"reason": "é" * limits.reason_chars_max}),
    fine("AdjustBalance", "tenant-account", lambda: {"user_id": ""}),
    fine(
        "AdjustBalance",
        "strings-max-length",
        lambda: {
            "idempotency_key": at_max("key", limits.idempotency_key_chars_max),
            "tenant_id": at_max("t", limits.id_chars_max),
            "user_id": "u" * limits.id_chars_max,
            "conversation_id": "c" * limits.id_chars_max,
        },
    ),
]


def check_echo(rpc: str, request: Any, response: Any) -> None:
    """The response reflects the accepted values."""
    if rpc == "Reserve":
        assert response.reservation.amount == request.amount
        assert response.requested == request.amount
        assert not response.partial
    elif rpc == "SetQuota":
        b = response.balance
        assert b.period == request.period
        assert b.window_hours == request.window_hours
        assert b.time_zone == (request.time_zone or "UTC")
        assert b.soft_limit_percent == request.soft_limit_percent
        assert b.grant_order == (request.grant_order or pb.GRANT_ORDER_QUOTA_FIRST)
    elif rpc == "SetRateLimit":
        rl = response.rate_limit
        assert (rl.tenant_id, rl.user_id, rl.conversation_id, rl.model) == (
            request.tenant_id,
            request.user_id,
            request.conversation_id,
            request.model,
        )
        assert rl.tokens_per_minute == request.tokens_per_minute
        assert rl.requests_per_minute == request.requests_per_minute
    elif rpc == "GrantTokens":
        (grant,) = response.balance.grants
        assert grant.remaining == request.amount
        assert grant.HasField("expires_at") == request.HasField("expires_at")
        if request.HasField("expires_at"):
            assert grant.expires_at.seconds == request.expires_at.seconds
        assert response.balance.granted == request.amount
    else:
        assert response.balance.used == request.tokens
    if rpc != "SetRateLimit":
        balance = response.reservation if rpc == "Reserve" else response.balance
        assert balance.tenant_id == request.tenant_id
        assert balance.user_id == request.user_id


@pytest.mark.parametrize(("rpc", "changes"), AT_THE_LIMITS)
def test_values_at_the_limits_are_accepted_and_append_their_event(
    stub: Stub, database_url: str, rpc: str, changes: Callable[[], dict[str, Any]]
) -> None:
    """Each bound is exact: values on it pass validation (so the refusals above are at +1),
    and the write appends its one event."""
    request: Any = request_for(rpc, changes())
    response = call(stub, rpc)(request)
    check_echo(rpc, request, response)
    assert tenant_events(database_url, request.tenant_id) == [EVENT_OF[rpc]]


# --- idempotency of the new writes --------------------------------------------------------------

NEW_WRITES = ("SetRateLimit", "GrantTokens", "AdjustBalance")


def assert_key_reused(
    stub: Stub, database_url: str, rpc: str, request: Message, field: str
) -> RpcFailure:
    before = event_count(database_url)
    failure = call_fails(call(stub, rpc), request)
    assert failure.code is grpc.StatusCode.ALREADY_EXISTS, failure
    assert failure.reason == "IDEMPOTENCY_KEY_REUSED", failure
    assert failure.metadata == {"field": field}, failure
    assert field in failure.message, failure
    assert event_count(database_url) == before
    return failure


@pytest.mark.parametrize("rpc", NEW_WRITES)
def test_retry_with_the_same_key_returns_the_first_response_and_writes_nothing(
    stub: Stub, database_url: str, rpc: str
) -> None:
    request: Any = request_for(rpc, {})
    first = call(stub, rpc)(request)
    assert tenant_events(database_url, request.tenant_id) == [EVENT_OF[rpc]]
    for _ in range(2):
        assert call(stub, rpc)(request) == first
    assert tenant_events(database_url, request.tenant_id) == [EVENT_OF[rpc]]


@pytest.mark.parametrize(
    ("rpc", "change", "field"),
    [
        pytest.param(rpc, change, field, id=f"{rpc}:{field}")
        for rpc, change, field in [
            ("SetRateLimit", {"user_id": "bob"}, "user_id"),
            ("SetRateLimit", {"conversation_id": "conv-1"}, "conversation_id"),
            ("SetRateLimit", {"model": ""}, "model"),
            ("SetRateLimit", {"tokens_per_minute": 10_001}, "tokens_per_minute"),
            ("SetRateLimit", {"requests_per_minute": 0}, "requests_per_minute"),
            ("GrantTokens", {"user_id": ""}, "user_id"),
            ("GrantTokens", {"amount": 5_001}, "amount"),
            ("GrantTokens", {"expires_at": None}, "expires_at"),
            ("GrantTokens", {"reason": "another reason"}, "reason"),
            ("AdjustBalance", {"user_id": "bob"}, "user_id"),
            ("AdjustBalance", {"tokens": 500}, "tokens"),
            ("AdjustBalance", {"reason": "another reason"}, "reason"),
            ("Reserve", {"min_amount": 0}, "min_amount"),
            ("SetQuota", {"time_zone": "Asia/Tokyo"}, "time_zone"),
            ("SetQuota", {"soft_limit_percent": 0}, "soft_limit_percent"),
            ("SetQuota", {"grant_order": pb.GRANT_ORDER_QUOTA_FIRST}, "grant_order"),
            ("SetQuota", {"period": ROLLING, "window_hours": 24}, "period"),
        ]
    ],
)
def test_same_key_with_a_different_request_names_the_field(
    stub: Stub, database_url: str, rpc: str, change: dict[str, Any], field: str
) -> None:
    """The same key with one field changed: ALREADY_EXISTS, IDEMPOTENCY_KEY_REUSED naming
    that field, nothing written; the first request still replays."""
    request = request_for(rpc, {})
    first = call(stub, rpc)(request)
    assert_key_reused(stub, database_url, rpc, varied(request, change), field)
    assert call(stub, rpc)(request) == first


def test_grant_retry_with_a_later_expiry_names_expires_at(stub: Stub, database_url: str) -> None:
    request = _grant_tokens(new_id("t"))
    stub.GrantTokens(request)
    later = stamp(request.expires_at.ToDatetime(tzinfo=UTC) + timedelta(seconds=1))
    assert_key_reused(
        stub, database_url, "GrantTokens", varied(request, {"expires_at": later}), "expires_at"
    )


def _for_tenant(rpc: str, tenant: str, key: str) -> Message:
    return varied(BASES[rpc](tenant), {"idempotency_key": key})


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ("SetRateLimit", "GrantTokens"),
        ("GrantTokens", "AdjustBalance"),
        ("AdjustBalance", "SetRateLimit"),
        ("SetQuota", "SetRateLimit"),
        ("Reserve", "GrantTokens"),
        ("AdjustBalance", "Reserve"),
    ],
)
def test_key_reused_for_another_operation_names_operation(
    stub: Stub, database_url: str, first: str, then: str
) -> None:
    tenant, key = new_id("t"), new_id("key")
    call(stub, first)(_for_tenant(first, tenant, key))
    assert_key_reused(stub, database_url, then, _for_tenant(then, tenant, key), "operation")
    assert len(tenant_events(database_url, tenant)) == 1


def test_same_key_in_another_tenant_is_a_new_request(stub: Stub, database_url: str) -> None:
    """Keys are unique per tenant: the same key elsewhere is not a reuse."""
    key = new_id("key")
    for rpc in NEW_WRITES:
        tenant = new_id("t")
        call(stub, rpc)(_for_tenant(rpc, tenant, key))
        assert tenant_events(database_url, tenant) == [EVENT_OF[rpc]]


def test_set_rate_limit_retry_returns_the_first_response_after_a_later_change(
    stub: Stub, database_url: str
) -> None:
    """Like every idempotent write, a retry returns what the first call answered, even when
    another call changed the limit since."""
    first_request = varied(_set_rate_limit(new_id("t")), {"tokens_per_minute": 100})
    first = stub.SetRateLimit(first_request)
    changed = {"idempotency_key": new_id("key"), "tokens_per_minute": 200}
    stub.SetRateLimit(varied(first_request, changed))
    retried = stub.SetRateLimit(first_request)
    assert retried.rate_limit.tokens_per_minute == 100
    assert retried == first


def test_grant_retry_after_its_expiry_passed_returns_the_first_response(
    stub: Stub, database_url: str
) -> None:
    """A client whose first GrantTokens succeeded but timed out retries it; by then the
    expiry it asked for may have passed. The retry must still return the first response."""
    soon = stamp(datetime.now(UTC) + timedelta(seconds=1))
    request = varied(_grant_tokens(new_id("t")), {"expires_at": soon})
    first = stub.GrantTokens(request)
    time.sleep(max(0.0, request.expires_at.ToDatetime(tzinfo=UTC).timestamp() - time.time()) + 0.05)
    assert stub.GrantTokens(request) == first
    assert tenant_events(database_url, request.tenant_id) == ["TokensGranted"]
