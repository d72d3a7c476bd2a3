"""`make bench` (gateway head-to-head): the same burst — `--calls` concurrent chat calls (64)
for one user whose budget fits `--fit` of them (10) — through each budget mechanism of
LiteLLM that runs here, and through the ledger's LiteLLM callback (services.client.litellm)
against `tokenledger serve` in its own process. The provider is the local OpenAI-compatible
server of the tests (tests/openai_server.py), counting prompts with LiteLLM's tokenizer so
that its usage is what OpenAI would report, every reply using all of its max tokens.

Per mechanism it prints: calls the provider served, the tokens it served, the tokens past the
budget, and — from `--sequential` calls one at a time with no budget in reach — the latency
per call p50/p99 and what the mechanism adds to the baseline (the same calls with no budget
mechanism at all, measured first and last; their mean). Run:
`python -m tests.bench.gateway_bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported

import litellm

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import LedgerClient
from services.client.litellm import LedgerCallback
from tests.bench.harness import Latencies, bench_database, ledger_process
from tests.openai_server import OpenAIServer

litellm.suppress_debug_info = True
MODEL = "gpt-4o"
MESSAGES = [
    {"role": "system", "content": "You answer questions about accounting for LLM traffic."},
    {"role": "user", "content": "How does a token ledger keep a budget under concurrency?"},
]
MAX_TOKENS = 60
USER = "alice"

Call = Callable[[], Awaitable[Any]]


@dataclass
class Row:
    mechanism: str
    through: int = 0
    refused: int = 0
    served_tokens: int = 0
    past_budget: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    added_p50_ms: float = 0.0
    added_p99_ms: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Budget:
    per_call_tokens: int
    tokens: int
    usd: float


def _budget(fit: int) -> Budget:
    prompt = int(litellm.token_counter(model=MODEL, messages=MESSAGES))
    per_call = prompt + MAX_TOKENS
    cost_in, cost_out = litellm.cost_per_token(model=MODEL, prompt_tokens=prompt,
                                               completion_tokens=MAX_TOKENS)  # fmt: skip
    return Budget(per_call, fit * per_call, fit * (cost_in + cost_out))


def _deployment(server: OpenAIServer, **extra: Any) -> dict[str, Any]:
    params = {"model": f"openai/{MODEL}", "api_base": server.base_url, "api_key": "sk-bench"}
    return {"model_name": MODEL, "litellm_params": params | extra}


async def _burst(call: Call, calls: int) -> tuple[int, list[str]]:
    results = await asyncio.gather(*(call() for _ in range(calls)), return_exceptions=True)
    errors = [type(r).__name__ for r in results if isinstance(r, BaseException)]
    return calls - len(errors), errors


async def _latency(call: Call, n: int) -> Latencies:
    lat = Latencies()
    for _ in range(n):
        started = time.perf_counter()
        await call()
        lat.add(started)
    return lat


def _sdk_call(server: OpenAIServer, **kw: Any) -> Call:
    return lambda: litellm.acompletion(
        model=f"openai/{MODEL}", api_base=server.base_url, api_key="sk-bench", messages=MESSAGES,
        max_tokens=MAX_TOKENS, user=USER, num_retries=0, **kw,
    )  # fmt: skip


def _router_call(router: Any) -> Call:
    return lambda: router.acompletion(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                      user=USER, num_retries=0)  # fmt: skip


# --- the mechanisms: each returns (call for the burst, call for the latency run, note) --------


async def m_none(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    return _sdk_call(server), _sdk_call(server), "no budget mechanism (the baseline)"


async def m_router_tpm(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    burst = litellm.Router(model_list=[_deployment(server, tpm=budget.tokens)],
                           routing_strategy="usage-based-routing-v2")  # fmt: skip
    open_ = litellm.Router(model_list=[_deployment(server, tpm=10**9)],
                           routing_strategy="usage-based-routing-v2")  # fmt: skip
    return _router_call(burst), _router_call(open_), f"deployment tpm={budget.tokens}"


async def m_router_tpm_uncapped(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    """The same, with the parallel-call cap LiteLLM derives from tpm raised to the burst."""
    burst = litellm.Router(
        model_list=[_deployment(server, tpm=budget.tokens, max_parallel_requests=64)],
        routing_strategy="usage-based-routing-v2",
    )
    open_ = litellm.Router(model_list=[_deployment(server, tpm=10**9, max_parallel_requests=64)],
                           routing_strategy="usage-based-routing-v2")  # fmt: skip
    return (
        _router_call(burst),
        _router_call(open_),
        f"tpm={budget.tokens}, max_parallel_requests=64",
    )


async def m_deployment_budget(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    burst = litellm.Router(
        model_list=[_deployment(server, max_budget=budget.usd, budget_duration="1d")]
    )
    open_ = litellm.Router(model_list=[_deployment(server, max_budget=10**6, budget_duration="1d")])
    return _router_call(burst), _router_call(open_), f"deployment max_budget=${budget.usd:.6f}/1d"


async def m_provider_budget(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    def router(limit: float) -> Any:
        config = {"openai": {"budget_limit": limit, "time_period": "1d"}}
        return litellm.Router(model_list=[_deployment(server)], provider_budget_config=config)

    return (
        _router_call(router(budget.usd)),
        _router_call(router(10**6)),
        "provider_budget_config openai",
    )


async def m_global_max_budget(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    litellm.max_budget = budget.usd
    ctx["cleanup"] = lambda: setattr(litellm, "max_budget", 0.0)
    ctx["report"] = lambda: f"litellm._current_cost after the burst: {litellm._current_cost}"
    return _sdk_call(server), _sdk_call(server), f"litellm.max_budget=${budget.usd:.6f}"


async def m_budget_manager(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    manager = litellm.BudgetManager(project_name=f"bench-{uuid.uuid4().hex[:6]}")
    manager.create_budget(total_budget=budget.usd, user=USER)
    manager.create_budget(total_budget=10**6, user="unbounded")
    call = _sdk_call(server)

    def guarded(user: str) -> Call:
        async def run() -> Any:  # the documented check, call, update_cost
            if manager.get_current_cost(user) >= manager.get_total_budget(user):
                raise RuntimeError("BudgetManager: over budget")
            reply = await call()
            manager.update_cost(completion_obj=reply, user=user)
            return reply

        return run

    return guarded(USER), guarded("unbounded"), "check get_current_cost, call, update_cost"


async def m_ledger(
    server: OpenAIServer, budget: Budget, ctx: dict[str, Any]
) -> tuple[Call, Call, str]:
    target, tenant = ctx["ledger_target"], f"bench-{uuid.uuid4().hex[:8]}"
    with LedgerClient(target) as admin:
        admin.set_quota(tenant_id=tenant, user_id=USER, limit=budget.tokens, period=pb.PERIOD_DAY)
        admin.set_quota(tenant_id=tenant, user_id="unbounded", limit=10**12, period=pb.PERIOD_DAY)
    callback = LedgerCallback(target=target, tenant_id=tenant)
    litellm.callbacks = [callback]
    ctx["cleanup"] = lambda: setattr(litellm, "callbacks", [])
    ctx["settle"] = lambda: callback.open_holds == 0
    sequential = _sdk_call(server, metadata={"tokenledger_user_id": "unbounded"})
    return _sdk_call(server), sequential, f"user quota {budget.tokens} tokens/day"


MECHANISMS = {
    "none": m_none,
    "litellm Router usage-based-routing-v2 tpm": m_router_tpm,
    "  the same, max_parallel_requests=64": m_router_tpm_uncapped,
    "litellm deployment max_budget": m_deployment_budget,
    "litellm provider budget": m_provider_budget,
    "litellm.max_budget": m_global_max_budget,
    "litellm BudgetManager": m_budget_manager,
    "tokenledger LedgerCallback": m_ledger,
}


async def measure(name: str, server: OpenAIServer, budget: Budget, args: argparse.Namespace,
                  ctx: dict[str, Any]) -> Row:  # fmt: skip
    for key in ("cleanup", "settle", "report"):
        ctx.pop(key, None)
    burst, sequential, note = await MECHANISMS[name](server, budget, ctx)
    try:
        await _latency(sequential, 3)  # warm: connections, LiteLLM's first-call setup
        server.reset()
        through, errors = await _burst(burst, args.calls)
        await _settled(ctx)
        served, completions = server.served_tokens, server.completions
        lat = await _latency(sequential, args.sequential)
        await _settled(ctx)
    finally:
        if "cleanup" in ctx:
            ctx["cleanup"]()
    if "report" in ctx:
        note += f"; {ctx['report']()}"
    if errors:
        note += f"; refusals: {sorted(set(errors))}"
    return Row(name, through=completions, refused=args.calls - through, served_tokens=served,
               past_budget=max(0, served - budget.tokens), p50_ms=lat.pct_ms(50),
               p99_ms=lat.pct_ms(99), note=note)  # fmt: skip


async def _settled(ctx: dict[str, Any]) -> None:
    """LiteLLM logs success after the call returns: wait for the callback's commits."""
    for _ in range(600):
        if "settle" not in ctx or ctx["settle"]():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # LiteLLM's own async success logging (its spend counters)


async def run(args: argparse.Namespace, ledger_target: str) -> list[Row]:
    server = OpenAIServer(
        reply_tokens=MAX_TOKENS, cached_fraction=0.0, latency_s=args.provider_latency_s,
        count_prompt=lambda messages: int(litellm.token_counter(model=MODEL, messages=messages)),
    ).start()  # fmt: skip
    budget = _budget(args.fit)
    ctx: dict[str, Any] = {"ledger_target": ledger_target}
    rows = []
    try:
        for name in [*MECHANISMS, "none"]:  # the baseline first and last: the machine drifts
            rows.append(await measure(name, server, budget, args, ctx))
    finally:
        server.stop()
    first, last = rows[0], rows.pop()
    base_p50, base_p99 = (first.p50_ms + last.p50_ms) / 2, (first.p99_ms + last.p99_ms) / 2
    first.note += (
        f"; p50/p99 {first.p50_ms}/{first.p99_ms} ms first, {last.p50_ms}/{last.p99_ms} last"
    )
    first.p50_ms, first.p99_ms = round(base_p50, 2), round(base_p99, 2)
    for row in rows:
        row.added_p50_ms = round(row.p50_ms - base_p50, 2)
        row.added_p99_ms = round(row.p99_ms - base_p99, 2)
    print(f"budget: {args.fit} calls = {budget.tokens} tokens (${budget.usd:.6f} at LiteLLM's "
          f"{MODEL} prices); each call {budget.per_call_tokens} tokens; "
          f"{args.calls} at once")  # fmt: skip
    return rows


def print_rows(rows: list[Row], args: argparse.Namespace) -> None:
    head = (f"{'mechanism':44} {'through':>7} {'tokens':>7} {'past budget':>11} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} {'+p99':>6}")  # fmt: skip
    print(head)
    for r in rows:
        print(f"{r.mechanism:44} {r.through:>7} {r.served_tokens:>7} {r.past_budget:>11} "
              f"{r.p50_ms:>7} {r.p99_ms:>7} {r.added_p50_ms:>6} {r.added_p99_ms:>6}")  # fmt: skip
    for r in rows:
        print(json.dumps({"bench": "gateway", "calls": args.calls, "fit": args.fit} | r.__dict__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--fit", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--provider-latency-s", type=float, default=0.05)
    args = parser.parse_args()
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # BudgetManager keeps its user_cost.json in the working directory
        try:
            with ledger_process(url, Path(tmp) / "ledger.log") as target:
                print_rows(asyncio.run(run(args, target)), args)
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    main()
