"""Metrics: the ledger's counters, gauges and RPC durations, read through an in-memory reader
on a real server; and `tokenledger serve` answering GET /metrics in Prometheus form."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.config import ContextSettings
from services.ledger.config import Settings
from services.platform.config import ConfigError, MetricsSettings
from tests.support import (
    Clock,
    LedgerProcess,
    ServerThread,
    call_fails,
    free_port,
    new_id,
    scratch_database,
)

Stub = pb_grpc.LedgerServiceStub
LISTEN, EXPORTER = "TOKENLEDGER_METRICS_LISTEN", "TOKENLEDGER_METRICS_EXPORTER"
Points = dict[str, list[Any]]


@pytest.fixture(scope="module")
def own_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of this module's own: the held gauge sums every tenant, and a sweeper of
    another test's server would expire (and count) holds here."""
    with scratch_database(tmp_path_factory.mktemp("pg-metrics")) as url:
        yield url


@pytest.fixture
def metered(own_database: str) -> Iterator[tuple[ServerThread, InMemoryMetricReader]]:
    """A server on a settable clock, its sweeper idle (the test runs the sweep), measured by
    an in-memory reader."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    server = ServerThread(
        own_database, clock=Clock(), sweep_interval_s=3600, meter_provider=provider
    ).start()
    yield server, reader
    server.stop()
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> Points:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def by_attrs(pts: Points, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """Each point's value (or the point itself, for histograms) by its sorted attributes."""
    return {
        tuple(sorted((p.attributes or {}).items())): getattr(p, "value", p)
        for p in pts.get(name, [])
    }


def counted(pts: Points, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """The counter's series above zero (every series starts at 0)."""
    return {k: v for k, v in by_attrs(pts, name).items() if v}


def reserve(stub: Stub, tenant: str, amount: int, **kw: Any) -> pb.ReserveResponse:
    fields: dict[str, Any] = {
        "idempotency_key": new_id("r"),
        "tenant_id": tenant,
        "user_id": "ann",
        "model": "gpt-4o",
        "amount": amount,
        **kw,
    }
    return stub.Reserve(pb.ReserveRequest(**fields))


def commit(stub: Stub, tenant: str, rid: str, used: int) -> pb.CommitResponse:
    return stub.Commit(
        pb.CommitRequest(tenant_id=tenant, reservation_id=rid, usage=pb.Usage(input_tokens=used))
    )


def held_in_database(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(held), 0) FROM accounts WHERE user_id = ''"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_ledger_outcomes_are_counted_once_with_their_labels(
    metered: tuple[ServerThread, InMemoryMetricReader], own_database: str
) -> None:
    """Grants, partial grants, refusals by reason, expiries (swept and found by a write),
    committed and overage tokens are counted exactly; a retried Reserve counts nothing."""
    server, reader = metered
    budget, swept, touched, limited = (new_id(p) for p in ("tb", "ts", "tt", "tl"))
    with server.stub() as stub:
        stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=new_id("q"), tenant_id=budget, user_id="ann", limit=1_000,
                period=pb.PERIOD_DAY,
            )
        )  # fmt: skip
        first = pb.ReserveRequest(
            idempotency_key=new_id("r"), tenant_id=budget, user_id="ann", model="gpt-4o",
            amount=600, ttl_seconds=3_600,
        )  # fmt: skip
        r1 = stub.Reserve(first)
        assert stub.Reserve(first) == r1  # a retry: answered from its record
        r2 = reserve(stub, budget, 600, min_amount=100, ttl_seconds=3_600)
        assert r2.reservation.amount == 400
        assert call_fails(stub.Reserve, pb.ReserveRequest(
            idempotency_key=new_id("r"), tenant_id=budget, user_id="ann", model="gpt-4o",
            amount=100,
        )).reason == "BUDGET_EXHAUSTED"  # fmt: skip
        assert commit(stub, budget, r1.reservation.reservation_id, 700).overage == 100

        stub.SetRateLimit(
            pb.SetRateLimitRequest(
                idempotency_key=new_id("rl"), tenant_id=limited, tokens_per_minute=100
            )
        )
        reserve(stub, limited, 100, ttl_seconds=3_600)
        assert call_fails(stub.Reserve, pb.ReserveRequest(
            idempotency_key=new_id("r"), tenant_id=limited, user_id="ann", model="gpt-4o",
            amount=1,
        )).reason == "RATE_LIMITED"  # fmt: skip
        bad = call_fails(stub.Reserve, pb.ReserveRequest(tenant_id=budget, amount=1))
        assert bad.reason == "INVALID_ARGUMENT"

        late = reserve(stub, swept, 50, ttl_seconds=30)
        reserve(stub, touched, 70, ttl_seconds=30)
        server.clock.advance(31)
        assert server.run(server.server.store.expire_overdue()) == 2  # the sweeper's pass
        reserve(stub, touched, 20, ttl_seconds=3_600)
        assert commit(stub, swept, late.reservation.reservation_id, 80).late

    pts = points(reader)
    assert counted(pts, "tokenledger.reservations") == {
        (("outcome", "granted"),): 5,
        (("outcome", "partial"),): 1,
    }
    assert counted(pts, "tokenledger.refusals") == {
        (("reason", "BUDGET_EXHAUSTED"),): 1,
        (("reason", "RATE_LIMITED"),): 1,
        (("reason", "INVALID_ARGUMENT"),): 1,
    }
    assert set(by_attrs(pts, "tokenledger.refusals")) >= {
        (("reason", r),) for r in ("IDEMPOTENCY_KEY_REUSED", "STORE_UNAVAILABLE")
    }  # at 0: every reason has its series from the start
    assert by_attrs(pts, "tokenledger.expiries") == {(): 2}
    assert by_attrs(pts, "tokenledger.overage.tokens") == {(): 100}
    # within the hold 600 of 700, and all 80 of the late commit
    assert by_attrs(pts, "tokenledger.committed.tokens") == {(): 680}


def test_rpc_durations_pool_and_held_gauges(
    metered: tuple[ServerThread, InMemoryMetricReader], own_database: str
) -> None:
    """Each RPC's duration is recorded by method and status code; the pool gauges come from
    the pool; the held gauge, once refreshed, equals the tenant rows' sum in the database."""
    server, reader = metered
    tenant = new_id("t")
    with server.stub() as stub:
        stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=new_id("q"), tenant_id=tenant, limit=500, period=pb.PERIOD_DAY
            )
        )
        reserve(stub, tenant, 300, ttl_seconds=3_600)
        reserve(stub, tenant, 200, ttl_seconds=3_600)
        with pytest.raises(grpc.RpcError):
            reserve(stub, tenant, 1)
    held = server.run(server.server.metrics.refresh_held(server.server.store))
    assert held == held_in_database(own_database) and held >= 500

    pts = points(reader)
    durations = by_attrs(pts, "tokenledger.rpc.duration")
    ok = durations[(("code", "OK"), ("rpc", "Reserve"))]
    refused = durations[(("code", "RESOURCE_EXHAUSTED"), ("rpc", "Reserve"))]
    assert (ok.count, refused.count) == (2, 1)
    assert 0 < ok.sum < 10 and ok.min > 0
    assert durations[(("code", "OK"), ("rpc", "SetQuota"))].count == 1
    assert by_attrs(pts, "tokenledger.held.tokens") == {(): held}
    size = by_attrs(pts, "tokenledger.db.pool.size")[()]
    available = by_attrs(pts, "tokenledger.db.pool.available")[()]
    assert 1 <= size <= 10 and 0 <= available <= size
    assert by_attrs(pts, "tokenledger.db.pool.waiting") == {(): 0}


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        body: bytes = reply.read()
    return body.decode()


def test_serve_exposes_prometheus_metrics(database_url: str, tmp_path: Path) -> None:
    """`tokenledger serve` with TOKENLEDGER_METRICS_LISTEN answers GET /metrics; a Reserve
    shows in tokenledger_reservations_total and the RPC duration histogram."""
    address = f"127.0.0.1:{free_port()}"
    proc = LedgerProcess(database_url, tmp_path / "serve.log", TOKENLEDGER_METRICS_LISTEN=address)
    proc.start()
    try:
        with grpc.insecure_channel(proc.target) as channel:
            reserve(pb_grpc.LedgerServiceStub(channel), new_id("t"), 10)
        text = scrape(address)
    finally:
        proc.stop()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in "#")
    scope = 'otel_scope_name="tokenledger",otel_scope_schema_url="",otel_scope_version=""'
    assert samples[f'tokenledger_reservations_total{{{scope},outcome="granted"}}'] == "1.0"
    assert samples[f"tokenledger_expiries_total{{{scope}}}"] == "0.0"
    assert any(
        k.startswith("tokenledger_rpc_duration_seconds_count{") and 'rpc="Reserve"' in k
        for k in samples
    )
    for name in ("tokenledger_db_pool_size", "tokenledger_held_tokens", "process_cpu_seconds"):
        assert any(k.startswith(name) for k in samples), name


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, MetricsSettings("none", "")),
        ({LISTEN: "127.0.0.1:9464"}, MetricsSettings("prometheus", "127.0.0.1:9464")),
        ({EXPORTER: "otlp"}, MetricsSettings("otlp", "")),
        (
            {EXPORTER: "Prometheus+OTLP", LISTEN: "[::1]:9464"},
            MetricsSettings("prometheus+otlp", "[::1]:9464"),
        ),
    ],
)
def test_metrics_settings(env: dict[str, str], expected: MetricsSettings) -> None:
    """Only the address set means Prometheus; OTLP needs no address."""
    assert MetricsSettings.from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({EXPORTER: "statsd"}, "must be one of none, prometheus, otlp, prometheus+otlp"),
        ({EXPORTER: "prometheus"}, "set TOKENLEDGER_METRICS_LISTEN"),
        ({EXPORTER: "otlp", LISTEN: "127.0.0.1:9464"}, "serves no /metrics"),
        ({EXPORTER: "none", LISTEN: "127.0.0.1:9464"}, "serves no /metrics"),
        ({LISTEN: "9464"}, "must be host:port"),
        ({LISTEN: "localhost:http"}, "must be host:port"),
        ({LISTEN: "localhost:70000"}, "must be host:port"),
    ],
)
def test_bad_metrics_settings_are_refused(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        MetricsSettings.from_env(env)


def test_context_service_reads_its_own_metrics_address() -> None:
    """Both processes run side by side under `make run`: each has its own /metrics port."""
    env = {LISTEN: "127.0.0.1:9464", "TOKENLEDGER_CONTEXT_METRICS_LISTEN": "127.0.0.1:9465"}
    assert ContextSettings.from_env(env).metrics == MetricsSettings("prometheus", "127.0.0.1:9465")
    assert Settings.from_env(env).metrics == MetricsSettings("prometheus", "127.0.0.1:9464")
