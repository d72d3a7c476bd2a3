"""`tokenledger web`: a read-only page of a tenant's usage (and cost) for finance and ops.

Tokens by day as an inline SVG chart, the top users and conversations, the split by model, a
tenant picker for keys scoped to every tenant ('*'), and the same rows as
`tokenledger usage --format csv` for download. It reads the database through the ledger's own
read side (LedgerAudit.export_usage, the rows ExportUsage streams, converted by the same
functions), so the page and the API cannot disagree.

Callers are the API's: an API key with a role that may call ExportUsage (reader, auditor,
admin), scoped to the tenant or to '*', checked as the gRPC servers check it (auth.py's
key_principal, through the process's key cache, so a revoked key is refused at once). A key
comes as `Authorization: Bearer <key>` or in the HttpOnly cookie the login form sets. The page
always asks for a key, whatever TOKENLEDGER_AUTH says for the gRPC port: it is meant for
browsers. No script runs on it; Jinja escapes everything it shows.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import heapq
import io
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from psycopg_pool import AsyncConnectionPool

from ledger import errors, limits, validation
from ledger.application import utc_now
from ledger.postgres.audit import LedgerAudit
from ledger.postgres.errors import translated
from ledger.postgres.store import PostgresStore
from ledger.reads import GROUP_NAMES, UsageQuery
from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.ledger import convert, money_text, reports
from services.ledger.config import Settings
from services.ledger.reports import Column, Record
from services.ledger.web_chart import Chart, bar_chart
from services.ledger.web_http import HttpError, Request, Response, WebServer, text_response
from services.platform import db
from services.platform.auth import ALL_TENANTS, KeyStore, Principal, key_principal, policy_of
from services.platform.config import ConfigError
from services.platform.errors import PermissionDenied, Unauthenticated
from services.platform.metrics import split_listen
from services.platform.observability import configure_logging

log = structlog.get_logger("tokenledger.web")

TEMPLATES = Path(__file__).parent / "templates" / "web"
COOKIE = "tokenledger_key"
cookie_max_age_s = 8 * 3600
top_rows = 10
tenants_max = 500
"""Tenants the picker lists; another is reached by its name in the `tenant` parameter."""
days_default = 30
PAGE_PARAMS = ("tenant", "from", "to", "tz")
CSV_PARAMS = (*PAGE_PARAMS, "by")
CSV_GROUPS_DEFAULT = "day,user,conversation,model"
_export = policy_of(pb.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name["ExportUsage"])
assert _export is not None, "ExportUsage declares its access in ledger.proto"
READ_ROLES = _export.roles
"""Who may read the page: whoever may call ExportUsage."""

# The tenants with usage, by a skip scan of usage_hourly's primary key: one index probe per
# tenant (a DISTINCT would read every row).
TENANTS_SQL = """
WITH RECURSIVE tenants AS (
    (SELECT tenant_id FROM usage_hourly ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT u.tenant_id FROM usage_hourly u WHERE u.tenant_id > t.tenant_id
            ORDER BY u.tenant_id LIMIT 1)
    FROM tenants t WHERE t.tenant_id IS NOT NULL
)
SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL LIMIT %s
"""


@dataclass(frozen=True)
class Span:
    """What a page or a download shows: a tenant's whole days `first`..`last` in `tz`."""

    tenant: str
    first: date
    last: date
    tz: str

    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]

    def query(self, groups: Iterable[str]) -> UsageQuery:
        zone = ZoneInfo(self.tz)
        return validation.usage_query(
            tenant_id=self.tenant,
            from_time=datetime.combine(self.first, time(), zone),
            to_time=datetime.combine(self.last + timedelta(days=1), time(), zone),
            group_by=list(groups),
            user_id="",
            conversation_id="",
            model="",
            time_zone=self.tz,
        )

    def params(self) -> dict[str, str]:
        return {"tenant": self.tenant, "from": self.first.isoformat(),
                "to": self.last.isoformat(), "tz": self.tz}  # fmt: skip


@dataclass(frozen=True)
class Cell:
    text: str
    full: str
    """The whole value (an id cut short on screen, money to the micro-unit)."""
    numeric: bool


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[tuple[str, bool]]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Report:
    charts: list[tuple[str, Chart]]
    tables: list[Table]
    summary: list[tuple[str, str]]
    note: str


def _params(request: Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, each at most once and each one this page takes."""
    allowed = tuple(allowed)
    for name, values in request.query.items():
        if name not in allowed:
            raise HttpError(
                400, f"unknown parameter {name!r}; this page takes {', '.join(allowed)}"
            )
        if len(values) > 1:
            raise HttpError(400, f"parameter {name!r} is given {len(values)} times")
    return {name: values[0].strip() for name, values in request.query.items()}


def _date(params: dict[str, str], name: str, default: date) -> date:
    text = params.get(name, "")
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise HttpError(
            400, f"{name}: expected a date like 2026-12-06, got {text[:40]!r}"
        ) from None


def _span(params: dict[str, str], tenant: str, now: datetime) -> Span:
    tz = params.get("tz") or "UTC"
    try:
        zone = ZoneInfo(tz)
    except (ValueError, KeyError, OSError):
        message = f"tz: {tz[:60]!r} is not an IANA time zone (e.g. Europe/Berlin)"
        raise HttpError(400, message) from None
    last = _date(params, "to", now.astimezone(zone).date())
    first = _date(params, "from", last - timedelta(days=days_default - 1))
    if first > last:
        raise HttpError(400, f"from ({first}) is after to ({last})")
    if (last - first).days >= limits.usage_range_days_max:
        raise HttpError(400, f"from..to spans more than {limits.usage_range_days_max} days")
    return Span(tenant, first, last, tz)


def _groups(text: str) -> list[str]:
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown:
        raise HttpError(400, f"by: unknown {', '.join(unknown)}; use {', '.join(GROUP_NAMES)}")
    return groups


def _authorize(principal: Principal, tenant: str) -> None:
    """PERMISSION_DENIED unless the key may read usage, and `tenant`'s ("" for none yet)."""
    if not principal.roles & READ_ROLES:
        raise PermissionDenied(
            f"the usage page needs the role {' or '.join(sorted(READ_ROLES))}; key "
            f"{principal.key_id} has {', '.join(sorted(principal.roles)) or 'none'}"
        )
    if tenant and not principal.covers(tenant):
        raise PermissionDenied(
            f"key {principal.key_id} is scoped to tenant {principal.tenant_id!r} and may not "
            f"read tenant {tenant!r}"
        )


def _cell(column: Column, rec: Record, zone: ZoneInfo) -> Cell:
    text = reports.cell(column, rec, zone, "day")
    full = text
    if column.kind == "money":
        full = money_text.money_exact(int(rec.get(column.name, 0)), str(rec.get("currency", "")))
    return Cell(reports.shorten(text, 48), full, column.kind in ("count", "money"))


def _table(title: str, records: list[Record], first: Column, zone: ZoneInfo) -> Table:
    columns = [first, *(reports.CATALOG[n] for n in reports.TABLE_FIELDS)]
    return Table(
        title,
        [(c.header, c.kind in ("count", "money")) for c in columns],
        [[_cell(c, r, zone) for c in columns] for r in records],
    )


def _login_cookie(token: str, request: Request, max_age_s: int) -> str:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), Secure
    behind a proxy that says the browser came over https."""
    secure = request.headers.get("x-forwarded-proto", "") == "https"
    return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}" + (
        "; Secure" if secure else ""
    )


class WebApp:
    """The page's routes over the ledger's read side and the API keys."""

    def __init__(
        self,
        audit: LedgerAudit,
        keys: KeyStore,
        pool: AsyncConnectionPool[Any],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._audit = audit
        self._keys = keys
        self._pool = pool
        self._store = PostgresStore(pool)
        self._clock = clock
        self._env = Environment(
            loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined
        )
        self._routes: dict[tuple[str, str], tuple[Callable[[Request], Awaitable[Response]], bool]]
        self._routes = {
            ("GET", "/"): (self._page, True),
            ("GET", "/login"): (self._login_form, True),
            ("POST", "/login"): (self._login, True),
            ("POST", "/logout"): (self._logout, True),
            ("GET", "/usage.csv"): (self._csv, False),
        }

    async def handle(self, request: Request) -> Response:
        route = self._routes.get((request.method, request.path))
        if route is None:
            methods = [m for m, p in self._routes if p == request.path]
            if methods:
                response = text_response(405, f"{request.path} takes {', '.join(methods)}")
                response.headers.append(("Allow", ", ".join(methods)))
                return response
            return text_response(404, f"no page {request.path[:80]}")
        handler, html = route
        try:
            return await handler(request)
        except (HttpError, Unauthenticated, PermissionDenied, errors.LedgerError) as exc:
            return self._refusal(exc, html)

    def _refusal(self, exc: Exception, html: bool) -> Response:
        status = 400
        if isinstance(exc, HttpError):
            status = exc.status
        elif isinstance(exc, Unauthenticated):
            status = 401
        elif isinstance(exc, PermissionDenied):
            status = 403
        elif isinstance(exc, errors.StoreUnavailable):
            status = 503
        elif not isinstance(exc, errors.InvalidArgument):
            raise exc
        if status == 401 and html:
            response = self._render(401, "login.html", error=str(exc))
        elif html:
            response = self._render(status, "error.html", status=status, error=str(exc))
        else:
            response = text_response(status, str(exc))
        if status == 401:
            response.headers.append(("WWW-Authenticate", 'Bearer realm="tokenledger"'))
        return response

    def _render(self, code: int, template: str, **values: Any) -> Response:
        body = self._env.get_template(template).render(**values)
        return Response(code, body.encode())

    async def _principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the Authorization header must be `Bearer <API key>`")
            return await key_principal(self._keys, token.strip())
        token = request.cookie(COOKIE)
        if not token:
            raise Unauthenticated("no API key: log in, or send `Authorization: Bearer tlk_…`")
        return await key_principal(self._keys, token)

    # --- routes ----------------------------------------------------------------------------

    async def _login_form(self, request: Request) -> Response:
        return self._render(200, "login.html", error="")

    async def _login(self, request: Request) -> Response:
        token = request.form().get("key", [""])[0].strip()
        _authorize(await key_principal(self._keys, token), "")
        cookie = _login_cookie(token, request, cookie_max_age_s)
        return Response(303, headers=[("Location", "/"), ("Set-Cookie", cookie)])

    async def _logout(self, request: Request) -> Response:
        cookie = _login_cookie("", request, 0)
        return Response(303, headers=[("Location", "/login"), ("Set-Cookie", cookie)])

    async def _page(self, request: Request) -> Response:
        principal = await self._principal(request)
        params = _params(request, PAGE_PARAMS)
        every = principal.tenant_id == ALL_TENANTS
        tenant = params.get("tenant") or ("" if every else principal.tenant_id)
        span = _span(params, tenant, self._clock())
        _authorize(principal, tenant)
        report = await self._report(span) if tenant else None
        return self._render(
            200,
            "page.html",
            span=span,
            principal=principal,
            tenants=await self._tenants() if every else [],
            report=report,
            csv_params=span.params() | {"by": CSV_GROUPS_DEFAULT},
        )

    async def _csv(self, request: Request) -> Response:
        """The rows `tokenledger usage --format csv` prints, as a download that streams."""
        principal = await self._principal(request)
        params = _params(request, CSV_PARAMS)
        tenant = params.get("tenant") or principal.tenant_id
        if tenant == ALL_TENANTS:
            raise HttpError(400, "tenant: a key for every tenant names the tenant to export")
        span = _span(params, tenant, self._clock())
        groups = _groups(params.get("by", CSV_GROUPS_DEFAULT))
        _authorize(principal, tenant)
        query = span.query(groups)  # refuses a bad tenant or range before the answer starts
        name = f"usage-{tenant}-{span.first}-{span.last}.csv"
        return Response(
            200,
            self._csv_chunks(query, groups),
            "text/csv; charset=utf-8",
            [("Content-Disposition", f'attachment; filename="{name}"')],
        )

    # --- reading ---------------------------------------------------------------------------

    async def _records(self, query: UsageQuery, currency: str) -> AsyncIterator[Record]:
        """The query's rows as records, with the tenant's `currency` (read once a page)."""
        rows = self._audit.export_usage(query)
        async with aclosing(rows):
            async for row in rows:
                yield reports.record(convert.usage_row(row), query.group_by, currency)

    async def _csv_chunks(self, query: UsageQuery, groups: list[str]) -> AsyncIterator[bytes]:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=reports.csv_columns(groups))
        writer.writeheader()
        currency = await self._store.currency(query.tenant_id)
        async for rec in self._records(query, currency):
            writer.writerow(rec)
            if out.tell() > 32 << 10:
                yield out.getvalue().encode()
                out.seek(0)
                out.truncate()
        yield out.getvalue().encode()

    async def _top(self, query: UsageQuery, currency: str) -> list[Record]:
        """The `top_rows` records with the most tokens, holding no more than that many."""
        heap: list[tuple[int, int, Record]] = []
        async for i, rec in _enumerate(self._records(query, currency)):
            item = (int(rec["total_tokens"]), -i, rec)
            if len(heap) < top_rows:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)
        return [rec for *_, rec in sorted(heap, reverse=True)]

    async def _tenants(self) -> list[str]:
        with translated():
            async with self._pool.connection() as conn:
                cur = await conn.execute(TENANTS_SQL, (tenants_max,))
                return [row["tenant_id"] for row in await cur.fetchall()]

    async def _report(self, span: Span) -> Report:
        zone = ZoneInfo(span.tz)
        currency = await self._store.currency(span.tenant)
        days = [r async for r in self._records(span.query(["day"]), currency)]
        by_day = {reports.cell(reports.CATALOG["period"], r, zone, "day"): r for r in days}
        money = functools.partial(money_text.money_short, currency=currency)
        charts = [
            ("Tokens by day", _day_chart(span, by_day, "total_tokens", "{:,}".format)),
            ("Cost by day", _day_chart(span, by_day, "cost_micros", money)),
        ]
        models = [r async for r in self._records(span.query(["model"]), currency)]
        models.sort(key=lambda r: int(r["total_tokens"]), reverse=True)
        tables = [
            _table(
                "Top users", await self._top(span.query(["user"]), currency), reports.ACCOUNT, zone
            ),
            _table(
                "Top conversations",
                await self._top(span.query(["conversation"]), currency),
                reports.ACCOUNT,
                zone,
            ),
            _table("By model", models, reports.CATALOG["model"], zone),
        ]
        return Report(charts, tables, _summary(days, zone), reports.unpriced_note(days))


def _day_chart(
    span: Span, by_day: dict[str, Record], field: str, label: Callable[[int], str]
) -> Chart:
    points = [
        (d.isoformat(), int(by_day.get(d.isoformat(), {}).get(field, 0))) for d in span.days()
    ]
    return bar_chart(points, label)


def _summary(days: list[Record], zone: ZoneInfo) -> list[tuple[str, str]]:
    total = reports.totals(days)
    names = ["total_tokens", "input_tokens", "output_tokens", "cached_input_tokens",
             "cost_micros", "unpriced_tokens"]  # fmt: skip
    cells = [(reports.CATALOG[n].header, reports.cell(reports.CATALOG[n], total, zone, "day"))
             for n in names]  # fmt: skip
    return [*cells, ("days with usage", str(len(days)))]


async def _enumerate(items: AsyncIterator[Record]) -> AsyncIterator[tuple[int, Record]]:
    i = 0
    async for item in items:
        yield i, item
        i += 1


# --- the process -------------------------------------------------------------------------------

LISTEN_DEFAULT = "127.0.0.1:8080"
POOL_SIZE_MAX = 4


def add_command(sub: Any) -> None:
    p = sub.add_parser(
        "web",
        help="serve the read-only usage page (reads DATABASE_URL, or DATABASE_URL_READONLY for "
        "usage; API keys that may read usage)",
    )
    p.add_argument(
        "--listen",
        default=os.environ.get("TOKENLEDGER_WEB_LISTEN", LISTEN_DEFAULT),
        help=f"host:port (default: $TOKENLEDGER_WEB_LISTEN, else {LISTEN_DEFAULT})",
    )
    p.set_defaults(run=cmd_web)


def cmd_web(args: Any) -> int:
    try:
        settings = Settings.from_env()
        host, port = split_listen(args.listen)
    except (ConfigError, ValueError) as exc:
        print(f"tokenledger web: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    url = settings.database_url or db.embedded_url(settings.data_dir)
    asyncio.run(serve(url, settings.database_url_readonly, host, port))
    return 0


async def serve(url: str, read_url: str, host: str, port: int) -> None:
    """Serve the page until SIGTERM or SIGINT. Keys are read from the primary (`url`: its
    LISTEN keeps the key cache honest), usage from `read_url` when set (a replica)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with db.make_pool(url, POOL_SIZE_MAX) as pool:
        read_pool = db.make_pool(read_url, POOL_SIZE_MAX) if read_url else pool
        async with read_pool:
            keys = KeyStore(pool)
            audit = LedgerAudit(read_pool, primary=pool)
            server = WebServer(WebApp(audit, keys, read_pool).handle)
            bound = await server.start(host, port)
            _warn_if_cleartext(host)
            log.info("web page", url=f"http://{host}:{bound}/")
            try:
                await stop.wait()
            finally:
                await server.stop()
                await keys.close()
                audit.close()


def _warn_if_cleartext(host: str) -> None:
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "API KEYS IN CLEARTEXT: the web page has no TLS of its own; beyond loopback, put "
            "an https proxy in front (it should send X-Forwarded-Proto: https)",
            address=host,
        )
