"""Guards against hostile or runaway callers (services/platform/guards.py), on real servers: a call
without a deadline still ends (the server's default), streams are bounded, a caller over its
cap of calls in flight is refused while others are served, and requests over the message cap
are refused by gRPC before they reach the service."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import TokenizerPool
from services.ledger.server import LedgerServer, message_bytes_max
from services.platform import db
from services.platform.config import ConfigError, guards_from_env
from services.platform.guards import PRINCIPAL, Guards, caller_of
from tests.support import (
    ContextServerThread,
    ServerThread,
    call_fails,
    failure,
    health_status,
    new_id,
)

REPO = Path(__file__).resolve().parents[2]
SERVING = 1
GUARDS = Guards(deadline_s=1.0, stream_deadline_s=1.5, caller_calls_max=2)
PATIENT_S = 30.0
"""A client deadline far beyond the guarded server's defaults."""


class GuardedServer(ServerThread):
    """A ledger server with guards of its own (short defaults, a small cap)."""

    def __init__(self, url: str, guards: Guards) -> None:
        super().__init__(url)
        self.guards = guards

    async def _start(self) -> None:
        self.pool = db.make_pool(self.url, 10)
        await self.pool.open(wait=True, timeout=10)
        self.server = LedgerServer(
            self.pool, sweep_interval_s=self.sweep_interval_s, guards=self.guards
        )
        self.port = await self.server.start("127.0.0.1:0")


@pytest.fixture(scope="module")
def guarded(database_url: str) -> Iterator[GuardedServer]:
    server = GuardedServer(database_url, GUARDS)
    server.start()
    yield server
    server.stop()


def record_usage(stub: pb_grpc.LedgerServiceStub, tenant: str, user: str = "u") -> None:
    """An event on the tenant, which also creates its account row."""
    stub.RecordUsage(
        pb.RecordUsageRequest(
            idempotency_key=new_id("u"),
            tenant_id=tenant,
            user_id=user,
            model="m",
            usage=pb.Usage(input_tokens=1),
        ),
        timeout=PATIENT_S,
    )


LOCK_TENANT = "SELECT 1 FROM accounts WHERE tenant_id = %s AND user_id = '' FOR UPDATE"


def reserved_events(url: str, key: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE event_type = 'TokensReserved' "
            "AND idempotency_key = %s",
            (key,),
        ).fetchone()
    assert row is not None
    return int(row[0])


# --- deadlines ----------------------------------------------------------------------------------


def test_a_call_without_deadline_ends_at_the_server_default(
    guarded: GuardedServer, database_url: str
) -> None:
    """A Reserve stuck on a row lock, sent with no deadline, ends DEADLINE_EXCEEDED after the
    server's 1 s default; once the lock is free the retry converges on one reservation."""
    tenant = new_id("t")
    request = pb.ReserveRequest(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id="u", model="m", amount=10
    )
    with guarded.stub() as stub:
        record_usage(stub, tenant)
        with psycopg.connect(database_url) as blocker:
            blocker.execute(LOCK_TENANT, (tenant,))
            started = time.monotonic()
            refused = call_fails(stub.Reserve, request)  # no timeout
            waited = time.monotonic() - started
        assert refused.code is grpc.StatusCode.DEADLINE_EXCEEDED, refused
        assert refused.reason == "DEADLINE_EXCEEDED"
        assert refused.metadata == {"deadline_s": "1", "source": "server default"}
        assert 0.9 <= waited < 5, waited
        retried = stub.Reserve(request, timeout=PATIENT_S)
        assert stub.Reserve(request, timeout=PATIENT_S) == retried
    assert reserved_events(database_url, request.idempotency_key) == 1


def test_a_client_deadline_longer_than_the_default_is_honoured(
    guarded: GuardedServer, database_url: str
) -> None:
    """The default applies only to calls without a deadline: a call whose client allows 30 s
    waits out a 2 s lock and succeeds."""
    tenant = new_id("t")
    locked = threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(database_url) as blocker:
            blocker.execute(LOCK_TENANT, (tenant,))
            locked.set()
            time.sleep(2.0)

    with guarded.stub() as stub:
        record_usage(stub, tenant)
        holder = threading.Thread(target=hold_lock)
        holder.start()
        assert locked.wait(10)
        started = time.monotonic()
        reply = stub.Reserve(
            pb.ReserveRequest(
                idempotency_key=new_id("k"), tenant_id=tenant, user_id="u", model="m", amount=5
            ),
            timeout=PATIENT_S,
        )
        waited = time.monotonic() - started
        holder.join()
    assert reply.reservation.amount == 5
    assert waited > GUARDS.deadline_s


def test_a_never_ending_stream_without_deadline_ends_at_the_stream_default(
    guarded: GuardedServer,
) -> None:
    """SubscribeEvents follows the log forever; without a client deadline it delivers what
    there is, then ends DEADLINE_EXCEEDED at the server's stream default (1.5 s here)."""
    tenant = new_id("t")
    with guarded.stub() as stub:
        record_usage(stub, tenant)
        started = time.monotonic()
        received = []
        stream = stub.SubscribeEvents(pb.SubscribeEventsRequest(tenant_id=tenant))
        with pytest.raises(grpc.RpcError) as ended:
            for reply in stream:
                received.append(reply.event.event_type)
        waited = time.monotonic() - started
    assert received == ["UsageRecorded"]
    assert failure(ended.value).code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure(ended.value).metadata["deadline_s"] == "1.5"
    assert 1.4 <= waited < 6, waited


def test_replay_history_stops_at_max_events_and_says_where_to_go_on(
    guarded: GuardedServer,
) -> None:
    """A replay is bounded: max_events=3 of 5 events sends 3, and its end says incomplete."""
    tenant = new_id("t")
    with guarded.stub() as stub:
        for _ in range(5):
            record_usage(stub, tenant)
        replies = list(
            stub.ReplayHistory(
                pb.ReplayHistoryRequest(tenant_id=tenant, max_events=3), timeout=PATIENT_S
            )
        )
    events = [e for r in replies for e in r.events]
    end = replies[-1].end
    assert len(events) == 3 and end.events == 3 and not end.complete
    assert end.last_position == events[-1].position


def test_a_context_call_without_deadline_ends_at_the_context_default(
    ledger: ServerThread, database_url: str
) -> None:
    """The context service has the same guard: PrepareContext waiting on a ledger that waits
    on a lock ends DEADLINE_EXCEEDED at its own default (0.5 s here, the ledger call's own
    timeout being 5 s)."""
    pool = TokenizerPool(data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers"))
    context = ContextServerThread(
        ledger.target, pool=pool, guards=Guards(deadline_s=0.5), ledger_timeout_s=5.0
    ).start()
    tenant = new_id("t")
    request = cpb.PrepareContextRequest(
        idempotency_key=new_id("p"),
        tenant_id=tenant,
        user_id="u",
        model="gpt-4o",
        messages=[cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content="Hello there")],
        max_output_tokens=50,
    )
    try:
        with ledger.stub() as stub:
            record_usage(stub, tenant)
        with context.stub() as ctx:
            ctx.CountTokens(cpb.CountTokensRequest(model="gpt-4o", text="warm up"), timeout=60)
            with psycopg.connect(database_url) as blocker:
                blocker.execute(LOCK_TENANT, (tenant,))
                started = time.monotonic()
                refused = call_fails(ctx.PrepareContext, request)
                waited = time.monotonic() - started
    finally:
        context.stop()
    assert refused.code is grpc.StatusCode.DEADLINE_EXCEEDED, refused
    assert refused.metadata.get("deadline_s") == "0.5"
    assert waited < 4, waited


# --- concurrency per caller -----------------------------------------------------------------


def _open_streams(channel: grpc.Channel, tenant: str, caller: str | None, n: int) -> list[Any]:
    """`n` SubscribeEvents calls in flight for `caller` (each has delivered its first event)."""
    stub = pb_grpc.LedgerServiceStub(channel)
    metadata = (("x-caller", caller),) if caller else ()
    streams = []
    for _ in range(n):
        stream = stub.SubscribeEvents(
            pb.SubscribeEventsRequest(tenant_id=tenant), timeout=PATIENT_S, metadata=metadata
        )
        next(stream)
        streams.append(stream)
    return streams


def _balance(stub: pb_grpc.LedgerServiceStub, tenant: str, caller: str | None) -> Any:
    metadata = (("x-caller", caller),) if caller else ()
    return stub.GetBalance(
        pb.GetBalanceRequest(tenant_id=tenant), timeout=PATIENT_S, metadata=metadata
    )


def test_a_caller_over_its_cap_is_refused_while_another_is_served(guarded: GuardedServer) -> None:
    """With 2 calls in flight (open streams), caller "greedy" is refused a third with
    RESOURCE_EXHAUSTED, TOO_MANY_CALLS and RetryInfo; caller "modest" and health checks are
    served; once one stream ends, greedy is served again."""
    tenant = new_id("t")
    with grpc.insecure_channel(guarded.target) as channel:
        stub = pb_grpc.LedgerServiceStub(channel)
        record_usage(stub, tenant)
        streams = _open_streams(channel, tenant, "greedy", GUARDS.caller_calls_max)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                _balance(stub, tenant, "greedy")
            said = failure(refused.value)
            assert said.code is grpc.StatusCode.RESOURCE_EXHAUSTED, said
            assert said.reason == "TOO_MANY_CALLS"
            assert said.metadata == {"caller": "caller:greedy", "in_flight": "2", "calls_max": "2"}
            assert said.retry_delay_s == pytest.approx(0.2)
            assert _balance(stub, tenant, "modest").balance.tenant_id == tenant
            assert health_status(guarded.target) == SERVING
            streams.pop().cancel()
            deadline = time.monotonic() + 5
            while True:  # the server notices the cancellation a moment later
                try:
                    _balance(stub, tenant, "greedy")
                    break
                except grpc.RpcError as exc:
                    assert failure(exc).reason == "TOO_MANY_CALLS"
                    assert time.monotonic() < deadline, "greedy is still refused"
                    time.sleep(0.05)
        finally:
            for stream in streams:
                stream.cancel()


def test_unnamed_callers_count_by_their_host(guarded: GuardedServer) -> None:
    """Without x-caller (and without authentication) a caller is its peer host: streams over
    two connections from 127.0.0.1 share one cap."""
    tenant = new_id("t")
    with (
        grpc.insecure_channel(guarded.target) as first,
        grpc.insecure_channel(
            guarded.target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as second,
    ):
        record_usage(pb_grpc.LedgerServiceStub(first), tenant)
        streams = _open_streams(first, tenant, None, 1) + _open_streams(second, tenant, None, 1)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                _balance(pb_grpc.LedgerServiceStub(second), tenant, None)
            said = failure(refused.value)
            assert (said.reason, said.metadata["caller"]) == (
                "TOO_MANY_CALLS",
                "peer:ipv4:127.0.0.1",
            )
        finally:
            for stream in streams:
                stream.cancel()


class _FakeContext:
    """What caller_of reads of a gRPC servicer context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata, self._peer = metadata, peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("principal", "metadata", "peer", "caller"),
    [
        (
            "0123456789abcdef",
            (("x-caller", "batch"),),
            "ipv4:10.0.0.1:5000",
            "key:0123456789abcdef",
        ),
        ("", (("x-caller", "batch"),), "ipv4:10.0.0.1:5000", "caller:batch"),
        ("", (("x-caller", "b" * 500),), "ipv4:10.0.0.1:5000", "caller:" + "b" * 121),
        ("", (), "ipv4:10.0.0.1:5000", "peer:ipv4:10.0.0.1"),
        ("", (), "ipv6:[::1]:5000", "peer:ipv6:[::1]"),
        ("", (), "unix:/tmp/s", "peer:unix:/tmp/s"),
    ],
)
def test_caller_is_the_key_then_x_caller_then_the_peer_host(
    principal: str, metadata: tuple[tuple[str, str], ...], peer: str, caller: str
) -> None:
    """caller_of: the authenticated key id wins over x-caller, which wins over the peer host
    (without its port); names are cut to 128 characters."""
    token = PRINCIPAL.set(principal)
    try:
        assert caller_of(_FakeContext(metadata, peer)) == caller  # type: ignore[arg-type]
    finally:
        PRINCIPAL.reset(token)


# --- message size -----------------------------------------------------------------------------


def test_a_request_over_the_message_cap_is_refused_by_grpc_and_writes_nothing(
    stub: pb_grpc.LedgerServiceStub, database_url: str
) -> None:
    """A Reserve of more than 1 MiB (a huge label) is RESOURCE_EXHAUSTED from gRPC itself,
    before any of our code runs, and appends nothing."""
    tenant = new_id("t")
    request = pb.ReserveRequest(
        idempotency_key=new_id("k"),
        tenant_id=tenant,
        user_id="u",
        model="m",
        amount=1,
        labels={"blob": "x" * message_bytes_max},
    )
    assert request.ByteSize() > message_bytes_max
    refused = call_fails(stub.Reserve, request)
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert reserved_events(database_url, request.idempotency_key) == 0


# --- settings ---------------------------------------------------------------------------------


def test_guard_settings_come_from_the_environment() -> None:
    """Defaults, overrides, 0 turning the cap off, and refusals of unusable values."""
    assert guards_from_env({}) == Guards(30.0, 3_600.0, 256)
    assert guards_from_env({}, deadline_s=60.0).deadline_s == 60.0
    env = {
        "TOKENLEDGER_DEFAULT_DEADLINE_S": "2.5",
        "TOKENLEDGER_STREAM_DEADLINE_S": "600",
        "TOKENLEDGER_CALLER_CONCURRENCY_MAX": "0",
    }
    assert guards_from_env(env) == Guards(2.5, 600.0, 0)
    for name, value in [
        ("TOKENLEDGER_DEFAULT_DEADLINE_S", "0"),
        ("TOKENLEDGER_DEFAULT_DEADLINE_S", "soon"),
        ("TOKENLEDGER_STREAM_DEADLINE_S", "-1"),
        ("TOKENLEDGER_CALLER_CONCURRENCY_MAX", "-5"),
    ]:
        with pytest.raises(ConfigError, match=name):
            guards_from_env({name: value})
