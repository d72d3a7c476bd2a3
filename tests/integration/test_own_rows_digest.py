"""The digest of a checkpoint's own rows as a verification takes it (verify._own_rows: the
lines written and ordered by PostgreSQL) equals checkpoints.delta_digest, the one recorded
when the checkpoint was taken, on random texts: quotes, backslashes, every control
character, any code point, keys that differ only past a common prefix, and removals (NULL)."""

from __future__ import annotations

import uuid

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import checkpoints as cp
from ledger.postgres import verify

_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=12
)
_rows = st.lists(
    st.tuples(st.sampled_from(cp.KINDS) | _text, _text | st.just('a\x1f\\"é€𝄞'), st.none() | _text),
    max_size=30,
    unique_by=lambda r: (r[0], r[1]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rows)
def test_the_digest_of_a_checkpoints_rows_is_delta_digests(
    database_url: str, rows: list[tuple[str, str, str | None]]
) -> None:
    tenant = f"digest-{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY audit_checkpoint_rows (tenant_id, seq, kind, key, value) FROM STDIN"
            ) as copy,
        ):
            for row in rows:
                copy.write_row((tenant, 1, *row))
        found = verify._own_rows(conn, tenant, 1)  # type: ignore[arg-type]
    assert found == (len(rows), cp.delta_digest(rows))
