"""Audit checkpoints, the pure part: the state a verification rebuilds as (kind, key, value)
items, their digest, and a checkpoint's chain hash.

A checkpoint records, at a log position, a digest of every kind of rebuilt state (stream
heads, accounts, reservations, usage rows, rate limiters) and the items that changed since the
previous checkpoint. The digest of a kind is additive (AdHash: the sum, modulo 2^4096, of a
4096-bit SHAKE-256 of each item), for two reasons: parts of a verification that share nothing
add their sums into the tenant's, and the next checkpoint's digest follows from this one's by
subtracting the items that changed and adding their new values, without reading the rest.
At 4096 bits, Wagner's generalized-birthday attack on such sums costs about 2^128 work.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any

from ledger import codec
from ledger.model import Account, AccountKey, RateLimit, RateLimitKey, Reservation
from ledger.usage import UsageCounters, UsageKey

KINDS = ("stream", "account", "reservation", "usage", "rate_limit")
SUM_BYTES = 512
_MODULUS = 1 << (8 * SUM_BYTES)

Item = tuple[str, str, str]
"""(kind, key, value): one row of rebuilt state as canonical text."""
Change = tuple[str, str, str | None, str | None]
"""(kind, key, value at the checkpoint, value now); None: no such row."""


def item_sum(kind: str, key: str, value: str) -> int:
    data = b"\0".join((kind.encode(), key.encode(), value.encode()))
    return int.from_bytes(hashlib.shake_256(data).digest(SUM_BYTES), "big")


@dataclass
class Digest:
    """How many items of one kind, and the sum of their hashes."""

    rows: int = 0
    total: int = 0

    def add(self, item: Item, sign: int = 1) -> None:
        self.rows += sign
        self.total = (self.total + sign * item_sum(*item)) % _MODULUS

    def merge(self, other: Digest) -> None:
        self.rows += other.rows
        self.total = (self.total + other.total) % _MODULUS

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "sum": self.total.to_bytes(SUM_BYTES, "big").hex()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Digest:
        return cls(int(obj["rows"]), int.from_bytes(bytes.fromhex(obj["sum"]), "big"))


_ABSENT = object()


def _as_is(value: Any) -> Any:
    return value


def digests_of(items: Iterator[Item]) -> dict[str, Digest]:
    """The digests of a whole state, item by item: what RunningDigests takes by changes."""
    out = {kind: Digest() for kind in KINDS}
    for item in items:
        out[item[0]].add(item)
    return out


@dataclass(frozen=True)
class Source:
    """One kind of a fold's state as RunningDigests reads it: its values by key, each
    value's item, and how a value is known unchanged (`same`) and kept for the next take
    (`keep`): by identity for the immutable values a fold replaces, by a copy compared by
    value for those it changes in place (usage counters)."""

    kind: str
    values: Mapping[Any, Any]
    item_of: Callable[[Any, Any], Item]
    same: Callable[[Any, Any], bool] = operator.is_
    keep: Callable[[Any], Any] = _as_is


class RunningDigests:
    """The digests of a state that a fold keeps changing, taken again and again: a full
    verification takes them at every checkpoint it passes. Each take hashes only the items
    that changed since the last one (the sum takes their old hash out and their new one in),
    so a log with many checkpoints costs its state once, not once a checkpoint."""

    def __init__(self) -> None:
        self._digests = {kind: Digest() for kind in KINDS}
        self._kept: dict[str, dict[Any, Any]] = {kind: {} for kind in KINDS}

    def take(self, sources: Iterable[Source]) -> dict[str, Digest]:
        """The digests of every kind of the state now (a kind without a source: none)."""
        for source in sources:
            kept, digest = self._kept[source.kind], self._digests[source.kind]
            same, keep, item_of = source.same, source.keep, source.item_of
            seen, before = 0, len(kept)
            for key, value in source.values.items():
                was = kept.get(key, _ABSENT)
                if was is not _ABSENT:
                    seen += 1
                    if same(was, value):
                        continue
                    digest.add(item_of(key, was), -1)
                digest.add(item_of(key, value))
                kept[key] = keep(value)
            if seen < before:  # keys gone (no fold removes any)
                for key in kept.keys() - source.values.keys():
                    digest.add(item_of(key, kept.pop(key)), -1)
        return {kind: Digest(d.rows, d.total) for kind, d in self._digests.items()}


def _text(value: Any) -> str:
    return codec.state_json(value).decode()


def _key_text(parts: list[str]) -> str:
    """A key as a JSON list of strings: canonical_json's text."""
    return _text(parts)


def account_key_text(key: AccountKey) -> str:
    return _key_text([key.tenant_id, key.user_id, key.conversation_id])


def usage_key_text(key: UsageKey) -> str:
    return _key_text(
        [key.tenant_id, codec.ts(key.hour), key.user_id, key.conversation_id, key.model]
    )


def rate_limit_key_text(key: RateLimitKey) -> str:
    a = key.account
    return _key_text([a.tenant_id, a.user_id, a.conversation_id, key.model])


def stream_item(key: AccountKey, head: tuple[int, bytes]) -> Item:
    return ("stream", account_key_text(key), f"{head[0]}:{head[1].hex()}")


def account_item(acc: Account) -> Item:
    return ("account", account_key_text(acc.key), _text(codec.account_to_json(acc)))


def reservation_item(res: Reservation) -> Item:
    return ("reservation", res.reservation_id, _text(codec.reservation_to_json(res)))


def usage_item(key: UsageKey, counters: UsageCounters) -> Item:
    # The counters' fields by name (asdict would deep-copy each integer: most of what taking a
    # checkpoint's digests cost); canonical JSON sorts them.
    return ("usage", usage_key_text(key), _text(vars(counters)))


def rate_limit_item(rl: RateLimit) -> Item:
    values = [rl.tokens_per_minute, rl.requests_per_minute, rl.tokens_tat, rl.requests_tat]
    return ("rate_limit", rate_limit_key_text(rl.key), _text(values))


def parse_stream(value: str) -> tuple[int, bytes]:
    version, head = value.split(":")
    return int(version), bytes.fromhex(head)


def parse_account(value: str) -> Account:
    return codec.account_from_json(codec.json_loads(value))


def parse_reservation(value: str) -> Reservation:
    return codec.reservation_from_json(codec.json_loads(value))


def parse_usage(value: str) -> UsageCounters:
    counters = UsageCounters(**codec.json_loads(value))
    if "unpriced_tokens" not in value:  # taken before prices existed: all usage was unpriced
        counters.unpriced_tokens = (
            counters.input_tokens + counters.output_tokens + counters.cached_input_tokens
        )
    return counters


def parse_rate_limit(key: RateLimitKey, value: str) -> RateLimit:
    tpm, rpm, tokens_tat, requests_tat = codec.json_loads(value)
    return RateLimit(key, tpm, rpm, tokens_tat, requests_tat)


def parse_key(kind: str, text: str, value: str) -> tuple[Any, AccountKey]:
    """A state item's key as a verification keeps it, and the account it belongs to."""
    if kind == "reservation":
        return text, parse_reservation(value).key
    parts = codec.json_loads(text)
    if kind in ("stream", "account"):
        account = AccountKey(*parts)
        return account, account
    if kind == "usage":
        tenant, hour, user, conversation, model = parts
        account = AccountKey(tenant, user, conversation)
        return UsageKey(tenant, codec.parse_ts(hour), user, conversation, model), account
    tenant, user, conversation, model = parts
    account = AccountKey(tenant, user, conversation)
    return RateLimitKey(account, model), account


def delta_digest(items: list[tuple[str, str, str | None]]) -> bytes:
    """sha256 of a checkpoint's own rows, in (kind, key) order by code point: each row's
    canonical JSON and a newline."""
    h = hashlib.sha256()
    for item in sorted(items, key=itemgetter(0, 1)):
        h.update(codec.canonical_json(list(item)) + b"\n")
    return h.digest()


@dataclass(frozen=True)
class Checkpoint:
    """One row of audit_checkpoints."""

    tenant_id: str
    seq: int
    position: int
    events: int
    taken_at: datetime
    state: dict[str, Digest] = field(compare=False)
    delta_rows: int
    delta_digest: bytes
    prev_hash: bytes
    hash: bytes = b""

    def seeded(self) -> tuple[str, ...]:
        """The kinds of state with rows at this checkpoint (a count its hash covers)."""
        return tuple(kind for kind in KINDS if self.state[kind].rows)

    def state_json(self) -> dict[str, Any]:
        return {kind: self.state[kind].to_json() for kind in KINDS}

    def expected_hash(self) -> bytes:
        body = {
            "tenant_id": self.tenant_id,
            "seq": self.seq,
            "position": self.position,
            "events": self.events,
            "taken_at": codec.ts(self.taken_at),
            "state": self.state_json(),
            "delta_rows": self.delta_rows,
            "delta_digest": self.delta_digest.hex(),
        }
        return hashlib.sha256(self.prev_hash + codec.canonical_json(body)).digest()

    @property
    def name(self) -> str:
        return f"{self.tenant_id}#{self.seq}"


def chain_problems(checkpoints: list[Checkpoint]) -> list[tuple[Checkpoint, str]]:
    """Each checkpoint (in seq order) that does not follow from its predecessor."""
    out = []
    prev_hash, seq, position = codec.GENESIS_HASH, 0, 0
    for cp in checkpoints:
        if cp.seq != seq + 1:
            out.append((cp, f"seq {cp.seq} follows {seq}"))
        elif cp.prev_hash != prev_hash:
            out.append((cp, "prev_hash is not the previous checkpoint's hash"))
        elif cp.expected_hash() != cp.hash:
            out.append((cp, "hash does not match the checkpoint's content"))
        elif cp.position < position:
            out.append((cp, f"position {cp.position} is before the previous {position}"))
        prev_hash, seq, position = cp.hash, cp.seq, cp.position
    return out
