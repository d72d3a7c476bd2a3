"""A verification from a checkpoint starts each touched key from its state there
(ledger/postgres/verify.py, _Fold._seed): it looks up the keys of the kinds the checkpoint
has rows of, and a key of a kind it counts none of starts absent without a look-up. Usage
hours are looked up after the fold (_Fold._seed_usage), their counters there added to the
events'."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ledger import checkpoints as cp
from ledger.model import Account, AccountKey, TokensReserved
from ledger.postgres import verify
from ledger.reads import Scope
from ledger.usage import UsageCounters, quick_add_usage, usage_key

AT = datetime(2026, 10, 1, 8, tzinfo=UTC)
USER = AccountKey("t", "ann")
HOLD = TokensReserved(key=USER, occurred_at=AT, model="m", reservation_id="r1", amount=5,
                      expires_at=AT)  # fmt: skip


class StateAt:
    """A connection that answers _STATE_AT_SQL from `state` and records what was asked."""

    def __init__(self, state: dict[tuple[str, str], str]) -> None:
        self.state = state
        self.asked: list[tuple[str, str]] = []

    def execute(self, query: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        assert query == verify._STATE_AT_SQL
        keys, tenant, seq = params
        assert (tenant, seq) == ("t", 2)
        asked = [(kind, key) for kind, key in json.loads(keys)]
        self.asked += asked
        return [{"kind": k, "key": key, "value": self.state[(k, key)]} for k, key in asked
                if (k, key) in self.state]  # fmt: skip


def seeded_fold(
    seeded: tuple[str, ...], state: dict[tuple[str, str], str], collect: bool = False
) -> Any:
    part = verify.Part(
        Scope("t"), False, True, since_seq=2, since=10, seeded=seeded, collect=collect
    )
    fold = verify._Fold(part)
    row = {"tenant_id": "t", "user_id": "ann", "conversation_id": ""}
    fold.touched.add(part, row, HOLD)
    conn = StateAt(state)
    fold._seed(conn)
    return fold, conn


def test_the_kinds_a_checkpoint_has_rows_of_are_looked_up_and_the_others_start_absent() -> None:
    account = Account(USER, limit=900, held=40)
    state = {cp.account_item(account)[:2]: cp.account_item(account)[2]}
    fold, conn = seeded_fold(cp.KINDS, state, collect=True)
    asked_kinds = {kind for kind, _ in conn.asked}
    assert asked_kinds == {"stream", "account", "reservation", "rate_limit"}
    assert fold.rebuilt.accounts[USER] == account
    # A hold makes its reservation anew: unless collecting changes, it is not looked up.
    fold, conn = seeded_fold(cp.KINDS, state)
    assert {kind for kind, _ in conn.asked} == {"stream", "account", "rate_limit"}
    assert fold.touched.reservations == {"r1"}

    without = tuple(k for k in cp.KINDS if k not in ("rate_limit", "reservation"))
    fold, conn = seeded_fold(without, state)
    assert {kind for kind, _ in conn.asked} == {"stream", "account"}
    assert fold.rebuilt.accounts[USER] == account
    assert fold.touched.rate_limits and not fold.rebuilt.rate_limits
    assert not fold.old  # only a fold collecting changes records the values it started from

    fold, conn = seeded_fold(without, state, collect=True)
    assert {kind for kind, _ in conn.asked} == {"stream", "account"}
    not_asked = [text for text in fold.old if text[0] in ("rate_limit", "reservation")]
    assert not_asked and all(fold.old[text] is None for text in not_asked)
    assert fold.old[cp.account_item(account)[:2]] == cp.account_item(account)[2]


def test_usage_hours_are_looked_up_after_the_fold_and_their_counters_added() -> None:
    fold, _ = seeded_fold(cp.KINDS, {})
    key = usage_key(HOLD)
    quick_add_usage(fold.usage, HOLD)
    quick_add_usage(fold.usage, HOLD)
    at_checkpoint = UsageCounters(reservations=3, commits=2, input_tokens=70)
    conn = StateAt({cp.usage_item(key, at_checkpoint)[:2]: cp.usage_item(key, at_checkpoint)[2]})
    fold._seed_usage(conn)
    assert conn.asked == [("usage", cp.usage_key_text(key))]
    assert fold.usage[key] == UsageCounters(reservations=5, commits=2, input_tokens=70)
    assert not fold.old

    # Collecting changes records the value it started from; an hour the checkpoint has no row
    # of starts from nothing.
    fold, _ = seeded_fold(cp.KINDS, {}, collect=True)
    quick_add_usage(fold.usage, HOLD)
    fold._seed_usage(conn := StateAt({}))
    assert fold.usage[key] == UsageCounters(reservations=1)
    assert fold.old[("usage", cp.usage_key_text(key))] is None

    # A checkpoint with no usage rows is not asked.
    fold, _ = seeded_fold(tuple(k for k in cp.KINDS if k != "usage"), {})
    quick_add_usage(fold.usage, HOLD)
    fold._seed_usage(conn := StateAt({}))
    assert conn.asked == [] and fold.usage[key] == UsageCounters(reservations=1)
