"""A reservation as a context manager: reserve on enter, commit the usage the block reports
on exit, roll back when the block raises (or reports nothing).

The Reserve request is built once, with one idempotency key, before the first attempt: every
retry — gRPC's own on UNAVAILABLE, or the caller entering a fresh hold with the same
`idempotency_key` after a crash — meets the ledger's first outcome instead of a second hold.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, Unpack

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import requests as rq
from services.client.errors import HoldError, LedgerError

NEW, HELD, COMMITTED, ROLLED_BACK = "new", "held", "committed", "rolled back"


class Calls(Protocol):
    """The three calls a blocking hold makes (LedgerClient's)."""

    def reserve(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveFields]
    ) -> pb.ReserveResponse: ...

    def commit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitFields]
    ) -> pb.CommitResponse: ...

    def rollback(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackFields]
    ) -> pb.RollbackResponse: ...


class AsyncCalls(Protocol):
    """The three calls an asyncio hold makes (AsyncLedgerClient's)."""

    def reserve(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.ReserveFields]
    ) -> Awaitable[pb.ReserveResponse]: ...

    def commit(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.CommitFields]
    ) -> Awaitable[pb.CommitResponse]: ...

    def rollback(
        self, *, timeout_s: float | None = None, **fields: Unpack[rq.RollbackFields]
    ) -> Awaitable[pb.RollbackResponse]: ...


def _note(exc: BaseException | None, reservation_id: str, failed: LedgerError) -> None:
    if exc is not None:
        exc.add_note(
            f"rolling back reservation {reservation_id} failed too ({failed}); "
            "the hold ends at its expiry"
        )


class _HoldState:
    """What a hold knows and checks, whichever client drives it."""

    def __init__(self, fields: rq.ReserveFields, timeout_s: float | None) -> None:
        self.fields = fields
        self.timeout_s = timeout_s
        self.idempotency_key = fields["idempotency_key"]
        self.state = NEW
        self.reserved: pb.ReserveResponse | None = None
        self.committed: pb.CommitResponse | None = None
        self.rolled_back: pb.RollbackResponse | None = None
        self.usage: pb.Usage | None = None

    @property
    def reservation_id(self) -> str:
        return self._reply().reservation.reservation_id

    @property
    def tenant_id(self) -> str:
        return self.fields["tenant_id"]

    @property
    def granted(self) -> int:
        """Tokens held: all of `amount`, or less on a partial grant (`min_amount`)."""
        return self._reply().reservation.amount

    @property
    def partial(self) -> bool:
        return self._reply().partial

    def _reply(self) -> pb.ReserveResponse:
        if self.reserved is None:
            raise HoldError("the hold is not reserved yet: enter it (`with client.hold(...)`)")
        return self.reserved

    def _check_open(self, action: str) -> None:
        if self.state == NEW:
            raise HoldError(f"cannot {action} a hold that was never reserved: enter it first")
        if self.state != HELD:
            raise HoldError(
                f"cannot {action} reservation {self.reservation_id}: it was already "
                f"{self.state} by this hold (a hold ends exactly once)"
            )

    def report(
        self, *, input_tokens: int = 0, output_tokens: int = 0, cached_input_tokens: int = 0
    ) -> None:
        """What the model call used (prompt tokens not cached, completion tokens, cached
        prompt tokens); committed on exit. A later report replaces an earlier one."""
        self._check_open("report usage to")
        for name, value in (
            ("input_tokens", input_tokens),
            ("output_tokens", output_tokens),
            ("cached_input_tokens", cached_input_tokens),
        ):
            if not isinstance(value, int) or value < 0:
                raise HoldError(f"{name} must be a non-negative int, got {value!r}")
        self.usage = pb.Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
        )

    def _usage_to_commit(self, usage: pb.Usage | None, action: str = "commit") -> pb.Usage:
        self._check_open(action)
        chosen = usage if usage is not None else self.usage
        if chosen is None:
            raise HoldError(
                f"nothing to commit on reservation {self.reservation_id}: report the usage "
                "first (hold.report(...)) or roll it back"
            )
        return chosen


class Hold(_HoldState):
    """A blocking hold (LedgerClient.hold)."""

    def __init__(self, client: Calls, fields: rq.ReserveFields, timeout_s: float | None) -> None:
        super().__init__(fields, timeout_s)
        self._client = client

    def __enter__(self) -> Hold:
        self.reserve()
        return self

    def reserve(self) -> pb.ReserveResponse:
        """What entering does: place the hold (for use without `with`; then commit or roll
        back explicitly)."""
        if self.state != NEW:
            raise HoldError("a hold is entered once; make a new one for the next call")
        self.reserved = self._client.reserve(timeout_s=self.timeout_s, **self.fields)
        self.state = HELD
        return self.reserved

    def __exit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        if self.state != HELD:
            return
        if exc_type is not None:
            try:
                self.rollback(f"the block raised {exc_type.__name__}")
            except LedgerError as failed:  # the block's own exception is the one to see
                _note(exc, self.reservation_id, failed)
        elif self.usage is None:
            self.rollback("the block reported no usage")
        else:
            self.commit()

    def commit(self, usage: pb.Usage | None = None) -> pb.CommitResponse:
        """Commit now (the reported usage, or `usage`); the exit then does nothing."""
        chosen = self._usage_to_commit(usage)
        self.committed = self._client.commit(
            tenant_id=self.tenant_id, reservation_id=self.reservation_id, usage=chosen,
            timeout_s=self.timeout_s,
        )  # fmt: skip
        self.state = COMMITTED
        return self.committed

    def rollback(self, reason: str = "") -> pb.RollbackResponse:
        self._check_open("roll back")
        self.rolled_back = self._client.rollback(
            tenant_id=self.tenant_id, reservation_id=self.reservation_id, reason=reason,
            timeout_s=self.timeout_s,
        )  # fmt: skip
        self.state = ROLLED_BACK
        return self.rolled_back


class AsyncHold(_HoldState):
    """An asyncio hold (AsyncLedgerClient.hold), used with `async with`."""

    def __init__(
        self, client: AsyncCalls, fields: rq.ReserveFields, timeout_s: float | None
    ) -> None:
        super().__init__(fields, timeout_s)
        self._client = client

    async def __aenter__(self) -> AsyncHold:
        await self.reserve()
        return self

    async def reserve(self) -> pb.ReserveResponse:
        if self.state != NEW:
            raise HoldError("a hold is entered once; make a new one for the next call")
        self.reserved = await self._client.reserve(timeout_s=self.timeout_s, **self.fields)
        self.state = HELD
        return self.reserved

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        if self.state != HELD:
            return
        if exc_type is not None:
            try:
                await self.rollback(f"the block raised {exc_type.__name__}")
            except LedgerError as failed:  # the block's own exception is the one to see
                _note(exc, self.reservation_id, failed)
        elif self.usage is None:
            await self.rollback("the block reported no usage")
        else:
            await self.commit()

    async def commit(self, usage: pb.Usage | None = None) -> pb.CommitResponse:
        chosen = self._usage_to_commit(usage)
        self.committed = await self._client.commit(
            tenant_id=self.tenant_id, reservation_id=self.reservation_id, usage=chosen,
            timeout_s=self.timeout_s,
        )  # fmt: skip
        self.state = COMMITTED
        return self.committed

    async def rollback(self, reason: str = "") -> pb.RollbackResponse:
        self._check_open("roll back")
        self.rolled_back = await self._client.rollback(
            tenant_id=self.tenant_id, reservation_id=self.reservation_id, reason=reason,
            timeout_s=self.timeout_s,
        )  # fmt: skip
        self.state = ROLLED_BACK
        return self.rolled_back
