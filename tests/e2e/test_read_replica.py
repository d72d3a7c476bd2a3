"""DATABASE_URL_READONLY: audit and usage reads go to the read replica's pool, writes, live
balances and the follower feed to the primary. The "replica" here is a second database that
received none of the writes, so every answer shows which one it came from."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import ServerThread, cycle, new_id, scratch_database, stamp


@pytest.fixture
def split(database_url: str, tmp_path: Path) -> Iterator[pb_grpc.LedgerServiceStub]:
    with scratch_database(tmp_path) as replica:
        ledger = ServerThread(database_url, read_url=replica).start()
        try:
            with ledger.stub() as stub:
                yield stub
        finally:
            ledger.stop()


def test_reads_for_audit_and_usage_go_to_the_replica(split: pb_grpc.LedgerServiceStub) -> None:
    tenant = new_id("t")
    cycle(split, tenant, "ann", "c1", 100, 60)
    now = datetime.now(UTC)
    live = split.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann"))
    assert live.balance.used > 0  # the primary has the usage

    query = pb.UsageQuery(tenant_id=tenant, from_time=stamp(now - timedelta(days=1)),
                          to_time=stamp(now + timedelta(hours=1)))  # fmt: skip
    assert not split.QueryUsage(pb.QueryUsageRequest(query=query)).rows
    replayed = list(split.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant)))
    assert replayed[-1].end.events == 0
    verified = split.VerifyAudit(pb.VerifyAuditRequest(tenant_id=tenant))
    assert verified.events_checked == 0


def test_past_balances_and_the_follower_feed_read_the_primary(
    split: pb_grpc.LedgerServiceStub,
) -> None:
    tenant = new_id("t")
    cycle(split, tenant, "ann", "", 100, 60)
    past = split.GetBalance(
        pb.GetBalanceRequest(tenant_id=tenant, user_id="ann", as_of=stamp(datetime.now(UTC)))
    )
    assert past.balance.used > 0
    feed = split.SubscribeEvents(pb.SubscribeEventsRequest(tenant_id=tenant), timeout=5)
    types = []
    try:
        for answer in feed:
            types.append(answer.event.event_type)
            if len(types) == 2:
                break
    finally:
        feed.cancel()
    assert types == ["TokensReserved", "ReservationCommitted"]
    with pytest.raises(grpc.RpcError):  # the cancelled stream is over
        next(feed)
