"""`tokenledger audit archive`, `audit prune-partitions`, `audit verify --archive` (offline)
and `audit replay --archive` as an operator runs them, with their bad inputs (one line, exit
2, nothing changed)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledger import archive
from ledger.archive import Manifest
from tests.archive_support import (
    Months,
    archive_rows,
    edit_manifest,
    partitions,
    rewrite,
    three_months,
)
from tests.support import TOKENLEDGER, ServerThread, new_id, run_cli, scratch_database


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`tokenledger audit ARGS` in this process, DATABASE_URL set to `url` or unset."""
    return run_cli(["audit", *args], {"DATABASE_URL": url or None})


def cli_process(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The same through the installed `tokenledger` entry point."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [str(TOKENLEDGER), "audit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env | ({"DATABASE_URL": url} if url else {}),
    )


@dataclass
class Site:
    url: str
    months: Months
    a: str
    b: str
    server: ServerThread
    tmp: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("archive_cli")
    with scratch_database(tmp) as url:
        a, b = new_id("a"), new_id("b")
        months = three_months(url, [a, b], checkpoints=[a], users=4)
        server = ServerThread(url, sweep_interval_s=3600).start()  # no expiry mid-archive
        try:
            yield Site(url, months, a, b, server, tmp)
        finally:
            server.stop()


def replay(site: Site, *archives: Path) -> list[dict[str, object]]:
    args = ["replay", "--tenant", site.a, "--json", "--target", site.server.target]
    done = cli(site.url, *args, *(f"--archive={p}" for p in archives))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_archive_verify_replay_and_prune_on_the_command_line(site: Site) -> None:
    m = site.months
    whole = replay(site)
    first, second = site.tmp / "a1.tla.gz", site.tmp / "a2.tla.gz"
    made = cli_process(site.url, "archive", "--tenant", site.a, "--before", f"{m.mid:%Y-%m}",
                       "--out", str(first), "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["events"] == 9  # a quota, four users' reserve and end
    text = cli(site.url, "archive", "--tenant", site.a, "--before", f"{m.now:%Y-%m}",
               "--out", str(second))  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "archive 2 of" in text.stdout and "verified and recorded" in text.stdout

    offline = cli("", "verify", "--tenant", site.a, "--archive", str(first), "--archive",
                  str(second))  # fmt: skip
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert offline.stdout.count(": ok") == 2
    edited = site.tmp / "edited.tla.gz"
    rewrite(first, edited, lambda lines: edit_manifest(lines, lambda m: m.update(events=1)))
    tampered = cli("", "verify", "--tenant", site.a, "--archive", str(edited))
    assert tampered.returncode == 1 and "2 PROBLEMS" in tampered.stdout
    assert "9 events, the manifest says 1" in tampered.stdout
    edited.unlink()
    assert replay(site, first, second) == whole  # before any drop: the same log

    refused = cli(site.url, "prune-partitions", "--before", f"{m.now:%Y-%m}")
    assert refused.returncode == 1 and "nothing dropped" in refused.stdout
    assert site.b in refused.stdout
    b_file = site.tmp / "b.tla.gz"
    b_made = cli(site.url, "archive", "--tenant", site.b, "--before", f"{m.now:%Y-%m}",
                 "--out", str(b_file))  # fmt: skip
    assert b_made.returncode == 0, b_made.stdout + b_made.stderr
    dry = cli(site.url, "prune-partitions", "--before", f"{m.now:%Y-%m}", "--dry-run")
    assert dry.returncode == 0 and "would drop 2 partitions" in dry.stdout
    dropped = cli(site.url, "prune-partitions", "--before", f"{m.now:%Y-%m}")
    assert dropped.returncode == 0 and "dropped 2 partitions" in dropped.stdout, dropped.stdout

    assert len(replay(site)) < len(whole)
    assert replay(site, first, second) == whole  # the archives give back what was dropped
    online = cli(site.url, "verify", "--tenant", site.a, "--target", site.server.target)
    assert online.returncode == 0, online.stdout
    rebuild = cli(site.url, "rebuild", "--tenant", site.a)  # its log no longer starts at 1
    assert rebuild.returncode == 2 and rebuild.stderr.count("\n") == 1, rebuild.stderr
    assert "is archived up to position" in rebuild.stderr


def test_bad_inputs_are_refused_in_one_line_and_change_nothing(site: Site) -> None:
    m = site.months
    not_gzip = site.tmp / "not.tla.gz"
    not_gzip.write_bytes(b"hello")
    existing = site.tmp / "exists.tla.gz"
    existing.write_bytes(b"")
    future = f"{m.now.year + 1}-01"
    others = site.tmp / "others.tla.gz"
    with others.open("wb") as f:  # an archive of another tenant (empty: no database needed)
        writer = archive.Writer(f, {})
        writer.finish(Manifest("someone", 1, "2026-01", 0, 0, 0, 0, {}, {}, {}, ""))
    cases = [
        (("archive", "--tenant", site.a, "--before", "2026-13"), "no such month"),
        (("archive", "--tenant", site.a, "--before", "last-year"), "expected a month"),
        (("archive", "--tenant", site.a, "--before", future), "after the current month"),
        (("archive", "--tenant", new_id("nobody"), "--before", f"{m.now:%Y-%m}"), "no event"),
        (("archive", "--tenant", "", "--before", f"{m.now:%Y-%m}"), "--tenant"),
        (("archive", "--tenant", site.b, "--before", f"{m.now:%Y-%m}", "--out", str(existing)),
         "the file exists"),
        (("archive", "--tenant", site.b, "--before", f"{m.now:%Y-%m}", "--out",
          str(site.tmp / "none" / "x")), "no such directory"),
        (("archive", "--tenant", site.b), "--before"),
        (("prune-partitions", "--before", "12/2026"), "expected a month"),
        (("prune-partitions", "--before", future), "after the current month"),
        (("verify", "--tenant", site.a, "--archive", str(site.tmp / "missing")), "No such file"),
        (("verify", "--tenant", site.a, "--archive", str(not_gzip)), "Not a gzipped file"),
        (("replay", "--tenant", site.a, "--archive", str(not_gzip)), "Not a gzipped file"),
        (("verify", "--tenant", site.a, "--archive", str(others)), "'someone''s archive"),
        (("replay", "--tenant", site.a, "--archive", str(others)), "is not tenant"),
    ]  # fmt: skip
    before = (archive_rows(site.url), partitions(site.url), sorted(site.tmp.iterdir()))
    for args, message in cases:
        done = cli(site.url, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            args,
            done.stderr,
        )
    assert (archive_rows(site.url), partitions(site.url), sorted(site.tmp.iterdir())) == before
