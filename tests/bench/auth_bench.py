"""What API keys cost a call: two `tokenledger serve` processes on one database, one with
TOKENLEDGER_AUTH=api_key (every call carrying a key) and one with auth off, driven in turns
(short runs, alternating, the order flipped each round) so that both see the same load on a
shared machine. Prints each run and the medians: auth-on throughput over auth-off, and the
server CPU per RPC it adds; then, free of the machine's load, the CPU one call's key check
takes in process (`key_principal` with the key cached, as the interceptor calls it).

`python -m tests.bench.auth_bench --clients 1,64 --rounds 4 --seconds 3`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from services.platform import db
from services.platform.auth import KeyStore, key_principal
from tests.bench.harness import bench_database, ledger_server
from tests.bench.ledger_bench import SPREAD_USERS, api_key, ledger_cycles, with_cpu
from tests.support import LedgerProcess


def run(server: LedgerProcess, clients: int, seconds: float, key: str = "") -> dict[str, Any]:
    assert server.proc is not None
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return with_cpu(
        server.proc.pid,
        ledger_cycles(server.target, clients, SPREAD_USERS, seconds, metadata=metadata),
    )


async def key_check_us(url: str, key: str, calls: int = 20_000) -> float:
    """CPU µs of one cached key check: parse, cache hit, sha256 of the secret, comparison."""
    async with db.make_pool(url, 2) as pool:
        keys = KeyStore(pool)
        assert keys.cache is not None
        await key_principal(keys, key)  # starts the cache's listener
        for _ in range(1_000):  # up to 10 s for its LISTEN
            if keys.cache.listening:
                break
            await asyncio.sleep(0.01)
        await key_principal(keys, key)  # cached from here on
        started = time.process_time()
        for _ in range(calls):
            await key_principal(keys, key)
        spent = time.process_time() - started
        await keys.close()
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    report = []
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        key = api_key(url)
        with (
            ledger_server(url, Path(tmp) / "off.log") as off,
            ledger_server(url, Path(tmp) / "on.log", TOKENLEDGER_AUTH="api_key") as on,
        ):
            for clients in (int(c) for c in args.clients.split(",")):
                ratios, added = [], []
                for n in range(args.rounds):
                    runs = {}
                    for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
                        server = off if mode == "off" else on
                        runs[mode] = run(server, clients, args.seconds, key if mode == "on" else "")
                    ratios.append(runs["on"]["rpcs_s"] / runs["off"]["rpcs_s"])
                    added.append(
                        runs["on"]["server_cpu_ms_per_rpc"] - runs["off"]["server_cpu_ms_per_rpc"]
                    )
                    print(
                        f"clients {clients:>3} round {n}: off {runs['off']['rpcs_s']} rpc/s "
                        f"{runs['off']['server_cpu_ms_per_rpc']} ms CPU/RPC | on "
                        f"{runs['on']['rpcs_s']} rpc/s {runs['on']['server_cpu_ms_per_rpc']} ms "
                        f"CPU/RPC",
                        flush=True,
                    )
                row = {
                    "clients": clients,
                    "on_over_off_median": round(statistics.median(ratios), 3),
                    "added_cpu_ms_per_rpc_median": round(statistics.median(added), 3),
                }
                report.append(row)
                print(
                    f"clients {clients:>3}: API keys on = {row['on_over_off_median']} of auth-off "
                    f"throughput, {row['added_cpu_ms_per_rpc_median']:+.3f} ms server CPU per RPC "
                    f"(medians of {args.rounds})",
                    flush=True,
                )
        check_us = asyncio.run(key_check_us(url, key))
    print(f"one cached key check: {check_us:.1f} µs of CPU", flush=True)
    print(json.dumps({"runs": report, "key_check_us": round(check_us, 1)}, separators=(",", ":")))


if __name__ == "__main__":
    main()
