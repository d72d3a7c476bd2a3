"""`make bench`, predictive output holds (issue #17): the same replayed traffic through a real
ledger and context service (separate processes), once holding max_tokens for every reply
(OUTPUT_HOLD_MAX_TOKENS) and once holding the predicted p95 (OUTPUT_HOLD_PREDICTED), each in
its own tenant.

The traffic (seeded): `--users` users of one model, each with their own median reply length
(lognormal around 250 tokens, sigma 0.8: some users write a line, some a page), each reply
lognormal around its user's median (sigma 0.6), cut at max_tokens 4096 as a model would;
prompts of 5 sizes (about 150 to 3,000 tokens). A quarter of the users arrive only in the
measured part, with few calls: they are held at the tenant's p95 (or at max_tokens while the
tenant has too few calls). The first `--warmup` calls per user build the history the
prediction reads and are not measured. Each call: PrepareContext, then Commit with the
fitted prompt as input and the reply's length as output (usage above a hold is overage).

Printed, for each mode: output tokens held ÷ output tokens used, all tokens held ÷ used, the
share of replies longer than their hold and the overage; then how many calls fit a fixed
budget at once (a tenant limit of `--budget` tokens above what is used, holds placed one after
another for the traffic's next calls and left open until the ledger refuses one); the same
ratios recomputed for other margins from the same figures; machine load. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import context_pb2_grpc as cpb_grpc
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.bench.context_bench import context_process
from tests.bench.harness import Latencies, bench_database, ledger_process

MODEL = "gpt-4o"
MAX_TOKENS = 4096
MEDIAN_OF_MEDIANS = 250
USER_SIGMA = 0.8
CALL_SIGMA = 0.6
PROMPT_WORDS = (100, 300, 700, 1200, 2200)
MODES = {"max_tokens": cpb.OUTPUT_HOLD_MAX_TOKENS, "predicted": cpb.OUTPUT_HOLD_PREDICTED}
MARGINS = (0.0, 0.1, 0.25, 0.5)


@dataclass(frozen=True)
class Call:
    user: str
    prompt: int  # index into the prompts
    output: int  # the reply's tokens, at most MAX_TOKENS


def traffic(users: int, warmup: int, measured: int, seed: int) -> tuple[list[Call], list[Call]]:
    """(warm-up calls, measured calls), seeded; late users appear only in the measured part."""
    rng = random.Random(seed)
    medians = {f"u{i:03}": rng.lognormvariate(math.log(MEDIAN_OF_MEDIANS), USER_SIGMA)
               for i in range(users)}  # fmt: skip
    names = sorted(medians)
    late = set(names[: users // 4])

    def call(user: str) -> Call:
        reply = round(rng.lognormvariate(math.log(medians[user]), CALL_SIGMA))
        return Call(user, rng.randrange(len(PROMPT_WORDS)), max(1, min(MAX_TOKENS, reply)))

    early = [u for u in names if u not in late]
    warm = [call(u) for u in early for _ in range(warmup)]
    rng.shuffle(warm)
    weights = [0.2 if u in late else 1.0 for u in names]  # late users: few calls each
    return warm, [call(rng.choices(names, weights)[0]) for _ in range(measured)]


def prompts(seed: int) -> list[list[cpb.ChatMessage]]:
    rng = random.Random(seed)
    words = ["budget", "token", "ledger", "model", "context", "window", "the", "a", "of"]
    out = []
    for n in PROMPT_WORDS:
        text = " ".join(rng.choice(words) for _ in range(n))
        out.append([
            cpb.ChatMessage(role=cpb.CHAT_ROLE_SYSTEM, content="You are a careful assistant."),
            cpb.ChatMessage(role=cpb.CHAT_ROLE_USER, content=text),
        ])  # fmt: skip
    return out


@dataclass
class Tally:
    calls: int = 0
    output_held: int = 0
    output_used: int = 0
    held: int = 0
    used: int = 0
    over_hold: int = 0
    overage: int = 0
    scopes: dict[str, int] | None = None
    latency: Latencies = field(default_factory=Latencies)


class Replay:
    """Calls through the context service and commits to the ledger for one tenant and mode."""

    def __init__(self, ctx: Any, ledger: Any, chats: list[list[cpb.ChatMessage]], mode: str):
        self.ctx, self.ledger, self.chats, self.mode = ctx, ledger, chats, mode
        self.tenant = f"{mode}-{uuid.uuid4().hex[:6]}"
        self.p95s: list[tuple[int, int, int]] = []  # (scope, p95, output) of measured calls

    def prepare(self, call: Call, **fields: Any) -> cpb.PrepareContextResponse:
        reply: cpb.PrepareContextResponse = self.ctx.PrepareContext(cpb.PrepareContextRequest(
            idempotency_key=uuid.uuid4().hex, tenant_id=self.tenant, user_id=call.user,
            model=MODEL, messages=self.chats[call.prompt], max_output_tokens=MAX_TOKENS,
            output_hold=MODES[self.mode], **fields,
        ))  # fmt: skip
        return reply

    def run(self, calls: list[Call], tally: Tally | None = None) -> None:
        for call in calls:
            started = time.perf_counter()
            reply = self.prepare(call)
            if tally is not None:
                tally.latency.add(started)
            output = min(call.output, reply.max_tokens)  # a model stops at max_tokens
            usage = pb.Usage(input_tokens=reply.breakdown.prompt_total, output_tokens=output)
            done = self.ledger.Commit(pb.CommitRequest(
                tenant_id=self.tenant, reservation_id=reply.reservation_id, usage=usage,
            ))  # fmt: skip
            if tally is not None:
                self._count(tally, reply, output, done)

    def _count(
        self, t: Tally, reply: cpb.PrepareContextResponse, output: int, done: pb.CommitResponse
    ) -> None:
        hold = reply.breakdown.output_reserve
        t.calls += 1
        t.output_held, t.output_used = t.output_held + hold, t.output_used + output
        t.held += reply.granted_tokens
        t.used += reply.breakdown.prompt_total + output
        t.over_hold += output > hold
        t.overage += done.overage
        if reply.HasField("output_prediction"):
            p = reply.output_prediction
            name = pb.OutputStatsScope.Name(p.scope).removeprefix("OUTPUT_STATS_SCOPE_").lower()
            t.scopes = (t.scopes or {}) | {name: (t.scopes or {}).get(name, 0) + 1}
            self.p95s.append((p.scope, p.p95_output_tokens, output))

    def fit_budget(self, calls: list[Call], budget: int) -> dict[str, Any]:
        """Holds for the next calls, left open, until the ledger refuses one under a tenant
        limit of `budget` above what is used; then rolled back."""
        balance = self.ledger.GetBalance(pb.GetBalanceRequest(tenant_id=self.tenant)).balance
        self.ledger.SetQuota(pb.SetQuotaRequest(
            idempotency_key=uuid.uuid4().hex, tenant_id=self.tenant,
            limit=balance.used + budget, period=pb.PERIOD_NONE,
        ))  # fmt: skip
        placed: list[cpb.PrepareContextResponse] = []
        for call in calls:
            try:
                placed.append(self.prepare(call))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                break
        for reply in placed:
            ended = pb.RollbackRequest(tenant_id=self.tenant, reservation_id=reply.reservation_id)
            self.ledger.Rollback(ended)
        held = sum(r.granted_tokens for r in placed)
        return {"calls": len(placed), "held": held, "budget": budget}


def cached_latency(ctx: Any, ledger: Any, replay: Replay, calls: list[Call]) -> dict[str, float]:
    """PrepareContext p50 in both modes, interleaved call by call (outside load falls on both
    alike), on a service keeping the figures for the default 5 s; each hold rolled back."""
    lats = {mode: Latencies() for mode in MODES}
    for call in calls:
        for mode in MODES:
            replay.mode = mode
            started = time.perf_counter()
            reply = replay.prepare(call)
            lats[mode].add(started)
            ended = pb.RollbackRequest(tenant_id=replay.tenant, reservation_id=reply.reservation_id)
            ledger.Rollback(ended)
    return {mode: lat.pct_ms(50) for mode, lat in lats.items()}


def what_if(p95s: list[tuple[int, int, int]]) -> dict[str, dict[str, float]]:
    """Output held ÷ used and the share of replies over their hold, recomputed for other
    margins from the same figures (the figures do not depend on the margin: usage is recorded
    in full either way)."""
    predicted = (pb.OUTPUT_STATS_SCOPE_USER, pb.OUTPUT_STATS_SCOPE_TENANT)
    out = {}
    for margin in MARGINS:
        holds = [
            min(MAX_TOKENS, -(-p95 * round(margin * 1000) // 1000) + p95)
            if scope in predicted else MAX_TOKENS
            for scope, p95, _ in p95s
        ]  # fmt: skip
        used = [o for _, _, o in p95s]
        out[f"{margin:g}"] = {
            "output_held_over_used": round(sum(holds) / sum(used), 2),
            "over_hold_share": round(
                sum(o > h for o, h in zip(used, holds, strict=True)) / len(used), 4
            ),
        }
    return out


def summary(t: Tally) -> dict[str, Any]:
    return {
        "calls": t.calls,
        "output_held_over_used": round(t.output_held / t.output_used, 2),
        "held_over_used": round(t.held / t.used, 2),
        "over_hold_share": round(t.over_hold / t.calls, 4),
        "overage_tokens": t.overage,
        "overage_over_used": round(t.overage / t.used, 4),
        "scopes": t.scopes or {},
        "prepare_p50_ms": t.latency.pct_ms(50),
    }


def replay_mode(
    replay: Replay, warm: list[Call], measured: list[Call], budget_calls: list[Call], budget: int
) -> dict[str, Any]:
    """The warm-up, then the measured calls counted, then the fit of a budget."""
    replay.run(warm)
    tally = Tally()
    replay.run(measured, tally)
    return summary(tally) | {"fit": replay.fit_budget(budget_calls, budget)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=25, help="calls per early user first")
    parser.add_argument("--calls", type=int, default=1000, help="measured calls")
    parser.add_argument("--budget", type=int, default=200_000, help="tokens, for the fit")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    warm, measured = traffic(args.users, args.warmup, args.calls, args.seed)
    budget_calls = traffic(args.users, 0, 2_000, args.seed + 1)[1]
    chats = prompts(args.seed)
    report: dict[str, Any] = {"load_before": os.getloadavg(), "cores": os.cpu_count()}
    started = time.monotonic()
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "servers.log"
        with (
            ledger_process(url, log, TOKENLEDGER_LOG_LEVEL="warning") as ledger_target,
            # The replay puts days of traffic into a minute: a figure kept 5 s (the default)
            # would be as stale as days of real traffic, so every call reads the ledger's.
            context_process(ledger_target, log, url, CONTEXT_OUTPUT_STATS_TTL_S="0") as target,
            grpc.insecure_channel(target) as cch,
            grpc.insecure_channel(ledger_target) as lch,
        ):
            ctx, ledger = cpb_grpc.ContextServiceStub(cch), pb_grpc.LedgerServiceStub(lch)
            for mode in MODES:
                replay = Replay(ctx, ledger, chats, mode)
                report[mode] = replay_mode(replay, warm, measured, budget_calls, args.budget)
            report["margins"] = what_if(replay.p95s)  # the predicted replay's figures
            with (
                context_process(ledger_target, log, url) as cached_target,
                grpc.insecure_channel(cached_target) as cached,
            ):
                ctx = cpb_grpc.ContextServiceStub(cached)
                replay.ctx = ctx
                report["cached_p50_ms"] = cached_latency(ctx, ledger, replay, measured[:300])
    report["load_after"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started)
    report["traffic"] = {"users": args.users, "warmup_calls": len(warm),
                         "measured_calls": len(measured), "seed": args.seed}  # fmt: skip
    _print(report)
    print(json.dumps(report, separators=(",", ":")))


def _print(r: dict[str, Any]) -> None:
    t = r["traffic"]
    print(
        f"predictive output holds: {t['users']} users, {t['warmup_calls']} warm-up + "
        f"{t['measured_calls']} measured calls (seed {t['seed']}), max_tokens {MAX_TOKENS}"
    )
    for mode in MODES:
        s, fit = r[mode], r[mode]["fit"]
        print(f"  {mode:10}: output held/used {s['output_held_over_used']}, all held/used "
              f"{s['held_over_used']}, replies over their hold {s['over_hold_share']:.1%}, "
              f"overage {s['overage_tokens']:,} tokens ({s['overage_over_used']:.2%} of used); "
              f"{fit['calls']} calls in flight fit {fit['budget']:,} tokens; PrepareContext "
              f"p50 {s['prepare_p50_ms']} ms"
              + (f"; figures from {s['scopes']}" if s["scopes"] else ""))  # fmt: skip
    c = r["cached_p50_ms"]
    print(f"  PrepareContext p50 with the figures kept 5 s (the default), interleaved: "
          f"max_tokens {c['max_tokens']} ms, predicted {c['predicted']} ms")  # fmt: skip
    for margin, m in r["margins"].items():
        print(f"  margin {margin:>4}: output held/used {m['output_held_over_used']}, "
              f"replies over their hold {m['over_hold_share']:.1%}")  # fmt: skip
    before, after = r["load_before"], r["load_after"]
    print(f"  machine: {r['cores']} cores, load average {before[0]:.1f} before, "
          f"{after[0]:.1f} after ({r['seconds']} s)")  # fmt: skip


if __name__ == "__main__":
    main()
