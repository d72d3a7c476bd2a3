"""`make chaos`: the long fault run. Prints what happened and exits non-zero on a violation."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tests.chaos.harness import run_with_faults, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--spacing-s", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tally, faults, problems = asyncio.run(
            run_with_faults(
                Path(tmp),
                clients=args.clients,
                kills=args.kills,
                db_restarts=["fast", "immediate", "fast", "immediate"],
                spacing_s=args.spacing_s,
            )
        )
    for problem in problems:
        print(f"VIOLATION: {problem}")
    print(summary(tally, faults, problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
