"""Benchmark plumbing: a scratch database, the ledger server as a separate process, and
latency statistics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.support import scratch_database

TOKENLEDGER = Path(sys.executable).parent / "tokenledger"
SERVER_START_TIMEOUT_S = 60


@contextmanager
def bench_database() -> Iterator[str]:
    """A scratch database on DATABASE_URL's server, or on an embedded PostgreSQL."""
    with tempfile.TemporaryDirectory() as tmp, scratch_database(Path(tmp)) as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ledger_process(url: str, log_path: Path, **env: str) -> Iterator[str]:
    """`tokenledger serve` in its own process; yields its target address."""
    target = f"127.0.0.1:{free_port()}"
    full_env = (
        os.environ
        | {
            "DATABASE_URL": url,
            "TOKENLEDGER_LISTEN": target,
            "TOKENLEDGER_LOG_FORMAT": "json",
        }
        | env
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(TOKENLEDGER), "serve"], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=SERVER_START_TIMEOUT_S)
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


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
