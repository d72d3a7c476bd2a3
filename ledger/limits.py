"""Bounds on every input. Each name ends with its unit."""

id_chars_max = 128
"""tenant, user, conversation and reservation ids."""
idempotency_key_chars_max = 128
model_chars_max = 128
reason_chars_max = 512
time_zone_chars_max = 64
requests_per_minute_max = 10**9

amount_tokens_max = 100_000_000
"""One reservation or one usage kind; far above any model's context window."""
limit_tokens_max = 10**15

ttl_s_default = 600
reservation_ttl_s_max = 86_400

labels_count_max = 16
label_key_chars_max = 64
label_value_chars_max = 256

expire_batch_max = 256
"""Overdue holds expired in one transaction, so a backlog cannot make a call slow."""

batch_items_max = 100
"""Items of one ReserveBatch, CommitBatch or RollbackBatch call."""
batch_commands_max = 256
"""Writes of one tenant applied in one transaction (group commit)."""

replay_events_max = 1_000_000
"""Events one ReplayHistory call streams; the end message says where to go on."""
usage_range_days_max = 400
usage_page_size_default = 100
usage_page_size_max = 1_000
follow_poll_s = 0.2
"""How often a follower looks again while event notifications are down, or while the events
of one it got are held back by an older open transaction."""
follow_backstop_s = 5.0
"""How long a follower waits for a notification before it looks again anyway."""
verify_listed_max = 1_000
"""Chain breaks and projection differences one VerifyAudit response lists (it counts all)."""

idempotency_retention_s_default = 7 * 86_400
"""How long a key's first outcome is kept: a week, seven times the longest hold
(reservation_ttl_s_max), so a caller's retries (seconds to hours after an outage, a queue
replayed next day or after a weekend) meet their first answer. After it, the key is a new
request."""
idempotency_retention_s_min = 86_400
alert_thresholds_max = 10
alert_threshold_percent_max = 1_000
"""A threshold past 100 % watches overage (usage recorded above the limit)."""
prune_batch_max = 1_000
"""Expired keys deleted in one statement (a short transaction that skips locked rows)."""

money_micros_max = 10**15
"""A money quota, grant or correction, in micro-units: a thousand million currency units."""
price_micros_per_mtok_max = 10**10
"""A price per million tokens, in micro-units: 10,000 currency units, about 17 times the
dearest model in LiteLLM's price table (600 USD per million output tokens)."""
prices_per_call_max = 1_000
"""Prices one SetPrices call sets (a price table of thousands of models takes a few calls)."""
price_schedule_days_max = 366
"""How far ahead a price may be set to take effect."""

output_stats_window_hours_default = 7 * 24
"""GetOutputStats looks this far back unless asked otherwise: a week covers weekday and
weekend traffic, and is recent enough to follow a changed prompt or model."""
output_stats_window_hours_max = 90 * 24
output_stats_samples_max = 1_000
"""The most recent calls a statistic is taken over: bounds the query (an index-only scan of
at most this many entries) and keeps old traffic from outweighing new."""
output_stats_min_samples_default = 20
"""Below this many calls, a user's figures are not trusted and the tenant's are used (and
below it for the tenant too, none): with 20, the p95 is the 19th of 20 observations."""
