"""The short fault run of `make test` (`make chaos` is the long one): the server is killed
with SIGKILL and the database restarted (fast and immediate) under concurrent load whose
clients retry with the same idempotency key. Nothing acknowledged is lost or applied twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.chaos.harness import run_with_faults, summary


def test_kills_and_database_restarts_lose_nothing_and_double_nothing(tmp_path: Path) -> None:
    tally, faults, problems = asyncio.run(
        run_with_faults(
            tmp_path, clients=16, kills=2, db_restarts=["fast", "immediate"], spacing_s=2.0
        )
    )
    print(summary(tally, faults, problems))
    assert problems == []
    assert faults.server_kills == 2 and faults.not_serving_seen == 2
    assert tally.retries > 0, "no call was ever interrupted: the faults proved nothing"
    assert len(tally.committed) > 50 and tally.rolled_back
    assert set(tally.codes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
