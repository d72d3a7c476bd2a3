"""`tokenledger audit checkpoint` and `audit verify --from-checkpoint` as a user runs them,
and VerifyAudit's from_checkpoint over gRPC, with their bad inputs (refused, nothing
written)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import psycopg

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services._gen.tokenledger.v1 import ledger_pb2_grpc as pb_grpc
from tests.support import (
    LedgerProcess,
    ServerThread,
    call_fails,
    cycle,
    exits_within,
    new_id,
    run_cli,
)

Stub = pb_grpc.LedgerServiceStub


def cli(url: str, *args: str, target: str = "") -> subprocess.CompletedProcess[str]:
    """`tokenledger audit ARGS` in this process (the entry point: test_archive_cli)."""
    argv = ["audit", *args, *(["--target", target] if target else [])]
    return run_cli(argv, {"DATABASE_URL": url, "TOKENLEDGER_AUDIT_WORKERS": "2"})


def written(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        a = conn.execute("SELECT count(*) FROM audit_checkpoints").fetchone()
        b = conn.execute("SELECT count(*) FROM audit_checkpoint_rows").fetchone()
    assert a is not None and b is not None
    return int(a[0]), int(b[0])


def test_checkpoint_then_verify_from_it_on_the_command_line(
    ledger: ServerThread, stub: Stub, history: str, database_url: str
) -> None:
    target = ledger.target
    none_yet = cli(database_url, "verify", "--tenant", history, "--from-checkpoint", target=target)
    assert none_yet.returncode == 2
    assert "FAILED_PRECONDITION" in none_yet.stderr and "no checkpoint yet" in none_yet.stderr

    taken = cli(database_url, "checkpoint", "--tenant", history, "--json")
    assert taken.returncode == 0, taken.stderr
    first = json.loads(taken.stdout)
    assert (first["taken"], first["seq"], first["events"], first["events_checked"]) == (
        True, 1, 10, 10,
    )  # fmt: skip
    before = written(database_url)
    again = cli(database_url, "checkpoint", "--tenant", history)
    assert again.returncode == 2 and "since checkpoint 1" in again.stderr
    assert written(database_url) == before

    cycle(stub, history, "ann", "c1", 101, 60)  # two more events
    text = cli(database_url, "verify", "--tenant", history, "--from-checkpoint", target=target)
    assert text.returncode == 0, text.stderr + text.stdout
    assert f"from checkpoint 1 (position {first['position']:,})" in text.stdout
    assert "events checked 2 in 1 streams" in text.stdout
    report = json.loads(cli(database_url, "verify", "--tenant", history, "--from-checkpoint",
                            "--json", target=target).stdout)  # fmt: skip
    assert (report["fromCheckpoint"], report["eventsChecked"], report["checkpointsOk"]) == (
        "1", "2", True,
    )  # fmt: skip
    full = cli(database_url, "verify", "--tenant", history, target=target)
    assert full.returncode == 0 and "checkpoints checked 1: ok" in full.stdout

    with psycopg.connect(database_url) as conn:  # a superuser edits the checkpoint
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE audit_checkpoints SET position = position + 1 WHERE tenant_id = %s",
                     (history,))  # fmt: skip
    for extra in ((), ("--from-checkpoint",)):
        broken = cli(database_url, "verify", "--tenant", history, *extra, target=target)
        assert broken.returncode == 1, extra
        assert "checkpoints checked 1: DIFFER" in broken.stdout
        assert f"checkpoint {history}#1 chain: hash does not match" in broken.stdout
    refused = cli(database_url, "checkpoint", "--tenant", history)
    assert refused.returncode == 1 and "NOT taken" in refused.stdout
    assert written(database_url) == before


def test_bad_checkpoint_requests_are_refused_with_nothing_written(
    stub: Stub, history: str, database_url: str
) -> None:
    before = written(database_url)
    unknown = cli(database_url, "checkpoint", "--tenant", new_id("nobody"))
    assert unknown.returncode == 2 and "has no events to checkpoint" in unknown.stderr
    missing = cli(database_url, "checkpoint")
    assert missing.returncode == 2 and "--tenant" in missing.stderr
    assert written(database_url) == before

    f = call_fails(
        stub.VerifyAudit, pb.VerifyAuditRequest(tenant_id=history, user_id="ann",
                                                from_checkpoint=True),
    )  # fmt: skip
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f.field_violations[0][0] == "from_checkpoint"
    for tenant in (history, new_id("nobody")):
        f = call_fails(
            stub.VerifyAudit, pb.VerifyAuditRequest(tenant_id=tenant, from_checkpoint=True)
        )
        assert f.code == grpc.StatusCode.FAILED_PRECONDITION and "no checkpoint yet" in f.message
    assert written(database_url) == before


def test_the_server_takes_a_checkpoint_every_n_events(database_url: str, tmp_path: Path) -> None:
    """TOKENLEDGER_CHECKPOINT_EVERY_EVENTS: a tenant gets a checkpoint once it has that many
    events since its last one (and not before), each verified from the previous one."""
    server = LedgerProcess(
        database_url, tmp_path / "ledger.log", TOKENLEDGER_CHECKPOINT_EVERY_EVENTS="6",
        TOKENLEDGER_CHECKPOINT_CHECK_S="0.2", TOKENLEDGER_AUDIT_WORKERS="1",
    )  # fmt: skip
    server.start()
    tenant = new_id("t")

    def seqs() -> list[tuple[int, int]]:
        with psycopg.connect(database_url) as conn:
            return [(int(a), int(b)) for a, b in conn.execute(
                "SELECT seq, events FROM audit_checkpoints WHERE tenant_id = %s ORDER BY seq",
                (tenant,),
            ).fetchall()]  # fmt: skip

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(seqs()) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LedgerServiceStub(channel)
            cycle(stub, tenant, "ann", "c1", 100, 50)  # 2 events: not due
            time.sleep(1.5)
            assert seqs() == []
            for n in range(3):
                cycle(stub, tenant, "ann", f"c{n}", 100, 50)
            wait_for(1)
            assert seqs() == [(1, 8)]
            for n in range(3):
                cycle(stub, tenant, "bob", f"c{n}", 100, 50)
            wait_for(2)
            assert seqs() == [(1, 8), (2, 14)]
            report = stub.VerifyAudit(pb.VerifyAuditRequest(tenant_id=tenant))
            assert report.checkpoints_checked == 2 and report.checkpoints_ok
            assert report.projections_match and report.chains_ok
    finally:
        server.stop()
    lines = [json.loads(x) for x in (tmp_path / "ledger.log").read_text().splitlines()
             if x.startswith("{")]  # fmt: skip
    assert any(line["event"] == "checkpoint taken" for line in lines)
    # `serve` starts its audit worker with the server; it is gone with it.
    (started,) = [line for line in lines if line["event"] == "audit workers started"]
    assert len(started["pids"]) == 1 and exits_within(started["pids"][0], 30)


def test_a_server_killed_outright_leaves_no_audit_worker_behind(
    database_url: str, tmp_path: Path
) -> None:
    """A server's audit workers are the fork server's children, not its own: killed with
    SIGKILL, the server cannot stop them, and they end by themselves (and the fork server
    with them) instead of waiting for work for ever."""
    log = tmp_path / "ledger.log"
    server = LedgerProcess(database_url, log, TOKENLEDGER_AUDIT_WORKERS="2")
    server.start()
    try:
        deadline = time.monotonic() + 60
        while '"audit workers started"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.kill()
    (started,) = [json.loads(line) for line in log.read_text().splitlines()
                  if '"audit workers started"' in line]  # fmt: skip
    workers = started["pids"]
    fork_server = {int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
                   for pid in workers if Path(f"/proc/{pid}").exists()}  # fmt: skip
    assert len(workers) == 2
    assert all(exits_within(pid, 30) for pid in [*workers, *fork_server])
