"""The context service's metrics (OpenTelemetry API): tokens counted, count-cache hits and
misses, tokenizer pool bytes, pruning and summarization events and tokens saved per strategy.

Instruments are created on the meter provider passed in (the global one by default), so a test
can read them through its own provider and an InMemoryMetricReader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from services.context.tokenizers import CounterStats

METER_NAME = "tokenledger.context"


class ContextMetrics:
    """Every instrument of the service; `stats` reads the counter's cumulative figures."""

    def __init__(
        self, stats: Callable[[], CounterStats], provider: MeterProvider | None = None
    ) -> None:
        meter = (provider or metrics.get_meter_provider()).get_meter(METER_NAME)
        self._stats = stats
        self.tokens_counted = meter.create_counter(
            "context.tokens_counted",
            unit="{token}",
            description="Tokens counted for callers (messages, tools and priming), by encoding",
        )
        self.fit_events = meter.create_counter(
            "context.fit.events",
            unit="{event}",
            description="Conversations changed to fit, by strategy and action "
            "(pruned, truncated, summarized)",
        )
        self.tokens_saved = meter.create_counter(
            "context.fit.tokens_saved",
            unit="{token}",
            description="Prompt tokens removed by fitting, by strategy",
        )
        self.summarizer_calls = meter.create_counter(
            "context.summarizer.calls",
            unit="{call}",
            description="Remote summarizer calls, by outcome (ok, fallback)",
        )
        self._memory_instruments(meter)
        self.prepare_duration = meter.create_histogram(
            "context.prepare.duration",
            unit="ms",
            description="PrepareContext time from request to response, ledger call included",
        )
        meter.create_observable_counter(
            "context.count_cache.hits",
            [self._observe(lambda s: s.cache_hits)],
            unit="{lookup}",
            description="Per-message count cache hits",
        )
        meter.create_observable_counter(
            "context.count_cache.misses",
            [self._observe(lambda s: s.cache_misses)],
            unit="{lookup}",
            description="Per-message count cache misses (the text was encoded)",
        )
        meter.create_observable_counter(
            "context.tokens_encoded",
            [self._observe(lambda s: s.tokens_encoded)],
            unit="{token}",
            description="Tokens actually run through a tokenizer (cache misses and texts)",
        )
        meter.create_observable_gauge(
            "context.tokenizer_pool.bytes",
            [self._observe(lambda s: s.pool.bytes_estimated)],
            unit="By",
            description="Estimated memory of the loaded encodings",
        )

    def _memory_instruments(self, meter: metrics.Meter) -> None:
        self.retention_ratio = meter.create_histogram(
            "context.retention.ratio",
            unit="1",
            description="Information retention ratio of each PrepareContext that had facts to "
            "keep (memory facts and retention markers kept / in the original), by strategy",
        )
        self.retention_facts = meter.create_counter(
            "context.retention.facts",
            unit="{fact}",
            description="Facts (memory facts and markers) PrepareContext had to keep, by "
            "strategy and outcome (kept, lost)",
        )
        self.memory_left_out = meter.create_counter(
            "context.memory.left_out",
            unit="{fact}",
            description="Memory facts left out of the prompt because they did not fit the "
            "memory's share, by strategy",
        )

    def _observe(
        self, read: Callable[[CounterStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(self._stats()))]

        return callback

    def counted(self, tokens: int, encoding: str, rpc: str) -> None:
        self.tokens_counted.add(tokens, {"encoding": encoding, "rpc": rpc})

    def fitted(
        self,
        strategy: str,
        *,
        pruned: bool,
        truncated: bool,
        summarized: bool,
        tokens_saved: int,
    ) -> None:
        for action, happened in (
            ("pruned", pruned),
            ("truncated", truncated),
            ("summarized", summarized),
        ):
            if happened:
                self.fit_events.add(1, {"strategy": strategy, "action": action})
        self.tokens_saved.add(max(tokens_saved, 0), {"strategy": strategy})
