"""ContextService: count a conversation exactly, reserve its tokens in the ledger, and fit it
into the model's window and the grant. The servicer parses, calls and maps: the counting,
planning and fitting are pure (planning.py) and run in a worker thread (small requests
inline); every call of the ledger or of the summarizer endpoint runs on the event loop.

PrepareContext in two kinds of phases, never a thread waiting on the loop:
1. parse (loop): validate everything at the edge (nothing is reserved for a bad request);
2. plan (thread): count, find the mandatory part, plan one Reserve. If even its floor exceeds
   the window, fail before reserving (FAILED_PRECONDITION, CONTEXT_DOES_NOT_FIT, the shortfall
   named);
   With OUTPUT_HOLD_PREDICTED, the ledger's output figures are read (loop, usually from
   output_hold.py's cache) meanwhile, and the plan holds their p95 plus a margin for the reply
   instead of max_output (the window still keeps max_output for it);
3. reserve (loop): the grant is the budget: output reserve = min(the output hold, grant -
   mandatory), prompt budget = grant - output reserve;
4. fit (thread) the conversation to the budget with the strategy. With a summarizer endpoint, a
   SUMMARIZE fit stops where its summary is needed; then (loop) the endpoint's tokens are
   reserved, it is called and its usage committed; then (thread) the fit is finished with its
   text, or with the built-in summary if it failed;
5. map (loop): the fitted messages with the reservation id. The caller commits that reservation
   with the model's actual usage (or rolls it back); the hold may exceed what the fitted prompt
   needs, and the commit releases the rest.

A failure after the hold was placed rolls it back (no orphan holds), except cancellation: the
caller may retry with the same key, and the ledger would then hand back the same reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf import message

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.context import document_holds, documents, memory, output_hold, planning
from services.context.fitting import AllocationPolicy, DoesNotFit, FitResult, Strategy
from services.context.ledger_client import LedgerCallError, LedgerClient
from services.context.memory_store import MemoryStore
from services.context.metrics import ContextMetrics
from services.context.planning import Counted, MemoryPlan, Plan, WindowTooSmall
from services.context.remote_summarizer import (
    Account,
    Charge,
    Measure,
    RemoteSummarizer,
    RemoteSummarizerConfig,
    SummarizerOutcome,
    prepare_job,
)
from services.context.requests import Prepare, Target, parse_count, parse_prepare
from services.context.responses import count_reply, messages_to_send, prepare_response
from services.context.tokenizers import (
    ModelRegistry,
    TokenCounter,
    TokenizationError,
    TokenizerDataError,
)
from services.context.tokenizers.mistral_chat import MistralRefused
from services.context.tokenizers.templates import TemplateRefused
from services.platform.errors import (
    CallRefused,
    Code,
    ContextOverGrant,
    ContextOverWindow,
    InvalidRequest,
    LedgerUnavailable,
    MemoryFull,
    MemoryUnavailable,
    Relayed,
    TokenizationFailed,
    TokenizerUnavailable,
)

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

inline_count_bytes_max = 64 * 1024
"""Smaller requests are counted on the event loop: a thread hop costs more than they do."""

LEDGER_KEY_PREFIX = "ctx:"
LEDGER_RETRY_DELAY_S = 1


# --- errors ---------------------------------------------------------------------------------


def ledger_refusal(exc: LedgerCallError, what: str) -> CallRefused:
    """The ledger's error passed on: its code and details, the message prefixed with what was
    asked. A ledger that cannot be reached (or too slow for our deadline on the call) is
    UNAVAILABLE, reason LEDGER_UNAVAILABLE, with a RetryInfo: retrying is the right move; one
    that said why (STORE_UNAVAILABLE, say) is UNAVAILABLE with its own details."""
    relayed = exc.status.SerializeToString()
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        text = f"the ledger could not be reached to {what}: {exc.message}"
        if exc.status.details:
            return Relayed(Code.UNAVAILABLE, text, relayed)
        return LedgerUnavailable(
            text, metadata={"ledger_status": exc.code.name}, retry_after_s=LEDGER_RETRY_DELAY_S
        )
    return Relayed(Code[exc.code.name], f"the ledger refused to {what}: {exc.message}", relayed)


def _does_not_fit(
    target: Target,
    model: str,
    required: int,
    available: int,
    mandatory: int,
    min_output: int,
    indices: Sequence[int],
    limited_by: str,
) -> CallRefused:
    shortfall = required - available
    limit = (
        f"{model or target.encoding}'s context window of {available} tokens"
        if limited_by == "WINDOW"
        else f"the {available} tokens the ledger granted"
    )
    text = (
        f"the system, pinned and input messages (indices {list(indices)}, with their tool calls "
        f"and results, tool definitions and reply priming) need {mandatory} prompt tokens, plus "
        f"{min_output} for the output makes {required}: more than {limit}, short by "
        f"{shortfall}; shorten or unpin messages, lower min_output_tokens, or use a model with "
        "a larger window"
    )
    metadata = {
        "required_tokens": str(required),
        "available_tokens": str(available),
        "shortfall_tokens": str(shortfall),
        "mandatory_prompt_tokens": str(mandatory),
        "min_output_tokens": str(min_output),
        "mandatory_indices": ",".join(map(str, indices)),
        "limited_by": limited_by,
    }
    kind = ContextOverWindow if limited_by == "WINDOW" else ContextOverGrant
    return kind(text, metadata=metadata)


def fingerprint(request: message.Message) -> str:
    """Of the whole request, kept as a label on the hold: a different request under the same
    idempotency key then differs from the first and the ledger refuses it."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()[:32]


# --- the service -----------------------------------------------------------------------------


class ContextService(cpb_grpc.ContextServiceServicer):
    def __init__(
        self,
        counter: TokenCounter,
        ledger: LedgerClient,
        metrics: ContextMetrics,
        executor: Executor,
        *,
        registry: ModelRegistry,
        policy: AllocationPolicy,
        remote_summarizer: RemoteSummarizerConfig | None = None,
        memory_store: MemoryStore | None = None,
        hold: output_hold.OutputHoldConfig = output_hold.HOLD_DEFAULTS,
    ) -> None:
        self._output_stats = output_hold.OutputStatsCache(ledger, hold.stats_ttl_s)
        self._hold_margin = hold.margin
        self._counter = counter
        self._memory = memory_store
        self._ledger = ledger
        self._metrics = metrics
        self._executor = executor
        self._registry = registry
        self._policy = policy
        self._remote = RemoteSummarizer(remote_summarizer, ledger) if remote_summarizer else None

    async def aclose(self) -> None:
        """Close the summarizer endpoint's connections (the server's ledger client is its own)."""
        if self._remote is not None:
            await self._remote.aclose()

    async def _work(self, inline: bool, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking tokenization on the executor, keeping the event loop free; small
        requests inline. Tokenizer failures become errors that say so (never a silent 0)."""
        try:
            if inline:
                return fn(*args)
            ctx = contextvars.copy_context()  # the request's span follows into the worker
            call = functools.partial(ctx.run, fn, *args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except TokenizerDataError as exc:
            raise TokenizerUnavailable(f"cannot count: {exc}") from None
        except TokenizationError as exc:
            raise TokenizationFailed(f"cannot count: {exc}") from None
        except (TemplateRefused, MistralRefused) as exc:
            # The model's own chat format cannot express the conversation (e.g. two tool calls
            # in one Llama 3.1 message, a Mistral call id that is not 9 letters or digits).
            raise InvalidRequest(str(exc), violations=[("messages", str(exc))]) from None

    # --- CountTokens -------------------------------------------------------------------------

    async def CountTokens(
        self, request: cpb.CountTokensRequest, context: Context
    ) -> cpb.CountTokensResponse:
        r = parse_count(request, self._registry)
        inline = r.content_bytes <= inline_count_bytes_max
        reply = await self._work(
            inline, count_reply, self._counter, r.target, r.messages, r.tools, r.text, r.render
        )
        self._metrics.counted(reply.total_tokens, reply.encoding, "CountTokens")
        return reply

    # --- PrepareContext ----------------------------------------------------------------------

    async def PrepareContext(
        self, request: cpb.PrepareContextRequest, context: Context
    ) -> cpb.PrepareContextResponse:
        started = time.perf_counter()
        p = parse_prepare(request, self._registry, self._policy)
        inline = p.content_bytes <= inline_count_bytes_max
        facts, mp, prediction = await self._plan_held(request, p, inline, context)
        p, counted, plan_ = mp.prepare, mp.counted, mp.plan
        ahead = self._fit_ahead(p, counted, plan_)
        try:
            reply = await self._reserve(request, p, plan_, context, prediction is not None)
        except BaseException:
            _discard(ahead)
            raise
        reservation = reply.reservation
        budget, output = plan_.split(reservation.amount)
        if budget != plan_.split(plan_.amount)[0]:
            _discard(ahead)  # a partial grant: fit to what was granted
            ahead = None
        try:
            fitted, outcome = await self._fit(request, p, counted, budget, inline, ahead)
        except DoesNotFit as exc:
            await self._rollback(request.tenant_id, reservation.reservation_id, "does not fit")
            limited = plan_.bound_by(reservation.amount)
            raise _does_not_fit(p.target, request.model, exc.required_tokens + output,
                                reservation.amount, exc.required_tokens, output,
                                exc.mandatory_indices, limited) from None  # fmt: skip
        except asyncio.CancelledError:
            raise  # the hold stays for a retry with the same key, or expires
        except BaseException:
            await self._rollback(request.tenant_id, reservation.reservation_id, "internal error")
            raise
        sent = _with_memory(request, mp)
        response = prepare_response(request, p, counted, plan_, reply, fitted, output, outcome,
                                    sent, mp.index)  # fmt: skip
        if prediction is not None:  # the hold is a prediction: the reply may take all it may
            response.max_tokens = plan_.send
            response.output_prediction.CopyFrom(prediction)
        await self._memory_report(request, p, mp, facts, response, outcome)
        self._record(p, counted, fitted, outcome, started)
        self._record_memory(p, response)
        return response

    async def _plan_held(
        self, request: cpb.PrepareContextRequest, p: Prepare, inline: bool, context: Context
    ) -> tuple[list[memory.Fact], MemoryPlan, cpb.OutputPrediction | None]:
        """The memory's facts, the count and the plan; with a predicted output hold, the
        ledger's figures are read (or taken from the cache) while the conversation is
        counted, and the plan holds less."""
        predicting = None
        if p.predict_output:
            key = (request.tenant_id, request.user_id, request.model)
            ask = output_hold.predict(self._output_stats, key, p.max_output, self._hold_margin,
                                      _remaining(context))  # fmt: skip
            predicting = asyncio.ensure_future(ask)
        try:
            facts = await self._memory_facts(request, p) if p.use_memory else []
            mp = await self._plan(p, inline, facts)
            prediction = await predicting if predicting is not None else None
        finally:
            _discard(predicting)
        if prediction is None:
            return facts, mp, None
        return facts, replace(mp, plan=mp.plan.with_hold(prediction.hold_tokens)), prediction

    async def _memory_report(
        self,
        request: cpb.PrepareContextRequest,
        p: Prepare,
        mp: MemoryPlan,
        facts: list[memory.Fact],
        response: cpb.PrepareContextResponse,
        outcome: SummarizerOutcome | None,
    ) -> None:
        """The memory's part of the response and the retention ratio; facts the remote
        summarizer proposed are set for later calls (not over the caller's own)."""
        memory.apply_memory(response, mp.selection, mp.index, mp.tokens)
        fitted: Sequence[cpb.ChatMessage] = response.messages
        if p.written_only and (facts or p.markers):
            fitted = messages_to_send(request, response)
        response.retention.CopyFrom(memory.retention(facts, p.markers, request.messages, fitted))
        if outcome is None or not p.use_memory:
            return
        response.summarizer.facts_note = outcome.facts_note
        known = {f.key for f in facts}
        new = [f for f in outcome.proposed if f.key not in known]
        if not new:
            return
        conversation = memory.Conversation(
            request.tenant_id, request.user_id, request.conversation_id
        )
        try:
            await self._store().set(conversation, new)
        except Exception as exc:  # the prompt and its hold are ready: proposals are a bonus,
            # and failing now would leave the caller a hold it never heard of.
            why = exc.message if isinstance(exc, MemoryFull) else type(exc).__name__
            note = f"proposed facts not set: {why}"
            response.summarizer.facts_note = "; ".join(filter(None, (outcome.facts_note, note)))
            return
        response.memory_proposed.extend(f.key for f in new)

    async def _memory_facts(
        self, request: cpb.PrepareContextRequest, p: Prepare
    ) -> list[memory.Fact]:
        """The conversation's facts, after setting those its messages state."""
        conversation = memory.Conversation(
            request.tenant_id, request.user_id, request.conversation_id
        )
        if p.stated:
            return await self._store().set(conversation, p.stated)
        return await self._store().list(conversation)

    def _store(self) -> MemoryStore:
        if self._memory is None:
            raise MemoryUnavailable(
                "this context service has no database for its memory (DATABASE_URL)"
            )
        return self._memory

    async def _plan(self, p: Prepare, inline: bool, facts: list[memory.Fact]) -> MemoryPlan:
        """Count and plan (thread), with the memory message when facts fit its share; a
        window too small for the floor is refused unreserved."""
        try:
            return await self._work(inline, planning.plan_with_memory, self._counter, p, facts)
        except WindowTooSmall as exc:
            raise _does_not_fit(p.target, p.model, exc.required, exc.window, exc.mandatory,
                                p.min_output, exc.indices, "WINDOW") from None  # fmt: skip

    def _fit_ahead(
        self, p: Prepare, counted: Counted, plan_: Plan
    ) -> asyncio.Future[FitResult] | None:
        """The fit for the full grant, started in a thread while the ledger answers the Reserve
        (the grant is nearly always what was asked); not when a summarizer endpoint may be
        needed, which runs on the loop."""
        if self._remote is not None and p.strategy is Strategy.SUMMARIZE:
            return None
        budget, _ = plan_.split(plan_.amount)
        work = self._work(False, planning.fit_budget, self._counter, p, counted, budget)
        return asyncio.ensure_future(work)  # type: ignore[arg-type]

    async def _fit(
        self,
        request: cpb.PrepareContextRequest,
        p: Prepare,
        counted: Counted,
        budget: int,
        inline: bool,
        ahead: asyncio.Future[FitResult] | None = None,
    ) -> tuple[FitResult, SummarizerOutcome | None]:
        """Fit (thread), or take the fit made ahead for this budget. With a summarizer endpoint,
        a SUMMARIZE fit that needs a summary stops there; the endpoint and its ledger hold
        (loop); then the fit is finished (thread)."""
        if ahead is not None:
            return await ahead, None
        remote = self._remote if p.strategy is Strategy.SUMMARIZE else None
        job = prepare_job if remote is not None else None
        step = await self._work(inline, planning.fit_budget, self._counter, p, counted, budget, job)
        if isinstance(step, FitResult):
            return step, None
        assert remote is not None
        pending, remote_job = step
        text, outcome = await remote.summarize(
            remote_job, _charge(request), self._measure(p), want_facts=p.use_memory
        )
        finish = planning.finish_summary
        fitted = await self._work(inline, finish, self._counter, p, counted, pending, text)
        return fitted, outcome

    def _measure(self, p: Prepare) -> Measure:
        """Tokens of a summary text the endpoint returned, counted off the loop if large."""
        count = planning.summary_counter(self._counter, p.target)

        async def measure(text: str) -> int:
            return await self._work(len(text.encode()) <= inline_count_bytes_max, count, text)

        return measure

    async def _reserve(
        self,
        request: cpb.PrepareContextRequest,
        p: Prepare,
        plan_: Plan,
        context: Context,
        predicted: bool = False,
    ) -> pb.ReserveResponse:
        ask = pb.ReserveRequest(
            idempotency_key=LEDGER_KEY_PREFIX + request.idempotency_key,
            tenant_id=request.tenant_id,
            user_id=request.user_id,
            conversation_id=request.conversation_id,
            model=request.model,
            amount=plan_.amount,
            min_amount=plan_.floor if plan_.floor < plan_.amount else 0,
            ttl_seconds=request.ttl_seconds,
            labels={
                "source": "context",
                "ctx.strategy": p.strategy.value,
                "ctx.request": fingerprint(request),
            },
        )
        if predicted:  # a reader of the log can tell predicted holds (and their overage) apart
            ask.labels["ctx.output_hold"] = "predicted"
        try:
            return await self._ledger.reserve(ask, timeout_s=_remaining(context))
        except LedgerCallError as exc:
            floor = f"at least {plan_.floor}, " if plan_.floor < plan_.amount else ""
            raise ledger_refusal(
                exc,
                f"reserve {plan_.amount} tokens ({floor}the mandatory "
                f"messages need {plan_.mandatory_tokens} plus {p.min_output} for the output)",
            ) from None

    async def _rollback(self, tenant_id: str, reservation_id: str, reason: str) -> None:
        request = pb.RollbackRequest(
            tenant_id=tenant_id, reservation_id=reservation_id, reason=f"context: {reason}"
        )
        # If the ledger cannot be told, the hold expires by its TTL; the first error matters more.
        with contextlib.suppress(LedgerCallError):
            await self._ledger.rollback(request)

    def _record_memory(self, p: Prepare, response: cpb.PrepareContextResponse) -> None:
        strategy = {"strategy": p.strategy.value}
        if response.memory_left_out:
            self._metrics.memory_left_out.add(len(response.memory_left_out), strategy)
        r = response.retention
        if r.facts_total:
            self._metrics.retention_ratio.record(r.ratio, strategy)
            self._metrics.retention_facts.add(r.facts_kept, {**strategy, "outcome": "kept"})
            lost = r.facts_total - r.facts_kept
            self._metrics.retention_facts.add(lost, {**strategy, "outcome": "lost"})

    # --- PlanDocument ------------------------------------------------------------------------

    async def PlanDocument(
        self, request: cpb.PlanDocumentRequest, context: Context
    ) -> cpb.PlanDocumentResponse:
        plan_ = documents.parse_plan(request, self._registry)
        chunks, total = await self._work(False, documents.plan_chunks, self._counter, plan_)
        ids: list[str] = []
        if request.reserve:
            documents.check_reservable(chunks)  # before anything is held
            try:
                ids = await document_holds.reserve_all(
                    self._ledger, request, chunks, _remaining(context)
                )
            except LedgerCallError as exc:
                raise ledger_refusal(exc, documents.ask_text(request, chunks)) from None
        self._metrics.counted(total, plan_.target.encoding, "PlanDocument")
        return documents.plan_response(request, plan_, chunks, total, ids)

    # --- memory ------------------------------------------------------------------------------

    async def SetMemory(
        self, request: cpb.SetMemoryRequest, context: Context
    ) -> cpb.SetMemoryResponse:
        conversation, facts = memory.parse_set(request)
        stored = await self._store().set(conversation, facts)
        return cpb.SetMemoryResponse(facts=memory.pb_facts(stored))

    async def ListMemory(
        self, request: cpb.ListMemoryRequest, context: Context
    ) -> cpb.ListMemoryResponse:
        conversation = memory.parse_list(request)
        stored = await self._store().list(conversation)
        return cpb.ListMemoryResponse(facts=memory.pb_facts(stored))

    async def DeleteMemory(
        self, request: cpb.DeleteMemoryRequest, context: Context
    ) -> cpb.DeleteMemoryResponse:
        conversation, keys = memory.parse_delete(request)
        deleted = await self._store().delete(conversation, keys)
        return cpb.DeleteMemoryResponse(deleted=deleted)

    def _record(
        self,
        p: Prepare,
        counted: Counted,
        fitted: FitResult,
        outcome: SummarizerOutcome | None,
        started: float,
    ) -> None:
        self._metrics.counted(counted.prompt_tokens, counted.encoding, "PrepareContext")
        if outcome is not None:
            result = "fallback" if outcome.fallback_reason else "ok"
            self._metrics.summarizer_calls.add(1, {"outcome": result})
        if fitted.fitted:
            self._metrics.fitted(
                p.strategy.value,
                pruned=bool(fitted.dropped),
                truncated=bool(fitted.truncated),
                summarized=bool(fitted.summarized),
                tokens_saved=fitted.tokens_saved,
            )
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._metrics.prepare_duration.record(elapsed_ms, {"strategy": p.strategy.value})


def _with_memory(
    request: cpb.PrepareContextRequest, mp: MemoryPlan
) -> Sequence[cpb.ChatMessage] | None:
    """The request's messages with the memory message where the fit put it (None: as sent)."""
    if mp.index < 0:
        return None
    m = mp.prepare.messages[mp.index]
    message = cpb.ChatMessage(role=cpb.CHAT_ROLE_SYSTEM, content=m.content, name=m.name,
                              pinned=True)  # fmt: skip
    sent = list(request.messages)
    sent.insert(mp.index, message)
    return sent


def _discard(ahead: asyncio.Future[Any] | None) -> None:
    """Drop work started ahead that is not needed (a fit, a prediction), without an
    unretrieved-exception warning; done work is left as it is."""
    if ahead is not None:
        ahead.add_done_callback(lambda f: f.cancelled() or f.exception())
        ahead.cancel()


def _charge(request: cpb.PrepareContextRequest) -> Charge:
    """The summarizer endpoint's tokens go to the conversation being compacted."""
    account = Account(request.tenant_id, request.user_id, request.conversation_id)
    return Charge(account, request.idempotency_key, int(request.ttl_seconds))


def _remaining(context: Context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining > 0 else None
