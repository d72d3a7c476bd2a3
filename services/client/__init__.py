"""The Python client of the ledger (import path `services.client`), installable without the
servers' packages: it needs only grpcio, protobuf and googleapis-common-protos.

- `LedgerClient` / `AsyncLedgerClient`: one typed method per RPC, `hold(...)`.
- `services.client.context`: `ContextClient.prepare(...)`, an OpenAI-format conversation fitted
  to the window and the budget by the context service, ready to send.
- `errors`: typed exceptions from the ledger's ErrorInfo (`BudgetExhausted`, `RateLimited`, …).
- `services.client.openai`: the OpenAI SDK wrapped so that every chat completion (and
  response) is reserved and settled (needs the `integrations` extra).
- `services.client.litellm`: a LiteLLM callback doing the same for the SDK, the Router and
  the proxy (needs the `integrations` extra).
"""

from services._gen.tokenledger.v1.ledger_pb2 import Usage
from services.client.client import AsyncLedgerClient, LedgerClient
from services.client.errors import (
    BadCredentials,
    BadTarget,
    BudgetExhausted,
    ClientError,
    DeadlineExceeded,
    HoldError,
    IdempotencyKeyReused,
    Internal,
    InvalidArgument,
    LedgerError,
    LedgerUnavailable,
    PermissionDenied,
    RateLimited,
    ReservationEnded,
    ReservationNotFound,
    TooManyCalls,
    Unauthenticated,
)
from services.client.hold import AsyncHold, Hold

__all__ = [
    "AsyncHold",
    "AsyncLedgerClient",
    "BadCredentials",
    "BadTarget",
    "BudgetExhausted",
    "ClientError",
    "DeadlineExceeded",
    "Hold",
    "HoldError",
    "IdempotencyKeyReused",
    "Internal",
    "InvalidArgument",
    "LedgerClient",
    "LedgerError",
    "LedgerUnavailable",
    "PermissionDenied",
    "RateLimited",
    "ReservationEnded",
    "ReservationNotFound",
    "TooManyCalls",
    "Unauthenticated",
    "Usage",
]
