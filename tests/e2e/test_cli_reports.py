"""`tokenledger audit …`, `usage` and `top` against a real server, as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from datetime import UTC, datetime

import psycopg

from tests.support import TOKENLEDGER, ServerThread


def run(ledger: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOKENLEDGER), *args, "--target", ledger.target],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"COLUMNS": "250"},  # a wide terminal: rich wraps tables to fit
    )


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
    table = run(ledger, "usage", "--tenant", history, "--by", "day")
    assert table.returncode == 0 and "total_tokens" in table.stdout and "368" in table.stdout
    bad = run(ledger, "usage", "--tenant", history, "--by", "week")
    assert bad.returncode != 0 and "unknown --by week" in bad.stderr
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
