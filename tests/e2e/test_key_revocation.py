"""A key revoked from another process stops working in a serving `tokenledger serve` process
within `key_cache.revocation_bound_s`, although that process keeps keys in memory; another
key's calls go on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import psycopg

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.platform.key_cache import revocation_bound_s
from tests.support import ApiKey, LedgerProcess, create_key, new_id

CALL_TIMEOUT_S = 5.0


class _Caller(threading.Thread):
    """Reserves in a loop with one key, recording each call's start, end and status."""

    def __init__(self, target: str, tenant: str, key: ApiKey) -> None:
        super().__init__(daemon=True)
        self.target, self.tenant, self.key = target, tenant, key
        self.calls: list[tuple[float, float, grpc.StatusCode]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    stub.Reserve(
                        pb.ReserveRequest(
                            idempotency_key=new_id("k"), tenant_id=self.tenant, user_id="u",
                            model="m", amount=1,
                        ),
                        metadata=self.key.metadata, timeout=CALL_TIMEOUT_S,
                    )  # fmt: skip
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                self.calls.append((started, time.monotonic(), code))


def test_a_key_revoked_elsewhere_is_refused_within_the_bound_while_others_go_on(
    database_url: str, tmp_path: Path
) -> None:
    tenant = new_id("t")
    doomed = create_key(database_url, tenant, "writer")
    other = create_key(database_url, tenant, "writer")
    server = LedgerProcess(database_url, tmp_path / "ledger.log", TOKENLEDGER_AUTH="api_key")
    server.start()
    callers = [_Caller(server.target, tenant, key) for key in (doomed, other)]
    try:
        for caller in callers:
            caller.start()
        time.sleep(1.0)  # both keys in the server's cache, which listens by now
        revoking = time.monotonic()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (doomed.key_id,)
            )
        committed = time.monotonic()
        time.sleep(1.0)
    finally:
        for caller in callers:
            caller.stop.set()
            caller.join(CALL_TIMEOUT_S)
        server.stop()
    doomed_calls, other_calls = callers[0].calls, callers[1].calls
    before = [code for _, ended, code in doomed_calls if ended < revoking]
    assert len(before) > 20 and set(before) == {grpc.StatusCode.OK}
    refused = [s for s, _, code in doomed_calls if code is grpc.StatusCode.UNAUTHENTICATED]
    assert refused, "the revoked key was never refused"
    took = max(0.0, refused[0] - committed)
    print(f"revoked key first refused {took * 1000:.1f} ms after the revocation committed")
    assert took < revocation_bound_s
    late = [code for s, _, code in doomed_calls if s >= committed + revocation_bound_s]
    assert late and set(late) == {grpc.StatusCode.UNAUTHENTICATED}
    assert {code for _, _, code in other_calls} == {grpc.StatusCode.OK}
    assert len([s for s, _, _ in other_calls if s > committed]) > 20
