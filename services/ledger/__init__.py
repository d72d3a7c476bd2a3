"""The ledger's gRPC edge: imports ledger, services.platform and _gen; never services.context.

The servicer, pb <-> ledger conversion, the composition root (server.py), the ledger's metrics
and settings, and the `tokenledger` commands that serve, migrate, report and manage keys."""
