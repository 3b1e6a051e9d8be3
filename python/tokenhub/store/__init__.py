"""Persistence: tenants, API keys and usage events behind one `Store` interface.

`open_store(url)` picks the backend from the URL; today that is SQLite (`sqlite:///abs/path.db`,
`sqlite:///./rel.db` or a plain path). The schema and its migrations are plain SQL that
PostgreSQL also accepts, so a second backend only has to implement `Store`.
"""

from __future__ import annotations

from tokenhub.store.base import (
    DEFAULT_DATABASE,
    ENV_DB,
    ActiveKey,
    AlreadyExists,
    ApiKey,
    AuditEntry,
    HostBeat,
    InsertResult,
    InvalidEvents,
    LimitRow,
    Limits,
    NotFound,
    Store,
    StoreError,
    Tenant,
    database_path,
    open_store,
)

__all__ = [
    "DEFAULT_DATABASE",
    "ENV_DB",
    "ActiveKey",
    "AlreadyExists",
    "ApiKey",
    "AuditEntry",
    "HostBeat",
    "InsertResult",
    "InvalidEvents",
    "LimitRow",
    "Limits",
    "NotFound",
    "Store",
    "StoreError",
    "Tenant",
    "database_path",
    "open_store",
]
