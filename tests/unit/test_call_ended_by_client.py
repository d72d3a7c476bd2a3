"""A call whose client went away (deadline, cancel) while the server was writing ends quietly:
info, no traceback, no abort on the dead call. Anything else still ends INTERNAL, logged."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest
from grpc._cython import cygrpc  # type: ignore[attr-defined]

from services.platform.interceptors import ErrorInterceptor


class _Context:
    """Just what the error boundary asks of a call (a pure unit test, no server)."""

    def __init__(self, cancelled: bool) -> None:
        self._cancelled = cancelled
        self.aborted: tuple[Any, ...] | None = None

    def cancelled(self) -> bool:
        return self._cancelled

    async def abort(self, *args: Any) -> None:
        self.aborted = args
        raise grpc.aio.AbortError()


def _run(exc: Exception, cancelled: bool) -> _Context:
    async def behavior(request: object, context: object) -> None:
        raise exc

    context = _Context(cancelled)
    mapped = ErrorInterceptor().wrap(behavior, "/tokenledger.v1.LedgerService/SubscribeEvents")
    with contextlib.suppress(grpc.aio.AbortError):
        asyncio.run(mapped(object(), context))  # type: ignore[arg-type]
    return context


@pytest.mark.parametrize(
    ("exc", "cancelled"),
    [(cygrpc.ExecuteBatchError("Failed execute_batch"), False), (RuntimeError("write"), True)],
)
def test_a_write_to_a_client_that_left_is_no_error(
    exc: Exception, cancelled: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    context = _run(exc, cancelled)
    assert context.aborted is None
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out


def test_an_unexpected_error_on_a_live_call_is_still_internal() -> None:
    context = _run(RuntimeError("bug"), cancelled=False)
    assert context.aborted is not None and context.aborted[0] is grpc.StatusCode.INTERNAL
