"""Budget alerts to a webhook: each BudgetThresholdCrossed this process appends is POSTed as JSON
to `TOKENLEDGER_ALERT_WEBHOOK_URL`, off the request path.

The ledger's observer hands committed events over (a non-blocking put into a bounded queue);
one task posts them, retrying with exponential backoff. When the queue is full an alert is
dropped and counted, never waited for: a Reserve must not slow down because a webhook does.
The webhook is a convenience, at least once while the process lives; the log and the NATS
export are the record (every crossing is an event there). Each body carries an `alert_id`
that is the same on every retry, for the receiver to drop repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import httpx
import structlog

from ledger.model import BudgetThresholdCrossed, Event

log = structlog.get_logger("tokenledger.alerts")

QUEUE_MAX = 1_000
ATTEMPTS_MAX = 5
BACKOFF_S = 0.5
TIMEOUT_S = 5.0


def alert_body(event: BudgetThresholdCrossed) -> dict[str, Any]:
    """The webhook's JSON. A money budget's alert says so (`budget` "money", `used` and
    `capacity` in micro-units of `currency`) and has its own alert_id."""
    k = event.key
    at = event.occurred_at.isoformat()
    alert_id = f"{k.tenant_id}/{k.user_id}/{k.conversation_id}/{event.threshold_percent}/{at}"
    body = {
        "alert_id": alert_id if event.currency is None else alert_id + "/money",
        "event_type": "BudgetThresholdCrossed",
        "tenant_id": k.tenant_id,
        "user_id": k.user_id,
        "conversation_id": k.conversation_id,
        "budget": "tokens" if event.currency is None else "money",
        "threshold_percent": event.threshold_percent,
        "used": event.used,
        "capacity": event.capacity,
        "occurred_at": at,
    }
    if event.currency is not None:
        body["currency"] = event.currency
    return body


class AlertWebhook:
    def __init__(
        self, url: str, *, queue_max: int = QUEUE_MAX, backoff_s: float = BACKOFF_S
    ) -> None:
        self.url = url
        self.backoff_s = backoff_s
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_max)
        self.sent = self.dropped = self.failed = 0
        self._task: asyncio.Task[None] | None = None

    def observe(self, events: Sequence[Event]) -> None:
        """The ledger's observer: queue the alerts among `events`, dropping what does not fit."""
        for event in events:
            if not isinstance(event, BudgetThresholdCrossed):
                continue
            try:
                self.queue.put_nowait(alert_body(event))
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning(
                    "alert dropped: the webhook queue is full", queue_max=self.queue.maxsize
                )

    def start(self) -> None:
        self._task = asyncio.create_task(self._post_forever(), name="alert-webhook")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _post_forever(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            while True:
                body = await self.queue.get()
                if await self._post(client, body):
                    self.sent += 1
                else:
                    self.failed += 1
                    log.warning("alert not delivered", alert_id=body["alert_id"], url=self.url)

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> bool:
        for attempt in range(ATTEMPTS_MAX):
            try:
                response = await client.post(self.url, json=body)
                if response.is_success:
                    return True
                if response.is_client_error and response.status_code != 429:
                    return False  # the receiver refuses it: retrying will not help
            except httpx.HTTPError as exc:
                log.info("alert webhook failed, retrying", error=str(exc), attempt=attempt + 1)
            await asyncio.sleep(self.backoff_s * 2**attempt)
        return False
