"""LiteLLM, metered by the ledger: a callback that reserves before each completion and settles
after it, from the asyncio SDK (`litellm.acompletion`), the Router and the proxy.

    import os; os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # never fetch prices
    import litellm
    from services.client.litellm import LedgerCallback

    litellm.callbacks = [LedgerCallback(target="127.0.0.1:50051", tenant_id="acme")]
    await litellm.acompletion(model="openai/gpt-4o", messages=[...], max_tokens=500,
                              user="alice")  # the user pays (or metadata, below)

Where it hooks in (LiteLLM 1.110): the SDK and the Router call
`async_pre_call_deployment_hook` before each attempt — the hold is placed there, and a
refusal (`BudgetExhausted`, `RateLimited`, …) is raised to the caller before any provider
call; the proxy calls `async_pre_call_hook` first (the hold is placed there, and the
deployment hook then sees it). `async_log_success_event` commits the response's usage
(cached prompt tokens apart), after a stream ends; `async_log_failure_event` rolls back.
LiteLLM logs nothing for a stream its caller closes midway, and no hook sees its chunks
before the last: close such a stream with `await callback.aclose_stream(stream)`, which
commits the counted prompt and the counted text it delivered. A stream dropped otherwise is
not settled: its hold expires at its TTL (`Policy.ttl_seconds`), its usage unrecorded, and
the callback forgets it after twice that.
The blocking `litellm.completion` fires none of the async hooks: use `acompletion`.

Who pays: metadata `tokenledger_user_id` (and `tokenledger_tenant_id`,
`tokenledger_conversation_id`), else the call's `user`, else `default_user_id`; in the proxy,
the API key's user. A call with no payer is refused. The prompt is counted in-process with
`litellm.token_counter` unless a counter is given (e.g. ContextServiceCounter, exact).
The ledger away fails the call (fail closed) unless `Policy(fail_open=True)`.

In the proxy's config:

    litellm_settings:
      callbacks: services.client.litellm_proxy.proxy_handler

(services/client/litellm_proxy.py builds it from TOKENLEDGER_TARGET, TOKENLEDGER_API_KEY,
TOKENLEDGER_TENANT_ID, TOKENLEDGER_DEFAULT_USER_ID and TOKENLEDGER_FAIL_OPEN.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client.channel import Settings
from services.client.client import AsyncLedgerClient
from services.client.counting import AsyncCounter
from services.client.errors import ClientError, LedgerError, LedgerUnavailable
from services.client.hold import AsyncHold
from services.client.metering import (
    OnSettled,
    Payer,
    Plan,
    Policy,
    Settlement,
    bound,
    plan,
    usage_from_openai,
)

log = logging.getLogger("tokenledger.client.litellm")
LEDGER_TTL_S_DEFAULT = 600
"""The ledger's hold TTL when a Reserve names none (README: Reserve)."""
METERED_CALL_TYPES = frozenset({"acompletion", "completion"})
META_PREFIX = "tokenledger_"


def _call_type(call_type: Any) -> str:
    return str(getattr(call_type, "value", call_type))


def _metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    merged: dict[str, Any] = {}
    for source in (
        (kwargs.get("litellm_params") or {}).get("metadata"),
        kwargs.get("litellm_metadata"),
        kwargs.get("metadata"),
    ):
        if isinstance(source, Mapping):
            merged.update(source)
    return merged


class LedgerCallback(CustomLogger):  # type: ignore[misc]  # LiteLLM ships no type hints
    """Reserve before, settle after; one hold per LiteLLM call id."""

    def __init__(
        self,
        *,
        target: str = "",
        tenant_id: str = "",
        default_user_id: str = "",
        ledger: AsyncLedgerClient | None = None,
        counter: AsyncCounter | None = None,
        policy: Policy | None = None,
        on_settled: OnSettled | None = None,
        **client_options: Any,
    ) -> None:
        """`target` (and `client_options`: api_key, tls, …) make an AsyncLedgerClient on the
        event loop that first uses it; or pass `ledger`. `tenant_id`: who pays unless the
        call's metadata says."""
        super().__init__()
        if ledger is None and not target:
            raise ClientError("LedgerCallback needs a ledger target (or an AsyncLedgerClient)")
        self.target, self.tenant_id, self.default_user_id = target, tenant_id, default_user_id
        self.policy = policy or Policy()
        self.counter, self.on_settled = counter, on_settled
        self._client_options = client_options
        self._ledger = ledger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holds: dict[str, tuple[AsyncHold, Plan, int]] = {}
        self._placed_at: dict[str, float] = {}
        """When each hold was placed: one whose call never settles (a stream dropped without
        aclose_stream) is forgotten after twice its TTL, by when the ledger has expired it."""
        if target:
            Settings(target, **client_options)  # a bad target or key is refused now

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LedgerCallback:
        return cls(
            target=env.get("TOKENLEDGER_TARGET", "127.0.0.1:50051"),
            api_key=env.get("TOKENLEDGER_API_KEY") or None,
            tenant_id=env.get("TOKENLEDGER_TENANT_ID", ""),
            default_user_id=env.get("TOKENLEDGER_DEFAULT_USER_ID", ""),
            policy=Policy(fail_open=env.get("TOKENLEDGER_FAIL_OPEN", "") == "true"),
        )

    def ledger(self) -> AsyncLedgerClient:
        """The client, made on the running loop (gRPC's asyncio channels belong to one)."""
        loop = asyncio.get_running_loop()
        if self._ledger is None or (self.target and self._loop is not loop):
            self._ledger = AsyncLedgerClient(self.target, **self._client_options)
            self._loop = loop
        return self._ledger

    def payer(self, kwargs: Mapping[str, Any], key_user: str = "") -> Payer:
        meta = _metadata(kwargs)
        tenant = str(meta.get(META_PREFIX + "tenant_id") or self.tenant_id)
        user = str(
            meta.get(META_PREFIX + "user_id") or key_user or kwargs.get("user")
            or self.default_user_id
        )  # fmt: skip
        if not tenant or not user:
            raise ClientError(
                "no one to charge this call to: set metadata tokenledger_user_id (or the "
                "call's `user`, or default_user_id) and a tenant_id"
            )
        return Payer(tenant, user, str(meta.get(META_PREFIX + "conversation_id") or ""))

    async def _count(self, model: str, messages: list[Any]) -> int:
        if self.counter is not None:
            return await self.counter.acount_chat(model, messages)
        return int(litellm.token_counter(model=model, messages=messages))

    async def reserve(self, data: dict[str, Any], key_user: str = "") -> None:
        """Place the hold of one call (once per call id) and bound its output."""
        if not data.get("litellm_call_id"):  # LiteLLM takes the call id it is given
            data["litellm_call_id"] = str(uuid.uuid4())
        call_id = str(data["litellm_call_id"])
        if call_id in self._holds:
            return
        self._forget_expired()
        payer, model = self.payer(data, key_user), str(data.get("model", ""))
        try:
            the_plan = plan(data, await self._count(model, list(data.get("messages") or ())),
                            self.policy, "max_tokens")  # fmt: skip
            hold = self.ledger().hold(
                tenant_id=payer.tenant_id, user_id=payer.user_id,
                conversation_id=payer.conversation_id, model=model, amount=the_plan.amount,
                min_amount=the_plan.min_amount, ttl_seconds=self.policy.ttl_seconds,
            )  # fmt: skip
            await hold.reserve()
        except LedgerUnavailable:
            if not self.policy.fail_open:
                raise
            log.warning("the ledger is away and fail_open is set: call %s is unmetered", call_id)
            return
        bound(data, the_plan, hold.granted)
        if data.get("stream"):
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        self._holds[call_id] = (hold, the_plan, int(data[the_plan.max_key]))
        self._placed_at[call_id] = time.monotonic()

    def _forget_expired(self) -> None:
        ttl_s = self.policy.ttl_seconds or LEDGER_TTL_S_DEFAULT
        horizon = time.monotonic() - 2 * ttl_s
        for call_id in [c for c, at in self._placed_at.items() if at < horizon]:
            self._placed_at.pop(call_id, None)
            self._holds.pop(call_id, None)

    # --- LiteLLM's hooks -----------------------------------------------------------------------

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        if _call_type(call_type) in METERED_CALL_TYPES:
            await self.reserve(kwargs)
        return kwargs

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        """The proxy's hook (it fires only there)."""
        if _call_type(call_type) in METERED_CALL_TYPES:
            await self.reserve(data, str(getattr(user_api_key_dict, "user_id", "") or ""))
        return data

    async def aclose_stream(self, stream: Any) -> None:
        """Close a stream read only in part, and settle its hold: LiteLLM logs no event for
        it, so the callback commits the counted prompt and the counted text LiteLLM says it
        delivered (`response_uptil_now`). A stream read to its end is left to the success
        event, which has the provider's usage."""
        await stream.aclose()
        logging_obj = getattr(stream, "logging_obj", None)
        call_id = str(getattr(logging_obj, "litellm_call_id", "") or "")
        if getattr(stream, "sent_last_chunk", False) or call_id not in self._holds:
            return
        await self._settle_cut(call_id, str(getattr(stream, "response_uptil_now", "") or ""))

    async def _settle_cut(self, call_id: str, text: str) -> None:
        """Commit the counted prompt and the counted text a stream closed midway delivered."""
        self._placed_at.pop(call_id, None)
        held = self._holds.pop(call_id, None)
        if held is None:
            return
        hold, the_plan, sent = held
        model = hold.fields["model"]
        if self.counter is not None:
            output = await self.counter.acount_text(model, text)
        else:
            output = int(litellm.token_counter(model=model, text=text)) if text else 0
        usage = pb.Usage(input_tokens=the_plan.prompt_tokens, output_tokens=output)
        await self._commit(hold, the_plan, sent, usage, estimated=True)

    async def _commit(
        self, hold: AsyncHold, the_plan: Plan, sent: int, usage: pb.Usage, estimated: bool
    ) -> None:
        s = Settlement(hold.reservation_id, the_plan.amount, hold.granted, sent,
                       usage=usage, estimated=estimated)  # fmt: skip
        try:
            await hold.commit(usage)
            s.outcome = "committed"
        except LedgerError as exc:
            s.outcome, s.error = "unsettled", str(exc)
        self._settled(s)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        call_id = str(kwargs.get("litellm_call_id") or "")
        self._placed_at.pop(call_id, None)
        held = self._holds.pop(call_id, None)
        if held is None:
            return
        hold, the_plan, sent = held
        usage = usage_from_openai(getattr(response_obj, "usage", None))
        estimated = usage is None
        if usage is None:
            usage = pb.Usage(input_tokens=the_plan.prompt_tokens, output_tokens=sent)
        await self._commit(hold, the_plan, sent, usage, estimated)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        call_id = str(kwargs.get("litellm_call_id") or "")
        self._placed_at.pop(call_id, None)
        held = self._holds.pop(call_id, None)
        if held is None:
            return  # refused before the hold, or by the ledger itself
        hold, the_plan, sent = held
        s = Settlement(hold.reservation_id, the_plan.amount, hold.granted, sent)
        try:
            await hold.rollback(f"the call failed: {type(kwargs.get('exception')).__name__}")
            s.outcome, s.error = "rolled back", str(kwargs.get("exception") or "")
        except LedgerError as exc:
            s = replace(s, outcome="unsettled", error=str(exc))
        self._settled(s)

    def _settled(self, s: Settlement) -> None:
        if s.outcome == "unsettled":
            log.warning("a LiteLLM call could not be settled: %s", s.error)
        if self.on_settled is not None:
            self.on_settled(s)

    @property
    def open_holds(self) -> int:
        """Holds placed whose call has not been settled yet."""
        return len(self._holds)
