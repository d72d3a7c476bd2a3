"""`tokenledger balance`, `quota set`, `grant`, `adjust` and `rate-limit set` against a real
ledger: short answers, `--json`, safe retries, and bad inputs refused in one line with
nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass

import psycopg
import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.cli import main
from tests.support import TOKENLEDGER, ServerThread, free_port, new_id


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], target: str, *argv: str) -> Ran:
    """`tokenledger ARGV --target TARGET` in this process."""
    capsys.readouterr()
    try:
        code = main([*argv, "--target", target])
    except SystemExit as exc:  # argparse refuses bad arguments by exiting
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def events(url: str, tenant: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def tenant(ledger: ServerThread) -> str:
    """A tenant whose user ann has 1000 tokens a day."""
    tenant = new_id("t")
    with ledger.stub() as stub:
        stub.SetQuota(
            pb.SetQuotaRequest(
                idempotency_key=new_id("q"), tenant_id=tenant, user_id="ann", limit=1000,
                period=pb.PERIOD_DAY,
            )
        )  # fmt: skip
    return tenant


def test_each_write_prints_a_short_answer_and_balance_shows_the_account_and_its_ancestors(
    ledger: ServerThread, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> Ran:
        return cli(capsys, ledger.target, *argv)

    quota = run("quota", "set", f"{tenant}/ann", "--limit", "2000", "--period", "month",
                "--time-zone", "Europe/Berlin", "--soft-limit-percent", "80")  # fmt: skip
    assert quota.code == 0, quota.err
    assert quota.out.startswith(f"quota set: user {tenant}/ann: limit 2000 a month (Europe/Berlin)")
    assert "soft at 80 %" in quota.out and "available 2000" in quota.out
    grant = run("grant", f"{tenant}/ann", "500", "--reason", "welcome", "--expires-in", "7d")
    assert grant.code == 0 and grant.out.startswith("granted 500 tokens, unused by ")
    assert "granted 500, available 2500" in grant.out
    credit = run("adjust", f"{tenant}/ann", "-50", "--reason", "refund")
    assert credit.out.startswith("credited 50 tokens: ") and "used -50" in credit.out
    charge = run("adjust", f"{tenant}/ann", "80", "--reason", "missed usage")
    assert charge.out.startswith("charged 80 tokens: ") and "used 30" in charge.out
    rate = run("rate-limit", "set", f"{tenant}/ann", "--tokens-per-minute", "600", "--model",
               "gpt-4o")  # fmt: skip
    assert rate.out == (
        f"rate limit set: {tenant}/ann, model gpt-4o: 600 tokens/min, requests unlimited\n"
    )
    balance = run("balance", f"{tenant}/ann/chat-1")
    assert balance.code == 0, balance.err
    assert balance.out.splitlines() == [
        f"tenant {tenant}: no limit; used 30, held 0",
        f"user {tenant}/ann: limit 2000 a month (Europe/Berlin), soft at 80 %; used 30, held 0, "
        f"granted 500, available 2470, resets at {_month_end(balance.out)}",
        f"conversation {tenant}/ann/chat-1: no limit; used 0, held 0",
        "reservable now: 2470",
    ]
    as_json = json.loads(run("balance", f"{tenant}/ann", "--json").out)
    assert as_json["balance"]["limit"] == "2000" and as_json["reservable"] == "2470"
    assert as_json["ancestors"][0]["tenantId"] == tenant


def _month_end(out: str) -> str:
    """The reset time the output names (the first of next month in Berlin, in UTC)."""
    return out.split("resets at ")[1].splitlines()[0]


def test_balance_of_an_unknown_account_says_no_limit_rather_than_zeros(
    ledger: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = new_id("t")
    ran = cli(capsys, ledger.target, "balance", f"{unknown}/nobody")
    assert ran.out.splitlines() == [
        f"tenant {unknown}: no limit; used 0, held 0",
        f"user {unknown}/nobody: no limit; used 0, held 0",
        "reservable now: no limit",
    ]


def test_a_retry_with_the_same_idempotency_key_writes_once(
    ledger: ServerThread, tenant: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = events(database_url, tenant)
    grant = ("grant", f"{tenant}/ann", "300", "--reason", "retry", "--idempotency-key", "g-1")
    first, again = cli(capsys, ledger.target, *grant), cli(capsys, ledger.target, *grant)
    assert first.code == again.code == 0 and first.out == again.out
    assert events(database_url, tenant) == before + 1
    other = cli(capsys, ledger.target, *grant[:2], "301", *grant[3:])
    assert other.code == 2 and other.err.startswith("tokenledger: ALREADY_EXISTS: ")
    assert events(database_url, tenant) == before + 1
    # Without a key, each run is a new write.
    cli(capsys, ledger.target, "grant", f"{tenant}/ann", "1", "--reason", "a")
    cli(capsys, ledger.target, "grant", f"{tenant}/ann", "1", "--reason", "a")
    assert events(database_url, tenant) == before + 3


def test_writes_print_the_response_as_json_with_json(
    ledger: ServerThread, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = cli(capsys, ledger.target, "rate-limit", "set", f"{tenant}/ann",
              "--requests-per-minute", "5", "--json")  # fmt: skip
    assert json.loads(ran.out) == {
        "rateLimit": {"tenantId": tenant, "userId": "ann", "requestsPerMinute": "5"}
    }
    cleared = cli(capsys, ledger.target, "quota", "set", f"{tenant}/ann", "--limit", "none",
                  "--json")  # fmt: skip
    balance = json.loads(cleared.out)["balance"]
    assert "limit" not in balance and balance["period"] == "PERIOD_NONE"


BAD_INPUTS = [
    (("balance", "{t}/ann/c/x"), "at most two '/'"),
    (("quota", "set", "{t}//ann", "--limit", "5", "--period", "day"), "the user '' is not an id"),
    (("quota", "set", "{t}/ann", "--limit", "5", "--period", "week"), "invalid choice: 'week'"),
    (("quota", "set", "{t}/ann", "--limit", "-5", "--period", "day"), "-5 is not between 0"),
    (("quota", "set", "{t}/ann", "--limit", "lots", "--period", "day"), "not a whole number"),
    (("quota", "set", "{t}/ann", "--limit", "5"), "--period is required with a limit"),
    (("quota", "set", "{t}/ann", "--limit", "5", "--period", "rolling"), "--window-hours"),
    (("quota", "set", "{t}/ann", "--limit", "5", "--period", "day", "--window-hours", "3"),
     "--window-hours"),
    (("quota", "set", "{t}/ann", "--limit", "5", "--period", "day", "--time-zone", "Mars/Base"),
     "INVALID_ARGUMENT: time_zone"),
    (("grant", "{t}/ann", "-5", "--reason", "x"), "-5 is not between 0"),
    (("grant", "{t}/ann", "0", "--reason", "x"), "grant 0 tokens and no --money"),
    (("grant", "{t}/ann", "0", "--reason", "x", "--money", "-1"), "'-1': 0 or more"),
    (("grant", "{t}/ann", "5"), "the following arguments are required: --reason"),
    (("grant", "{t}/ann", "5", "--reason", "  "), "give a reason"),
    (("grant", "{t}/ann", "5", "--reason", "x", "--expires-at", "2001-01-01T00:00:00Z"),
     "not in the future"),
    (("grant", "{t}/ann", "5", "--reason", "x", "--expires-in", "soon"), "not a duration"),
    (("grant", "{t}/ann", "5", "--reason", "x", "--expires-in", "1d", "--expires-at",
      "2999-01-01"), "not allowed with argument"),
    (("grant", "{t}/ann", "5", "--reason", "x", "--idempotency-key", "a key"), "no spaces"),
    (("adjust", "{t}/ann", "0", "--reason", "x"), "0 tokens and no --money change nothing"),
    (("adjust", "{t}/ann", "0", "--reason", "x", "--money", "1.0000001"), "at most 6 decimals"),
    (("quota", "set", "{t}/ann", "--limit", "none", "--money-limit", "-3"), "0 or more"),
    (("quota", "set", "{t}/ann", "--limit", "none", "--money-limit", "2e12"), "is beyond"),
    (("price", "set", "{t}", "m", "--currency", "USD", "--input", "-1", "--output", "1"),
     "'-1': 0 or more"),
    (("price", "set", "{t}", "m", "--currency", "USD", "--input", "1", "--output", "20000"),
     "20000 is beyond 10,000.00"),
    (("price", "set", "{t}", "m", "--currency", "USD", "--input", "nan", "--output", "1"),
     "with at most 6 decimals"),
    (("price", "set", "{t}/ann", "m", "--currency", "USD", "--input", "1", "--output", "1"),
     "name the tenant alone"),
    (("price", "set", "{t}", "m", "--currency", "XYZ", "--input", "1", "--output", "1"),
     "INVALID_ARGUMENT: prices[0].currency: 'XYZ' is not an ISO 4217"),
    (("price", "set", "{t}", "m", "--currency", "USD", "--input", "1", "--output", "1",
      "--from", "2001-01-01"), "not in the future"),
    (("price", "list", "{t}", "--model", "a b"), "not a model name"),
    (("adjust", "{t}/ann", "12x", "--reason", "x"), "not a whole number"),
    (("adjust", "{t}/ann", "5"), "the following arguments are required: --reason"),
    (("rate-limit", "set", "{t}/ann"), "give --tokens-per-minute, --requests-per-minute"),
    (("rate-limit", "set", "{t}/ann", "--tokens-per-minute", "-1"), "-1 is not between 0"),
    (("rate-limit", "set", "{t}/ann", "--requests-per-minute", "1", "--model", "a b"),
     "not a model name"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "says"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_a_bad_input_is_refused_in_one_line_with_exit_2_and_nothing_written(
    argv: tuple[str, ...],
    says: str,
    ledger: ServerThread,
    tenant: str,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = events(database_url, tenant)
    with ledger.stub() as stub:
        balance = stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann"))
    ran = cli(capsys, ledger.target, *(a.replace("{t}", tenant) for a in argv))
    assert ran.code == 2 and ran.out == ""
    assert ran.err.count("\n") == 1 and says in ran.err, ran.err
    assert ran.err.startswith("tokenledger") and "Traceback" not in ran.err
    assert events(database_url, tenant) == before
    with ledger.stub() as stub:
        assert stub.GetBalance(pb.GetBalanceRequest(tenant_id=tenant, user_id="ann")) == balance


def test_an_unreachable_ledger_is_named_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    ran = cli(capsys, target, "grant", "acme/ann", "5", "--reason", "x")
    assert time.monotonic() - started < 3
    assert ran.code == 2 and ran.err == (
        f"tokenledger: no ledger at {target}: start it with `make run`, or set TOKENLEDGER_TARGET\n"
    )


def test_the_installed_entry_point_takes_its_target_from_tokenledger_target(
    ledger: ServerThread, tenant: str
) -> None:
    """The real `tokenledger` executable: TOKENLEDGER_TARGET, the answer, the exit codes."""
    env = os.environ | {"TOKENLEDGER_TARGET": ledger.target}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TOKENLEDGER), *argv], capture_output=True, text=True, env=env, timeout=60
        )

    quota = run("quota", "set", f"{tenant}/bob", "--limit", "700", "--period", "none")
    assert quota.returncode == 0, quota.stderr
    assert (
        quota.stdout
        == f"quota set: user {tenant}/bob: limit 700 in all; used 0, held 0, available 700\n"
    )
    refused = run("adjust", f"{tenant}/bob", "5")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--reason" in refused.stderr and refused.stdout == ""
