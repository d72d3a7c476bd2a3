"""The page's bar chart geometry (services/ledger/web_chart.py) and the HTTP request reader
(services/ledger/web_http.py): what they draw and what they refuse."""

from __future__ import annotations

import asyncio

import pytest

from services.ledger import web_chart
from services.ledger.web_chart import bar_chart, nice_step
from services.ledger.web_http import HttpError, Request, body_bytes_max, read_request


@pytest.mark.parametrize(
    ("top", "step"), [(0, 1), (3, 1), (40, 10), (41, 20), (368, 100), (9_999_999, 5_000_000)]
)
def test_grid_steps_are_round(top: int, step: int) -> None:
    assert nice_step(top) == step
    assert nice_step(top) * web_chart.TICKS >= top


def test_a_bar_per_day_with_usage_scaled_to_the_axis() -> None:
    points = [("2026-12-01", 100), ("2026-12-02", 0), ("2026-12-03", 400), ("2026-12-04", 50)]
    chart = bar_chart(points, "{:,}".format)
    assert [b.day for b in chart.bars] == ["2026-12-01", "2026-12-03", "2026-12-04"]
    tallest = chart.bars[1]
    assert tallest.y + tallest.height == pytest.approx(chart.baseline)
    assert tallest.height == pytest.approx(chart.bars[0].height * 4)
    assert tallest.title == "2026-12-03: 400"
    assert [label for _, label in chart.y_ticks] == ["0", "100", "200", "300", "400"]
    assert chart.bars[0].x < tallest.x < chart.bars[2].x <= chart.width


def test_long_ranges_name_at_most_ten_days() -> None:
    points = [(f"2026-{m:02d}-{d:02d}", d) for m in range(1, 13) for d in range(1, 29)]
    chart = bar_chart(points, str)
    assert len(chart.bars) == len(points) and len(chart.x_labels) <= web_chart.X_LABELS_MAX
    assert chart.x_labels[0][1] == "01-01"


def _read(raw: bytes) -> Request:
    async def run() -> Request:
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_request(reader)

    return asyncio.run(run())


def test_a_request_with_query_cookie_and_form() -> None:
    request = _read(
        b"POST /login?x=1&x=2 HTTP/1.1\r\nHost: a\r\nCookie: a=b; tokenledger_key=tlk_1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n\r\nkey=k%2B1"
    )
    assert (request.method, request.path, request.query) == ("POST", "/login", {"x": ["1", "2"]})
    assert request.cookie("tokenledger_key") == "tlk_1" and request.cookie("nope") == ""
    assert request.form() == {"key": ["k+1"]}


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET / SPDY/3\r\n\r\n", 400),
        (b"GET http://elsewhere/ HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (body_bytes_max + 1), 413),
        (b"GET /?" + b"&".join(b"a%d=1" % i for i in range(40)) + b" HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_requests_are_refused_with_their_status(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as refused:
        _read(raw)
    assert refused.value.status == status
