"""The usage web page over real HTTP against a real database: who may see it (no key, a bad
or revoked key, a key without a reading role, another tenant's key, a '*' key), the login
cookie, the CSV download (the rows `tokenledger usage --format csv` prints), and bad input."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any

import psycopg
import pytest

from ledger.postgres.audit import LedgerAudit
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger.web import WebApp
from services.ledger.web_http import WebServer
from services.platform import db
from services.platform.auth import KeyStore
from tests.support import TOKENLEDGER, ApiKey, ServerThread, _LoopThread, create_key, new_id

HTTP_TIMEOUT_S = 10


class WebThread(_LoopThread):
    """The web page (WebApp on WebServer) on 127.0.0.1:0, as `tokenledger web` serves it."""

    what = "web page"

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__()

    async def _start(self) -> None:
        self.pool = db.make_pool(self.url, 4)
        await self.pool.open(wait=True, timeout=10)
        self.keys = KeyStore(self.pool)
        self.audit = LedgerAudit(self.pool)
        self.server = WebServer(WebApp(self.audit, self.keys, self.pool).handle)
        self.port = await self.server.start("127.0.0.1", 0)

    async def _close(self) -> None:
        await self.keys.close()
        self.audit.close()
        await self.pool.close()


@dataclass
class Answer:
    status: int
    headers: Message
    body: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def call(
    web: WebThread,
    path: str,
    *,
    key: ApiKey | None = None,
    cookie: str = "",
    form: dict[str, str] | None = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key.token}"
    if cookie:
        sent["Cookie"] = cookie
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(
        f"http://{web.target}{path}", data=data, headers=sent, method=method
    )
    try:
        with _opener.open(request, timeout=HTTP_TIMEOUT_S) as reply:
            return Answer(reply.status, reply.headers, reply.read().decode())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers, exc.read().decode())


@pytest.fixture(scope="module")
def web(database_url: str) -> Iterator[WebThread]:
    server = WebThread(database_url).start()
    yield server
    server.stop()


@pytest.fixture
def reader(database_url: str, history: str) -> ApiKey:
    return create_key(database_url, history, "reader")


def test_without_a_valid_key_the_page_asks_for_one(web: WebThread, database_url: str) -> None:
    """No key, a malformed one, a wrong secret: 401 with the login form and a Bearer challenge."""
    bare = call(web, "/")
    assert bare.status == 401 and bare.headers["WWW-Authenticate"].startswith("Bearer")
    assert '<form method="post" action="/login">' in bare.body and "no API key" in bare.body
    malformed = call(web, "/", headers={"Authorization": "Bearer nope"})
    assert malformed.status == 401 and "malformed API key" in malformed.body
    real = create_key(database_url, "acme", "reader")
    wrong = ApiKey(real.key_id, real.token[:-4] + "0000")
    assert call(web, "/", key=wrong).status == 401
    basic = call(web, "/", headers={"Authorization": "Basic YTpi"})
    assert basic.status == 401 and "Bearer &lt;API key&gt;" in basic.body
    assert call(web, "/usage.csv?tenant=acme").status == 401


def test_a_reader_sees_its_tenant(web: WebThread, reader: ApiKey, history: str) -> None:
    """The reader's own tenant by default: a bar for the one day with usage, the top users
    (ann 352 tokens, bob 16), the models, and the totals."""
    page = call(web, "/", key=reader)
    assert page.status == 200, page.body
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert len(re.findall(r'<rect class="bar" ', page.body)) == 1
    # ann: 50 + 300 input, 1 + 1 output; bob: 10 input, 1 output, 5 cached input
    # The history's models have no price: the cost is a flagged dash, never a silent 0.
    assert _table(page.body, "top-users") == [
        ["ann", "350", "2", "352", "-*"],
        ["bob", "10", "1", "16", "-*"],
    ]
    assert "368 tokens were used on models with no price" in page.body
    assert [row[0] for row in _table(page.body, "by-model")] == ["llama-3", "gpt-4o"]
    conversations = _table(page.body, "top-conversations")
    assert [row[0] for row in conversations] == ["ann/c2", "ann/c1", "bob/c9", "bob"]
    assert "<strong>368</strong>" in page.body  # the tenant's total tokens
    assert f"tenant={history}" in page.body  # the CSV link


def test_cost_on_the_page_is_tokens_times_the_price_in_force(
    web: WebThread, ledger: ServerThread, database_url: str
) -> None:
    """A priced tenant: each user's cost is its tokens times the price, to the cent shown."""
    tenant = new_id("t")
    key = create_key(database_url, tenant, "reader")
    with ledger.stub() as stub:
        stub.SetPrices(
            pb.SetPricesRequest(
                idempotency_key=new_id("p"),
                tenant_id=tenant,
                prices=[
                    pb.Price(
                        model="gpt-4o",
                        currency="EUR",
                        input_micros_per_mtok=2_500_000,
                        output_micros_per_mtok=10_000_000,
                        cached_input_micros_per_mtok=0,
                    )
                ],
            )
        )
        for user, inp, out in (("ann", 1_000_000, 200_000), ("bob", 40_000, 3_000)):
            stub.RecordUsage(pb.RecordUsageRequest(
                idempotency_key=new_id("u"), tenant_id=tenant, user_id=user, model="gpt-4o",
                usage=pb.Usage(input_tokens=inp, output_tokens=out)))  # fmt: skip
    page = call(web, "/", key=key)
    assert page.status == 200, page.body
    # ann: 1M * 2.50 + 0.2M * 10 = 4.50 EUR; bob: 0.04M * 2.50 + 0.003M * 10 = 0.13 EUR
    users = _table(page.body, "top-users")
    assert [(row[0], row[-1]) for row in users] == [("ann", "€4.50"), ("bob", "€0.13")]
    assert "Cost by day" in page.body and "no price" not in page.body


def _table(body: str, table_id: str) -> list[list[str]]:
    """The cells of the rows of the HTML table with that id."""
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', body, re.S)
    assert match, f"no table {table_id}"
    rows = re.findall(r"<tr>(.*?)</tr>", match.group(1).split("<tbody>")[1], re.S)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows]


def test_roles_and_tenants_are_the_apis(
    web: WebThread, database_url: str, reader: ApiKey, history: str
) -> None:
    """403 for a key without a reading role and for another tenant's data; an auditor key
    reads like a reader (as ExportUsage allows)."""
    writer = create_key(database_url, history, "writer")
    denied = call(web, "/", key=writer)
    assert denied.status == 403 and "needs the role admin or auditor or reader" in denied.body
    other = call(web, "/?tenant=someone-else", key=reader)
    assert other.status == 403 and "may not read tenant &#39;someone-else&#39;" in other.body
    csv_other = call(web, "/usage.csv?tenant=someone-else", key=reader)
    assert csv_other.status == 403 and csv_other.headers["Content-Type"].startswith("text/plain")
    auditor = create_key(database_url, history, "auditor")
    assert call(web, "/", key=auditor).status == 200


def test_a_revoked_key_is_refused_at_once(web: WebThread, database_url: str, history: str) -> None:
    key = create_key(database_url, history, "reader")
    assert call(web, "/", key=key).status == 200  # now in the key cache
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key.key_id,))
    deadline = time.monotonic() + 2
    while (answer := call(web, "/", key=key)).status == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer.status == 401 and f"API key {key.key_id} was revoked" in answer.body


def test_login_form_sets_an_httponly_cookie(
    web: WebThread, database_url: str, reader: ApiKey, history: str
) -> None:
    login = call(web, "/login", form={"key": reader.token})
    assert login.status == 303 and login.headers["Location"] == "/"
    cookie = login.headers["Set-Cookie"]
    assert cookie.startswith(f"tokenledger_key={reader.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    session = cookie.split(";")[0]
    page = call(web, "/", cookie=session)
    assert page.status == 200 and f"key {reader.key_id}" in page.body
    behind_tls = call(web, "/login", form={"key": reader.token},
                      headers={"X-Forwarded-Proto": "https"})  # fmt: skip
    assert "; Secure" in behind_tls.headers["Set-Cookie"]
    bad = call(web, "/login", form={"key": "tlk_0123"})
    assert bad.status == 401 and 'role="alert">malformed API key' in bad.body
    writer = create_key(database_url, history, "writer")
    assert call(web, "/login", form={"key": writer.token}).status == 403
    logout = call(web, "/logout", form={}, cookie=session)
    assert logout.status == 303 and "tokenledger_key=;" in logout.headers["Set-Cookie"]
    assert "Max-Age=0" in logout.headers["Set-Cookie"]


def test_csv_download_is_what_the_cli_prints(
    web: WebThread, ledger: ServerThread, reader: ApiKey, history: str
) -> None:
    """/usage.csv streams the rows and columns of `tokenledger usage --format csv`."""
    answer = call(web, "/usage.csv?by=user,model", key=reader)
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert answer.headers["Content-Disposition"].startswith(
        f'attachment; filename="usage-{history}-'
    )
    cli = subprocess.run(
        [str(TOKENLEDGER), "usage", "--tenant", history, "--by", "user,model", "--format", "csv",
         "--target", ledger.target],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert list(csv.reader(io.StringIO(answer.body))) == list(csv.reader(io.StringIO(cli.stdout)))
    rows = list(csv.DictReader(io.StringIO(answer.body)))
    assert {(r["user"], r["model"], r["total_tokens"]) for r in rows} == {
        ("ann", "gpt-4o", "51"), ("ann", "llama-3", "301"), ("bob", "gpt-4o", "16")
    }  # fmt: skip
    default = list(csv.DictReader(io.StringIO(call(web, "/usage.csv", key=reader).body)))
    assert list(default[0])[:4] == ["period", "user", "conversation", "model"]


def test_a_key_for_every_tenant_picks_one(web: WebThread, database_url: str, history: str) -> None:
    everyone = create_key(database_url, "*", "reader")
    picker = call(web, "/", key=everyone)
    assert picker.status == 200 and "Choose a tenant" in picker.body
    assert f'<option value="{history}">{history}</option>' in picker.body
    chosen = call(web, f"/?tenant={history}", key=everyone)
    assert chosen.status == 200 and f'<option value="{history}" selected>' in chosen.body
    assert _table(chosen.body, "top-users")[0][0] == "ann"
    unnamed = call(web, "/usage.csv", key=everyone)
    assert unnamed.status == 400 and "names the tenant" in unnamed.body


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("from=yesterday", "from: expected a date like 2026-12-06, got &#39;yesterday&#39;"),
        ("from=2026-12-06&to=2026-12-01", "from (2026-12-06) is after to (2026-12-01)"),
        ("from=2020-01-01&to=2026-01-01", "from..to spans more than 400 days"),
        ("tz=Mars/Olympus", "tz: &#39;Mars/Olympus&#39; is not an IANA time zone"),
        ("tz=%3Cscript%3E", "tz: &#39;&lt;script&gt;&#39; is not an IANA time zone"),
        ("tz=Asia/Kolkata", "whole hours"),
        ("color=red", "unknown parameter &#39;color&#39;; this page takes tenant, from, to, tz"),
        ("to=2026-12-01&to=2026-12-02", "parameter &#39;to&#39; is given 2 times"),
    ],
)
def test_bad_parameters_are_400_with_the_reason(
    web: WebThread, reader: ApiKey, query: str, message: str
) -> None:
    answer = call(web, f"/?{query}", key=reader)
    assert answer.status == 400 and message in answer.body, answer.body
    assert "<script>" not in answer.body


def test_bad_requests_of_other_kinds(web: WebThread, database_url: str, reader: ApiKey) -> None:
    everyone = create_key(database_url, "*", "reader")
    bad_tenant = call(web, "/?tenant=bad%20tenant", key=everyone)
    assert bad_tenant.status == 400 and "query.tenant_id" in bad_tenant.body
    week = call(web, "/usage.csv?by=week", key=reader)
    assert week.status == 400 and "by: unknown week" in week.body
    both = call(web, "/usage.csv?by=day,hour", key=reader)
    assert both.status == 400 and "DAY or by HOUR" in both.body
    assert call(web, "/", key=reader, method="DELETE").status == 405
    assert call(web, f"/nope-{new_id('x')}", key=reader).status == 404
    form_as_json = call(web, "/login", form={}, headers={"Content-Type": "application/json"})
    assert form_as_json.status == 415
