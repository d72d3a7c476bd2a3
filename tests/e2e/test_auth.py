"""Authentication and roles (issue #6) through real servers: API keys (missing, malformed,
unknown, revoked through the CLI while the server runs), the role each RPC needs, the '*'
scope, mTLS (client certificates required and verified), the context service calling the
ledger with its own key, the actor recorded in events, and the loud warning when auth is off.
Tenant isolation RPC by RPC is in test_tenant_isolation.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.context.tokenizer_data import DATA_DIR_ENV
from services.context.tokenizers import TokenizerPool
from services.platform import db
from services.platform.auth import (
    ClientAuth,
    make_authenticator,
    parse_token,
    server_credentials,
    warn_if_off,
)
from services.platform.config import AuthSettings, ConfigError
from services.platform.key_cache import revocation_bound_s
from tests.certs import CertAuthority, Pair
from tests.support import (
    TOKENLEDGER,
    ApiKey,
    ContextServerThread,
    LedgerProcess,
    ServerThread,
    call_fails,
    create_key,
    failure,
    new_id,
    register_cert,
)

REPO = Path(__file__).resolve().parents[2]
Stub = pb_grpc.LedgerServiceStub
CALL_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def auth_ledger(database_url: str) -> Iterator[ServerThread]:
    server = ServerThread(database_url, auth_mode="api_key").start()
    yield server
    server.stop()


@pytest.fixture
def tenant() -> str:
    return new_id("t")


def _stub(target: str, key: ApiKey | None = None, **tls: Any) -> Any:
    """A blocking ledger stub sending `key` (if any), over TLS when `tls` names the files."""
    channel = ClientAuth(api_key=key.token if key else "", **tls).channel(target)
    return channel, pb_grpc.LedgerServiceStub(channel)


def _reserve(tenant: str, amount: int = 10) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        idempotency_key=new_id("k"), tenant_id=tenant, user_id="u", model="gpt-4o", amount=amount
    )


def _actors(url: str, tenant: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT DISTINCT actor FROM events WHERE tenant_id = %s", (tenant,))
        return {r[0] for r in rows}


def _refused(fn: Any, request: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    how = call_fails(lambda r: fn(r, timeout=CALL_TIMEOUT_S), request)
    return how.code, how.reason, how.metadata


# --- API keys --------------------------------------------------------------------------------


def test_a_call_without_a_key_is_unauthenticated_and_health_stays_open(
    auth_ledger: ServerThread, tenant: str
) -> None:
    channel, stub = _stub(auth_ledger.target)
    with channel:
        code, reason, _ = _refused(stub.Reserve, _reserve(tenant))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer nonsense",
        "Basic dXNlcjpwYXNz",
        "Bearer " + "tlk_" + "0" * 16 + "_" + "1" * 64,  # well formed, unknown id
        "Bearer",
    ],
)
def test_a_malformed_or_unknown_key_is_unauthenticated(
    auth_ledger: ServerThread, database_url: str, tenant: str, authorization: str
) -> None:
    with grpc.insecure_channel(auth_ledger.target) as channel:
        how = call_fails(
            lambda r: Stub(channel).Reserve(r, metadata=(("authorization", authorization),)),
            _reserve(tenant),
        )
    assert (how.code, how.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert _actors(database_url, tenant) == set()


def test_a_known_key_id_with_a_wrong_secret_is_unauthenticated(
    auth_ledger: ServerThread, database_url: str, tenant: str
) -> None:
    key = create_key(database_url, tenant, "writer")
    forged = ApiKey(key.key_id, key.token[:-4] + ("0000" if key.token[-4:] != "0000" else "1111"))
    channel, stub = _stub(auth_ledger.target, forged)
    with channel:
        code, reason, _ = _refused(stub.Reserve, _reserve(tenant))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_the_callers_key_id_is_the_actor_of_every_event_it_appends(
    auth_ledger: ServerThread, database_url: str, tenant: str
) -> None:
    key = create_key(database_url, tenant, "writer")
    channel, stub = _stub(auth_ledger.target, key)
    with channel:
        rid = stub.Reserve(_reserve(tenant)).reservation.reservation_id
        stub.Commit(
            pb.CommitRequest(tenant_id=tenant, reservation_id=rid, usage=pb.Usage(input_tokens=3))
        )
    assert _actors(database_url, tenant) == {f"key:{key.key_id}"}


WRITER_RPCS = {
    "Reserve": lambda t, rid: _reserve(t),
    "Commit": lambda t, rid: pb.CommitRequest(
        tenant_id=t, reservation_id=rid, usage=pb.Usage(input_tokens=1)
    ),
    "Rollback": lambda t, rid: pb.RollbackRequest(tenant_id=t, reservation_id=rid),
    "RecordUsage": lambda t, rid: pb.RecordUsageRequest(
        idempotency_key=new_id("u"),
        tenant_id=t,
        user_id="u",
        model="gpt-4o",
        usage=pb.Usage(output_tokens=2),
    ),
}


@pytest.mark.parametrize("rpc", sorted(WRITER_RPCS))
def test_a_reader_cannot_write(
    rpc: str, auth_ledger: ServerThread, database_url: str, tenant: str
) -> None:
    writer = create_key(database_url, tenant, "writer")
    reader = create_key(database_url, tenant, "reader", "auditor")
    w_channel, w_stub = _stub(auth_ledger.target, writer)
    r_channel, r_stub = _stub(auth_ledger.target, reader)
    with w_channel, r_channel:
        rid = w_stub.Reserve(_reserve(tenant)).reservation.reservation_id
        before = _actors(database_url, tenant)
        code, reason, metadata = _refused(getattr(r_stub, rpc), WRITER_RPCS[rpc](tenant, rid))
        r_stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="u"))  # it can read
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert metadata["required_roles"] == "writer"
    assert _actors(database_url, tenant) == before


def test_a_writer_reads_its_tenants_output_stats_and_no_other_tenants(
    auth_ledger: ServerThread, database_url: str, tenant: str
) -> None:
    """GetOutputStats admits writers (the context service sizes holds with its writer key),
    scoped to their tenant like every call."""
    writer = create_key(database_url, tenant, "writer")
    ask = pb.GetOutputStatsRequest(tenant_id=tenant, user_id="u", model="gpt-4o")
    channel, stub = _stub(auth_ledger.target, writer)
    with channel:
        assert stub.GetOutputStats(ask).scope == pb.OUTPUT_STATS_SCOPE_NONE
        ask.tenant_id = new_id("other")
        code, _, _ = _refused(stub.GetOutputStats, ask)
    assert code == grpc.StatusCode.PERMISSION_DENIED


ADMIN_RPCS = {
    "SetQuota": lambda t: pb.SetQuotaRequest(
        idempotency_key=new_id("q"), tenant_id=t, limit=1_000, period=pb.PERIOD_DAY
    ),
    "SetRateLimit": lambda t: pb.SetRateLimitRequest(
        idempotency_key=new_id("r"), tenant_id=t, tokens_per_minute=100
    ),
    "GrantTokens": lambda t: pb.GrantTokensRequest(
        idempotency_key=new_id("g"), tenant_id=t, user_id="u", amount=5, reason="r"
    ),
    "AdjustBalance": lambda t: pb.AdjustBalanceRequest(
        idempotency_key=new_id("a"), tenant_id=t, user_id="u", tokens=5, reason="r"
    ),
}


@pytest.mark.parametrize("rpc", sorted(ADMIN_RPCS))
def test_a_writer_cannot_set_quotas_grant_or_adjust_and_an_admin_can(
    rpc: str, auth_ledger: ServerThread, database_url: str, tenant: str
) -> None:
    writer = create_key(database_url, tenant, "writer", "reader", "auditor")
    admin = create_key(database_url, tenant, "admin")
    w_channel, w_stub = _stub(auth_ledger.target, writer)
    a_channel, a_stub = _stub(auth_ledger.target, admin)
    with w_channel, a_channel:
        code, reason, metadata = _refused(getattr(w_stub, rpc), ADMIN_RPCS[rpc](tenant))
        assert _actors(database_url, tenant) == set()
        getattr(a_stub, rpc)(ADMIN_RPCS[rpc](tenant))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert metadata["required_roles"] == "admin"
    assert _actors(database_url, tenant) == {f"key:{admin.key_id}"}


def test_an_auditor_replays_and_verifies_and_a_reader_cannot(
    auth_ledger: ServerThread, database_url: str, tenant: str
) -> None:
    writer = create_key(database_url, tenant, "writer")
    auditor = create_key(database_url, tenant, "auditor")
    reader = create_key(database_url, tenant, "reader")
    channels = [_stub(auth_ledger.target, k) for k in (writer, auditor, reader)]
    (wc, w), (ac, a), (rc, r) = channels
    with wc, ac, rc:
        w.Reserve(_reserve(tenant))
        replay = list(a.ReplayHistory(pb.ReplayHistoryRequest(tenant_id=tenant)))
        report = a.VerifyAudit(pb.VerifyAuditRequest(tenant_id=tenant))
        balance = a.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="u"))
        refused = [
            _refused(lambda req, **kw: list(r.ReplayHistory(req, **kw)),
                     pb.ReplayHistoryRequest(tenant_id=tenant)),
            _refused(r.VerifyAudit, pb.VerifyAuditRequest(tenant_id=tenant)),
        ]  # fmt: skip
    assert replay[-1].end.events == 1 and report.chains_ok and report.projections_match
    assert balance.balance.held == 10
    assert {(code, meta["required_roles"]) for code, _, meta in refused} == {
        (grpc.StatusCode.PERMISSION_DENIED, "auditor")
    }


def test_a_star_key_acts_on_every_tenant_and_alone_may_follow_all_tenants(
    auth_ledger: ServerThread, database_url: str
) -> None:
    t1, t2 = new_id("t"), new_id("t")
    star = create_key(database_url, "*", "writer", "reader")
    scoped = create_key(database_url, t1, "reader")
    sc, s = _stub(auth_ledger.target, star)
    oc, o = _stub(auth_ledger.target, scoped)
    with sc, oc:
        for t in (t1, t2):
            s.Reserve(_reserve(t))
            assert s.GetBalance(pb.GetBalanceRequest(tenant_id=t, user_id="u")).balance.held == 10
        stream = s.SubscribeEvents(pb.SubscribeEventsRequest(), timeout=CALL_TIMEOUT_S)
        first = next(stream)
        stream.cancel()
        code, _, metadata = _refused(
            lambda req, **kw: next(o.SubscribeEvents(req, **kw)), pb.SubscribeEventsRequest()
        )
    assert first.event.position > 0
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert metadata["tenant_id"] == "*"


def test_an_open_event_stream_ends_soon_after_its_key_is_revoked(
    database_url: str, tenant: str
) -> None:
    """SubscribeEvents never ends by itself: the stream re-checks its key (here every 0.2 s)
    and ends with UNAUTHENTICATED once the key is revoked, while another key's goes on."""
    ledger = ServerThread(database_url, auth_mode="api_key", stream_recheck_s=0.2).start()
    key = create_key(database_url, tenant, "reader", "writer")
    other = create_key(database_url, tenant, "reader")
    try:
        channel, stub = _stub(ledger.target, key)
        o_channel, o_stub = _stub(ledger.target, other)
        with channel, o_channel:
            stub.Reserve(_reserve(tenant))
            request = pb.SubscribeEventsRequest(tenant_id=tenant)
            stream = stub.SubscribeEvents(request, timeout=CALL_TIMEOUT_S)
            # The feed shows an event once every older transaction in the cluster has ended
            # (ledger/audit.py, follow), so a slow one elsewhere can hold it back a while.
            survivor = o_stub.SubscribeEvents(request, timeout=6 * CALL_TIMEOUT_S)
            assert next(stream).event.tenant_id == tenant
            assert next(survivor).event.tenant_id == tenant
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key.key_id,)
                )
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            waited_s = time.monotonic() - started
            writer, w_stub = _stub(ledger.target, create_key(database_url, tenant, "writer"))
            with writer:
                w_stub.Reserve(_reserve(tenant))
            assert next(survivor).event.event_type == "TokensReserved"
            survivor.cancel()
    finally:
        ledger.stop()
    assert failure(ended.value).code == grpc.StatusCode.UNAUTHENTICATED
    assert waited_s < 2


# --- the CLI, the stored hash, revocation, logs (a real `tokenledger serve` process) ----------


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DATABASE_URL": url, "TOKENLEDGER_LOG_FORMAT": "json"}
    return subprocess.run(
        [str(TOKENLEDGER), "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_keys_cli_shows_the_secret_once_stores_its_hash_and_a_revoked_key_stops(
    database_url: str, tmp_path: Path
) -> None:
    """Through a `tokenledger serve` process: the key the CLI made works; after
    `tokenledger keys revoke`, calls are refused (once the revocation's notification reached the
    server's key cache: test_key_revocation.py measures that bound); no log line holds the
    secret."""
    tenant = new_id("t")
    server = LedgerProcess(
        database_url, tmp_path / "ledger.log", TOKENLEDGER_AUTH="api_key",
        TOKENLEDGER_LOG_LEVEL="debug",
    )  # fmt: skip
    created = _cli(
        database_url, "create", "--tenant", tenant, "--role", "writer", "--role", "admin",
        "--name", "ci-job",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    parsed = parse_token(token)
    assert parsed is not None, created.stdout
    key_id, secret = parsed
    listed = _cli(database_url, "list", "--tenant", tenant)
    assert key_id in listed.stdout and "ci-job" in listed.stdout
    assert secret not in listed.stdout + listed.stderr + created.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT t::text, secret_sha256 FROM api_keys t WHERE key_id = %s", (key_id,)
        ).fetchone()
    assert row is not None
    assert bytes(row[1]) == hashlib.sha256(secret.encode()).digest()
    assert secret not in row[0]  # the whole row, as text: only the hash

    server.start()
    try:
        channel, stub = _stub(server.target, ApiKey(key_id, token))
        with channel:
            stub.SetQuota(
                pb.SetQuotaRequest(
                    idempotency_key=new_id("q"), tenant_id=tenant, limit=100, period=pb.PERIOD_DAY
                )
            )
            stub.Reserve(_reserve(tenant))
            revoked = _cli(database_url, "revoke", key_id)
            assert revoked.returncode == 0, revoked.stderr
            time.sleep(revocation_bound_s)
            code, reason, _ = _refused(stub.Reserve, _reserve(tenant))
        again = _cli(database_url, "revoke", key_id)
    finally:
        server.stop()
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert again.returncode != 0
    assert "REVOKED" in listed.stdout.splitlines()[0]
    assert _actors(database_url, tenant) == {f"key:{key_id}"}
    log = (tmp_path / "ledger.log").read_text()
    assert secret not in log
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    rpc_lines = [x for x in lines if str(x.get("rpc", "")).startswith("/tokenledger.v1.")]
    assert {line.get("actor") for line in rpc_lines if line.get("status") == "OK"} == {
        f"key:{key_id}"
    }
    assert any(line.get("status") == "UNAUTHENTICATED" for line in rpc_lines)


def test_keys_cli_refuses_an_unknown_role(database_url: str) -> None:
    out = _cli(database_url, "create", "--tenant", "t", "--role", "root", "--name", "x")
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_the_service_role_may_only_read_keys_and_the_reader_role_not_even_that(
    database_url: str,
) -> None:
    """A compromised service cannot mint or un-revoke a key; read replicas see no hashes."""
    key = create_key(database_url, "t", "reader")
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE tokenledger_app")
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone() is not None
        for statement in (
            "UPDATE api_keys SET revoked_at = NULL WHERE key_id = %s",
            "DELETE FROM api_keys WHERE key_id = %s",
            "INSERT INTO api_keys (key_id, tenant_id, roles, name, cert_cn)"
            " VALUES (%s, '*', '{admin}', 'x', 'x')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement, (key.key_id,))
            conn.rollback()
            conn.execute("SET ROLE tokenledger_app")
        conn.execute("SET ROLE tokenledger_reader")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM api_keys")


# --- auth off --------------------------------------------------------------------------------


def test_auth_off_logs_a_warning_at_startup_and_records_no_actor(
    database_url: str, tenant: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        server = ServerThread(database_url).start()
    try:
        with server.stub() as stub:
            stub.Reserve(_reserve(tenant))
    finally:
        server.stop()
    warnings = [e for e in logs if e.get("auth") == "off"]
    assert warnings and warnings[0]["log_level"] == "warning"
    assert "AUTHENTICATION IS OFF" in warnings[0]["event"]
    assert _actors(database_url, tenant) == {""}


def test_auth_settings_refuse_incomplete_tls(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    assert AuthSettings.from_env({}).mode == "off"
    for env in (
        {"TOKENLEDGER_AUTH": "mtls"},
        {"TOKENLEDGER_AUTH": "mtls", "TOKENLEDGER_TLS_CERT": str(pem)},
        {"TOKENLEDGER_AUTH": "api_key", "TOKENLEDGER_TLS_CLIENT_CA": str(pem)},
        {"TOKENLEDGER_AUTH": "api_key", "TOKENLEDGER_TLS_CERT": str(tmp_path / "missing")},
        {"TOKENLEDGER_AUTH": "password"},
    ):
        with pytest.raises(ConfigError):
            AuthSettings.from_env(env)
    with pytest.raises(ConfigError):
        ClientAuth.from_env({"TOKENLEDGER_LEDGER_API_KEY": "not-a-key"})


# --- mTLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = CertAuthority(root / "ca"), CertAuthority(root / "rogue", "rogue CA")
    return {
        "ca": ca,
        "server": ca.server(),
        "client": ca.client("billing-svc"),
        "unregistered": ca.client("stranger"),
        "context": ca.client("context-svc"),
        "rogue": rogue.client("billing-svc"),
    }


def _mtls_settings(pki: dict[str, Any], mode: str) -> AuthSettings:
    server: Pair = pki["server"]
    return AuthSettings(mode, server.cert, server.key, pki["ca"].cert)


def _tls(pki: dict[str, Any], client: str | None) -> dict[str, Path | None]:
    pair: Pair | None = pki[client] if client else None
    return {
        "tls_ca": pki["ca"].cert,
        "tls_cert": pair.cert if pair else None,
        "tls_key": pair.key if pair else None,
    }


def test_mtls_refuses_a_client_without_a_certificate_or_with_a_foreign_one_and_admits_a_registered_cn(  # noqa: E501
    pki: dict[str, Any], database_url: str, tenant: str
) -> None:
    """The handshake refuses no certificate or one another CA signed (UNAVAILABLE: no
    connection); a CN signed by the CA but not registered is UNAUTHENTICATED; a registered
    one is admitted with its roles and tenant, and recorded as `cert:<cn>`."""
    key_id = register_cert(database_url, "billing-svc", tenant, "writer")
    settings = _mtls_settings(pki, "mtls")
    ledger = ServerThread(
        database_url, auth_mode="mtls", credentials=server_credentials(settings)
    ).start()
    outcomes = {}
    try:
        for client in (None, "rogue", "unregistered", "client"):
            channel, stub = _stub(ledger.target, **_tls(pki, client))
            with channel:
                try:
                    stub.Reserve(_reserve(tenant), timeout=CALL_TIMEOUT_S)
                    outcomes[client] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    outcomes[client] = failure(exc).code
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key_id,))
        time.sleep(revocation_bound_s)
        channel, stub = _stub(ledger.target, **_tls(pki, "client"))
        with channel:
            revoked = _refused(stub.Reserve, _reserve(tenant))[0]
    finally:
        ledger.stop()
    assert outcomes == {
        None: grpc.StatusCode.UNAVAILABLE,
        "rogue": grpc.StatusCode.UNAVAILABLE,
        "unregistered": grpc.StatusCode.UNAUTHENTICATED,
        "client": grpc.StatusCode.OK,
    }
    assert revoked == grpc.StatusCode.UNAUTHENTICATED
    assert _actors(database_url, tenant) == {"cert:billing-svc"}


def test_the_context_service_calls_the_ledger_over_mtls_with_its_own_key(
    pki: dict[str, Any], database_url: str, tenant: str
) -> None:
    """Ledger in mtls+api_key mode; the context service presents its client certificate and
    its own key, so the ledger records the context service's key as the actor, not the
    caller's; the caller's key only opens the context service (its tenant, role writer)."""
    context_key = create_key(database_url, "*", "writer", name="context service")
    caller = create_key(database_url, tenant, "writer")
    reader = create_key(database_url, tenant, "reader")
    ledger = ServerThread(
        database_url,
        auth_mode="mtls+api_key",
        credentials=server_credentials(_mtls_settings(pki, "mtls+api_key")),
    ).start()
    context = None
    try:
        context = ContextServerThread(
            ledger.target,
            auth_mode="api_key",
            keys_url=database_url,
            pool=TokenizerPool(
                data_dir=Path(os.environ.get(DATA_DIR_ENV) or REPO / "var" / "tokenizers")
            ),
            ledger_metadata=lambda: context_key.metadata,
            ledger_credentials=ClientAuth(**_tls(pki, "context")).credentials(),  # type: ignore[arg-type]
        ).start()
        request = cpb.PrepareContextRequest(
            idempotency_key=new_id("p"), tenant_id=tenant, user_id="u", model="gpt-4o",
            messages=[cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content="Trains to Porto?")],
            max_output_tokens=64,
        )  # fmt: skip
        with grpc.insecure_channel(context.target) as channel:
            ctx = cpb_grpc.ContextServiceStub(channel)
            nobody = call_fails(ctx.PrepareContext, request)
            denied = call_fails(lambda r: ctx.PrepareContext(r, metadata=reader.metadata), request)
            prepared = ctx.PrepareContext(request, metadata=caller.metadata)
            counted = ctx.CountTokens(
                cpb.CountTokensRequest(model="gpt-4o", text="hi"), metadata=reader.metadata
            )
        # Without a client certificate the ledger admits no connection, key or not.
        channel, stub = _stub(ledger.target, context_key, **_tls(pki, None))
        with channel:
            no_cert = _refused(stub.Reserve, _reserve(tenant))[0]
    finally:
        if context is not None:
            context.stop()
        ledger.stop()
    assert nobody.code == grpc.StatusCode.UNAUTHENTICATED
    assert (denied.code, denied.metadata["required_roles"]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "writer",
    )
    assert prepared.reservation_id and counted.total_tokens > 0
    assert no_cert == grpc.StatusCode.UNAVAILABLE
    assert _actors(database_url, tenant) == {f"key:{context_key.key_id}"}


@pytest.mark.parametrize(
    ("address", "tls", "warned"),
    [
        ("0.0.0.0:50051", False, True),
        ("10.1.2.3:50051", False, True),
        ("0.0.0.0:50051", True, False),
        ("127.0.0.1:50051", False, False),
        ("[::1]:50051", False, False),
        ("localhost:50051", False, False),
    ],
)
def test_bearer_keys_in_cleartext_off_loopback_are_warned_about(
    database_url: str, address: str, tls: bool, warned: bool
) -> None:
    """With API keys on, a port reachable from the network without TLS gets a loud line."""
    unopened = db.make_pool(database_url, 1)  # the check never reaches the database
    authenticator = make_authenticator(AuthSettings(mode="api_key"), unopened)
    with structlog.testing.capture_logs() as logs:
        warn_if_off(authenticator, "svc", tls=tls, address=address)
    cleartext = [e for e in logs if e.get("auth") == "cleartext"]
    assert bool(cleartext) is warned
    if warned:
        assert cleartext[0]["log_level"] == "warning" and "TLS" in cleartext[0]["event"]
