"""Predictive output holds (issue #17): hold what a user's replies recently took, not the
caller's max_tokens.

The figures are the ledger's (LedgerService.GetOutputStats: the p95 of the output tokens of the
user's recent calls of the model, or the tenant's when the user has fewer than 20). They are
kept per (tenant, user, model) for `ttl_s` so that the hot path pays no extra ledger call on
most requests: a hold is sized from figures at most `ttl_s` old (plus the ledger's own read
lag where its reads go to a replica). Concurrent requests for the same key share one call.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services._gen.tokenledger.v1 import context_pb2 as cpb
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.context.ledger_client import LedgerCallError, LedgerClient

output_hold_margin_default = 0.10
"""Held above the p95: the p95 of 20 calls (the fewest the ledger trusts) is their 19th, a
noisy estimate, and traffic drifts within the window. tests/bench/predict_bench.py measures
what the margin buys: held ÷ used and the share of replies longer than their hold."""
output_stats_ttl_s_default = 5.0
output_stats_entries_max = 65_536
"""Keys kept at once (least recently used go first): a few MiB at most."""


@dataclass(frozen=True, slots=True)
class OutputHoldConfig:
    """CONTEXT_OUTPUT_HOLD_MARGIN and CONTEXT_OUTPUT_STATS_TTL_S."""

    margin: float = output_hold_margin_default
    stats_ttl_s: float = output_stats_ttl_s_default


HOLD_DEFAULTS = OutputHoldConfig()
Key = tuple[str, str, str]
PREDICTED_SCOPES = (pb.OUTPUT_STATS_SCOPE_USER, pb.OUTPUT_STATS_SCOPE_TENANT)


@dataclass(slots=True)
class _Entry:
    fetched_at: float
    reply: asyncio.Future[pb.GetOutputStatsResponse]


class OutputStatsCache:
    """The ledger's output statistics per (tenant, user, model), each kept for `ttl_s`."""

    def __init__(
        self,
        ledger: LedgerClient,
        ttl_s: float = output_stats_ttl_s_default,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()

    async def get(
        self, key: Key, timeout_s: float | None
    ) -> tuple[pb.GetOutputStatsResponse, float]:
        """The figures and their age in seconds; LedgerCallError if the ledger refused or
        could not be reached (nothing is kept then: the next request asks again)."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None or now - entry.fetched_at >= self._ttl_s:
            entry = self._fetch(key, now, timeout_s)
        else:
            self._entries.move_to_end(key)
        # shield: one waiter's cancellation must not cancel the call the others wait for
        return await asyncio.shield(entry.reply), now - entry.fetched_at

    def _fetch(self, key: Key, now: float, timeout_s: float | None) -> _Entry:
        tenant_id, user_id, model = key
        request = pb.GetOutputStatsRequest(tenant_id=tenant_id, user_id=user_id, model=model)
        reply = asyncio.ensure_future(self._ledger.output_stats(request, timeout_s))
        entry = self._entries[key] = _Entry(now, reply)
        self._entries.move_to_end(key)
        while len(self._entries) > output_stats_entries_max:
            self._entries.popitem(last=False)
        reply.add_done_callback(lambda done: self._forget_failed(key, entry, done))
        return entry

    def _forget_failed(
        self, key: Key, entry: _Entry, done: asyncio.Future[pb.GetOutputStatsResponse]
    ) -> None:
        failed = done.cancelled() or done.exception() is not None  # retrieves it, too
        if failed and self._entries.get(key) is entry:
            del self._entries[key]


def hold_tokens(stats: pb.GetOutputStatsResponse, max_output: int, margin: float) -> int:
    """min(max_output, ceil(p95 * (1 + margin))), at least 1; max_output when the figures are
    too few to trust (scope NONE)."""
    if stats.scope not in PREDICTED_SCOPES:
        return max_output
    # In whole parts per million: a float product would make 100 * 1.1 hold 111.
    ppm = round(margin * 1_000_000)
    over = -(-stats.p95_output_tokens * ppm // 1_000_000)
    return max(1, min(max_output, stats.p95_output_tokens + over))


async def predict(
    cache: OutputStatsCache, key: Key, max_output: int, margin: float, timeout_s: float | None
) -> cpb.OutputPrediction:
    """The output hold for a call of `key` wanting at most `max_output` tokens. If the ledger's
    figures cannot be read, max_output is held and `fallback_reason` says why: the Reserve
    that follows will then fail on its own if the ledger is really away."""
    try:
        stats, age_s = await cache.get(key, timeout_s)
    except LedgerCallError as exc:
        return cpb.OutputPrediction(
            scope=pb.OUTPUT_STATS_SCOPE_NONE,
            hold_tokens=max_output,
            margin=margin,
            fallback_reason=f"the ledger's output statistics could not be read: {exc}",
        )
    return cpb.OutputPrediction(
        scope=stats.scope,
        samples=stats.samples,
        p95_output_tokens=stats.p95_output_tokens,
        hold_tokens=hold_tokens(stats, max_output, margin),
        margin=margin,
        stats_age_ms=round(age_s * 1000),
    )
