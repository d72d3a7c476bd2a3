-- The SQL of one Reserve→Commit cycle as the store issues it (ledger/store.py), with the
-- Python work (decisions, hashing) left out: the database ceiling for `make bench`.
\set u random(0, :users - 1)
\set r random(1, 1000000000000)
-- Reserve
BEGIN;
SELECT tenant_id, user_id, conversation_id, quota_limit, period, held, used_total, used_day,
    day_start, used_month, month_start, stream_version, head_hash
  FROM accounts WHERE tenant_id = ':tenant' AND (user_id, conversation_id) IN (('', ''), ('u' || :u, ''))
  ORDER BY user_id, conversation_id FOR UPDATE;
SELECT operation, request, response FROM idempotency_keys
  WHERE tenant_id = ':tenant' AND idempotency_key = 'k' || :client_id || '_' || :r;
SELECT reservation_id FROM reservations
  WHERE tenant_id = ':tenant' AND state = 'held' AND expires_at <= now() AND reservation_id <> ''
  ORDER BY expires_at LIMIT 256 FOR UPDATE;
UPDATE accounts SET held = held + 100, stream_version = stream_version + 1, updated_at = now()
  WHERE tenant_id = ':tenant' AND user_id = 'u' || :u AND conversation_id = ''
  RETURNING stream_version AS v \gset
UPDATE accounts SET held = held + 100, updated_at = now()
  WHERE tenant_id = ':tenant' AND user_id = '' AND conversation_id = '';
INSERT INTO events (tenant_id, user_id, conversation_id, version, event_type, occurred_at, model,
    reservation_id, amount, input_tokens, output_tokens, cached_input_tokens, idempotency_key,
    actor, trace_id, data, prev_hash, hash)
  VALUES (':tenant', 'u' || :u, '', :v, 'TokensReserved', now(), 'gpt-4o',
    'rsv_' || :client_id || '_' || :r, 100, 0, 0, 0, 'k' || :client_id || '_' || :r, '', '',
    '{"expires_at": "2026-01-01T00:00:00.000000+00:00", "labels": {}}', sha256('a'), sha256('b'));
INSERT INTO reservations (tenant_id, reservation_id, user_id, conversation_id, model, amount,
    state, created_at, expires_at, labels, late)
  VALUES (':tenant', 'rsv_' || :client_id || '_' || :r, 'u' || :u, '', 'gpt-4o', 100, 'held',
    now(), now() + interval '10 minutes', '{}', false);
INSERT INTO idempotency_keys (tenant_id, idempotency_key, operation, request, response)
  VALUES (':tenant', 'k' || :client_id || '_' || :r, 'Reserve', '{"amount": 100}', '{"r": 1}');
COMMIT;
-- Commit
BEGIN;
SELECT user_id, conversation_id FROM reservations
  WHERE tenant_id = ':tenant' AND reservation_id = 'rsv_' || :client_id || '_' || :r;
SELECT tenant_id, user_id, conversation_id, quota_limit, period, held, used_total, used_day,
    day_start, used_month, month_start, stream_version, head_hash
  FROM accounts WHERE tenant_id = ':tenant' AND (user_id, conversation_id) IN (('', ''), ('u' || :u, ''))
  ORDER BY user_id, conversation_id FOR UPDATE;
SELECT * FROM reservations
  WHERE tenant_id = ':tenant' AND reservation_id = 'rsv_' || :client_id || '_' || :r FOR UPDATE;
SELECT reservation_id FROM reservations
  WHERE tenant_id = ':tenant' AND state = 'held' AND expires_at <= now()
    AND reservation_id <> 'rsv_' || :client_id || '_' || :r
  ORDER BY expires_at LIMIT 256 FOR UPDATE;
UPDATE accounts SET held = held - 100, used_total = used_total + 60, used_day = used_day + 60,
    used_month = used_month + 60, stream_version = stream_version + 1, updated_at = now()
  WHERE tenant_id = ':tenant' AND user_id = 'u' || :u AND conversation_id = ''
  RETURNING stream_version AS v \gset
UPDATE accounts SET held = held - 100, used_total = used_total + 60, used_day = used_day + 60,
    used_month = used_month + 60, updated_at = now()
  WHERE tenant_id = ':tenant' AND user_id = '' AND conversation_id = '';
INSERT INTO events (tenant_id, user_id, conversation_id, version, event_type, occurred_at, model,
    reservation_id, amount, input_tokens, output_tokens, cached_input_tokens, idempotency_key,
    actor, trace_id, data, prev_hash, hash)
  VALUES (':tenant', 'u' || :u, '', :v, 'ReservationCommitted', now(), 'gpt-4o',
    'rsv_' || :client_id || '_' || :r, 100, 40, 20, 0, '', '', '',
    '{"reserved_at": "2026-01-01T00:00:00.000000+00:00"}', sha256('a'), sha256('b'));
UPDATE reservations SET state = 'committed', input_tokens = 40, output_tokens = 20,
    cached_input_tokens = 0, late = false, ended_at = now(), ended_balance = '{"held": 0}'
  WHERE tenant_id = ':tenant' AND reservation_id = 'rsv_' || :client_id || '_' || :r;
COMMIT;
