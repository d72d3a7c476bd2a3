"""The PostgreSQL adapter: the unit of work and every SQL statement, rows and their mapping."""
