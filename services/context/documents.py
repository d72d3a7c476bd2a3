"""Progressive loading (PlanDocument), the pure part: a document too large for one call is
split into chunks by exact tokens, each repeating `overlap` tokens of the one before, ending
on a paragraph end, else a sentence end, in the second half of its room where one exists, else
on a token. Each chunk is counted again alone (what the model sees) and kept within the
chunk size. Runs in a worker thread."""

from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass

from ledger import limits
from ledger.validation import ID_PATTERN, KEY_PATTERN, MODEL_PATTERN, Checker, account_key
from services._gen.tokenledger.v1 import context_pb2 as cpb
from services.context.requests import (
    Target,
    _raise_violations,
    _resolve,
    idempotency_key_chars_max,
    output_tokens_max,
    ttl_s_max,
)
from services.context.tokenizers import ENCODINGS, ModelRegistry, TokenCounter
from services.context.tokenizers.pool import LoadedEncoding
from services.platform.errors import InvalidRequest

document_bytes_max = 4 * 2**20
plan_reserve_chunks_max = 100
"""A reserved plan is one ReserveBatch: the ledger takes at most 100 items per call."""
_SENTENCE_ENDS = (b".", b"!", b"?", b'."', b".)", b'!"', b'?"')
_SPACE = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class DocumentPlan:
    """A validated PlanDocument request."""

    target: Target
    text: str
    chunk_tokens: int
    overlap_tokens: int
    max_output: int


@dataclass(frozen=True, slots=True)
class Chunk:
    start_token: int
    end_token: int
    tokens: int
    overlap_tokens: int
    start_byte: int
    end_byte: int
    boundary: str
    text: str


def _sizes(c: Checker, r: cpb.PlanDocumentRequest, target: Target | None) -> None:
    if r.chunk_tokens < 1:
        c.fail("chunk_tokens", f"is {r.chunk_tokens}; must be at least 1")
    if not 0 <= r.overlap_tokens < max(r.chunk_tokens, 1):
        c.fail("overlap_tokens", f"is {r.overlap_tokens}; must be 0 to chunk_tokens - 1 "
               f"({r.chunk_tokens - 1})")  # fmt: skip
    cap = (target.output_cap_tokens if target else 0) or output_tokens_max
    if not 0 <= r.max_output_tokens <= cap:
        c.fail("max_output_tokens", f"is {r.max_output_tokens}; must be 0 to {cap}")
    window = target.window_tokens if target else 0
    if window and r.chunk_tokens >= 1 and r.chunk_tokens + r.max_output_tokens > window:
        c.fail("chunk_tokens", f"is {r.chunk_tokens}; with max_output_tokens "
               f"{r.max_output_tokens} it exceeds the {window}-token window")  # fmt: skip
    if target is not None and not window:
        c.fail("context_window_tokens", "is required when the model is not known")
    size = len(r.text.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= document_bytes_max:
        c.fail("text", f"is {size} bytes; must be 1 to {document_bytes_max}")


def _reserve_fields(c: Checker, r: cpb.PlanDocumentRequest) -> None:
    c.number("ttl_seconds", r.ttl_seconds, low=0, high=ttl_s_max)
    if r.reserve:
        c.text("idempotency_key", r.idempotency_key, chars_max=idempotency_key_chars_max,
               pattern=KEY_PATTERN)  # fmt: skip
        account_key(c, r.tenant_id, r.user_id, r.conversation_id, user=True)
    else:
        c.text("tenant_id", r.tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
        c.text("idempotency_key", r.idempotency_key, chars_max=idempotency_key_chars_max,
               pattern=KEY_PATTERN, required=False)  # fmt: skip


def parse_plan(r: cpb.PlanDocumentRequest, registry: ModelRegistry) -> DocumentPlan:
    """Every field checked; all problems at once (InvalidRequest, UnknownModel)."""
    c = Checker()
    _reserve_fields(c, r)
    # With reserve the ledger charges a model, so one is named even beside an encoding.
    c.text("model", r.model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN,
           required=r.reserve or not r.encoding)  # fmt: skip
    c.number("context_window_tokens", r.context_window_tokens, low=0, high=10_000_000)
    target, unknown = _resolve(c, registry, r.model, r.encoding, r.context_window_tokens)
    if target is None and not unknown and not c.violations:
        c.fail("model", "is required (or name an encoding)")
    if target is not None and target.encoding not in ENCODINGS:
        c.fail("encoding", f"{target.encoding} is an estimate; chunks need exact counts: "
               f"name one of {', '.join(ENCODINGS)}")  # fmt: skip
    _sizes(c, r, target)
    _raise_violations(c, unknown, ", ".join(registry.families()))
    assert target is not None
    return DocumentPlan(target, r.text, r.chunk_tokens, r.overlap_tokens, r.max_output_tokens)


# --- planning ---------------------------------------------------------------------------------


def _is_char_start(data: bytes, offset: int) -> bool:
    return offset >= len(data) or (data[offset] & 0xC0) != 0x80


def _kind(data: bytes, offset: int) -> str:
    """What ends right before `offset`: "paragraph", "sentence" or "" (neither)."""
    before, after = data[max(0, offset - 4) : offset], data[offset : offset + 1]
    if before.endswith(b"\n\n") or (before.endswith(b"\n") and after == b"\n"):
        return "paragraph"
    if (before[-1:] in (b" ", b"\n") or after in (b" ", b"\n")) and before.rstrip(_SPACE).endswith(
        _SENTENCE_ENDS
    ):
        return "sentence"
    return ""


class _Doc:
    def __init__(self, enc: LoadedEncoding, text: str) -> None:
        self.enc = enc
        self.text = unicodedata.normalize("NFC", text) if enc.nfc else text
        self.data = self.text.encode("utf-8", "surrogatepass")
        self.tokens = enc.encode(self.text)
        lengths = (len(b) for b in enc.encoding.decode_tokens_bytes(self.tokens))
        self.offsets = [0, *itertools.accumulate(lengths)]

    def piece(self, start: int, end: int) -> str:
        return self.data[self.offsets[start] : self.offsets[end]].decode("utf-8", "surrogatepass")

    def end_for(self, start: int, after: int, plan: DocumentPlan) -> tuple[int, str, int]:
        """(end token, boundary kind, the chunk's own count) of the chunk starting at `start`
        and ending past `after` (the previous chunk's end)."""
        n = len(self.tokens)
        hard = min(start + plan.chunk_tokens, n)
        if hard == n and self.enc.count(self.piece(start, n)) <= plan.chunk_tokens:
            return n, "end", self.enc.count(self.piece(start, n))
        low = max(start + plan.overlap_tokens + 1, start + plan.chunk_tokens // 2, after + 1)
        candidates = [b for b in range(hard, low - 1, -1)
                      if _is_char_start(self.data, self.offsets[b])]  # fmt: skip
        ranked = sorted(candidates, key=lambda b: (_RANK[_kind(self.data, self.offsets[b])], -b))
        for b in ranked:
            own = self.enc.count(self.piece(start, b))
            if own <= plan.chunk_tokens:
                return b, _kind(self.data, self.offsets[b]) or "token", own
        b = max(start + plan.overlap_tokens + 1, after + 1)  # nothing fits: the smallest step
        while not _is_char_start(self.data, self.offsets[b]):
            b += 1  # a whole character at least
        own = self.enc.count(self.piece(start, b))
        if own > plan.chunk_tokens:
            text = (f"is {plan.chunk_tokens}; the document has a character (at byte "
                    f"{self.offsets[start]}) that takes {own} tokens: raise chunk_tokens to at "
                    f"least {own + plan.overlap_tokens}")  # fmt: skip
            raise InvalidRequest(f"chunk_tokens {text}", violations=[("chunk_tokens", text)])
        return b, "token", own


_RANK = {"paragraph": 0, "sentence": 1, "": 2}


def _next_start(doc: _Doc, start: int, end: int, overlap: int) -> tuple[int, int]:
    """The next chunk's first token and its overlap: `overlap` tokens back from `end`, moved
    back to the start of the character it would cut (a token or more of overlap more), or
    forward when moving back would not advance past `start` (less overlap)."""
    following = end - overlap
    back = following
    while not _is_char_start(doc.data, doc.offsets[back]):
        back -= 1
    if back > start:
        return back, end - back
    while not _is_char_start(doc.data, doc.offsets[following]):
        following += 1
    return following, end - following


def plan_chunks(counter: TokenCounter, plan: DocumentPlan) -> tuple[list[Chunk], int]:
    """The chunks covering every token of the document, in order, and its token count."""
    doc = _Doc(counter.encoding(plan.target.encoding), plan.text)
    chunks: list[Chunk] = []
    start, overlap, end, n = 0, 0, 0, len(doc.tokens)
    while True:
        end, kind, own = doc.end_for(start, end, plan)
        chunks.append(Chunk(start, end, own, overlap, doc.offsets[start], doc.offsets[end],
                            kind, doc.piece(start, end)))  # fmt: skip
        if end >= n:
            return chunks, n
        start, overlap = _next_start(doc, start, end, plan.overlap_tokens)


def check_reservable(chunks: list[Chunk]) -> None:
    if len(chunks) > plan_reserve_chunks_max:
        text = (f"the plan has {len(chunks)} chunks; a reserved plan may have at most "
                f"{plan_reserve_chunks_max}: raise chunk_tokens or reserve in parts")  # fmt: skip
        raise InvalidRequest(text, violations=[("chunk_tokens", text)])


def ask_text(r: cpb.PlanDocumentRequest, chunks: list[Chunk]) -> str:
    total = sum(c.tokens for c in chunks) + r.max_output_tokens * len(chunks)
    return (f"hold the whole plan, {len(chunks)} chunks of {total} tokens with their replies "
            "(nothing of it is held)")  # fmt: skip


def plan_response(
    r: cpb.PlanDocumentRequest,
    plan: DocumentPlan,
    chunks: list[Chunk],
    total: int,
    reservation_ids: list[str],
) -> cpb.PlanDocumentResponse:
    response = cpb.PlanDocumentResponse(
        document_tokens=total,
        encoding=plan.target.encoding,
        exact=True,
        context_window_tokens=plan.target.window_tokens,
    )
    ids = reservation_ids or [""] * len(chunks)
    response.chunks.extend(
        cpb.DocumentChunk(index=i, start_token=c.start_token, end_token=c.end_token,
                          tokens=c.tokens, overlap_tokens=c.overlap_tokens,
                          start_byte=c.start_byte, end_byte=c.end_byte, boundary=c.boundary,
                          text="" if r.omit_text else c.text, reservation_id=rid)
        for i, (c, rid) in enumerate(zip(chunks, ids, strict=True))
    )  # fmt: skip
    if reservation_ids:
        response.reserved_tokens = sum(c.tokens + r.max_output_tokens for c in chunks)
    return response
