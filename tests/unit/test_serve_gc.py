"""Once serving, the process collects its youngest generation less often
(services/platform/serve.gc_young_threshold) and start-up objects are frozen out of it."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

from services.platform import serve


class _Server:
    async def start(self, address: str) -> int:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        return 0

    async def stop(self, grace_s: float) -> None:
        pass


def test_serving_raises_the_young_generation_threshold_and_freezes_start_up_objects() -> None:
    before = gc.get_threshold()
    try:
        asyncio.run(
            serve.serve_until_signalled(
                _Server(), "127.0.0.1:0", 1.0, what="test", setting="TEST_LISTEN"
            )
        )
        assert gc.get_threshold() == (serve.gc_young_threshold, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
