"""A small HTTP/1.1 server on asyncio streams, for the read-only usage page (web.py).

Why this and not `http.server` or aiohttp: the page reads through the process's asyncio
connection pool and API key cache, which live on its event loop; `http.server` would serve
from threads that must hop onto the loop for every read, and aiohttp is a new dependency for
two GETs and one form POST. What it accepts is deliberately narrow: one request per
connection (`Connection: close`), a bounded head and body (no chunked uploads), a deadline for
reading the request and for answering it, and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.get_logger("tokenledger.web")

head_bytes_max = 16 << 10
"""Request line and headers; larger is 431."""
body_bytes_max = 4 << 10
"""A request body (the login form); larger is 413."""
query_fields_max = 32
read_timeout_s = 15.0
"""To receive a whole request: a client that trickles it is dropped."""
answer_timeout_s = 120.0
"""To answer one (a year of a big tenant's usage as CSV streams within it)."""
connections_max = 64
"""Open connections; more are answered 503 at once."""

SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
     "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)  # fmt: skip
"""Every answer: no script may run, nothing is framed or cached, no key leaks in a referrer."""


class HttpError(Exception):
    """A request refused before it reaches the page: its status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Lower-case names; a repeated header's values joined by ", "."""
    body: bytes = b""

    def cookie(self, name: str) -> str:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return ""

    def form(self) -> dict[str, list[str]]:
        """The fields of an `application/x-www-form-urlencoded` body."""
        kind = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise HttpError(415, "send the form as application/x-www-form-urlencoded")
        return _fields(self.body.decode("utf-8", "replace"))


@dataclass
class Response:
    status: int
    body: bytes | AsyncIterator[bytes] = b""
    """Bytes, or chunks that are sent as they come (chunked transfer encoding)."""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def text_response(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode(), "text/plain; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]


def _fields(text: str) -> dict[str, list[str]]:
    try:
        return parse_qs(text, keep_blank_values=True, max_num_fields=query_fields_max)
    except ValueError:
        raise HttpError(400, f"more than {query_fields_max} parameters") from None


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise HttpError(400, f"malformed header line {line[:40]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request from the stream, or HttpError with what is wrong with it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"the request head is over {head_bytes_max} bytes") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, _ = parts
    headers = _headers(lines[1:])
    if "transfer-encoding" in headers:
        raise HttpError(411, "send a Content-Length, not a chunked body")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "Content-Length is not a number") from None
    if not 0 <= length <= body_bytes_max:
        raise HttpError(413, f"the body is over {body_bytes_max} bytes")
    if not target.startswith("/"):  # origin form only: this is no proxy
        raise HttpError(400, "the request target must be a path")
    url = urlsplit(target)
    body = await reader.readexactly(length)
    return Request(method, url.path, _fields(url.query), headers, body)


async def _write(writer: asyncio.StreamWriter, response: Response) -> None:
    reason = HTTPStatus(response.status).phrase
    headers = [
        ("Content-Type", response.content_type),
        ("Connection", "close"),
        *SECURITY_HEADERS,
        *response.headers,
    ]
    body = response.body
    if isinstance(body, bytes):
        headers.append(("Content-Length", str(len(body))))
    else:
        headers.append(("Transfer-Encoding", "chunked"))
    head = f"HTTP/1.1 {response.status} {reason}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    writer.write(head.encode("latin-1"))
    if isinstance(body, bytes):
        writer.write(body)
    else:  # an error midway leaves the chunked body unterminated: the client sees it cut
        async for chunk in body:
            if chunk:
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await writer.drain()
        writer.write(b"0\r\n\r\n")
    await writer.drain()


class WebServer:
    """Serves `handler` on one address; `port` is the one bound."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=head_bytes_max
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop listening; answers in flight get `grace_s` to finish."""
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), grace_s)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > connections_max:
                await _write(writer, text_response(503, "too many open connections; retry"))
                return
            response = await self._answer(reader)
            if response is not None:
                async with asyncio.timeout(answer_timeout_s):
                    await _write(writer, response)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nobody to answer
        except Exception:
            log.exception("web answer failed while it was being sent")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(read_timeout_s):
                request = await read_request(reader)
        except HttpError as exc:
            return text_response(exc.status, str(exc))
        try:
            async with asyncio.timeout(answer_timeout_s):
                return await self.handler(request)
        except HttpError as exc:
            return text_response(exc.status, str(exc))
        except Exception:
            log.exception("web request failed", method=request.method, path=request.path)
            return text_response(500, "internal error; the server log has the details")
