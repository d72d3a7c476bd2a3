"""The context service: imports services.platform, _gen and pure ledger modules; no services.ledger.

Exact token counts and budget-aware windowing, in a process of its own that talks to the
ledger over gRPC only."""
