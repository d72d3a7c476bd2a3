"""Rebuild projections from the log, and check the hash chains: what an auditor relies on.

Both use the same evolve functions as the live store, so a difference between a rebuild and the
live tables means the log or the tables were changed outside the ledger.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from typing import Any

from ledger import codec
from ledger.domain import (
    affected,
    evolve_account,
    evolve_rate_limit,
    evolve_reservation,
    quick_evolve_account,
    quick_evolve_reservation,
    rate_limit_keys,
    step_of,
)
from ledger.model import (
    EPOCH,
    Account,
    AccountKey,
    BalanceAdjusted,
    Event,
    PriceSet,
    RateLimit,
    RateLimitKey,
    RateLimitSet,
    Reservation,
    ReservationCommitted,
    ReservationExpired,
    ReservationRolledBack,
    TokensReserved,
    Usage,
    UsageRecorded,
    day_of,
)
from ledger.money import PricePoint, point_of


def _every(key: AccountKey) -> bool:
    return True


@dataclass
class Projection:
    keep: Callable[[AccountKey], bool] = _every
    """Which accounts to build (with their limiters and reservations); the others are skipped."""
    accounts: dict[AccountKey, Account] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    rate_limits: dict[RateLimitKey, RateLimit] = field(default_factory=dict)
    ended_balances: dict[str, Account] = field(default_factory=dict)
    """The balance a commit or rollback answered (what its repeats return)."""
    prices: dict[tuple[str, datetime], PricePoint] = field(default_factory=dict)
    """(model, effective_from) -> the price set last for it."""

    evolve_reservation = staticmethod(evolve_reservation)

    def feed(self, event: Event) -> None:
        """Apply one event (in log order). An event about a reservation the log never placed
        (its TokensReserved was removed) changes the balances but no reservation, so the
        rebuild shows the reservation as missing instead of failing."""
        keep = self.keep
        if isinstance(event, PriceSet):
            self.prices[(event.model, event.effective_from)] = point_of(event)
        for key in affected(event):
            if keep(key):
                self.accounts[key] = evolve_account(self.accounts.get(key) or Account(key), event)
        self._feed_the_rest(event)

    def seed(self, acc: Account) -> None:
        """Start `acc`'s key from `acc` (a verification's state at a checkpoint)."""
        self.accounts[acc.key] = acc

    def _feed_the_rest(self, event: Event) -> None:
        """`event`'s rate limiters and reservation (feed, after the accounts)."""
        keep = self.keep
        # Only a RateLimitSet makes a limiter; until one exists, no event changes any.
        for rk in (
            rate_limit_keys(event) if self.rate_limits or isinstance(event, RateLimitSet) else ()
        ):
            if keep(rk.account):
                rl = evolve_rate_limit(self.rate_limits.get(rk), rk, event)
                if rl is not None:
                    self.rate_limits[rk] = rl
        rid = getattr(event, "reservation_id", "")
        if not (rid and keep(event.key)):
            return
        if rid in self.reservations or isinstance(event, TokensReserved):
            res = self.evolve_reservation(self.reservations.get(rid), event)
            assert res is not None
            self.reservations[rid] = res
            if isinstance(event, ReservationCommitted | ReservationRolledBack | UsageRecorded):
                self.ended_balances[rid] = self.accounts[res.key]


_QUICK_TYPES = frozenset(
    {TokensReserved, ReservationCommitted, ReservationRolledBack, ReservationExpired,
     UsageRecorded, BalanceAdjusted}
)  # fmt: skip
"""The events whose accounts are their stream's lineage, and that step_of makes a Step of."""


@dataclass
class QuickProjection(Projection):
    """A Projection that folds accounts by the domain's quick path (quick_evolve_account,
    equal to evolve_account) and finds the accounts a stream's events change once per
    stream. An account given to it (seeded from a checkpoint) goes through `seed`: one
    whose hourly buckets are not in strictly increasing hour order, as no fold makes them,
    is folded by evolve_account alone (the quick path keeps that order, it does not remake
    it)."""

    lineages: dict[AccountKey, tuple[AccountKey, ...]] = field(default_factory=dict)
    reference_only: set[AccountKey] = field(default_factory=set)
    evolve_reservation = staticmethod(quick_evolve_reservation)

    def seed(self, acc: Account) -> None:
        """Start `acc`'s key from `acc`; one whose buckets are out of hour order is folded by
        evolve_account alone."""
        super().seed(acc)
        if not (_in_hour_order(acc) and (acc.money is None or _in_hour_order(acc.money))):
            self.reference_only.add(acc.key)

    def feed(self, event: Event) -> None:
        if type(event) not in _QUICK_TYPES:
            super().feed(event)
            return
        lineage = self.lineages.get(event.key)
        if lineage is None:
            lineage = self.lineages[event.key] = tuple(filter(self.keep, event.key.lineage()))
        step, accounts = step_of(event), self.accounts
        for key in lineage:
            acc = accounts.get(key) or Account(key)
            if key in self.reference_only:
                accounts[key] = evolve_account(acc, event)
            else:
                accounts[key] = quick_evolve_account(acc, event, step)
        self._feed_the_rest(event)


def _in_hour_order(acc: Account) -> bool:
    hours = [h for h, _ in acc.recent]
    return all(a < b for a, b in pairwise(hours))


@dataclass(frozen=True)
class ChainBreak:
    """The first event of a stream whose version or hash does not follow from its predecessor."""

    stream: AccountKey
    version: int
    problem: str


class ChainVerifier:
    """Checks event rows one at a time, each stream's in version order (streams may
    interleave, as in log order): versions 1, 2, 3… without gaps, each prev_hash equal to the
    previous hash, each hash recomputed from the row. Reports each stream's first break."""

    def __init__(self, quick: bool = False) -> None:
        """`quick`: the rows are as a binary COPY gives them (codec.copied_event_hash)."""
        self.hash = codec.copied_event_hash if quick else codec.event_hash
        self.breaks: list[ChainBreak] = []
        self.heads: dict[AccountKey, tuple[int, bytes]] = {}
        self.checked = 0
        self._broken: set[AccountKey] = set()

    def feed(self, row: dict[str, Any]) -> None:
        self.checked += 1
        key = AccountKey(row["tenant_id"], row["user_id"], row["conversation_id"])
        version, head = self.heads.get(key, (0, codec.GENESIS_HASH))
        self.heads[key] = (row["version"], bytes(row["hash"]))
        if key in self._broken:
            return
        problem = ""
        if row["version"] != version + 1:
            problem = f"version {row['version']} follows {version}"
        elif bytes(row["prev_hash"]) != head:
            problem = "prev_hash is not the previous event's hash"
        elif self.hash(row, head) != bytes(row["hash"]):
            problem = "hash does not match the event's content"
        if problem:
            self.breaks.append(ChainBreak(key, row["version"], problem))
            self._broken.add(key)


# --- the tenant's account from its users' events, without their rows -------------------------

RESERVE, RELEASE, CHARGE, ADJUST = range(4)
"""Kinds of effect: a hold; a hold given back (rolled back, expired); usage charged (a commit,
or usage recorded); an operator's adjustment."""
_HOUR_US = 3_600_000_000
_WHOLE_HOURS_US = (0, 7_258_118_400_000_000)
"""From the epoch to 2200: times whose hour here (microseconds // _HOUR_US) is hour_of's, the
domain's (a float's whole seconds, exact to the microsecond until about 2240)."""
_EFFECT_FIELDS = ("position", "kind", "at", "tokens", "released", "reserved", "money", "cost")


_Effect = tuple[int, int, int, datetime | None, int, int]
"""kind, tokens (held, released, charged or adjusted), tokens released by a charge, the time
charged to (a charge's), money (held, released), cost."""


def _effect(event: Event) -> _Effect | None:
    """What an event does to the balance of each account of its lineage (None: nothing
    coalescing knows of, or nothing)."""
    match event:
        case TokensReserved():
            return RESERVE, event.amount, 0, None, event.money or 0, 0
        case ReservationRolledBack() | ReservationExpired():
            return RELEASE, event.amount, 0, None, event.money or 0, 0
        case ReservationCommitted():
            return (CHARGE, event.usage.total, event.amount, event.reserved_at,
                    event.money or 0, event.cost or 0)  # fmt: skip
        case UsageRecorded():
            at = event.reserved_at or event.occurred_at
            return CHARGE, event.usage.total, 0, at, 0, event.cost or 0
        case BalanceAdjusted():
            return ADJUST, event.tokens, 0, None, event.money or 0, 0
    return None


def _whole(us: int) -> bool:
    return _WHOLE_HOURS_US[0] <= us < _WHOLE_HOURS_US[1]


def _one_day(time_zone: str, hour: int) -> bool:
    """Whether the whole of `hour` (hours since the epoch) falls on one day in `time_zone`."""
    return time_zone == "UTC" or _one_day_in(time_zone, hour)


@lru_cache(maxsize=4096)
def _one_day_in(time_zone: str, hour: int) -> bool:
    first = _at(hour * _HOUR_US)
    return day_of(first, time_zone) == day_of(_at((hour + 1) * _HOUR_US - 1), time_zone)


def _us(at: datetime) -> int:
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _at(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


class Effects:
    """What the tenant's own account and rate limiters take from its users' events, one
    record an event, in log order: a user part collects them while it folds its users, and
    the tenant part folds them (EffectFold) instead of reading and decoding every row again.
    Columns of integers (times in microseconds since the epoch), so they cross a process
    boundary as a few buffers."""

    def __init__(self) -> None:
        self.columns = {name: array("q") for name in _EFFECT_FIELDS}
        self.model = array("l")
        """A hold's model, as its index in `models` (-1 for other kinds)."""
        self.models: list[str] = []
        self.rows = 0
        """Rows of users read (decodable or not): any of them touches the tenant's account."""

    def __len__(self) -> int:
        return len(self.columns["position"])

    def add(self, position: int, event: Event) -> None:
        """The tenant-level effect of a user's event (events of other kinds have none)."""
        c = self.columns
        effect = _effect(event)
        if effect is None:
            assert AccountKey(event.key.tenant_id) not in affected(event), event
            return
        kind, tokens, released, reserved_at, money, cost = effect
        reserved = 0 if reserved_at is None else _us(reserved_at)
        c["position"].append(position)
        c["kind"].append(kind)
        c["at"].append(_us(event.occurred_at))
        c["tokens"].append(tokens)
        c["released"].append(released)
        c["reserved"].append(reserved)
        c["money"].append(money)
        c["cost"].append(cost)
        self.model.append(self._model_index(event.model) if kind == RESERVE else -1)

    def _model_index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            self.models.append(model)
            return len(self.models) - 1


class EffectFold:
    """Feeds the effects of several parts, merged in log order, to the tenant's Projection as
    events. A run of effects that evolve_account would apply as plain sums is fed as one
    event of each kind (per hour charged to): same hour, so the same roll of the account
    (its day and month, hourly buckets, window); no grants to draw, in tokens or money; no
    tenant rate limiter (each hold advances one); no negative amounts. Anything else is fed
    event by event, as the log has it. Either way the account comes out as folding every
    event would make it."""

    def __init__(self, projection: Projection, tenant_id: str, parts: list[Effects]) -> None:
        self.projection = projection
        self.tenant = AccountKey(tenant_id)
        self.key = AccountKey(tenant_id, "*")
        """A user's key: its lineage reaches the tenant's account and no other it keeps."""
        self.columns = {
            name: sum((p.columns[name] for p in parts), array("q")) for name in _EFFECT_FIELDS
        }
        models: list[str] = []
        self.models: list[str] = []
        for p in parts:
            self.models += [p.models[i] if i >= 0 else "" for i in p.model]
            models += p.models
        self.hold_models = sorted(set(models))
        """The models of the holds among the effects (the tenant limiters they touch)."""
        positions = self.columns["position"]
        self.order = sorted(range(len(positions)), key=positions.__getitem__)
        self.next = 0
        self._run: dict[str, Any] | None = None

    def peek(self) -> int | None:
        """The position of the next effect not fed yet (None: all are)."""
        if self.next == len(self.order):
            return None
        return self.columns["position"][self.order[self.next]]

    def feed_until(self, position: int | None) -> None:
        """Feed the effects before `position` (None: all of them)."""
        c, order = self.columns, self.order
        pos, kinds, ats = c["position"], c["kind"], c["at"]
        n = len(order)
        while self.next < n:
            i = order[self.next]
            if position is not None and pos[i] >= position:
                break
            self.next += 1
            kind, at = kinds[i], ats[i]
            run = self._run
            if run is not None and at // _HOUR_US == run["hour"] and self._joins(i, kind):
                self._add(run, i, kind)
                continue
            self._flush()
            if self._starts_run(i, kind, at):
                self._run = {"hour": at // _HOUR_US, "at": at, "held": {}, "charged": {}}
                self._add(self._run, i, kind)
            else:
                self._feed_one(i, kind)
        self._flush()

    def _account(self) -> Account:
        return self.projection.accounts.get(self.tenant) or Account(self.tenant)

    def _starts_run(self, i: int, kind: int, at: int) -> bool:
        """Whether effect `i` may begin a run: the account has nothing a sum would treat
        differently, and its hour is one day in the account's zone."""
        acc = self._account()
        if acc.grants or (acc.money is not None and acc.money.grants) or not _whole(at):
            return False
        return self._joins(i, kind) and _one_day(acc.time_zone, at // _HOUR_US)

    def _joins(self, i: int, kind: int) -> bool:
        c = self.columns
        if kind == ADJUST or (kind == RESERVE and self.projection.rate_limits):
            return False
        if min(c["tokens"][i], c["released"][i], c["money"][i], c["cost"][i]) < 0:
            return False
        if kind != CHARGE:
            return True
        reserved = c["reserved"][i]
        return _whole(reserved) and _one_day(self._account().time_zone, reserved // _HOUR_US)

    def _add(self, run: dict[str, Any], i: int, kind: int) -> None:
        c = self.columns
        tokens, money = c["tokens"][i], c["money"][i]
        if kind == CHARGE:
            hour = c["reserved"][i] // _HOUR_US
            sums = run["charged"].setdefault(hour, [c["reserved"][i], 0, 0, 0, 0])
            sums[1] += tokens
            sums[2] += c["released"][i]
            sums[3] += money
            sums[4] += c["cost"][i]
        else:
            sums = run["held"].setdefault(kind, [0, 0])
            sums[0] += tokens
            sums[1] += money

    def _flush(self) -> None:
        """Feed the run so far as one event of each kind it holds. Its holds are fed as a
        rollback of minus their sum (the same change to what is held, in tokens and money),
        so that no rate limiter takes them: a run has holds only while the tenant has no
        limiter, and the event that rolls the account to the run's hour must not take one."""
        run, self._run = self._run, None
        if run is None:
            return
        at, feed = _at(run["at"]), self.projection.feed
        tokens, money = run["held"].get(RESERVE, (0, 0))
        # Always one event: every effect rolls the account to its hour, even one of nothing.
        feed(self._released(at, -tokens, -money))
        if RELEASE in run["held"]:
            feed(self._released(at, *run["held"][RELEASE]))
        for reserved, tokens, released, money, cost in run["charged"].values():
            feed(ReservationCommitted(
                key=self.key, occurred_at=at, reservation_id="", amount=released,
                usage=Usage(tokens), reserved_at=_at(reserved), money=money or None,
                cost=cost or None))  # fmt: skip

    def _released(self, at: datetime, tokens: int, money: int) -> ReservationRolledBack:
        return ReservationRolledBack(
            key=self.key, occurred_at=at, reservation_id="", amount=tokens, money=money or None
        )

    def hold(self, model: str) -> TokensReserved:
        """A hold of nothing on `model`: what touches the tenant's limiters of the model."""
        return self._reserved(EPOCH, 0, 0, model)

    def _reserved(self, at: datetime, tokens: int, money: int, model: str) -> TokensReserved:
        return TokensReserved(
            key=self.key, occurred_at=at, model=model, reservation_id="", amount=tokens,
            expires_at=at, money=money or None)  # fmt: skip

    def _feed_one(self, i: int, kind: int) -> None:
        """Feed effect `i` as the event it came from, as far as the tenant's account and
        limiters read it."""
        c = self.columns
        at, tokens, money = _at(c["at"][i]), c["tokens"][i], c["money"][i] or None
        event: Event
        if kind == RESERVE:
            event = self._reserved(at, tokens, c["money"][i], self.models[i])
        elif kind == RELEASE:
            event = self._released(at, tokens, c["money"][i])
        elif kind == CHARGE:
            event = ReservationCommitted(
                key=self.key, occurred_at=at, reservation_id="", amount=c["released"][i],
                usage=Usage(tokens), reserved_at=_at(c["reserved"][i]), money=money,
                cost=c["cost"][i] or None)  # fmt: skip
        else:
            event = BalanceAdjusted(
                key=self.key, occurred_at=at, tokens=tokens, reason="", money=money
            )
        self.projection.feed(event)

    def touched_models(self) -> list[str]:
        """The models of the holds among the effects: a verification from a checkpoint seeds
        the tenant's limiters of each (a hold may advance them)."""
        return self.hold_models
