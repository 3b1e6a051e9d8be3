"""Billing and settlement: exact money (`money`), the double-entry ledger (`ledger`), the
database layer for SQLite and PostgreSQL (`db`), and the operations on top (`service`)."""
