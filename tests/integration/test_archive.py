"""Archives (ledger/postgres/archive.py, ledger/archive.py): a tenant's old events go to a
file that verifies offline, chained to the tenant's previous archive and bound to a
checkpoint; an edited archive is found; partitions are dropped only when every event in them
is archived, and the live log then verifies from the archives' heads."""

from __future__ import annotations

import asyncio
import gzip
import io
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger import archive
from ledger.application import Ledger
from ledger.archive import ArchiveUnreadable, Manifest
from ledger.errors import CheckpointRefused
from ledger.model import AccountKey
from ledger.postgres.archive import Archiver, ArchiveRefused, PruneReport, month_start, prune
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.store import PostgresStore
from ledger.reads import Scope, VerifyReport
from services.platform import db
from tests.archive_support import (
    Months,
    archive_rows,
    edit_manifest,
    partitions,
    rewrite,
    take_checkpoint,
    three_months,
    traffic,
)
from tests.support import ServerThread, new_id, scratch_database


def run_archive(url: str, tenant: str, before: date, out: Path) -> Manifest:
    async def go() -> Manifest:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool)) as audit:
                today = Months.today().now
                return await Archiver(pool, audit).archive(tenant, before, out, today)

    return asyncio.run(go())


def run_prune(url: str, before: date, dry_run: bool = False) -> PruneReport:
    async def go() -> PruneReport:
        async with db.make_pool(url, 2) as pool:
            return await prune(pool, before, Months.today().now, dry_run)

    return asyncio.run(go())


def verify(url: str, scope: Scope, from_checkpoint: bool = False) -> VerifyReport:
    async def go() -> VerifyReport:
        async with db.make_pool(url, 2) as pool:
            with closing(LedgerAudit(pool, workers=2)) as audit:
                return await audit.verify(scope, from_checkpoint=from_checkpoint)

    return asyncio.run(go())


def clean(report: VerifyReport) -> bool:
    return not report.breaks and not report.differences


@dataclass
class World:
    url: str
    months: Months
    a: str  # checkpointed every month, archived twice
    b: str  # never checkpointed: archiving takes one
    first: Path
    second: Path
    manifests: tuple[Manifest, Manifest]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("archive")
    with scratch_database(tmp) as url:
        a, b = new_id("a"), new_id("b")
        months = three_months(url, [a, b], checkpoints=[a])
        first, second = tmp / "a1.tla.gz", tmp / "a2.tla.gz"
        m1 = run_archive(url, a, months.mid, first)
        m2 = run_archive(url, a, months.now, second)
        yield World(url, months, a, b, first, second, (m1, m2))


def test_archives_verify_offline_in_a_chain(world: World) -> None:
    m1, m2 = world.manifests
    r1 = archive.verify(world.first)
    r2 = archive.verify(world.second, previous=r1.manifest)
    assert (r1.problems, r2.problems) == ([], [])
    # six users of two months: a quota, then four commits and a rollback (2 events each)
    assert (m1.events, m2.events, m2.events_before) == (13, 13, 13)
    assert m1.checkpoint["seq"] == 1 and m2.checkpoint["seq"] == 2
    assert m2.start_heads == m1.heads and m2.first_position > m1.last_position
    assert m2.checkpoint["events"] == 26
    assert archive.verify(world.second, previous=m2).problems  # not its own predecessor


def test_the_archives_are_recorded(world: World) -> None:
    with psycopg.connect(world.url) as conn:
        rows = conn.execute(
            "SELECT seq, before_month, checkpoint_seq, last_position, events, heads "
            "FROM audit_archives WHERE tenant_id = %s ORDER BY seq",
            (world.a,),
        ).fetchall()
    m1, m2 = world.manifests
    assert rows == [
        (1, world.months.mid, 1, m1.last_position, 13, m1.heads),
        (2, world.months.now, 2, m2.last_position, 13, m2.heads),
    ]


def flip_a_digit(lines: list[bytes]) -> list[bytes]:
    line = lines[3]
    at = line.index(b'"input_tokens":') + len(b'"input_tokens":')
    digit = b"7" if line[at : at + 1] != b"7" else b"8"
    return [*lines[:3], line[:at] + digit + line[at + 1 :], *lines[4:]]


def test_a_flipped_byte_in_an_event_is_found(world: World, tmp_path: Path) -> None:
    edited = tmp_path / "edited.tla.gz"
    rewrite(world.first, edited, flip_a_digit)
    problems = archive.verify(edited).problems
    assert any("sha256" in p for p in problems)
    assert any("hash does not match the event's content" in p for p in problems)


def test_a_changed_head_in_the_manifest_is_found(world: World, tmp_path: Path) -> None:
    edited = tmp_path / "edited.tla.gz"
    key = sorted(world.manifests[0].heads)[0]

    def change(m: dict[str, Any]) -> None:
        m["heads"][key] = "99:" + "ab" * 32

    rewrite(world.first, edited, lambda lines: edit_manifest(lines, change))
    problems = archive.verify(edited).problems
    assert any(p.startswith(f"stream {key} ends at") for p in problems)


def test_a_recomputed_archive_still_breaks_with_its_checkpoint(
    world: World, tmp_path: Path
) -> None:
    """An event removed and the manifest made to agree (sha256, count, positions, heads):
    the checkpoint, whose hash the auditor kept, no longer agrees."""
    edited = tmp_path / "edited.tla.gz"

    def drop_last(lines: list[bytes]) -> list[bytes]:
        events = lines[:-2]
        w = archive.Writer(io.BytesIO(), {})
        for line in events:
            w.add(archive.row_from_line(line))

        def change(m: dict[str, Any]) -> None:
            m.update(events=w.events, last_position=w.last_position, heads=w.heads,
                     payload_sha256=w.payload_sha256)  # fmt: skip

        return edit_manifest([*events, lines[-1]], change)

    rewrite(world.first, edited, drop_last)
    problems = archive.verify(edited).problems
    assert any("is at position" in p for p in problems)
    assert any("counts 13 events" in p for p in problems)
    assert any("stream digest" in p for p in problems)


@pytest.mark.parametrize(
    "content", [b"", b"not gzip at all", b"\x1f\x8b\x08\x00garbage", 'gzip:{"a": 1}\n']
)
def test_what_is_not_an_archive_is_refused(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "x.tla.gz"
    if isinstance(content, str):
        with gzip.open(path, "wb") as f:
            f.write(content.removeprefix("gzip:").encode())
    else:
        path.write_bytes(content)
    with pytest.raises(ArchiveUnreadable):
        archive.verify(path)


@pytest.mark.parametrize(
    ("before", "message"),
    [("2026-13", "no such month"), ("26-01", "YYYY-MM"), ("2026-1", "YYYY-MM"), ("", "YYYY-MM")],
)
def test_a_malformed_month_is_refused(before: str, message: str) -> None:
    with pytest.raises(ArchiveRefused, match=message):
        month_start(before)


def test_bad_archive_requests_change_nothing(world: World, tmp_path: Path) -> None:
    before = archive_rows(world.url)
    next_month = date(world.months.now.year + world.months.now.month // 12,
                      world.months.now.month % 12 + 1, 1)  # fmt: skip
    refusals = [
        (world.a, next_month, tmp_path / "x", "after the current month"),
        (world.a, world.months.mid, tmp_path / "x", "archived up to"),
        (new_id("nobody"), world.months.now, tmp_path / "x", "has no event before"),
        (world.b, world.months.now, world.first, "the file exists"),
        (world.b, world.months.now, tmp_path / "no" / "x", "no such directory"),
    ]
    for tenant, month, out, message in refusals:
        with pytest.raises(ArchiveRefused, match=message) as caught:
            run_archive(world.url, tenant, month, out)
        assert caught.value.exit_code == 2
    assert archive_rows(world.url) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_what_would_fold_the_whole_log_is_refused_after_an_archive(world: World) -> None:
    """A rebuild and a past balance fold the log from its start, which archiving may drop."""

    async def go() -> None:
        async with db.make_pool(world.url, 2) as pool:
            with pytest.raises(CheckpointRefused, match="archived up to position"):
                await Ledger(PostgresStore(pool)).rebuild(world.a)
            with (
                closing(LedgerAudit(pool)) as audit,
                pytest.raises(CheckpointRefused, match="archived up to position"),
            ):
                await audit.balance_at(AccountKey(world.a, "u1"), datetime.now(UTC))

    asyncio.run(go())


def test_partitions_go_only_when_every_tenant_in_them_is_archived(
    world: World, tmp_path: Path
) -> None:
    """Runs last in this module: it drops the old months."""
    url, months = world.url, world.months
    old, mid = f"events_{months.old:%Y_%m}", f"events_{months.mid:%Y_%m}"
    before = partitions(url)
    refused = run_prune(url, months.now)
    assert set(refused.kept) == {old, mid} and not refused.dropped
    assert [m.split(":")[0] for m in refused.kept[old]] == [world.b]
    assert partitions(url) == before  # nothing changed

    b_archive = run_archive(url, world.b, months.now, tmp_path / "b1.tla.gz")
    assert b_archive.checkpoint["seq"] == 1  # taken by the archive: the log verified
    assert b_archive.last_position > max(m.last_position for m in world.manifests)
    assert run_prune(url, months.now, dry_run=True).dropped == []
    assert partitions(url) == before
    assert run_prune(url, months.now).dropped == [old, mid]
    after = partitions(url)
    assert old not in after and mid not in after
    assert after[f"events_{months.now:%Y_%m}"] == before[f"events_{months.now:%Y_%m}"]
    _live_log_verifies_from_the_archives(world)


def _live_log_verifies_from_the_archives(world: World) -> None:
    url, a = world.url, world.a
    full = verify(url, Scope(a))
    assert clean(full), (full.breaks, full.differences[:5])
    assert full.from_position == world.manifests[1].last_position
    assert full.checkpoints_checked == 2
    assert clean(verify(url, Scope(world.b)))
    assert clean(verify(url, Scope(a, "u1")))
    server = ServerThread(url).start()  # the log goes on after the archived versions
    try:
        traffic(server, a, users=3)
    finally:
        server.stop()
    assert clean(verify(url, Scope(a)))
    take_checkpoint(url, a)
    assert clean(verify(url, Scope(a), from_checkpoint=True))
    _a_deleted_live_event_is_found(url, a)


def _a_deleted_live_event_is_found(url: str, tenant: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off: superuser
        row = conn.execute(
            "DELETE FROM events WHERE tenant_id = %s AND user_id = 'u1' AND position = "
            "(SELECT min(position) FROM events WHERE tenant_id = %s AND user_id = 'u1') "
            "RETURNING version",
            (tenant, tenant),
        ).fetchone()
    assert row is not None
    gone = row[0]
    breaks = verify(url, Scope(tenant)).breaks
    assert [(b.stream.user_id, b.version, b.problem) for b in breaks] == [
        ("u1", gone + 1, f"version {gone + 1} follows {gone - 1}")
    ]
