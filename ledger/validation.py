"""Build commands from raw request values, bounding and checking every field.

All violations of one request are collected and raised together as InvalidArgument; field
names are the request's own (e.g. `usage.input_tokens`), so the gRPC layer can pass them on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pycountry

from ledger import errors, limits
from ledger.model import (
    AccountKey,
    AdjustBalance,
    Commit,
    GrantOrder,
    GrantTokens,
    Period,
    PriceEntry,
    RecordUsage,
    Reserve,
    Rollback,
    SetBudgetAlerts,
    SetPrices,
    SetQuota,
    SetRateLimit,
    Usage,
    rolling_window_hours_max,
    zone,
)
from ledger.reads import GROUP_NAMES, OutputStatsQuery, Scope, UsageQuery

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]*")
MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]*")
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_TIME_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*")
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (e.g. CSI)
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() also takes "²", int() not
_CURRENCY = re.compile(r"[A-Z]{3}")
_POSITION_MAX = 2**62
_XID_MAX = 2**63 - 1


def _whole_number(text: str, high: int) -> int | None:
    """`text` as a number 0…high, or None: tokens and cursors come back from clients."""
    if not _DIGITS.fullmatch(text) or int(text) > high:
        return None
    return int(text)


class Checker:
    """Collects field violations; `done()` raises them all at once."""

    def __init__(self) -> None:
        self.violations: list[errors.FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(errors.FieldViolation(field, description))

    def text(
        self,
        field: str,
        value: str,
        *,
        chars_max: int,
        pattern: re.Pattern[str] | None = None,
        required: bool = True,
    ) -> str:
        if not value:
            if required:
                self.fail(field, "is required")
            return value
        if len(value) > chars_max:
            self.fail(field, f"is {len(value)} characters long; at most {chars_max} allowed")
        elif pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"must match {pattern.pattern}")
        elif _CONTROL.search(value):
            self.fail(field, "must not contain control characters")
        return value

    def number(self, field: str, value: int, *, low: int, high: int) -> int:
        if not low <= value <= high:
            self.fail(field, f"is {value}; must be between {low} and {high}")
        return value

    def done(self) -> None:
        if self.violations:
            raise errors.InvalidArgument(self.violations)


def account_key(
    c: Checker, tenant_id: str, user_id: str, conversation_id: str, *, user: bool
) -> AccountKey:
    """The account a request names, its ids checked into `c` (the ledger's id syntax)."""
    c.text("tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    c.text("user_id", user_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN, required=user)
    c.text(
        "conversation_id",
        conversation_id,
        chars_max=limits.id_chars_max,
        pattern=ID_PATTERN,
        required=False,
    )
    if conversation_id and not user_id:
        c.fail("conversation_id", "needs a user_id: conversations belong to a user")
    return AccountKey(tenant_id, user_id, conversation_id)


def _idempotency_key(c: Checker, key: str) -> str:
    return c.text(
        "idempotency_key", key, chars_max=limits.idempotency_key_chars_max, pattern=KEY_PATTERN
    )


def _model(c: Checker, model: str) -> str:
    return c.text("model", model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN)


def _usage(c: Checker, usage: Usage, *, prefix: str = "usage.") -> Usage:
    for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
        c.number(prefix + name, getattr(usage, name), low=0, high=limits.amount_tokens_max)
    return usage


def _labels(c: Checker, labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if len(labels) > limits.labels_count_max:
        # Not entry by entry: a 1 MiB map holds ~100k of them, and so many violations would
        # overflow the status trailers (gRPC then answers RESOURCE_EXHAUSTED, details lost).
        c.fail("labels", f"has {len(labels)} entries; at most {limits.labels_count_max} allowed")
        return tuple(sorted(labels.items()))
    for k, v in labels.items():
        c.text("labels", k, chars_max=limits.label_key_chars_max, pattern=_LABEL_KEY)
        name = f"labels[{k}]" if len(k) <= limits.label_key_chars_max else "labels"
        c.text(name, v, chars_max=limits.label_value_chars_max, required=False)
    return tuple(sorted(labels.items()))


def reserve(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    model: str,
    amount: int,
    ttl_seconds: int,
    labels: Mapping[str, str],
    min_amount: int = 0,
    prompt_tokens: int = 0,
) -> Reserve:
    c = Checker()
    if min_amount and min_amount > amount:
        c.fail("min_amount", f"is {min_amount}; must not exceed amount ({amount})")
    if prompt_tokens > amount >= 0:
        c.fail("prompt_tokens", f"is {prompt_tokens}; must not exceed amount ({amount})")
    cmd = Reserve(
        idempotency_key=_idempotency_key(c, idempotency_key),
        key=account_key(c, tenant_id, user_id, conversation_id, user=True),
        model=_model(c, model),
        amount=c.number("amount", amount, low=1, high=limits.amount_tokens_max),
        ttl_s=c.number("ttl_seconds", ttl_seconds, low=0, high=limits.reservation_ttl_s_max)
        or limits.ttl_s_default,
        labels=_labels(c, labels),
        min_amount=c.number("min_amount", min_amount, low=0, high=limits.amount_tokens_max),
        prompt_tokens=c.number(
            "prompt_tokens", prompt_tokens, low=0, high=limits.amount_tokens_max
        ),
    )
    c.done()
    return cmd


def _reservation_ref(c: Checker, tenant_id: str, reservation_id: str) -> None:
    c.text("tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    c.text("reservation_id", reservation_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)


def commit(*, tenant_id: str, reservation_id: str, usage: Usage | None) -> Commit:
    c = Checker()
    _reservation_ref(c, tenant_id, reservation_id)
    if usage is None:
        c.fail("usage", "is required (all zero if the call used nothing)")
        usage = Usage()
    cmd = Commit(tenant_id, reservation_id, _usage(c, usage))
    c.done()
    return cmd


def rollback(*, tenant_id: str, reservation_id: str, reason: str) -> Rollback:
    c = Checker()
    _reservation_ref(c, tenant_id, reservation_id)
    c.text("reason", reason, chars_max=limits.reason_chars_max, required=False)
    c.done()
    return Rollback(tenant_id, reservation_id, reason)


def reservation_ref(*, tenant_id: str, reservation_id: str) -> tuple[str, str]:
    c = Checker()
    _reservation_ref(c, tenant_id, reservation_id)
    c.done()
    return tenant_id, reservation_id


def account(*, tenant_id: str, user_id: str, conversation_id: str) -> AccountKey:
    c = Checker()
    key = account_key(c, tenant_id, user_id, conversation_id, user=False)
    c.done()
    return key


def set_quota(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    limit: int | None,
    period: Period | None,
    window_hours: int = 0,
    time_zone: str = "",
    soft_limit_percent: int = 0,
    grant_order: GrantOrder | None = GrantOrder.QUOTA_FIRST,
    money_limit: int | None = None,
) -> SetQuota:
    c = Checker()
    key = account_key(c, tenant_id, user_id, conversation_id, user=False)
    if limit is not None:
        c.number("limit", limit, low=0, high=limits.limit_tokens_max)
    if money_limit is not None:
        c.number("money_limit_micros", money_limit, low=0, high=limits.money_micros_max)
    if period is None:
        c.fail("period", "is required: PERIOD_NONE, PERIOD_DAY, PERIOD_MONTH or PERIOD_ROLLING")
    if period is Period.ROLLING:
        c.number("window_hours", window_hours, low=1, high=rolling_window_hours_max)
    elif window_hours:
        c.fail("window_hours", "applies to PERIOD_ROLLING only; leave it 0")
    c.number("soft_limit_percent", soft_limit_percent, low=0, high=100)
    if grant_order is None:
        c.fail("grant_order", "is not a known GrantOrder")
    cmd = SetQuota(
        _idempotency_key(c, idempotency_key),
        key,
        limit,
        period or Period.NONE,
        window_hours=window_hours,
        time_zone=_time_zone(c, time_zone),
        soft_limit_percent=soft_limit_percent,
        grant_order=grant_order or GrantOrder.QUOTA_FIRST,
        money_limit=money_limit,
    )
    c.done()
    return cmd


def _time_zone(c: Checker, name: str, field: str = "time_zone") -> str:
    """`name` ("" is UTC) if it is an IANA time zone, else a violation of `field`."""
    if not name:
        return "UTC"
    before = len(c.violations)
    c.text(field, name, chars_max=limits.time_zone_chars_max, pattern=_TIME_ZONE)
    if len(c.violations) == before:  # only a well-formed name reaches the zone database
        try:
            zone(name)
        except (ValueError, OSError, KeyError):
            c.fail(field, f"{name!r} is not an IANA time zone (e.g. Europe/Berlin)")
    return name


def _odd_offset(name: str, start: datetime, end: datetime) -> datetime | None:
    """The first whole UTC hour in [start, end) at which `name` is not a whole number of hours
    from UTC (then its days do not start on an hourly bucket's edge), or None."""
    tz = zone(name)
    at = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while at < end:
        offset = at.astimezone(tz).utcoffset()
        if offset is not None and offset.total_seconds() % 3600:
            return at
        at += timedelta(hours=1)
    return None


def grant_tokens(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    amount: int,
    expires_at: datetime | None,
    reason: str,
    money: int = 0,
) -> GrantTokens:
    """Whether `expires_at` is in the future is decided with the key: a retry after the
    expiry must still get the first response. Tokens, money or both."""
    c = Checker()
    if not (amount or money):
        c.fail("amount", "is 0 and so is money_micros: grant tokens, money or both")
    cmd = GrantTokens(
        idempotency_key=_idempotency_key(c, idempotency_key),
        key=account_key(c, tenant_id, user_id, conversation_id, user=False),
        amount=c.number("amount", amount, low=0, high=limits.limit_tokens_max),
        expires_at=expires_at,
        reason=c.text("reason", reason, chars_max=limits.reason_chars_max, required=False),
        money=c.number("money_micros", money, low=0, high=limits.money_micros_max) or None,
    )
    c.done()
    return cmd


def adjust_balance(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    tokens: int,
    reason: str,
    money: int = 0,
) -> AdjustBalance:
    c = Checker()
    bound, money_bound = limits.limit_tokens_max, limits.money_micros_max
    if tokens == 0 and money == 0:
        c.fail("tokens", "must not be 0 (nor money_micros): > 0 charges, < 0 credits")
    cmd = AdjustBalance(
        idempotency_key=_idempotency_key(c, idempotency_key),
        key=account_key(c, tenant_id, user_id, conversation_id, user=False),
        tokens=c.number("tokens", tokens, low=-bound, high=bound),
        reason=c.text("reason", reason, chars_max=limits.reason_chars_max),
        money=c.number("money_micros", money, low=-money_bound, high=money_bound) or None,
    )
    c.done()
    return cmd


def set_rate_limit(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    model: str,
    tokens_per_minute: int,
    requests_per_minute: int,
) -> SetRateLimit:
    c = Checker()
    cmd = SetRateLimit(
        idempotency_key=_idempotency_key(c, idempotency_key),
        key=account_key(c, tenant_id, user_id, conversation_id, user=False),
        model=c.text("model", model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN,
                     required=False),
        tokens_per_minute=c.number(
            "tokens_per_minute", tokens_per_minute, low=0, high=limits.limit_tokens_max
        ),
        requests_per_minute=c.number(
            "requests_per_minute", requests_per_minute, low=0, high=limits.requests_per_minute_max
        ),
    )  # fmt: skip
    c.done()
    return cmd


def batch(*, tenant_id: str, items: int) -> str:
    """A batch call's tenant, and its item count within 1 .. batch_items_max."""
    c = Checker()
    c.text("tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    c.number("items", items, low=1, high=limits.batch_items_max)
    c.done()
    return tenant_id


def batch_item_tenant(index: int, batch_tenant_id: str, item_tenant_id: str) -> str:
    """The tenant of a batch's item: the batch's, which an item may repeat but not change."""
    if item_tenant_id not in ("", batch_tenant_id):
        field = f"items[{index}].tenant_id"
        why = f"is {item_tenant_id!r}; must be empty or the batch's, {batch_tenant_id!r}"
        raise errors.InvalidArgument([errors.FieldViolation(field, why)])
    return batch_tenant_id


def set_budget_alerts(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    thresholds_percent: Sequence[int],
) -> SetBudgetAlerts:
    c = Checker()
    if len(thresholds_percent) > limits.alert_thresholds_max:
        c.fail("thresholds_percent", f"has {len(thresholds_percent)}; at most "
               f"{limits.alert_thresholds_max}")  # fmt: skip
    if len(set(thresholds_percent)) < len(thresholds_percent):
        c.fail("thresholds_percent", "repeats a threshold")
    for i, t in enumerate(thresholds_percent):
        c.number(f"thresholds_percent[{i}]", t, low=1, high=limits.alert_threshold_percent_max)
    cmd = SetBudgetAlerts(
        idempotency_key=_idempotency_key(c, idempotency_key),
        key=account_key(c, tenant_id, user_id, conversation_id, user=False),
        thresholds_percent=tuple(sorted(thresholds_percent)),
    )
    c.done()
    return cmd


def record_usage(
    *,
    idempotency_key: str,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    model: str,
    usage: Usage | None,
) -> RecordUsage:
    c = Checker()
    if usage is None or usage.total == 0:
        c.fail("usage", "is required and must not be all zero")
        usage = usage or Usage()
    cmd = RecordUsage(
        idempotency_key=_idempotency_key(c, idempotency_key),
        key=account_key(c, tenant_id, user_id, conversation_id, user=True),
        model=_model(c, model),
        usage=_usage(c, usage),
    )
    c.done()
    return cmd


def set_prices(
    *, idempotency_key: str, tenant_id: str, prices: Sequence[PriceEntry], now: datetime
) -> SetPrices:
    """Each price's model, currency (ISO 4217), amounts (0 to the bound: a free model is
    allowed, a negative or absurd price is not) and start (at most a year ahead; whether it
    is past is decided with the key, as a grant's expiry is)."""
    c = Checker()
    c.text("tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    if not 1 <= len(prices) <= limits.prices_per_call_max:
        c.fail("prices", f"has {len(prices)}; 1 to {limits.prices_per_call_max} allowed")
    horizon = now + timedelta(days=limits.price_schedule_days_max)
    seen: set[tuple[str, datetime | None]] = set()
    for i, p in enumerate(prices[: limits.prices_per_call_max]):
        name = f"prices[{i}]."
        c.text(name + "model", p.model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN)
        _currency(c, name + "currency", p.currency)
        for kind in ("input", "output", "cached_input"):
            bound = limits.price_micros_per_mtok_max
            value = getattr(p, f"{kind}_per_mtok")
            c.number(f"{name}{kind}_micros_per_mtok", value, low=0, high=bound)
        if p.effective_from is not None and p.effective_from > horizon:
            c.fail(name + "effective_from", f"is more than {limits.price_schedule_days_max} "
                   "days ahead")  # fmt: skip
        if (p.model, p.effective_from) in seen:
            c.fail(name + "model", f"{p.model!r} is priced twice from the same time")
        seen.add((p.model, p.effective_from))
    cmd = SetPrices(_idempotency_key(c, idempotency_key), tenant_id, tuple(prices))
    c.done()
    return cmd


def _currency(c: Checker, field: str, code: str) -> str:
    known = _CURRENCY.fullmatch(code) and pycountry.currencies.get(alpha_3=code) is not None
    if not known:
        c.fail(field, f"{code!r} is not an ISO 4217 currency code (e.g. USD, EUR)")
    return code


def replay(
    *,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    from_position: int,
    from_time: datetime | None,
    max_events: int,
) -> tuple[Scope, int, datetime | None, int]:
    """(scope, first position, first time, how many events at most)."""
    c = Checker()
    key = account_key(c, tenant_id, user_id, conversation_id, user=False)
    c.number("from_position", from_position, low=0, high=2**62)
    c.number("max_events", max_events, low=0, high=limits.replay_events_max)
    c.done()
    scope = Scope(key.tenant_id, key.user_id, key.conversation_id)
    return scope, from_position, from_time, max_events or limits.replay_events_max


def verify(*, tenant_id: str, user_id: str, from_checkpoint: bool = False) -> Scope:
    c = Checker()
    key = account_key(c, tenant_id, user_id, "", user=False)
    if from_checkpoint and user_id:
        c.fail("from_checkpoint", "covers a whole tenant: leave user_id empty")
    c.done()
    return Scope(key.tenant_id, key.user_id)


def balance_at(as_of: datetime, now: datetime) -> datetime:
    c = Checker()
    if as_of > now:
        c.fail("as_of", f"is {as_of.isoformat()}, in the future; the log ends at now")
    c.done()
    return as_of


USAGE_GROUPS = GROUP_NAMES
_RANGE_MAX = timedelta(days=limits.usage_range_days_max)


def usage_query(
    *,
    tenant_id: str,
    from_time: datetime | None,
    to_time: datetime | None,
    group_by: Sequence[str | None],
    user_id: str,
    conversation_id: str,
    model: str,
    time_zone: str = "",
) -> UsageQuery:
    """A usage query; `group_by` holds names of USAGE_GROUPS (None for an unknown value)."""
    c = Checker()
    c.text("query.tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    c.text(
        "query.user_id", user_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN, required=False
    )
    c.text(
        "query.conversation_id",
        conversation_id,
        chars_max=limits.id_chars_max,
        pattern=ID_PATTERN,
        required=False,
    )
    c.text(
        "query.model",
        model,
        chars_max=limits.model_chars_max,
        pattern=MODEL_PATTERN,
        required=False,
    )
    if from_time is None or to_time is None:
        c.fail("query.from_time", "from_time and to_time are both required")
    elif to_time <= from_time:
        c.fail("query.to_time", "must be after from_time")
    elif to_time - from_time > _RANGE_MAX:
        c.fail("query.to_time", f"the range is at most {limits.usage_range_days_max} days")
    groups = [g for g in group_by if g is not None]
    if len(groups) != len(group_by):
        c.fail("query.group_by", f"each must be one of {', '.join(USAGE_GROUPS)}")
    if len(set(groups)) != len(groups):
        c.fail("query.group_by", "names a dimension twice")
    if {"day", "hour"} <= set(groups):
        c.fail("query.group_by", "group by DAY or by HOUR, not both")
    before = len(c.violations)
    time_zone = _time_zone(c, time_zone, "query.time_zone")
    zone_ok = len(c.violations) == before
    if zone_ok and from_time and to_time and "day" in groups and time_zone != "UTC":
        odd = _odd_offset(time_zone, from_time, min(to_time, from_time + _RANGE_MAX))
        if odd is not None:
            c.fail(
                "query.time_zone",
                f"{time_zone} is {odd.astimezone(zone(time_zone)).strftime('%z')} from UTC at "
                f"{odd.isoformat()}; days are summed from hourly usage, so the zone's offset "
                "must be whole hours throughout the range",
            )
    c.done()
    assert from_time is not None and to_time is not None
    return UsageQuery(
        tenant_id, from_time, to_time, tuple(groups), user_id, conversation_id, model, time_zone
    )


def page(*, page_size: int, page_token: str, query: UsageQuery) -> tuple[int, int]:
    """(offset, limit) of a usage page. The token binds the offset to its query."""
    c = Checker()
    c.number("page_size", page_size, low=0, high=limits.usage_page_size_max)
    offset = 0
    if page_token:
        raw, _, digest = page_token.partition(".")
        number = _whole_number(raw, _POSITION_MAX)
        if number is None or digest != _query_digest(query):
            c.fail("page_token", "is not a token this query returned")
        else:
            offset = number
    c.done()
    return offset, page_size or limits.usage_page_size_default


def page_token(query: UsageQuery, offset: int) -> str:
    return f"{offset}.{_query_digest(query)}"


def _query_digest(query: UsageQuery) -> str:
    return hashlib.sha256(repr(query).encode()).hexdigest()[:16]


def subscription(*, tenant_id: str, after_cursor: str, from_position: int) -> tuple[int, int]:
    """The (transaction id, position) to follow after."""
    c = Checker()
    c.text(
        "tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN, required=False
    )
    c.number("from_position", from_position, low=0, high=2**62)
    after = (0, 0)
    if after_cursor:
        xid, _, position = after_cursor.partition(".")
        parsed = (_whole_number(xid, _XID_MAX), _whole_number(position, _POSITION_MAX))
        if parsed[0] is None or parsed[1] is None:
            c.fail("after_cursor", "is not a cursor SubscribeEvents returned")
        else:
            after = (parsed[0], parsed[1])
    c.done()
    return after


def cursor(xid: int, position: int) -> str:
    return f"{xid}.{position}"


def price_list(*, tenant_id: str, model: str) -> tuple[str, str]:
    c = Checker()
    c.text("tenant_id", tenant_id, chars_max=limits.id_chars_max, pattern=ID_PATTERN)
    c.text("model", model, chars_max=limits.model_chars_max, pattern=MODEL_PATTERN, required=False)
    c.done()
    return tenant_id, model


def output_stats(
    *, tenant_id: str, user_id: str, model: str, window_hours: int, min_samples: int
) -> OutputStatsQuery:
    """A GetOutputStats query; 0 takes the default window and minimum."""
    c = Checker()
    key = account_key(c, tenant_id, user_id, "", user=False)
    _model(c, model)
    window = c.number("window_hours", window_hours, low=0,
                      high=limits.output_stats_window_hours_max)  # fmt: skip
    least = c.number("min_samples", min_samples, low=0, high=limits.output_stats_samples_max)
    c.done()
    return OutputStatsQuery(
        key.tenant_id,
        key.user_id,
        model,
        window or limits.output_stats_window_hours_default,
        least or limits.output_stats_min_samples_default,
    )
