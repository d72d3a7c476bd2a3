"""The handoff's fold (ledger/replay.py, Effects and EffectFold): the tenant's own account and
rate limiters folded from its own events plus the effects its users' events hand over, split
among any number of parts, equal those folded from every event, whatever the log holds
(grants, money, time zones whose hours span two days, limiters, negative adjustments, times
out of order, charges to earlier hours)."""

from __future__ import annotations

import pickle
import random
from datetime import UTC, datetime, timedelta

import pytest

from ledger.model import (
    AccountKey,
    BalanceAdjusted,
    Event,
    GrantOrder,
    Period,
    QuotaSet,
    RateLimitSet,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    TokensGranted,
    TokensReserved,
    Usage,
    UsageRecorded,
)
from ledger.replay import EffectFold, Effects, Projection

TENANT = "t"
START = datetime(2026, 3, 28, 21, 40, tzinfo=UTC)  # a month's end, and a DST change near
ZONES = ("UTC", "Asia/Kathmandu", "America/New_York", "Australia/Lord_Howe")


def tenant_event(rng: random.Random, at: datetime, n: int) -> Event:
    key = AccountKey(TENANT)
    roll = rng.random()
    if roll < 0.3:
        return QuotaSet(
            key=key, occurred_at=at, limit=rng.choice([None, 5_000, 10**6]),
            period=rng.choice(list(Period)), window_hours=rng.choice([0, 3, 24]),
            time_zone=rng.choice(ZONES), grant_order=rng.choice(list(GrantOrder)),
            money_limit=rng.choice([None, 10**7]),
        )  # fmt: skip
    if roll < 0.55:
        return TokensGranted(
            key=key, occurred_at=at, grant_id=f"g{n}", amount=rng.choice([0, 300, 4_000]),
            expires_at=rng.choice([None, at + timedelta(minutes=rng.randint(1, 300))]),
            reason="", money=rng.choice([None, 0, 50_000]),
        )  # fmt: skip
    if roll < 0.75:
        return RateLimitSet(
            key=key, occurred_at=at, model=rng.choice(["", "m1"]),
            tokens_per_minute=rng.choice([0, 2_000]), requests_per_minute=rng.choice([0, 5]),
        )  # fmt: skip
    return BalanceAdjusted(
        key=key, occurred_at=at, tokens=rng.randint(-500, 500), reason="",
        money=rng.choice([None, -3_000, 7_000]),
    )  # fmt: skip


def user_events(rng: random.Random, at: datetime, n: int) -> list[Event]:
    """A hold and its end (commit, rollback, expiry, late usage), or usage without a hold,
    or an adjustment, by a random user."""
    key = AccountKey(TENANT, f"u{rng.randint(0, 9)}", rng.choice(["", "c1"]))
    model, rid, amount = rng.choice(["m1", "m2"]), f"r{n}", rng.randint(0, 900)
    money = rng.choice([None, 0, rng.randint(1, 9_000)])
    later = at + timedelta(minutes=rng.randint(0, 150))
    usage = Usage(rng.randint(0, 700), rng.randint(0, 300), rng.randint(0, 50))
    cost = rng.choice([None, 0, rng.randint(1, 20_000)])
    hold = TokensReserved(key=key, occurred_at=at, model=model, reservation_id=rid,
                          amount=amount, expires_at=later, money=money)  # fmt: skip
    roll = rng.random()
    if roll < 0.45:
        end: Event = ReservationCommitted(
            key=key, occurred_at=later, model=model, reservation_id=rid, amount=amount,
            usage=usage, reserved_at=at, money=money, cost=cost)  # fmt: skip
    elif roll < 0.6:
        end = ReservationRolledBack(key=key, occurred_at=later, reservation_id=rid,
                                    amount=amount, money=money)  # fmt: skip
    elif roll < 0.75:
        end = ReservationExpired(key=key, occurred_at=later, reservation_id=rid,
                                 amount=amount, money=money)  # fmt: skip
    elif roll < 0.9:
        end = UsageRecorded(key=key, occurred_at=later, model=model, usage=usage,
                            reservation_id=rng.choice(["", rid]),
                            reserved_at=rng.choice([None, at]), cost=cost)  # fmt: skip
    else:
        return [BalanceAdjusted(key=key, occurred_at=at, tokens=rng.randint(-900, 900),
                                reason="", money=rng.choice([None, -2_000, 2_000]))]  # fmt: skip
    return [hold, end]


def a_log(seed: int, tenant_share: float, n: int = 1_500) -> list[Event]:
    rng = random.Random(seed)
    at, log = START, []
    for i in range(n):
        # Mostly forward, in bursts within an hour; sometimes back a little (clocks differ).
        at += timedelta(seconds=rng.choice([0, 1, 7, 60, 600, 2_400, -90]))
        if rng.random() < tenant_share:
            log.append(tenant_event(rng, at, i))
        else:
            log += user_events(rng, at, i)
    return log


def tenant_only(key: AccountKey) -> bool:
    return not key.user_id


def folded_with_effects(log: list[Event], parts: int, seed: int) -> Projection:
    """The tenant's part of a handoff: its own events, and the effects of its users' events
    collected by `parts` parts (each user in one), crossed through pickle as to a process."""
    rng = random.Random(seed)
    bucket = {f"u{u}": rng.randrange(parts) for u in range(10)}
    collected = [Effects() for _ in range(parts)]
    own: list[tuple[int, Event]] = []
    for position, event in enumerate(log, start=1):
        if event.key.user_id:
            collected[bucket[event.key.user_id]].add(position, event)
        else:
            own.append((position, event))
    projection = Projection(keep=tenant_only)
    fold = EffectFold(projection, TENANT, [pickle.loads(pickle.dumps(e)) for e in collected])
    for position, event in own:
        fold.feed_until(position)
        projection.feed(event)
    fold.feed_until(None)
    return projection


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("tenant_share", [0.0, 0.02, 0.2])
def test_the_tenant_folded_from_effects_equals_the_tenant_folded_from_every_event(
    seed: int, tenant_share: float
) -> None:
    log = a_log(seed, tenant_share)
    everything = Projection(keep=tenant_only)
    for event in log:
        everything.feed(event)
    for parts in (1, 4):
        handed = folded_with_effects(log, parts, seed)
        assert handed.accounts == everything.accounts, (seed, parts)
        assert handed.rate_limits == everything.rate_limits, (seed, parts)


def test_a_busy_hour_folds_as_one_run() -> None:
    """Thousands of holds and commits in one hour, with no grants, limiters or money on the
    tenant's account, are fed to the projection as a few events, not one each."""
    at = datetime(2026, 10, 1, 8, 1, tzinfo=UTC)
    effects = Effects()
    for n in range(2_000):
        key = AccountKey(TENANT, f"u{n}")
        effects.add(2 * n + 1, TokensReserved(
            key=key, occurred_at=at, model="m", reservation_id=f"r{n}", amount=100,
            expires_at=at))  # fmt: skip
        effects.add(2 * n + 2, ReservationCommitted(
            key=key, occurred_at=at, model="m", reservation_id=f"r{n}", amount=100,
            usage=Usage(60), reserved_at=at))  # fmt: skip
    fed: list[Event] = []

    class Counting(Projection):
        def feed(self, event: Event) -> None:
            fed.append(event)
            super().feed(event)

    projection = Counting(keep=tenant_only)
    EffectFold(projection, TENANT, [effects]).feed_until(None)
    assert len(fed) == 2
    account = projection.accounts[AccountKey(TENANT)]
    assert (account.held, account.used_total) == (0, 120_000)
