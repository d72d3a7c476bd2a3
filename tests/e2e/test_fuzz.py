"""Hostile input to every RPC of both services, over gRPC against real servers: requests built
by hypothesis from each method's message descriptor (strings with control characters, any
unicode, very long; integers over their whole range; enums undefined; timestamps out of range;
nested, repeated and map fields), and raw bytes (a valid message with a string field made
invalid UTF-8, truncated or corrupted wire format, random blobs).

No call may end UNKNOWN or INTERNAL, every refusal carries an ErrorInfo, the servers stay
healthy, and no refused call leaves an effect in the log: each request carries its own W3C
trace id, which the ledger stores with every event it appends, so the events of refused calls
are found exactly (one query per RPC). The RPC list comes from the service descriptors, so a
new RPC is fuzzed without a change here.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import TokenizerPool
from services.ledger.server import message_bytes_max
from tests.support import ContextServerThread, ServerThread, health_status

FD = descriptor.FieldDescriptor
REPO = Path(__file__).resolve().parents[2]
SERVICES = (
    pb.DESCRIPTOR.services_by_name["LedgerService"],
    cpb.DESCRIPTOR.services_by_name["ContextService"],
)
METHODS = [m for service in SERVICES for m in service.methods]

EXAMPLES_PER_RPC = 120
RAW_EXAMPLES_PER_RPC = 40
NEVER_ENDING = {"SubscribeEvents": 25}
"""Streams that follow the log until their deadline: fewer examples (each takes its deadline)."""
UNARY_TIMEOUT_S = 20.0
STREAM_TIMEOUT_S = 2.0
FOLLOW_TIMEOUT_S = 0.15
STREAM_MESSAGES_MAX = 50
"""Enough of a stream to know the server accepted it; the rest is cancelled."""

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
WITHOUT_ERROR_INFO = {
    grpc.StatusCode.DEADLINE_EXCEEDED,  # the client's own deadline
    grpc.StatusCode.CANCELLED,  # the client stopped reading
}
FUZZ_TENANTS = ("fuzz-t1", "fuzz-t2")
EXPIRY_ACTOR = "system:expiry"

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
NASTY_STRINGS = [
    "\x00",
    "a\x00b",
    "\x1b[2J",
    "\u202egpt",  # right-to-left override
    "\ufeff",
    "\u0085",
    "ﬀ",
    "²",  # str.isdigit() is True, int() refuses it
    "١٢٣",  # Arabic-Indic digits: int() takes them
    "².1",
    "1.²",
    "9" * 40 + ".1",
    "1." + "9" * 40,
    "-1.-1",
    "0." + "0" * 16,
    "99999999999999999999.99999999999999999999",
    "'; DROP TABLE events; --",
    "%s%s%s",
    "%(x)s",
    "{0}",
    "../../etc/passwd",
    "a" * 129,
    "a" * 513,
    "Etc/GMT+99",
    "../UTC",
    "UTC/../../x",
    "x" * 65,
    "rsv_" + "0" * 32,
]
BAD_UTF8 = [
    b"\xff",
    b"\xc3\x28",
    b"a\x80b",
    b"\xed\xa0\x80",  # a surrogate, encoded
    b"\xc0\xaf",  # overlong
    b"\xf8\x88\x80\x80\x80",
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
]


# --- strategies from descriptors ----------------------------------------------------------------


def _long_text() -> st.SearchStrategy[str]:
    return st.builds(lambda ch, n: ch * n, st.sampled_from("a0é\x00 🙂"), st.integers(100, 70_000))


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.text(alphabet=st.characters(max_codepoint=0x9F), max_size=20),
        st.sampled_from(NASTY_STRINGS),
        _long_text(),
    )


RUN = uuid.uuid4().hex[:8]
HOLDS: list[str] = []
"""Reservations of the fuzz tenants, so that commits and rollbacks reach real ones."""
KEYS = itertools.count(10)
PLAUSIBLE_INTS: dict[str, st.SearchStrategy[int]] = {
    "amount": st.integers(1, 2_000),
    "limit": st.integers(0, 50_000),
    "tokens": st.sampled_from([-50, 50]),
    "ttl_seconds": st.sampled_from([0, 60]),
    "window_hours": st.sampled_from([0, 1, 24]),
    "soft_limit_percent": st.sampled_from([0, 80]),
    "tokens_per_minute": st.sampled_from([0, 100_000]),
    "requests_per_minute": st.sampled_from([0, 1_000]),
    "input_tokens": st.integers(0, 500),
    "output_tokens": st.integers(0, 500),
    "cached_input_tokens": st.integers(0, 50),
    "max_output_tokens": st.sampled_from([1, 100, 1_000]),
    "min_output_tokens": st.sampled_from([0, 1]),
    "from_position": st.just(0),
    "max_events": st.sampled_from([0, 5]),
    "page_size": st.sampled_from([0, 5]),
    "priority": st.sampled_from([0, 1]),
    "seconds": st.just(0),
    "nanos": st.just(0),
}
"""Likely-valid integers by field name; other integers are small."""


def plausible_text(name: str) -> st.SearchStrategy[str]:
    """Values that pass validation more often than not, so calls reach the store."""
    ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,12}", fullmatch=True)
    by_name: dict[str, st.SearchStrategy[str]] = {
        "tenant_id": st.sampled_from(FUZZ_TENANTS),
        "user_id": st.sampled_from(("alice", "bob")),
        "conversation_id": st.sampled_from(("", "c1")),
        "model": st.sampled_from(("gpt-4o", "gpt-4o-mini", "llama-3", "claude-3-5-sonnet")),
        "encoding": st.sampled_from(("", "cl100k_base", "o200k_base")),
        "idempotency_key": st.one_of(
            st.integers(0, 9).map(lambda n: f"{RUN}-{n}"),  # reused: replays and conflicts
            st.builds(lambda: f"{RUN}-{next(KEYS)}"),  # fresh
        ),
        "reservation_id": st.one_of(
            st.sampled_from(HOLDS) if HOLDS else st.nothing(),
            st.uuids().map(lambda u: f"rsv_{u.hex}"),
        ),
        "time_zone": st.sampled_from(("", "UTC", "Europe/Berlin", "America/New_York")),
        "after_cursor": st.sampled_from(("", "1.1", "0.0")),
        "page_token": st.sampled_from(("", "0.0000000000000000", "100.abc")),
        "content": st.text(max_size=300),
        "text": st.text(max_size=300),
        "parameters_json": st.sampled_from(("", "{}", '{"type": "object"}', "[", "null")),
        "tool_call_id": st.just(""),
    }
    return by_name.get(name, st.one_of(ids, st.just("")))


def scalar(field_desc: FD, *, hostile: bool) -> st.SearchStrategy[Any]:
    kind = field_desc.type
    if kind == FD.TYPE_STRING:
        return hostile_text() if hostile else plausible_text(field_desc.name)
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        width = 64 if kind == FD.TYPE_DOUBLE else 32
        return st.floats(width=width) if hostile else st.floats(0, 0.5, width=width)
    if kind == FD.TYPE_ENUM:
        defined = [v.number for v in field_desc.enum_type.values]
        if hostile:
            return st.integers(-(2**31), 2**31 - 1)
        return st.sampled_from([n for n in defined if n] or defined)
    low, high = INT_RANGES[kind]
    if hostile:
        edges = st.sampled_from([low, high, low + 1, high - 1, -1, 0, 1, 10**8, 10**8 + 1])
        return st.one_of(st.integers(low, high), edges.filter(lambda v: low <= v <= high))
    return PLAUSIBLE_INTS.get(field_desc.name, st.sampled_from([0, 1, 10, 100]))


def plausible_timestamp() -> st.SearchStrategy[dict[str, Any]]:
    now = int(datetime.now(UTC).timestamp())
    return st.fixed_dictionaries(
        {"seconds": st.integers(now - 40 * 86_400, now + 3_600), "nanos": st.just(0)}
    )


def field_value(field_desc: FD, depth: int, mode: str) -> st.SearchStrategy[Any]:
    """One field's value: a scalar, a nested message (as a dict), a list or a map. `mode`:
    "plausible" (likely valid; "sparse" the same with fields left out), "hostile" (anything)
    or "mixed" (either, field by field)."""
    if field_desc.type == FD.TYPE_MESSAGE and field_desc.message_type.GetOptions().map_entry:
        entry = field_desc.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        if mode in ("plausible", "sparse") and key.type == FD.TYPE_STRING:
            keys: st.SearchStrategy[Any] = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
            size = 3
        else:
            keys, size = single(key, depth + 1, mode), 40
        entries = st.dictionaries(keys, single(value, depth + 1, mode), max_size=size)
        return entries.map(lambda d: {"__map__": d})
    element = single(field_desc, depth, mode)
    if not field_desc.is_repeated:
        return element
    if mode in ("plausible", "sparse"):
        scalar_items = field_desc.type != FD.TYPE_MESSAGE
        return st.lists(element, max_size=3, unique=scalar_items)
    many = st.lists(element, min_size=20, max_size=300) if mode == "hostile" else st.nothing()
    return st.one_of(st.lists(element, max_size=4), many)


def single(field_desc: FD, depth: int, mode: str) -> st.SearchStrategy[Any]:
    if field_desc.type != FD.TYPE_MESSAGE:
        if mode == "mixed":
            return st.one_of(scalar(field_desc, hostile=False), scalar(field_desc, hostile=True))
        return scalar(field_desc, hostile=mode == "hostile")
    nested = fields_of(field_desc.message_type, depth + 1, mode)
    if field_desc.message_type.full_name == "google.protobuf.Timestamp":
        return plausible_timestamp() if mode in ("plausible", "sparse") else nested
    return nested


def fields_of(
    desc: descriptor.Descriptor, depth: int = 0, mode: str = "mixed"
) -> st.SearchStrategy[dict[str, Any]]:
    """A message as {field name: value}: every field when plausible, else any subset."""
    if depth > 3:
        return st.just({})
    values = {f.name: st.deferred(lambda f=f: field_value(f, depth, mode)) for f in desc.fields}
    if mode == "plausible":
        return st.fixed_dictionaries(values)
    return st.fixed_dictionaries({}, optional=values)


def one_field_hostile(desc: descriptor.Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    """A plausible message with one field replaced by a hostile value."""
    if not desc.fields:
        return st.just({})
    swap = st.sampled_from(list(desc.fields)).flatmap(
        lambda f: st.tuples(st.just(f.name), field_value(f, 0, "hostile"))
    )
    return st.builds(lambda base, kv: {**base, kv[0]: kv[1]}, fields_of(desc, 0, "plausible"), swap)


def requests(desc: descriptor.Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    """Plausible messages (which reach the store), one hostile field in a plausible message
    (which finds what validation misses) and anything at all."""
    plausible = fields_of(desc, 0, "plausible")
    return st.one_of(
        plausible,
        plausible,
        fields_of(desc, 0, "sparse"),
        one_field_hostile(desc),
        fields_of(desc, 0, "mixed"),
        fields_of(desc, 0, "hostile"),
    )


def build(desc: descriptor.Descriptor, values: dict[str, Any]) -> Message:
    msg: Message = message_factory.GetMessageClass(desc)()
    fill(msg, values)
    return msg


def fill(msg: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field_desc = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if isinstance(value, dict) and "__map__" in value:
            for k, v in value["__map__"].items():
                if isinstance(v, dict):
                    fill(target[k], v)
                else:
                    target[k] = v
        elif field_desc.is_repeated:
            for item in value:
                if isinstance(item, dict):
                    fill(target.add(), item)
                else:
                    target.append(item)
        elif isinstance(value, dict):
            target.SetInParent()
            fill(target, value)
        else:
            setattr(msg, name, value)


# --- raw bytes ------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def string_paths(desc: descriptor.Descriptor, depth: int = 0) -> list[list[FD]]:
    """Paths of message fields that end in a string field (map entries included)."""
    paths: list[list[FD]] = []
    for f in desc.fields:
        if f.type == FD.TYPE_STRING:
            paths.append([f])
        elif f.type == FD.TYPE_MESSAGE and depth < 3:
            paths += [[f, *rest] for rest in string_paths(f.message_type, depth + 1)]
    return paths


def with_bad_utf8(raw: bytes, path: list[FD], bad: bytes) -> bytes:
    """`raw` with the string at `path` replaced (or, under repeated fields, joined) by `bad`:
    the last occurrence of a field wins, and an embedded message merges."""
    payload = _length_delimited(path[-1].number, bad)
    for outer in reversed(path[:-1]):
        payload = _length_delimited(outer.number, payload)
    return raw + payload


def raw_requests(desc: descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    valid = requests(desc).map(lambda v: build(desc, v).SerializeToString())
    paths = string_paths(desc)
    variants = [
        st.binary(max_size=300),
        st.builds(lambda raw, cut: raw[: max(0, len(raw) - cut)], valid, st.integers(1, 8)),
        st.builds(
            lambda raw, i, b: raw[:i] + bytes([b]) + raw[i + 1 :] if raw else bytes([b]),
            valid,
            st.integers(0, 400),
            st.integers(0, 255),
        ),
    ]
    if paths:
        variants.append(
            st.builds(with_bad_utf8, valid, st.sampled_from(paths), st.sampled_from(BAD_UTF8))
        )
    return st.one_of(variants)


# --- calling and observing ------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    has_error_info: bool


@dataclass
class Tally:
    """What one RPC's fuzzing sent and saw."""

    codes: Counter[str] = field(default_factory=Counter)
    accepted: set[str] = field(default_factory=set)  # trace ids of calls that succeeded
    refused: set[str] = field(default_factory=set)  # trace ids of calls that failed
    problems: list[str] = field(default_factory=list)


SENT: Counter[str] = Counter()
CODES: dict[str, Counter[str]] = {}


def _has_error_info(exc: grpc.RpcError) -> bool:
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status code
        return False
    return status is not None and any(
        d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details
    )


def send(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, raw: bytes, tally: Tally
) -> Outcome:
    """One call with its own trace id; records what happened."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    trace_id = uuid.uuid4().hex
    metadata = (("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"),)
    SENT[method.full_name] += 1
    code, info = grpc.StatusCode.OK, True
    try:
        if method.server_streaming:
            timeout = FOLLOW_TIMEOUT_S if method.name in NEVER_ENDING else STREAM_TIMEOUT_S
            stream = channel.unary_stream(path, request_serializer=identity)
            call = stream(raw, timeout=timeout, metadata=metadata)
            for n, _ in enumerate(call):
                if n + 1 >= STREAM_MESSAGES_MAX:
                    call.cancel()
                    break
        else:
            unary = channel.unary_unary(path, request_serializer=identity)
            unary(raw, timeout=UNARY_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        # gRPC itself refuses a request over the server's size limit, before any code of ours
        # can add details: its message says so ("Received message larger than max").
        oversize = (
            code is grpc.StatusCode.RESOURCE_EXHAUSTED
            and method.containing_service.name == "LedgerService"
            and len(raw) > message_bytes_max
        )
        info = code in WITHOUT_ERROR_INFO or oversize or _has_error_info(exc)
        # a stream we cancelled, or a follower cut by its deadline, was accepted
        accepted = code is grpc.StatusCode.CANCELLED or (
            code is grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming
        )
        (tally.accepted if accepted else tally.refused).add(trace_id)
    else:
        tally.accepted.add(trace_id)
    tally.codes[code.name] += 1
    CODES.setdefault(method.name, Counter())[code.name] += 1
    if code in FORBIDDEN:
        tally.problems.append(f"{method.name}: {code.name} for {raw[:200]!r}")
    elif not info:
        tally.problems.append(f"{method.name}: {code.name} without ErrorInfo for {raw[:200]!r}")
    return Outcome(code, info)


def events_of_refused_calls(url: str, tally: Tally) -> list[tuple[str, str, str]]:
    """Events (trace id, type, reservation) appended under the trace of a refused call."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT trace_id, event_type, reservation_id FROM events "
            "WHERE trace_id = ANY(%s) AND actor <> %s ORDER BY position",
            (sorted(tally.refused), EXPIRY_ACTOR),
        ).fetchall()


def untraced_events_after(url: str, position: int) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE position > %s AND trace_id = '' AND actor <> %s",
            (position, EXPIRY_ACTOR),
        ).fetchone()
    assert row is not None
    return int(row[0])


def last_position(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
    assert row is not None
    return int(row[0])


def net_effect(events: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Events that leave an effect: a hold the refused call placed and rolled back itself
    (the context service does so when a conversation cannot fit) cancels out."""
    rolled_back = {rid for _, kind, rid in events if kind == "ReservationRolledBack"}
    return [
        e
        for e in events
        if not (e[1] in ("TokensReserved", "ReservationRolledBack") and e[2] in rolled_back)
    ]


# --- fixtures and tests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def context_server(ledger: ServerThread) -> Iterator[ContextServerThread]:
    pool = TokenizerPool(data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers"))
    server = ContextServerThread(ledger.target, pool=pool).start()
    yield server
    server.stop()
    total = sum(SENT.values())
    print(f"\nfuzz: {total} requests over {len(SENT)} RPCs")
    for name, codes in sorted(CODES.items()):
        print(f"  {name}: {dict(codes.most_common())}")


def place_holds(channel: grpc.Channel) -> None:
    stub = pb_grpc.LedgerServiceStub(channel)
    for n in range(30):
        reply = stub.Reserve(
            pb.ReserveRequest(
                idempotency_key=f"{RUN}-hold-{n}",
                tenant_id=FUZZ_TENANTS[n % 2],
                user_id=("alice", "bob")[n % 3 % 2],
                model="gpt-4o",
                amount=100,
                ttl_seconds=3_600,
            ),
            timeout=UNARY_TIMEOUT_S,
        )
        HOLDS.append(reply.reservation.reservation_id)


@pytest.fixture(scope="module")
def channels(
    ledger: ServerThread, context_server: ContextServerThread
) -> Iterator[dict[str, grpc.Channel]]:
    with (
        grpc.insecure_channel(ledger.target) as ledger_channel,
        grpc.insecure_channel(context_server.target) as context_channel,
    ):
        place_holds(ledger_channel)
        yield {
            SERVICES[0].full_name: ledger_channel,
            SERVICES[1].full_name: context_channel,
        }


def _examples(method: descriptor.MethodDescriptor, per_rpc: int) -> int:
    return min(per_rpc, NEVER_ENDING.get(method.name, per_rpc))


FUZZ_SETTINGS = dict(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def check(
    url: str,
    method: descriptor.MethodDescriptor,
    tally: Tally,
    servers: tuple[ServerThread, ContextServerThread],
    since: int,
) -> None:
    assert not tally.problems, "\n".join(tally.problems[:20])
    left = net_effect(events_of_refused_calls(url, tally))
    assert not left, f"refused {method.name} calls appended events: {left[:10]}"
    assert untraced_events_after(url, since) == 0, "events appended without a trace id"
    for target in (servers[0].target, servers[1].target):
        assert health_status(target) == 1, f"{target} is no longer SERVING"  # SERVING


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
@pytest.mark.parametrize("variant", ["fields", "raw"])
def test_fuzzed_requests_are_never_unknown_or_internal_and_refusals_write_nothing(
    method: descriptor.MethodDescriptor,
    variant: str,
    channels: dict[str, grpc.Channel],
    database_url: str,
    ledger: ServerThread,
    context_server: ContextServerThread,
) -> None:
    """Requests from the descriptor (or raw bytes): no UNKNOWN/INTERNAL, every refusal with an
    ErrorInfo, no event from a refused call, both servers still SERVING."""
    if method.client_streaming:
        pytest.fail(f"{method.full_name} streams requests: teach the fuzzer to send streams")
    channel = channels[method.containing_service.full_name]
    tally = Tally()
    since = last_position(database_url)
    desc = method.input_type
    if variant == "fields":
        strategy = requests(desc).map(lambda v: build(desc, v).SerializeToString())
        examples = _examples(method, EXAMPLES_PER_RPC)
    else:
        strategy = raw_requests(desc)
        examples = _examples(method, RAW_EXAMPLES_PER_RPC)

    @settings(max_examples=examples, **FUZZ_SETTINGS)  # type: ignore[arg-type]
    @given(raw=strategy)
    def fuzz(raw: bytes) -> None:
        send(channel, method, raw, tally)

    fuzz()
    check(database_url, method, tally, (ledger, context_server), since)


def test_invalid_utf8_in_a_string_field_is_invalid_argument(
    channels: dict[str, grpc.Channel],
) -> None:
    """A string field that is not UTF-8 does not parse: INVALID_ARGUMENT with ErrorInfo, where
    gRPC alone would say UNKNOWN and quote the exception."""
    method = pb.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name["GetBalance"]
    raw = pb.GetBalanceRequest(tenant_id="t1").SerializeToString()
    bad = with_bad_utf8(raw, [pb.GetBalanceRequest.DESCRIPTOR.fields_by_name["user_id"]], b"\xff")
    outcome = send(channels[method.containing_service.full_name], method, bad, Tally())
    assert outcome == Outcome(grpc.StatusCode.INVALID_ARGUMENT, True)


@pytest.mark.parametrize("field_name", ["model", "encoding"])
def test_long_unknown_model_name_is_invalid_argument(
    channels: dict[str, grpc.Channel], field_name: str
) -> None:
    """A 20,000-character model (or encoding) name is INVALID_ARGUMENT with its ErrorInfo."""
    method = cpb.DESCRIPTOR.services_by_name["ContextService"].methods_by_name["CountTokens"]
    request = cpb.CountTokensRequest(model="gpt-4o", text="hi")
    setattr(request, field_name, "m" * 20_000)
    channel = channels[method.containing_service.full_name]
    outcome = send(channel, method, request.SerializeToString(), Tally())
    assert outcome == Outcome(grpc.StatusCode.INVALID_ARGUMENT, True)


def test_many_malformed_messages_are_invalid_argument(channels: dict[str, grpc.Channel]) -> None:
    """100 messages with an undefined role: INVALID_ARGUMENT with its ErrorInfo."""
    method = cpb.DESCRIPTOR.services_by_name["ContextService"].methods_by_name["CountTokens"]
    request = cpb.CountTokensRequest(
        model="gpt-4o",
        messages=[cpb.ChatMessage(role=99, content="a") for _ in range(100)],  # type: ignore[arg-type]
    )
    channel = channels[method.containing_service.full_name]
    outcome = send(channel, method, request.SerializeToString(), Tally())
    assert outcome == Outcome(grpc.StatusCode.INVALID_ARGUMENT, True)


def test_events_are_found_by_the_trace_id_of_the_call_that_appended_them(
    channels: dict[str, grpc.Channel], database_url: str
) -> None:
    """The attribution the fuzz test relies on: a call's own traceparent is stored with its
    events (were it not, "no event from a refused call" would hold vacuously)."""
    method = pb.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name["RecordUsage"]
    request = pb.RecordUsageRequest(
        idempotency_key=f"{RUN}-attribution",
        tenant_id=FUZZ_TENANTS[0],
        user_id="alice",
        model="gpt-4o",
        usage=pb.Usage(input_tokens=1),
    )
    tally = Tally()
    send(channels[method.containing_service.full_name], method, request.SerializeToString(), tally)
    assert len(tally.accepted) == 1
    tally.refused = tally.accepted  # as if it had been refused
    assert [e[1] for e in events_of_refused_calls(database_url, tally)] == ["UsageRecorded"]


def test_fuzzer_builds_every_field_kind() -> None:
    """The generic builder sets maps, repeated messages, nested timestamps and enums."""
    values = {
        "tenant_id": "t",
        "labels": {"__map__": {"k": "v"}},
        "amount": -(2**63),
    }
    reserve = build(pb.ReserveRequest.DESCRIPTOR, values)
    assert dict(reserve.labels) == {"k": "v"} and reserve.amount == -(2**63)
    prepare = build(
        cpb.PrepareContextRequest.DESCRIPTOR,
        {"messages": [{"role": 99, "content": "\x00"}], "policy": {"system_share": float("nan")}},
    )
    assert prepare.messages[0].role == 99
    usage = build(pb.QueryUsageRequest.DESCRIPTOR, {"query": {"from_time": {"seconds": -(2**63)}}})
    assert usage.query.from_time.seconds == -(2**63)


@pytest.mark.parametrize("char", ["x", "é", "€", "😀"])
def test_an_error_about_a_huge_input_stays_under_the_trailer_limit(
    channels: dict[str, grpc.Channel], char: str
) -> None:
    """A model name of 20,000 four-byte characters and 100 bad messages at once: the error
    still arrives whole, as INVALID_ARGUMENT with its ErrorInfo."""
    method = cpb.DESCRIPTOR.services_by_name["ContextService"].methods_by_name["CountTokens"]
    request = cpb.CountTokensRequest(
        model=char * 20_000,
        messages=[cpb.ChatMessage(role=99, content=char * 300) for _ in range(100)],  # type: ignore[arg-type]
    )
    channel = channels[method.containing_service.full_name]
    outcome = send(channel, method, request.SerializeToString(), Tally())
    assert outcome == Outcome(grpc.StatusCode.INVALID_ARGUMENT, True)
