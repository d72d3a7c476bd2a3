"""The OpenAI SDK, metered by the ledger: `chat.completions.create(...)` and
`responses.create(...)` reserve before the call and settle after it.

    import openai
    from services.client import LedgerClient
    from services.client.counting import ContextServiceCounter
    from services.client.openai import LedgeredOpenAI

    oai = LedgeredOpenAI(openai.OpenAI(), ledger=LedgerClient("127.0.0.1:50051"),
                         counter=ContextServiceCounter("127.0.0.1:50052"),
                         tenant_id="acme", user_id="alice")
    reply = oai.chat.completions.create(model="gpt-4o", messages=[...], max_tokens=500)

Each call: the prompt is counted (the counter: the context service, exactly, or anything
in-process), the prompt plus the call's max tokens is reserved (see services.client.metering
for partial grants), the call is made, and its `usage` is committed — cached prompt tokens
as `cached_input_tokens`, the rest of the prompt as `input_tokens`. A call that raises is
rolled back. A stream is asked for its usage (`stream_options.include_usage`) and settles
when it ends or is closed: with the provider's usage, or, when it was cut before the usage
chunk, with the counted prompt and the counted text it delivered (`Settlement.estimated`).
Close a stream you stop reading (`with` or `.close()`), else it settles only when read to
its end, and its hold expires at its TTL unsettled.

When the ledger cannot be reached the call is refused (`LedgerUnavailable`): fail closed,
unless `Policy(fail_open=True)`. Every other attribute is the wrapped client's, unmetered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Generic, Self, TypeVar

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client.client import AsyncLedgerClient, LedgerClient
from services.client.counting import AsyncCounter, Counter, responses_input
from services.client.errors import LedgerError, LedgerUnavailable
from services.client.hold import AsyncHold, Hold
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

log = logging.getLogger("tokenledger.client.openai")


@dataclass(frozen=True)
class _Api:
    """One metered endpoint: how its prompt, bound and stream events read."""

    name: str
    max_key: str

    def prompt(self, kwargs: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Sequence[Any]]:
        if self.name == "chat":
            return list(kwargs.get("messages") or ()), list(kwargs.get("tools") or ())
        messages = responses_input(kwargs.get("input"), kwargs.get("instructions"))
        return messages, list(kwargs.get("tools") or ())

    def ask_usage(self, kwargs: dict[str, Any]) -> None:
        """A chat stream reports usage only when asked; a Responses stream always does."""
        if self.name == "chat":
            kwargs["stream_options"] = {
                **(kwargs.get("stream_options") or {}),
                "include_usage": True,
            }

    def chunk_usage(self, chunk: Any) -> pb.Usage | None:
        if self.name == "chat":
            return usage_from_openai(getattr(chunk, "usage", None))
        if getattr(chunk, "type", "") == "response.completed":
            return usage_from_openai(getattr(chunk.response, "usage", None))
        return None

    def chunk_text(self, chunk: Any) -> str:
        if self.name == "chat":
            choices = getattr(chunk, "choices", None) or ()
            return "".join((c.delta.content or "") for c in choices if c.delta is not None)
        if getattr(chunk, "type", "") == "response.output_text.delta":
            return str(chunk.delta)
        return ""


CHAT = _Api("chat", "max_tokens")
RESPONSES = _Api("responses", "max_output_tokens")


@dataclass(frozen=True)
class _Meter:
    payer: Payer
    policy: Policy
    on_settled: OnSettled | None

    def settled(self, settlement: Settlement) -> None:
        if settlement.outcome == "unsettled":
            log.warning("a metered call could not be settled: %s", settlement.error)
        if self.on_settled is not None:
            self.on_settled(settlement)

    def settlement(self, hold: Hold | AsyncHold | None, the_plan: Plan, sent: int) -> Settlement:
        rid, granted = (hold.reservation_id, hold.granted) if hold else ("", 0)
        return Settlement(rid, the_plan.amount, granted, sent)

    def hold_fields(self, model: str, the_plan: Plan) -> dict[str, Any]:
        p = self.payer
        return {
            "tenant_id": p.tenant_id, "user_id": p.user_id, "conversation_id": p.conversation_id,
            "model": model, "amount": the_plan.amount, "min_amount": the_plan.min_amount,
            "ttl_seconds": self.policy.ttl_seconds,
        }  # fmt: skip


def _fallback_usage(the_plan: Plan, sent: int) -> pb.Usage:
    """No usage in a reply: charge what the hold covered (the prompt and the whole bound)."""
    return pb.Usage(input_tokens=the_plan.prompt_tokens, output_tokens=sent)


class _Endpoint:
    def __init__(self, metered: Any, api: _Api, create: Any) -> None:
        self._metered, self._api, self._create = metered, api, create

    def create(self, **kwargs: Any) -> Any:
        """The SDK's `create`, metered (same arguments, same result)."""
        return self._metered.call(self._api, self._create, dict(kwargs))


class _Namespace:
    """`client.chat` with a metered `completions` (or any namespace whose one child is)."""

    def __init__(self, inner: Any, **children: Any) -> None:
        self._inner = inner
        self.__dict__.update(children)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


L = TypeVar("L", LedgerClient, AsyncLedgerClient)
C = TypeVar("C", Counter, AsyncCounter)


class _Ledgered(Generic[L, C]):
    """What LedgeredOpenAI and LedgeredAsyncOpenAI share: the wrapped client with its
    metered endpoints; `_metered` (blocking or asyncio) makes the calls."""

    _metered: Callable[[L, C, _Meter], Any]

    def __init__(
        self,
        client: Any,
        *,
        ledger: L,
        counter: C,
        tenant_id: str,
        user_id: str,
        conversation_id: str = "",
        policy: Policy | None = None,
        on_settled: OnSettled | None = None,
    ) -> None:
        self._client = client
        self._ledger: L = ledger
        self._counter: C = counter
        self._meter = _Meter(
            Payer(tenant_id, user_id, conversation_id), policy or Policy(), on_settled
        )
        metered = type(self)._metered(ledger, counter, self._meter)
        completions = _Endpoint(metered, CHAT, client.chat.completions.create)
        self.chat = _Namespace(client.chat, completions=completions)
        self.responses = _Endpoint(metered, RESPONSES, client.responses.create)

    def for_user(self, user_id: str, conversation_id: str = "") -> Self:
        """The same client, charging another user (or conversation) of the same tenant."""
        m = self._meter
        return type(self)(
            self._client, ledger=self._ledger, counter=self._counter,
            tenant_id=m.payer.tenant_id, user_id=user_id, conversation_id=conversation_id,
            policy=m.policy, on_settled=m.on_settled,
        )  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Stream:
    """What both streams keep while they are read: the usage chunk, if one came, and the text
    delivered (counted when no usage came); `_settled` makes settling happen once."""

    def __init__(
        self, inner: Any, metered: _Metered, api: _Api, hold: Hold | AsyncHold, the_plan: Plan,
        sent: int,
    ) -> None:  # fmt: skip
        self._inner, self._metered, self._api, self._hold = inner, metered, api, hold
        self._plan, self._sent = the_plan, sent
        self._usage: pb.Usage | None = None
        self._text: list[str] = []
        self._settled = False

    def _observe(self, chunk: Any) -> None:
        self._usage = self._api.chunk_usage(chunk) or self._usage
        if text := self._api.chunk_text(chunk):
            self._text.append(text)

    def _settling(self) -> _Steps[None]:
        """Settle once: commit the usage chunk's usage, or, when none came, the counted
        prompt and the counted text delivered (about a token a chunk when even counting is
        away), marked estimated."""
        if self._settled:
            return
        self._settled = True
        usage, estimated = self._usage, False
        if usage is None:
            model, text = self._hold.fields["model"], "".join(self._text)
            try:
                output = yield partial(self._metered.count_text, model, text)
            except LedgerError:
                output = len(self._text)
            usage = pb.Usage(input_tokens=self._plan.prompt_tokens, output_tokens=output)
            estimated = True
        yield from self._metered.committing(self._hold, self._plan, self._sent, usage, estimated)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- the steps of a metered call, once for both kinds of client -------------------------------

_T = TypeVar("_T")
_Steps = Generator[Callable[[], Any], Any, _T]
"""A metered call's logic as psycopg writes its protocol: a generator that yields each call
to the ledger, the counter or the model (a function of no arguments) and is sent its result
(or thrown its exception). `_run` makes the calls blocking, `_arun` awaits them: the logic is
written once for both clients."""


def _run(steps: _Steps[_T]) -> _T:
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(result) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            result, error = step(), None
        except BaseException as exc:
            result, error = None, exc


async def _arun(steps: _Steps[_T]) -> _T:
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(result) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            result, error = await step(), None
        except BaseException as exc:
            result, error = None, exc


class _Metered:
    """A client's metered calls: the steps (_Steps) of each, which a blocking or an asyncio
    subclass runs with its own ledger client, counter and kind of stream."""

    stream: type[_Stream]

    def __init__(
        self, ledger: Any, count_chat: Callable[..., Any], count_text: Callable[..., Any],
        meter: _Meter,
    ) -> None:  # fmt: skip
        self.ledger, self.meter = ledger, meter
        self.count_chat, self.count_text = count_chat, count_text

    def calling(self, api: _Api, create: Any, kwargs: dict[str, Any]) -> _Steps[Any]:
        model = str(kwargs.get("model", ""))
        messages, tools = api.prompt(kwargs)
        try:
            prompt = yield partial(self.count_chat, model, messages, tools)
            the_plan = plan(kwargs, prompt, self.meter.policy, api.max_key)
            hold = self.ledger.hold(**self.meter.hold_fields(model, the_plan))
            yield hold.reserve
        except LedgerUnavailable:
            if not self.meter.policy.fail_open:
                raise
            return (yield from self._unmetered(create, kwargs, model))
        bound(kwargs, the_plan, hold.granted)
        sent = int(kwargs[the_plan.max_key])
        if kwargs.get("stream"):
            api.ask_usage(kwargs)
        try:
            result = yield partial(create, **kwargs)
        except BaseException as exc:
            yield from self._rolling_back(hold, the_plan, sent, exc)
            raise
        if kwargs.get("stream"):
            return self.stream(result, self, api, hold, the_plan, sent)
        usage = usage_from_openai(getattr(result, "usage", None))
        yield from self.committing(
            hold, the_plan, sent, usage or _fallback_usage(the_plan, sent), not usage
        )
        return result

    def committing(
        self, hold: Hold | AsyncHold, the_plan: Plan, sent: int, usage: pb.Usage, estimated: bool
    ) -> _Steps[None]:
        s = replace(self.meter.settlement(hold, the_plan, sent), usage=usage, estimated=estimated)
        try:
            yield partial(hold.commit, usage)
            s.outcome = "committed"
        except LedgerError as exc:
            s.outcome, s.error = "unsettled", str(exc)
        self.meter.settled(s)

    def _rolling_back(
        self, hold: Hold | AsyncHold, the_plan: Plan, sent: int, exc: BaseException
    ) -> _Steps[None]:
        s = self.meter.settlement(hold, the_plan, sent)
        try:
            yield partial(hold.rollback, f"the model call failed: {type(exc).__name__}")
            s.outcome, s.error = "rolled back", str(exc)
        except LedgerError as failed:
            s.outcome, s.error = "unsettled", str(failed)
        self.meter.settled(s)

    def _unmetered(self, create: Any, kwargs: dict[str, Any], model: str) -> _Steps[Any]:
        """fail_open: the call without a hold; its usage recorded if the ledger is back."""
        result = yield partial(create, **kwargs)
        usage = None if kwargs.get("stream") else usage_from_openai(getattr(result, "usage", None))
        s = Settlement("", 0, 0, 0, outcome="unmetered", usage=usage)
        if usage is not None:
            p = self.meter.payer
            try:
                yield partial(
                    self.ledger.record_usage, tenant_id=p.tenant_id, user_id=p.user_id,
                    conversation_id=p.conversation_id, model=model, usage=usage,
                )  # fmt: skip
            except LedgerError as exc:
                s.error = str(exc)
        self.meter.settled(s)
        return result


# --- blocking ---------------------------------------------------------------------------------


class MeteredStream(_Stream):
    """A stream that settles its hold once: at its end, on close, or when reading it fails."""

    def __init__(
        self, inner: Any, metered: _SyncMetered, api: _Api, hold: Hold, the_plan: Plan, sent: int
    ) -> None:
        super().__init__(inner, metered, api, hold, the_plan, sent)
        self._iter = iter(inner)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            chunk = next(self._iter)
        except BaseException:
            _run(self._settling())
            raise
        self._observe(chunk)
        return chunk

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            _run(self._settling())


class _SyncMetered(_Metered):
    stream = MeteredStream

    def __init__(self, ledger: LedgerClient, counter: Counter, meter: _Meter) -> None:
        super().__init__(ledger, counter.count_chat, counter.count_text, meter)

    def call(self, api: _Api, create: Any, kwargs: dict[str, Any]) -> Any:
        return _run(self.calling(api, create, kwargs))


class LedgeredOpenAI(_Ledgered[LedgerClient, Counter]):
    """`openai.OpenAI`, metered: `chat.completions.create` and `responses.create` reserve and
    settle in the ledger; `for_user` charges another user or conversation."""

    _metered = _SyncMetered


# --- asyncio ----------------------------------------------------------------------------------


class AsyncMeteredStream(_Stream):
    """An async stream that settles its hold once: at its end, on `aclose`, or on failure."""

    def __init__(
        self, inner: Any, metered: _AsyncMetered, api: _Api, hold: AsyncHold, the_plan: Plan,
        sent: int,
    ) -> None:  # fmt: skip
        super().__init__(inner, metered, api, hold, the_plan, sent)
        self._iter = inner.__aiter__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self._iter.__anext__()
        except BaseException:
            await _arun(self._settling())
            raise
        self._observe(chunk)
        return chunk

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        try:
            await self._inner.close()
        finally:
            await _arun(self._settling())

    close = aclose


class _AsyncMetered(_Metered):
    stream = AsyncMeteredStream

    def __init__(self, ledger: AsyncLedgerClient, counter: AsyncCounter, meter: _Meter) -> None:
        super().__init__(ledger, counter.acount_chat, counter.acount_text, meter)

    async def call(self, api: _Api, create: Any, kwargs: dict[str, Any]) -> Any:
        return await _arun(self.calling(api, create, kwargs))


class LedgeredAsyncOpenAI(_Ledgered[AsyncLedgerClient, AsyncCounter]):
    """`openai.AsyncOpenAI`, metered as LedgeredOpenAI is."""

    _metered = _AsyncMetered
