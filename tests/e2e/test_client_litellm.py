"""LiteLLM metered by the ledger (services.client.litellm): the real `litellm` package (SDK and
Router) against a local OpenAI-compatible HTTP server and a real ledger. Success (usage with
cached tokens committed), refusal before any provider call, provider errors (rollback),
streams, a burst of concurrent calls held to the budget, the ledger away (fail closed by
default), and bad inputs. The proxy itself does not install here (see README): its hook is
driven with LiteLLM's own UserAPIKeyAuth."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported

import litellm

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import (
    BadTarget,
    BudgetExhausted,
    ClientError,
    LedgerClient,
    LedgerUnavailable,
)
from services.client.litellm import LedgerCallback
from services.client.metering import Policy, Settlement
from tests.openai_server import OpenAIServer
from tests.support import ServerThread, free_port, new_id

litellm.suppress_debug_info = True
MESSAGES = [{"role": "user", "content": "What is a token ledger for, in one line?"}]
SETTLE_TIMEOUT_S = 10


@pytest.fixture
def ledger_client(ledger: ServerThread) -> Iterator[LedgerClient]:
    with LedgerClient(ledger.target) as c:
        yield c


@pytest.fixture
def tenant(ledger_client: LedgerClient) -> str:
    t = new_id("t")
    ledger_client.set_quota(tenant_id=t, user_id="ann", limit=10_000, period=pb.PERIOD_DAY)
    return t


def _callback(
    ledger: ServerThread, tenant: str, settled: list[Settlement], **kw: Any
) -> LedgerCallback:
    return LedgerCallback(target=ledger.target, tenant_id=tenant, on_settled=settled.append, **kw)


async def _wait(condition: Callable[[], bool]) -> None:
    """LiteLLM logs success after the call has returned: wait for it."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the callback did not settle in time")
        await asyncio.sleep(0.02)


def _run(callback: LedgerCallback, body: Callable[[], Any]) -> Any:
    async def main() -> Any:
        litellm.callbacks = [callback]
        try:
            return await body()
        finally:
            litellm.callbacks = []

    return asyncio.run(main())


def _completion(server: OpenAIServer, **kw: Any) -> Any:
    args = {"model": "openai/gpt-4o", "api_base": server.base_url, "api_key": "sk-test",
            "messages": MESSAGES, "max_tokens": 40, "user": "ann", "num_retries": 0}  # fmt: skip
    args.update(kw)
    return litellm.acompletion(**args)


def _balance(ledger_client: LedgerClient, tenant: str, user: str = "ann") -> tuple[int, int]:
    b = ledger_client.get_balance(tenant_id=tenant, user_id=user).balance
    return b.held, b.used


def test_an_sdk_call_is_reserved_before_and_its_usage_committed_after(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer, tenant: str
) -> None:
    settled: list[Settlement] = []
    callback = _callback(ledger, tenant, settled)

    async def body() -> Any:
        reply = await _completion(openai_server)
        await _wait(lambda: len(settled) == 1)
        return reply

    reply = _run(callback, body)
    (s,) = settled
    prompt = litellm.token_counter(model="openai/gpt-4o", messages=MESSAGES)
    assert s.outcome == "committed" and s.requested == prompt + 40 and s.granted == prompt + 40
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert s.usage == pb.Usage(input_tokens=reply.usage.prompt_tokens - cached,
                               cached_input_tokens=cached, output_tokens=20)  # fmt: skip
    assert _balance(ledger_client, tenant) == (0, reply.usage.total_tokens)
    assert callback.open_holds == 0


def test_a_call_over_budget_is_refused_before_the_provider_is_called(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer
) -> None:
    t = new_id("t")
    ledger_client.set_quota(tenant_id=t, user_id="ann", limit=30, period=pb.PERIOD_NONE)
    settled: list[Settlement] = []

    async def body() -> None:
        with pytest.raises(BudgetExhausted) as refused:
            await _completion(openai_server, max_tokens=500)
        assert refused.value.available == 30

    _run(_callback(ledger, t, settled), body)
    assert openai_server.requests == [] and settled == []
    assert _balance(ledger_client, t) == (0, 0)


def test_a_partial_grant_shrinks_max_tokens_when_the_policy_allows(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer
) -> None:
    t = new_id("t")
    prompt = litellm.token_counter(model="openai/gpt-4o", messages=MESSAGES)
    ledger_client.set_quota(tenant_id=t, user_id="ann", limit=prompt + 9, period=pb.PERIOD_NONE)
    settled: list[Settlement] = []
    callback = _callback(ledger, t, settled, policy=Policy(allow_shrink=True, min_output_tokens=5))

    async def body() -> None:
        await _completion(openai_server, max_tokens=500)
        await _wait(lambda: len(settled) == 1)

    _run(callback, body)
    assert openai_server.requests[-1]["max_tokens"] == 9
    assert settled[0].granted == prompt + 9


def test_a_provider_error_rolls_back(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer, tenant: str
) -> None:
    settled: list[Settlement] = []

    async def body() -> None:
        with pytest.raises(litellm.BadRequestError):
            await _completion(openai_server, model="openai/gpt-4o-error-400")
        await _wait(lambda: len(settled) == 1)

    _run(_callback(ledger, tenant, settled), body)
    (s,) = settled
    assert s.outcome == "rolled back" and _balance(ledger_client, tenant) == (0, 0)
    got = ledger_client.get_reservation(tenant_id=tenant, reservation_id=s.reservation_id)
    assert got.reservation.state == pb.RESERVATION_STATE_ROLLED_BACK


def test_a_stream_is_asked_for_usage_and_commits_it_when_it_ends(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer, tenant: str
) -> None:
    settled: list[Settlement] = []

    async def body() -> str:
        stream = await _completion(openai_server, stream=True)
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        await _wait(lambda: len(settled) == 1)
        return text

    text = _run(_callback(ledger, tenant, settled), body)
    assert text.split() == [f"w{i}" for i in range(20)]
    assert openai_server.requests[-1]["stream_options"] == {"include_usage": True}
    (s,) = settled
    assert s.outcome == "committed" and not s.estimated
    assert s.usage is not None and s.usage.output_tokens == 20 and s.usage.cached_input_tokens > 0


def test_a_stream_closed_midway_commits_the_prompt_and_the_text_it_delivered(
    ledger: ServerThread, ledger_client: LedgerClient, tenant: str
) -> None:
    """LiteLLM logs no event for a stream closed early; aclose_stream settles it."""
    slow = OpenAIServer(reply_tokens=200, chunk_delay_s=0.02).start()
    settled: list[Settlement] = []
    callback = _callback(ledger, tenant, settled)

    async def body() -> str:
        stream = await _completion(slow, stream=True, max_tokens=200)
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if len(text.split()) == 6:
                break
        await callback.aclose_stream(stream)
        return text

    try:
        text = _run(callback, body)
    finally:
        slow.stop()
    (s,) = settled
    prompt = litellm.token_counter(model="openai/gpt-4o", messages=MESSAGES)
    delivered = litellm.token_counter(model="openai/gpt-4o", text=text)
    assert s.outcome == "committed" and s.estimated and 0 < delivered < 200
    assert s.usage == pb.Usage(input_tokens=prompt, output_tokens=delivered)
    assert _balance(ledger_client, tenant) == (0, prompt + delivered)
    assert callback.open_holds == 0


def test_a_hold_whose_call_never_settles_is_forgotten_after_twice_its_ttl(
    ledger: ServerThread, ledger_client: LedgerClient, tenant: str
) -> None:
    """A stream dropped without aclose_stream leaves a hold no event ends: the ledger expires
    it at its TTL, and the callback forgets it by the next call after twice the TTL."""
    callback = _callback(ledger, tenant, [], policy=Policy(ttl_seconds=1))

    async def body() -> tuple[int, int]:
        dropped = {"model": "openai/gpt-4o", "messages": MESSAGES, "max_tokens": 5, "user": "ann"}
        await callback.async_pre_call_deployment_hook(dropped, "acompletion")
        before = callback.open_holds
        await asyncio.sleep(2.2)
        fresh = {"model": "openai/gpt-4o", "messages": MESSAGES, "max_tokens": 5, "user": "ann"}
        await callback.async_pre_call_deployment_hook(fresh, "acompletion")
        return before, callback.open_holds

    assert _run(callback, body) == (1, 1)  # the dropped one forgotten, the fresh one held
    prompt = litellm.token_counter(model="openai/gpt-4o", messages=MESSAGES)
    assert _balance(ledger_client, tenant) == (prompt + 5, 0)  # the dropped one expired


def test_the_router_holds_a_burst_of_concurrent_calls_to_the_budget(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer
) -> None:
    """16 calls at once for a user whose budget fits 4 holds: at least 4 go through (more
    when an early call settles below its hold before a late one reserves), every other one is
    refused before the provider, and nothing is spent past the budget."""
    t = new_id("t")
    prompt = litellm.token_counter(model="openai/gpt-4o", messages=MESSAGES)
    per_call = prompt + 40
    ledger_client.set_quota(tenant_id=t, user_id="ann", limit=4 * per_call + per_call // 2,
                            period=pb.PERIOD_NONE)  # fmt: skip
    settled: list[Settlement] = []

    async def body() -> list[Any]:
        params = {"model": "openai/gpt-4o", "api_base": openai_server.base_url, "api_key": "k"}
        router = litellm.Router(model_list=[{"model_name": "gpt-4o", "litellm_params": params}])
        calls = [router.acompletion(model="gpt-4o", messages=MESSAGES, max_tokens=40, user="ann",
                                    num_retries=0) for _ in range(16)]  # fmt: skip
        results = await asyncio.gather(*calls, return_exceptions=True)
        through = sum(1 for r in results if not isinstance(r, BaseException))
        await _wait(lambda: len(settled) == through)
        return results

    results = _run(_callback(ledger, t, settled), body)
    refused = sum(1 for r in results if isinstance(r, BudgetExhausted))
    assert len(openai_server.requests) == 16 - refused >= 4
    assert len(settled) == 16 - refused
    held, used = _balance(ledger_client, t)
    assert held == 0 and used == openai_server.served_tokens <= 4 * per_call + per_call // 2


def test_the_ledger_away_fails_the_call_closed_by_default_and_open_when_asked(
    openai_server: OpenAIServer,
) -> None:
    away = f"127.0.0.1:{free_port()}"
    settled: list[Settlement] = []

    async def closed() -> None:
        with pytest.raises(LedgerUnavailable, match="cannot be reached"):
            await _completion(openai_server)

    _run(
        LedgerCallback(target=away, tenant_id="t", max_attempts=2, on_settled=settled.append),
        closed,
    )
    assert openai_server.requests == []
    open_cb = LedgerCallback(
        target=away, tenant_id="t", max_attempts=2, policy=Policy(fail_open=True)
    )

    async def opened() -> Any:
        return await _completion(openai_server)

    reply = _run(open_cb, opened)
    assert reply.usage.completion_tokens == 20 and len(openai_server.requests) == 1


def test_bad_inputs_give_clear_errors(
    ledger: ServerThread, openai_server: OpenAIServer, tenant: str
) -> None:
    with pytest.raises(ClientError, match="needs a ledger target"):
        LedgerCallback(tenant_id="t")
    with pytest.raises(BadTarget):
        LedgerCallback(target="nohost", tenant_id="t")
    settled: list[Settlement] = []

    async def no_payer() -> None:
        with pytest.raises(ClientError, match="no one to charge"):
            await _completion(openai_server, user=None)

    _run(_callback(ledger, tenant, settled), no_payer)
    assert openai_server.requests == [] and settled == []


def test_the_proxy_hook_places_the_hold_once_and_metadata_names_the_payer(
    ledger: ServerThread, ledger_client: LedgerClient, openai_server: OpenAIServer, tenant: str
) -> None:
    """The proxy calls async_pre_call_hook, then (through its Router) the deployment hook:
    one hold, charged to the API key's user; a call the SDK makes names its payer by
    metadata."""
    from litellm.proxy._types import UserAPIKeyAuth

    settled: list[Settlement] = []
    callback = _callback(ledger, tenant, settled)

    async def body() -> None:
        data = {"model": "openai/gpt-4o", "messages": MESSAGES, "max_tokens": 10}
        await callback.async_pre_call_hook(UserAPIKeyAuth(user_id="bob"), None, data, "acompletion")
        await callback.async_pre_call_deployment_hook(data, "acompletion")
        assert callback.open_holds == 1 and data["max_tokens"] == 10
        assert data["litellm_call_id"]  # given one when it had none, for the events to find
        await _completion(openai_server, user="ann", metadata={"tokenledger_user_id": "cy"})
        await _wait(lambda: len(settled) == 1)

    _run(callback, body)
    assert _balance(ledger_client, tenant, "bob")[0] > 0
    usage = settled[0].usage
    assert usage is not None and usage.output_tokens == 20
    spent = usage.input_tokens + usage.cached_input_tokens + usage.output_tokens
    assert _balance(ledger_client, tenant, "cy") == (0, spent)


def test_the_proxy_config_names_a_callback_built_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    import services.client.litellm_proxy as proxy_module

    monkeypatch.setenv("TOKENLEDGER_TARGET", "ledger.internal:50051")
    monkeypatch.setenv("TOKENLEDGER_TENANT_ID", "acme")
    handler = importlib.reload(proxy_module).proxy_handler
    assert isinstance(handler, litellm.integrations.custom_logger.CustomLogger)
    assert (handler.target, handler.tenant_id) == ("ledger.internal:50051", "acme")
