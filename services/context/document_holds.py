"""PlanDocument's holds: one per chunk (the chunk's tokens plus the reply's), placed in one
ReserveBatch under keys derived from the caller's one idempotency key. All or none: if the
ledger refuses any chunk, the holds it placed for the others in that call are rolled back in
the same PlanDocument call and the refusal is passed on, so no partial plan stays held. (The
ledger's ReserveBatch applies items one by one, so the log shows those holds placed and rolled
back; a retry with the same key gets the same refusal, or the same holds.)"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import grpc
from google.rpc import status_pb2

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.context.documents import Chunk
from services.context.ledger_client import LedgerCallError, LedgerClient

LEDGER_KEY_PREFIX = "doc:"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def chunk_key(idempotency_key: str, index: int) -> str:
    return f"{LEDGER_KEY_PREFIX}{idempotency_key}:{index}"


def _items(r: cpb.PlanDocumentRequest, chunks: Sequence[Chunk]) -> list[pb.ReserveRequest]:
    digest = hashlib.sha256(r.SerializeToString(deterministic=True)).hexdigest()[:32]
    return [
        pb.ReserveRequest(
            idempotency_key=chunk_key(r.idempotency_key, i),
            user_id=r.user_id,
            conversation_id=r.conversation_id,
            model=r.model,
            amount=chunk.tokens + r.max_output_tokens,
            ttl_seconds=r.ttl_seconds,
            labels={
                "source": "context",
                "ctx.document": digest,
                "ctx.chunk": str(i),
                "ctx.chunks": str(len(chunks)),
            },
        )
        for i, chunk in enumerate(chunks)
    ]


def _refusal(raw: bytes) -> LedgerCallError:
    status = status_pb2.Status.FromString(raw)
    return LedgerCallError(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message, status)


async def reserve_all(
    ledger: LedgerClient,
    r: cpb.PlanDocumentRequest,
    chunks: Sequence[Chunk],
    timeout_s: float | None,
) -> list[str]:
    """The chunks' reservation ids, in order; LedgerCallError (the first refusal) with every
    hold placed by this call rolled back."""
    request = pb.ReserveBatchRequest(tenant_id=r.tenant_id, items=_items(r, chunks))
    reply = await ledger.reserve_batch(request, timeout_s=timeout_s)
    placed = [x.reserved.reservation.reservation_id for x in reply.results
              if x.WhichOneof("outcome") == "reserved"]  # fmt: skip
    refused = [x.refused for x in reply.results if x.WhichOneof("outcome") == "refused"]
    if not refused:
        return placed
    await rollback_all(ledger, r.tenant_id, placed, "context: document plan refused whole")
    raise _refusal(refused[0])


async def rollback_all(
    ledger: LedgerClient, tenant_id: str, reservation_ids: Sequence[str], reason: str
) -> None:
    if not reservation_ids:
        return
    items = [pb.RollbackRequest(reservation_id=rid, reason=reason) for rid in reservation_ids]
    # If the ledger cannot be told, the holds expire by their TTL; the refusal matters more.
    with contextlib.suppress(LedgerCallError):
        await ledger.rollback_batch(pb.RollbackBatchRequest(tenant_id=tenant_id, items=items))
