"""tokenledger's processes: `platform` (shared by both servers), `ledger` (the ledger's gRPC
edge), `context` (the context service), `_gen` (generated stubs) and `cli` (the `tokenledger`
entry point, the one module that knows both services)."""
