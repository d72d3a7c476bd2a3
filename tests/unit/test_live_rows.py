"""A verification compares the live projection rows as read (tuples) with the rebuilt values
written as rows (ledger/postgres/verify.py, _compare_rows), and decodes only the rows that
differ. That finds exactly what decoding every row found: each rebuilt value's row reads
back as the value, and rows that differ, are missing or were planted are reported field by
field as before."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

import pytest

from ledger import codec
from ledger.model import AccountKey, BudgetAlertsSet, Event, Period, QuotaSet, TokensReserved
from ledger.postgres import verify
from ledger.replay import Projection
from ledger.usage import UsageCounters, UsageKey, add_usage
from tests.unit.test_effect_fold import START, TENANT, a_log

KINDS = {"account": verify._ACCOUNTS, "reservation": verify._RESERVATIONS, "usage": verify._USAGE}


def more_events(rng: random.Random) -> list[Event]:
    """What the effect fold's logs lack: users' quotas and alerts, labelled holds."""
    out: list[Event] = []
    for u in range(10):
        key = AccountKey(TENANT, f"u{u}")
        at = START + timedelta(minutes=rng.randint(0, 600))
        out.append(QuotaSet(key=key, occurred_at=at, limit=rng.choice([None, 9_000]),
                            period=rng.choice(list(Period)), window_hours=rng.choice([0, 5]),
                            time_zone=rng.choice(["UTC", "Asia/Kathmandu"])))  # fmt: skip
        out.append(BudgetAlertsSet(key=key, occurred_at=at, thresholds_percent=(50, 80)))
        out.append(TokensReserved(
            key=key, occurred_at=at, model="m1", reservation_id=f"l{u}", amount=10,
            expires_at=at + timedelta(minutes=5), labels=(("a", "x"), ("t", f"{u}"))))  # fmt: skip
    return out


def rebuilt(seed: int) -> dict[str, dict[Any, Any]]:
    """Accounts, reservations and usage folded from a random log."""
    rng = random.Random(seed)
    projection, usage = Projection(), dict[UsageKey, UsageCounters]()
    for event in more_events(rng) + a_log(seed, 0.2, n=600):
        projection.feed(event)
        add_usage(usage, event)
    return {"account": projection.accounts, "reservation": projection.reservations,
            "usage": usage}  # fmt: skip


def live_row(kind: str, value: Any) -> tuple[Any, ...]:
    """The row PostgreSQL returns for `value`: row_of's, with an account's grants and money
    side as their JSON text where row_of has verify._UNLIKE."""
    row = KINDS[kind].row_of(value)
    if kind != "account":
        return row
    grants, money = verify._ACCOUNT_ROW.index("grants"), verify._ACCOUNT_ROW.index("money")
    out = list(row)
    out[grants] = json.dumps(codec.grants_to_json(value.grants))
    out[money] = None if value.money is None else json.dumps(codec.account_to_json(value.money))
    return tuple(out)


@pytest.mark.parametrize("seed", range(6))
def test_every_rebuilt_value_reads_back_from_its_row(seed: int) -> None:
    """Each value's live row decodes as the value; row_of is that row, except where it holds
    _UNLIKE (grants, a money side), which no live row equals."""
    unlike = 0
    for kind, values in rebuilt(seed).items():
        rows = KINDS[kind]
        assert len(values) > 10, kind
        for key, value in values.items():
            row = live_row(kind, value)
            assert rows.decode(rows.live_key(key), row) == (key, value), kind
            if verify._UNLIKE in rows.row_of(value):
                unlike += 1
                assert rows.row_of(value) != row
            else:
                assert rows.row_of(value) == row
    assert unlike, "the log has accounts with grants or money"


def _tampered(rows: verify._Rows, values: dict[Any, Any], rng: random.Random) -> dict[Any, Any]:
    """The live rows of `values` with one number changed in each of three rows and one row
    deleted."""
    live = {rows.live_key(k): live_row(rows.kind, v) for k, v in values.items()}
    keys = rng.sample(sorted(live, key=str), 4)
    for key in keys[:3]:
        row = list(live[key])
        numbers = [i for i, v in enumerate(row) if type(v) is int]
        i = rng.choice(numbers)
        row[i] += rng.choice([-7, 1, 1000])
        live[key] = tuple(row)
    del live[keys[3]]
    return live


@pytest.mark.parametrize("seed", range(6))
def test_rows_that_differ_are_reported_as_by_decoding_every_row(seed: int) -> None:
    """A changed number, a deleted row and a planted row (one the rebuild lacks) of each
    kind: the same differences, field by field, as _compare of every row decoded."""
    rng = random.Random(seed)
    for kind, values in rebuilt(seed).items():
        rows = KINDS[kind]
        live = _tampered(rows, values, rng)
        planted = rng.choice(sorted(values, key=str))
        values = {k: v for k, v in values.items() if k != planted}
        decoded = dict(rows.decode(k, row) for k, row in live.items())
        expected = verify._compare(kind, decoded, values, rows.name, rows.default)
        assert len(expected) >= 4, kind
        for decode_all in (False, True):
            found = verify._compare_rows(rows, live, values, decode_all)
            assert sorted(found, key=repr) == sorted(expected, key=repr), (kind, decode_all)
