"""The pure part of checkpoints (ledger/checkpoints.py): digests that parts add up and that
follow a change without the rest, state items that read back as what was written, and a
chain whose every kind of break is named."""

from __future__ import annotations

import hashlib
import json
from copy import copy
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ledger import checkpoints as cp
from ledger.codec import GENESIS_HASH
from ledger.model import Account, AccountKey, Period, RateLimit, RateLimitKey
from ledger.usage import UsageCounters, UsageKey

ITEMS = [("account", f"k{n}", f"v{n}") for n in range(50)] + [("usage", "h", "1")]


def test_a_digest_is_the_sum_of_its_parts_and_follows_a_change() -> None:
    whole = cp.digests_of(iter(ITEMS))
    halves = cp.digests_of(iter(ITEMS[::2])), cp.digests_of(iter(ITEMS[1::2]))
    for kind in cp.KINDS:
        merged = cp.Digest()
        merged.merge(halves[0][kind])
        merged.merge(halves[1][kind])
        assert (merged.rows, merged.total) == (whole[kind].rows, whole[kind].total)
    # Changing one item: subtract its old value, add the new one = the digest of the new set.
    changed = [*ITEMS[:-1], ("usage", "h", "2")]
    followed = cp.Digest(whole["usage"].rows, whole["usage"].total)
    followed.add(("usage", "h", "1"), -1)
    followed.add(("usage", "h", "2"))
    assert followed == cp.digests_of(iter(changed))["usage"] != whole["usage"]
    again = cp.Digest.from_json(followed.to_json())
    assert again == followed and len(followed.to_json()["sum"]) == 2 * cp.SUM_BYTES


def test_state_items_read_back_as_written() -> None:
    key = AccountKey("t", "ann", "c1")
    acc = Account(key, limit=500, period=Period.DAY, held=7, used_total=9, recent=((3, 4),))
    assert cp.parse_account(cp.account_item(acc)[2]) == acc
    rl = RateLimit(RateLimitKey(key, "gpt-4o"), 100, 5, 123456789, 42)
    assert cp.parse_rate_limit(rl.key, cp.rate_limit_item(rl)[2]) == rl
    counters = UsageCounters(input_tokens=5, commits=1, adjusted_tokens=-3)
    hour = datetime(2026, 12, 6, 7, tzinfo=UTC)
    item = cp.usage_item(UsageKey("t", hour, "ann", "c1", "m"), counters)
    assert cp.parse_usage(item[2]) == counters
    assert cp.parse_stream(cp.stream_item(key, (3, b"\x01" * 32))[2]) == (3, b"\x01" * 32)
    # Keys are JSON: an id with a slash or a quote cannot make two keys collide.
    assert cp.account_key_text(AccountKey("t", "a/b", "")) != cp.account_key_text(
        AccountKey("t", "a", "b")
    )


def _chain(n: int) -> list[cp.Checkpoint]:
    out: list[cp.Checkpoint] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        c = cp.Checkpoint(
            "t", seq, 10 * seq, 10 * seq, datetime(2026, 12, seq, tzinfo=UTC),
            cp.digests_of(iter(ITEMS[:seq])), seq, bytes(32), prev,
        )  # fmt: skip
        c = replace(c, hash=c.expected_hash())
        out.append(c)
        prev = c.hash
    return out


def test_every_break_of_a_checkpoint_chain_is_named() -> None:
    good = _chain(3)
    assert cp.chain_problems(good) == []
    edited = replace(good[1], events=99)  # content changed, hash not recomputed
    rehashed = replace(edited, hash=edited.expected_hash())  # and recomputed
    earlier = replace(good[2], position=5, prev_hash=good[1].hash)
    earlier = replace(earlier, hash=earlier.expected_hash())
    cases = {
        "hash does not match the checkpoint's content": [good[0], edited, good[2]],
        "prev_hash is not the previous checkpoint's hash": [good[0], rehashed, good[2]],
        "seq 3 follows 1": [good[0], good[2]],
        "position 5 is before the previous 20": [*good[:2], earlier],
    }
    for problem, chain in cases.items():
        found = [(c.seq, p) for c, p in cp.chain_problems(chain)]
        assert found and found[0][1] == problem, (problem, found)


def _json(value: object) -> bytes:
    """The canonical JSON as json.dumps writes it: what codec.canonical_json must match."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def reference_delta_digest(items: list[tuple[str, str, str | None]]) -> bytes:
    h = hashlib.sha256()
    for item in sorted(items, key=lambda i: (i[0], i[1])):
        h.update(_json(list(item)) + b"\n")
    return h.digest()


def test_a_checkpoints_rows_digest_as_by_the_reference_codec() -> None:
    """delta_digest and the key texts are written by codec.canonical_json (orjson where it
    writes json's bytes): the same bytes as json.dumps for every code point in keys and values
    (escaped, non-ASCII, null), and a lone surrogate, which orjson refuses, goes through json
    (which refuses it the same way)."""
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    rows: list[tuple[str, str, str | None]] = [
        ("usage", f"k{n}" + "".join(points[n::4096]), "".join(points[n::2049]) or None)
        for n in range(4096)
    ]
    rows += [("stream", 'a"b\\c\n', None), ("account", "é", '{"x":[1,"\u2028"]}')]
    assert cp.delta_digest(rows) == reference_delta_digest(rows)
    for _, key, value in rows[:64]:
        key_text = cp.account_key_text(AccountKey(key, value or "", "c"))
        assert key_text == _json([key, value or "", "c"]).decode()
    assert cp.delta_digest(rows[:1]) != cp.delta_digest(rows[:2])
    surrogate = [("usage", "k\ud800", "v")]
    try:
        expected: bytes | type[Exception] = reference_delta_digest(surrogate)
    except UnicodeEncodeError:
        expected = UnicodeEncodeError
    try:
        found: bytes | type[Exception] = cp.delta_digest(surrogate)
    except UnicodeEncodeError:
        found = UnicodeEncodeError
    assert found == expected


_steps = st.lists(
    st.tuples(st.sampled_from(["head", "counters", "drop", "take"]), st.integers(0, 5),
              st.integers(0, 3)),
    max_size=40,
)  # fmt: skip


@given(_steps)
def test_running_digests_equal_the_digests_of_the_whole_state_at_every_take(steps: Any) -> None:
    """RunningDigests hashes only what changed since its last take: replaced values (by
    identity), counters changed in place (by value), and keys gone; each take equals the
    digests of every item, taken afresh."""
    heads: dict[AccountKey, tuple[int, bytes]] = {}
    usage: dict[UsageKey, UsageCounters] = {}
    running = cp.RunningDigests()
    hour = datetime(2026, 12, 6, tzinfo=UTC)

    def take() -> None:
        got = running.take([
            cp.Source("stream", heads, cp.stream_item),
            cp.Source("usage", usage, cp.usage_item, lambda a, b: vars(a) == vars(b), copy),
        ])  # fmt: skip
        items = [cp.stream_item(k, h) for k, h in heads.items()]
        items += [cp.usage_item(k, c) for k, c in usage.items()]
        assert got == cp.digests_of(iter(items))

    for what, n, value in steps:
        key = AccountKey("t", f"u{n}")
        if what == "head":
            heads[key] = (value, bytes([value]) * 32)  # a new tuple, even of an equal value
        elif what == "counters":
            usage.setdefault(
                UsageKey("t", hour, f"u{n}", "", "m"), UsageCounters()
            ).commits += value
        elif what == "drop":
            heads.pop(key, None)
        else:
            take()
    take()
