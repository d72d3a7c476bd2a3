"""`tokenledger price set|list|import` and the money options of `quota set`, `grant`,
`adjust` and `balance`, against a real ledger (bad inputs: test_cli_admin.BAD_INPUTS)."""

from __future__ import annotations

import json

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger.cli_prices import litellm_price_file, litellm_prices
from tests.e2e.test_cli_admin import Ran, cli
from tests.support import ServerThread, new_id


def test_prices_are_set_listed_and_charged_and_balance_shows_money(
    ledger: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = new_id("t")

    def run(*argv: str) -> Ran:
        ran = cli(capsys, ledger.target, *argv)
        assert ran.code == 0, ran.err
        return ran

    set_ = run("price", "set", tenant, "gpt-4o", "--currency", "EUR", "--input", "2.50",
               "--output", "10", "--cached-input", "1.25")  # fmt: skip
    assert set_.out.startswith(f"price set: {tenant}: gpt-4o from ")
    assert set_.out.endswith(": EUR 2.50 input, 10.00 output, 1.25 cached input per 1M tokens\n")
    listed = json.loads(run("price", "list", tenant, "--json").out)
    assert listed["currency"] == "EUR"
    assert listed["prices"][0]["inputMicrosPerMtok"] == "2500000"
    quota = run("quota", "set", f"{tenant}/ann", "--limit", "none", "--period", "day",
                "--money-limit", "0.05")  # fmt: skip
    assert "| money: limit 0.05, spent 0.00, held 0.00, available 0.05" in quota.out
    run("grant", f"{tenant}/ann", "0", "--reason", "credit", "--money", "0.01")
    run("adjust", f"{tenant}/ann", "0", "--reason", "fix", "--money", "-0.002")
    with ledger.stub() as stub:
        held = stub.Reserve(
            pb.ReserveRequest(
                idempotency_key=new_id("r"),
                tenant_id=tenant,
                user_id="ann",
                model="gpt-4o",
                amount=1_000,
            )
        )
        used = pb.Usage(input_tokens=800, output_tokens=200)
        rid = held.reservation.reservation_id
        stub.Commit(pb.CommitRequest(tenant_id=tenant, reservation_id=rid, usage=used))
    # 800 * 2.50 + 200 * 10 per million tokens = 0.004 EUR spent, less the 0.002 credit
    user = run("balance", f"{tenant}/ann").out.splitlines()[1]
    assert user.endswith(
        "| money: limit 0.05 EUR, spent 0.002 EUR, held 0.00 EUR, granted 0.01 EUR, "
        "available 0.058 EUR"
    ), user


def test_import_sets_the_litellm_table_and_reports_what_it_rounded(
    ledger: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = new_id("t")
    ran = cli(capsys, ledger.target, "price", "import", tenant, "--models", "gpt-4o,gpt-4o-mini*")
    assert ran.code == 0, ran.err
    table = litellm_prices(litellm_price_file(), ["gpt-4o", "gpt-4o-mini*"])
    assert ran.out.startswith(f"{tenant}: {len(table.prices)} model prices set from litellm ")
    with ledger.stub() as stub:
        listed = stub.ListPrices(pb.ListPricesRequest(tenant_id=tenant, model="gpt-4o")).prices
    # LiteLLM's file: gpt-4o at 2.5e-06 input, 1e-05 output, 1.25e-06 cache read (USD/token)
    assert [(p.input_micros_per_mtok, p.output_micros_per_mtok,
             p.cached_input_micros_per_mtok, p.currency) for p in listed] == [
        (2_500_000, 10_000_000, 1_250_000, "USD")]  # fmt: skip


def test_import_of_no_model_is_refused(
    ledger: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = cli(capsys, ledger.target, "price", "import", new_id("t"), "--models", "no-such-*")
    assert ran.code == 2 and "no model of litellm" in ran.err and ran.out == ""
