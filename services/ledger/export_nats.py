"""`tokenledger export nats`: every event of the log, published to NATS JetStream.

It follows the log through the gap-free follower (LedgerAudit.follow: transaction-id order, so
a transaction that commits late is not skipped) and publishes each event, in that order and one
at a time, to `<prefix>.<tenant>.<EventType>` of its stream. Each message carries the event's
id (`tenant/user/conversation/version`, unique in the log) as `Nats-Msg-Id`, and the follower's
cursor after it as `Tokenledger-Cursor`.

The cursor is durable where the messages are: on start, the exporter reads the stream's last
message and follows on after its cursor. A publish is awaited before the next one is sent, so
the stream holds a prefix of the log in log order, and a restart, even after SIGKILL, resumes
exactly after the last event stored: none is lost, none sent twice. Should a publish whose
acknowledgement was lost be sent again, JetStream drops it by its Nats-Msg-Id. A publish that
JetStream does not answer (its stream gone or leaderless for a while, a timeout) is sent again,
backing off to every 5 s, until it is answered or the exporter is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from google.protobuf import json_format

from ledger import validation
from ledger.errors import InvalidArgument
from ledger.postgres.audit import LedgerAudit

if TYPE_CHECKING:  # nats is imported where it is used: it costs every `tokenledger` 0.3 s
    from nats.js import JetStreamContext
from ledger.reads import LoggedEvent
from services.ledger import convert
from services.ledger.config import Settings
from services.platform import db
from services.platform.config import ConfigError

log = structlog.get_logger("tokenledger.export")

STREAM_DEFAULT = "TOKENLEDGER_EVENTS"
PREFIX_DEFAULT = "tokenledger.events"
URL_DEFAULT = "nats://127.0.0.1:4222"
CURSOR_HEADER = "Tokenledger-Cursor"
DUPLICATE_WINDOW_S = 120
CONNECT_TIMEOUT_S = 5
PUBLISH_RETRY_S = (0.1, 5.0)
"""A publish JetStream did not answer is sent again after the first, doubling up to the second."""

_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,7}")


@dataclass(frozen=True)
class Target:
    """Where events go."""

    url: str = URL_DEFAULT
    stream: str = STREAM_DEFAULT
    prefix: str = PREFIX_DEFAULT

    def __post_init__(self) -> None:
        c = validation.Checker()
        if not self.url.startswith(("nats://", "tls://")):
            c.fail("url", f"is {self.url!r}; must start with nats:// or tls://")
        if not _STREAM_NAME.fullmatch(self.stream):
            c.fail("stream", f"is {self.stream!r}; 1-64 of A-Z a-z 0-9 _ -")
        if not _PREFIX.fullmatch(self.prefix):
            c.fail("subject_prefix", f"is {self.prefix!r}; dot-separated tokens of A-Z a-z 0-9 _ -")
        c.done()


def subject(prefix: str, event: LoggedEvent) -> str:
    """`<prefix>.<tenant>.<EventType>`; a tenant's `.` (the subject separator) becomes `_`,
    which tenant ids never contain, so no two tenants share a subject."""
    return f"{prefix}.{event.key.tenant_id.replace('.', '_')}.{event.event_type}"


def message_id(event: LoggedEvent) -> str:
    k = event.key
    return f"{k.tenant_id}/{k.user_id}/{k.conversation_id}/{event.version}"


async def _ensure_stream(js: JetStreamContext, target: Target) -> None:
    from nats.js.api import StreamConfig
    from nats.js.errors import NotFoundError

    config = StreamConfig(
        name=target.stream,
        subjects=[f"{target.prefix}.>"],
        duplicate_window=DUPLICATE_WINDOW_S,
    )
    try:
        await js.stream_info(target.stream)
    except NotFoundError:
        await js.add_stream(config)


async def last_cursor(js: JetStreamContext, stream: str) -> tuple[int, int]:
    """The follower's cursor after the stream's last message ((0, 0) for an empty stream)."""
    info = await js.stream_info(stream)
    if info.state.last_seq == 0:
        return (0, 0)
    last = await js.get_msg(stream, info.state.last_seq)
    text = (last.headers or {}).get(CURSOR_HEADER, "")
    return validation.subscription(tenant_id="", after_cursor=text, from_position=0)


async def export(audit: LedgerAudit, target: Target, stop: asyncio.Event) -> int:
    """Publish events until `stop`; returns how many this run published."""

    import nats

    async def quiet(exc: Exception) -> None:
        log.warning("nats", error=str(exc))

    # Reconnects forever once connected; the first connection gets CONNECT_TIMEOUT_S.
    nc = await asyncio.wait_for(
        nats.connect(target.url, max_reconnect_attempts=-1, error_cb=quiet), CONNECT_TIMEOUT_S
    )
    published = 0
    try:
        js = nc.jetstream()
        await _ensure_stream(js, target)
        after = await last_cursor(js, target.stream)
        log.info("export", stream=target.stream, after=validation.cursor(*after))
        async with aclosing(audit.follow("", after, 0, stop)) as events:
            async for event in events:
                headers = {
                    "Nats-Msg-Id": message_id(event),
                    CURSOR_HEADER: validation.cursor(event.transaction_id, event.position),
                    "Content-Type": "application/json",
                }
                body = json_format.MessageToJson(convert.ledger_event(event), indent=None)
                if not await _publish(js, subject(target.prefix, event), body, headers, stop):
                    break
                published += 1
    finally:
        await nc.close()
    return published


async def _publish(
    js: JetStreamContext, to: str, body: str, headers: dict[str, str], stop: asyncio.Event
) -> bool:
    """One event, sent again while JetStream does not answer (no responders: its stream gone
    or leaderless for a while; a timeout), with the same Nats-Msg-Id: within the stream's
    duplicate window it keeps one copy of a message whose answer was lost. False when `stop`
    comes first: the event is left to the next run, which resumes after the stream's last
    message."""
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import NoStreamResponseError

    delay, most = PUBLISH_RETRY_S
    while True:
        try:
            await js.publish(to, body.encode(), headers=headers)
            return True
        except (NoStreamResponseError, NatsTimeout) as exc:
            log.warning("nats publish not answered", error=str(exc), subject=to, retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return False
        delay = min(delay * 2, most)


async def _run(url: str, target: Target) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with db.make_pool(url, 2) as pool:
        audit = LedgerAudit(pool)
        try:
            published = await export(audit, target, stop)
        finally:
            audit.close()
    log.info("export stopped", published=published)
    return 0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export_cmd = sub.add_parser("export", help="publish the log to another system")
    kinds = export_cmd.add_subparsers(dest="sink", required=True)
    p = kinds.add_parser("nats", help="every event to NATS JetStream, resuming where it stopped")
    p.add_argument("--url", default=URL_DEFAULT, help=f"NATS server (default {URL_DEFAULT})")
    p.add_argument("--stream", default=STREAM_DEFAULT)
    p.add_argument("--subject-prefix", default=PREFIX_DEFAULT)
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    """The `export nats` command: checks its options, then exports until signalled."""
    try:
        target = Target(args.url, args.stream, args.subject_prefix)
        settings = Settings.from_env()
    except (InvalidArgument, ConfigError) as exc:
        print(f"tokenledger export nats: {exc}", file=sys.stderr)
        return 2
    url = settings.database_url or db.embedded_url(settings.data_dir)
    from nats.errors import NoServersError

    try:
        return asyncio.run(_run(url, target))
    except (OSError, NoServersError, TimeoutError) as exc:
        why = str(exc) or f"no answer within {CONNECT_TIMEOUT_S} s"
        print(f"tokenledger export nats: cannot reach {target.url}: {why}", file=sys.stderr)
        return 2
