"""`tokenledger export nats` against the real NATS JetStream on 127.0.0.1:4222: killed with
SIGKILL mid-stream and started again, it delivers every event of the log exactly once, each
stream's events in version order. Skipped, saying why, where no NATS server runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import nats
import psycopg
import pytest

from tests.support import ServerThread, cycle, new_id

NATS_URL = "nats://127.0.0.1:4222"
CYCLES = 240


def _nats_running() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=1).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _nats_running(), reason="no NATS server with JetStream on 127.0.0.1:4222"
)


class Exporter:
    """`tokenledger export nats` as its own process, to be killed."""

    def __init__(self, url: str, stream: str, prefix: str, log: Path) -> None:
        self.args = [sys.executable, "-m", "services.cli", "export", "nats", "--url", NATS_URL,
                     "--stream", stream, "--subject-prefix", prefix]  # fmt: skip
        self.env = {**os.environ, "DATABASE_URL": url}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=out)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


async def _messages(stream: str) -> list[tuple[str, dict[str, object]]]:
    """(Nats-Msg-Id, event) of every message in the stream, in stream order."""
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in (
            range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ()
        ):
            msg = await js.get_msg(stream, seq)
            out.append(((msg.headers or {})["Nats-Msg-Id"], json.loads(msg.data or b"{}")))
        return out
    finally:
        await nc.close()


async def _delete_stream(stream: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # a test that made none
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def _count(stream: str) -> int:
    """Messages in the stream; 0 before the exporter has made it."""
    try:
        return len(asyncio.run(_messages(stream)))
    except nats.js.errors.NotFoundError:
        return 0


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"TL_TEST_{uuid.uuid4().hex[:8]}"
    yield name
    asyncio.run(_delete_stream(name))


def _log_ids(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tenant_id, user_id, conversation_id, version FROM events"
        ).fetchall()
    return [f"{t}/{u}/{c}/{v}" for t, u, c, v in rows]


def _wait(condition: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_killed_exporter_restarts_where_it_stopped_and_sends_each_event_once(
    ledger: ServerThread, database_url: str, stream: str, tmp_path: Path
) -> None:
    prefix = f"tltest{uuid.uuid4().hex[:6]}.events"
    exporter = Exporter(database_url, stream, prefix, tmp_path / "exporter.log")
    tenant = new_id("t")

    def write() -> None:
        with ledger.stub() as stub:
            for i in range(CYCLES):
                cycle(stub, tenant, f"u{i % 7}", f"c{i % 3}", 10 + i % 5, 5)

    writer = threading.Thread(target=write)
    exporter.start()
    writer.start()
    _wait(lambda: _count(stream) > CYCLES // 2, 60)
    exporter.kill()  # mid-stream: the writer is still writing
    killed_at = _count(stream)
    exporter.start()
    writer.join(120)
    # The whole log as it stands; the suite's shared server may append more meanwhile (its
    # sweeper expires other tests' holds), which the exporter may or may not reach.
    logged = set(_log_ids(database_url))
    _wait(lambda: logged <= {i for i, _ in asyncio.run(_messages(stream))}, 60)
    assert exporter.stop() == 0
    messages = asyncio.run(_messages(stream))
    ids = [i for i, _ in messages]
    assert len(ids) == len(set(ids)), "an event was published twice"
    assert logged <= set(ids), "an event of the log was not published"
    assert set(ids) <= set(_log_ids(database_url)), "a published event is not in the log"
    assert 0 < killed_at < len(ids)
    starts = re.findall(r"after=(\S+)", exporter.log.read_text())
    assert len(starts) == 2 and starts[1] != "0.0", starts  # resumed from the stream's cursor
    versions: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for _, event in messages:
        key = (event.get("tenantId"), event.get("userId", ""), event.get("conversationId", ""))
        versions[key].append(int(event["version"]))  # type: ignore[call-overload]
    assert all(v == sorted(v) for v in versions.values()), "a stream's order was broken"
    mine = [e for _, e in messages if e.get("tenantId") == tenant]
    assert len(mine) == 2 * CYCLES  # each cycle: a hold and its commit


def test_a_publish_not_answered_is_sent_again_until_the_stream_is_back(
    ledger: ServerThread, database_url: str, stream: str, tmp_path: Path
) -> None:
    """The stream deleted under a running exporter: its publishes find no responder. It keeps
    the event it holds, sends it again until the stream is made again, and goes on: every
    event logged after the deletion reaches the new stream, once, and the exporter lives."""
    prefix = f"tltest{uuid.uuid4().hex[:6]}.events"
    exporter = Exporter(database_url, stream, prefix, tmp_path / "exporter.log")
    tenant = new_id("t")
    with ledger.stub() as stub:
        exporter.start()
        cycle(stub, tenant, "u", "c", 10, 5)
        _wait(lambda: _count(stream) >= 4, 60)  # the stream exists and has been written
        asyncio.run(_delete_stream(stream))
        before = set(_log_ids(database_url))
        for i in range(3):
            cycle(stub, tenant, "u", "c", 10 + i, 5)
        _wait(lambda: b"nats publish not answered" in exporter.log.read_bytes(), 30)
        asyncio.run(_add_stream(stream, prefix))
        for i in range(3):
            cycle(stub, tenant, "u", "c", 20 + i, 5)
    after = set(_log_ids(database_url)) - before
    assert len(after) >= 12  # six cycles of a reserve and a commit
    _wait(lambda: after <= {i for i, _ in asyncio.run(_messages(stream))}, 60)
    assert exporter.proc is not None and exporter.proc.poll() is None, "the exporter died"
    assert exporter.stop() == 0
    ids = [i for i, _ in asyncio.run(_messages(stream))]
    assert len(ids) == len(set(ids)), "an event was published twice"


async def _add_stream(stream: str, prefix: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=[f"{prefix}.>"])
    finally:
        await nc.close()


def test_export_nats_refuses_bad_options_before_touching_anything(stream: str) -> None:
    for args, said in (
        (["--url", "http://127.0.0.1:4222"], "must start with nats://"),
        (["--stream", "no.dots"], "stream"),
        (["--subject-prefix", "a.>"], "subject_prefix"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "export", "nats", "--stream", stream, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
    with pytest.raises(nats.js.errors.NotFoundError):
        asyncio.run(_messages(stream))  # no stream was created
