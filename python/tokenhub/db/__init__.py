"""The database layer: the schema as migrations (schema.py), the runner that applies them
(migrate.py) and one async interface over SQLite and PostgreSQL (database.py)."""
