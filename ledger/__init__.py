"""tokenledger's ledger: a pure domain (decide/evolve) and its PostgreSQL event store."""
