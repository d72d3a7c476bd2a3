"""`tokenledger audit …`, `usage` and `top` against a real server, as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from datetime import UTC, datetime

import psycopg
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger import reports
from services.ledger.money_text import money_short
from tests.support import TOKENLEDGER, ServerThread, new_id, run_cli


def run(ledger: ServerThread, *args: str, columns: int = 250) -> subprocess.CompletedProcess[str]:
    """`tokenledger …` in a terminal `columns` wide (COLUMNS, as a shell exports it)."""
    return run_cli([*args, "--target", ledger.target], {"COLUMNS": str(columns)})


def _header(lines: list[str]) -> int:
    """Where a table's header is: above its first rule (the title above may wrap)."""
    return next(i for i, line in enumerate(lines) if line.startswith("---")) - 1


def test_audit_verify_exits_zero_when_clean_and_non_zero_on_tampering(
    ledger: ServerThread, history: str, database_url: str
) -> None:
    clean = run(ledger, "audit", "verify", "--tenant", history)
    assert clean.returncode == 0, clean.stderr
    assert "chains: ok" in clean.stdout and "projections: match the log" in clean.stdout
    report = json.loads(run(ledger, "audit", "verify", "--tenant", history, "--json").stdout)
    assert report["eventsChecked"] == "10" and report["chainsOk"] is True
    with psycopg.connect(database_url) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE events SET amount = 1 WHERE tenant_id = %s AND user_id = 'bob' "
            "AND conversation_id = '' AND version = 1",
            (history,),
        )
    broken = run(ledger, "audit", "verify", "--tenant", history)
    assert broken.returncode == 1
    assert f"{history}/bob at version 1: hash does not match" in broken.stdout


def test_audit_replay_and_balance_at(ledger: ServerThread, history: str) -> None:
    lines = run(ledger, "audit", "replay", "--tenant", history, "--json").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 10 and events[0]["eventType"] == "QuotaSet"
    text = run(ledger, "audit", "replay", "--tenant", history, "--user", "bob")
    assert text.stdout.count("\n") == 5 and "ReservationRolledBack" in text.stdout
    quota = run(ledger, "audit", "replay", "--tenant", history, "--user", "ann").stdout
    quota_line = next(line for line in quota.splitlines() if " QuotaSet " in line)
    assert "limit=10000 period=day" in quota_line and "amount=" not in quota_line
    now = datetime.now(UTC).isoformat()
    balance = run(ledger, "audit", "balance-at", "--tenant", history, "--user", "ann", "--at", now)
    assert balance.returncode == 0, balance.stderr
    assert f"{history}/ann" in balance.stdout and "9648" in balance.stdout  # 10000 - 352


def test_usage_and_top(ledger: ServerThread, history: str) -> None:
    as_csv = run(ledger, "usage", "--tenant", history, "--by", "user,model", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert {(r["user"], r["model"], r["total_tokens"]) for r in rows} == {
        ("ann", "gpt-4o", "51"), ("ann", "llama-3", "301"), ("bob", "gpt-4o", "16")
    }  # fmt: skip
    top = json.loads(
        run(ledger, "top", "--tenant", history, "--limit", "1", "--format", "json").stdout
    )
    assert [(t["user"], t["total_tokens"]) for t in top] == [("ann", 352)]
    table = run(ledger, "usage", "--tenant", history, "--by", "day").stdout.splitlines()
    assert table[_header(table)].split() == ["day", "input", "output", "total", "cost"]
    # The history's models have no price: no cost, flagged, never a silent 0.
    assert table[-1] == "* 368 tokens were used on models with no price: they are not in the cost"
    assert table[-2].split()[0] == "total" and table[-2].split()[-2:] == ["368", "-*"]
    bad = run(ledger, "usage", "--tenant", history, "--by", "week")
    assert bad.returncode == 2 and "unknown --by week" in bad.stderr
    refused = run(ledger, "usage", "--tenant", "bad tenant")
    assert refused.returncode == 2 and "INVALID_ARGUMENT" in refused.stderr
    tokyo = json.loads(
        run(ledger, "usage", "--tenant", history, "--by", "day", "--tz", "Asia/Tokyo",
            "--format", "json").stdout
    )  # fmt: skip
    assert sum(d["total_tokens"] for d in tokyo) == 368
    assert all(d["period"].endswith("T15:00:00Z") for d in tokyo)  # Tokyo's midnight in UTC
    odd = run(ledger, "usage", "--tenant", history, "--by", "day", "--tz", "Asia/Kolkata")
    assert odd.returncode == 2 and "whole hours" in odd.stderr


def test_audit_rebuild_repairs_edited_projections(history: str, database_url: str) -> None:
    """`tokenledger audit rebuild` rewrites what was edited from the log and verifies it."""
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE accounts SET held = 0, used_total = 7 WHERE tenant_id = %s",
                     (history,))  # fmt: skip
    rebuilt = subprocess.run(
        [str(TOKENLEDGER), "audit", "rebuild", "--tenant", history, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"DATABASE_URL": database_url},
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert report["events"] == 10 and report["reservations"] == 4 and report["verified"] is True
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT used_total FROM accounts WHERE tenant_id = %s AND user_id = 'ann' "
            "AND conversation_id = ''",
            (history,),
        ).fetchone()
    assert row == (352,)


@pytest.fixture
def big_tenant(stub: pb_grpc.LedgerServiceStub) -> str:
    """A tenant with the ids real ones have (long emails, ticket ids, dated model names) and
    millions of tokens, on two priced models."""
    tenant = new_id("t")
    prices = [pb.Price(model="gpt-4o-2024-08-06", currency="USD", input_micros_per_mtok=2_500_000,
                       output_micros_per_mtok=10_000_000, cached_input_micros_per_mtok=1_250_000),
              pb.Price(model="claude-3-5-sonnet-20241022", currency="USD",
                       input_micros_per_mtok=3_000_000, output_micros_per_mtok=15_000_000,
                       cached_input_micros_per_mtok=300_000)]  # fmt: skip
    stub.SetPrices(
        pb.SetPricesRequest(idempotency_key=new_id("p"), tenant_id=tenant, prices=prices)
    )
    for i in range(6):
        stub.RecordUsage(pb.RecordUsageRequest(
            idempotency_key=new_id("u"), tenant_id=tenant,
            user_id=f"support-agent-{i:04d}@eu-west.customer-success.example.com",
            conversation_id=f"ticket-2026-12-06-{i:06d}-escalation-thread",
            model=("gpt-4o-2024-08-06", "claude-3-5-sonnet-20241022")[i % 2],
            usage=pb.Usage(input_tokens=9_876_543 * (i + 1), output_tokens=123_456 * (i + 1),
                           cached_input_tokens=1_000 * i),
        ))  # fmt: skip
    return tenant


def test_tables_fit_80_columns_and_total_what_json_says(
    ledger: ServerThread, big_tenant: str
) -> None:
    """The default table of `usage` and `top` fits an 80-column terminal with long ids and
    big numbers: ids shortened in the middle, every number whole, a totals row of the sums."""
    by = ("--by", "day,conversation,model")
    rows = json.loads(run(ledger, "usage", "--tenant", big_tenant, *by, "--format", "json").stdout)
    for args in (("usage", *by), ("top", "--by", "conversation")):
        out = run(ledger, *args, "--tenant", big_tenant, columns=80)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, out.stdout
        head = _header(lines)
        header = lines[head].split()
        assert header[-3:] == ["output", "total", "cost"]
        if "input" not in header:  # ids, a model and tens of millions leave it no room
            assert lines.pop() == (
                "input_tokens left out to fit 80 columns; --columns all shows them"
            )
        body = lines[head + 2 : -2]
        assert len(body) == 6 and all("…" in line for line in body)  # ids, shortened
        for r in rows:
            cost = money_short(r["cost_micros"], "USD")
            assert any(line.split()[-2:] == [f"{r['total_tokens']:,}", cost] for line in body)
        shown = [c for c in ("input", "output", "total") if c in header]
        sums = [sum(r[f"{c}_tokens"] for r in rows) for c in shown]
        cost = money_short(sum(r["cost_micros"] for r in rows), "USD")
        assert lines[-1].split() == ["total", *(f"{n:,}" for n in sums), cost]


def test_columns_option_and_every_column_in_csv(ledger: ServerThread, big_tenant: str) -> None:
    """--columns picks a table's columns (`all`: every one, wider than 80 if need be); an
    unknown one is a one-line error, exit 2; CSV always carries every column."""
    usage = ("usage", "--tenant", big_tenant, "--by", "user")
    chosen = run(ledger, *usage, "--columns", "user,commits,usage_records", columns=80)
    lines = chosen.stdout.splitlines()
    assert lines[_header(lines)].split() == ["user", "commits", "records"]
    assert lines[-1].split() == ["total", "0", "6"]
    every = run(ledger, *usage, "--columns", "all").stdout.splitlines()
    assert (
        every[_header(every)].split()[:3] == ["account", "input", "output"]
        and "adjustments" in every[1]
    )
    bad = run(ledger, *usage, "--columns", "total_tokens,cost_dollars")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "unknown column 'cost_dollars'" in bad.stderr
    mixed = run(ledger, *usage, "--columns", "user", "--format", "csv")
    assert mixed.returncode == 2 and "--format csv carries them all" in mixed.stderr
    as_csv = run(ledger, *usage, "--format", "csv").stdout
    header = next(csv.reader(io.StringIO(as_csv)))
    assert header == ["user", *reports.FIELDS] and len(header) >= 14
    assert run(ledger, "top", "--tenant", big_tenant, "--limit", "0").returncode == 2
