"""Benchmark plumbing: a scratch database, the ledger server as a separate process, and
latency statistics."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import LedgerProcess, scratch_database


@contextmanager
def bench_database() -> Iterator[str]:
    """A scratch database on DATABASE_URL's server, or on an embedded PostgreSQL."""
    with tempfile.TemporaryDirectory() as tmp, scratch_database(Path(tmp)) as url:
        yield url


@contextmanager
def ledger_server(url: str, log_path: Path, **env: str) -> Iterator[LedgerProcess]:
    """`tokenledger serve` in its own process."""
    ledger = LedgerProcess(url, log_path, **env)
    ledger.start()
    try:
        yield ledger
    finally:
        ledger.stop()


@contextmanager
def ledger_process(url: str, log_path: Path, **env: str) -> Iterator[str]:
    """`tokenledger serve` in its own process; yields its target address."""
    with ledger_server(url, log_path, **env) as ledger:
        yield ledger.target


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Latencies:
    samples_s: list[float] = field(default_factory=list)

    def add(self, started: float) -> None:
        self.samples_s.append(time.perf_counter() - started)

    def pct_ms(self, p: float) -> float:
        if not self.samples_s:
            return float("nan")
        ordered = sorted(self.samples_s)
        idx = min(len(ordered) - 1, int(p / 100 * len(ordered)))
        return round(ordered[idx] * 1000, 2)

    def summary(self) -> dict[str, float]:
        return {"p50_ms": self.pct_ms(50), "p99_ms": self.pct_ms(99), "p999_ms": self.pct_ms(99.9)}
