"""tokenledger's processes: the ledger gRPC server and the CLI."""
