"""The `Store` interface, its records and errors, and `open_store`.

Every method is synchronous and may block on disk, the network or another writer: the server
calls the store from worker threads (usage writes from the sink's dedicated writer thread, key
reloads from `asyncio.to_thread`), never from the event loop. Two engines implement it over the
one database layer (tokenhub.db): store/sqlite.py and store/postgres.py, sharing store/sql.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec

from tokenhub.usage import EVENT_FIELDS, UsageEvent

DEFAULT_DATABASE = "tokenhub.db"  # as tokenhub.db.database.DEFAULT_DATABASE
# The variable naming the database for the commands (and the settler process) not given one.
ENV_DB = "TOKENHUB_DB"

TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_ID = re.compile(r"key_[0-9a-f]{12}")
SECRET_PREFIX = "th-"
DISPLAY_PREFIX_LEN = 8  # characters of the secret kept for display ("th-" + 5)
MIN_SECRET_LEN = 16  # for caller-supplied secrets; generated ones have 46 characters


class StoreError(Exception):
    """A store operation failed; the message is one line, safe to show (never holds a secret)."""


class NotFound(StoreError):
    """The tenant or key does not exist."""


class AlreadyExists(StoreError):
    """The tenant or key exists already."""


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    created_ms: int


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An API key as listed: never its secret, never its hash."""

    id: str
    tenant_id: str
    tenant: str  # the tenant's name
    prefix: str  # the secret's first 8 characters, for telling keys apart
    created_ms: int
    revoked_ms: int | None = None
    updated_ms: int

    @property
    def active(self) -> bool:
        return self.revoked_ms is None


LIMIT_FIELDS = (
    "rpm",
    "tpm",
    "max_concurrency",
    "tokens_per_day",
    "guard_tpm",
    "guard_jump",
    "strong_share_pct",
)
KEY_LIMIT_FIELDS = LIMIT_FIELDS[:3]


class Limits(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The limits of a key or a tenant; None is no limit. tokens_per_day: tenants only."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    tokens_per_day: int | None = None
    # The bulk-extraction guard (tenants only; tokenhub.gateway.guard): a key of the tenant is
    # throttled when its smoothed token velocity passes guard_tpm tokens per minute, or
    # guard_jump times its own baseline.
    guard_tpm: int | None = None
    guard_jump: int | None = None
    # Tier routing (a model such as `auto`, tenants only): the most of the tenant's tiered
    # requests that may go to the strong tier, in percent; 0 forbids it.
    strong_share_pct: int | None = None

    def any(self) -> bool:
        return any(getattr(self, f) is not None for f in LIMIT_FIELDS)

    def describe(self) -> str:
        """`rpm=5 tpm=1000`, or `-` when there is none (for listings)."""
        parts = [f"{f}={v}" for f in LIMIT_FIELDS if (v := getattr(self, f)) is not None]
        return " ".join(parts) or "-"


NO_LIMITS = Limits()


ADMIN_SCOPES = ("read", "billing", "admin")  # each allows what the ones before it do
ADMIN_SECRET_PREFIX = "tha-"  # admin tokens; API keys are "th-"


class AdminToken(msgspec.Struct, frozen=True, kw_only=True):
    """An admin token as listed: never its secret, never its digest."""

    id: str
    name: str
    prefix: str
    scope: str
    created_ms: int
    revoked_ms: int | None = None


class AdminAudit(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    ts_ms: int
    actor: str
    action: str
    target: str
    before: Any
    after: Any


class AuditEntry(NamedTuple):
    id: str
    ts_ms: int
    kind: str  # guard_throttle, ...
    tenant: str
    key_id: str
    details: dict[str, Any]


class LimitRow(NamedTuple):
    scope: str  # "key" or "tenant"
    name: str  # key id or tenant name
    limits: Limits


class ActiveKey(NamedTuple):
    """What the authenticator needs of an active key (unpacks as a plain 3-tuple)."""

    sha256: str  # hex digest of the secret
    key_id: str
    tenant: str


class InsertResult(NamedTuple):
    """Outcome of `insert_events`: every event is exactly one of the three."""

    inserted: int  # new rows
    duplicates: int  # already stored with the same payload (a replay): nothing to do
    conflicts: int  # already stored with a DIFFERENT payload: the stored row was kept
    conflict_ids: tuple[str, ...] = ()


class HostBeat(NamedTuple):
    """A serving host's row in cluster_hosts: what its last heartbeat said."""

    host_id: str
    started_ms: int
    heartbeat_ms: int
    interval_ms: int  # how often it beats: silent for more than 3 intervals is down
    pid: int
    workers: int
    version: str
    journal_backlog: int  # usage events accepted but not yet in the database


class Store(Protocol):
    """Tenants, API keys and usage events. Implementations are safe to share between threads."""

    def migrate(self) -> list[int]:
        """Bring the schema up to date; returns the migration versions applied now."""
        ...

    def create_tenant(self, name: str) -> Tenant: ...
    def get_tenant(self, name: str) -> Tenant: ...
    def list_tenants(self) -> list[Tenant]: ...

    def create_key(self, tenant_name: str, *, secret: str | None = None) -> tuple[ApiKey, str]:
        """A new key for the tenant: (record, secret). Only the secret's SHA-256 is stored, so
        the secret is returned this once. `secret` imports a caller-chosen one (demo, tests)."""
        ...

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]: ...
    def revoke_key(self, key_id: str) -> ApiKey: ...
    def active_keys(self) -> list[ActiveKey]: ...

    def key_digests(self) -> list[ActiveKey]:
        """Alias of `active_keys` (the name `server.auth.KeyCache` is wired to)."""
        ...

    def change_marker(self) -> int:
        """A number that changes whenever a tenant, key or limit changes (from any process)."""
        ...

    def set_limits(self, scope: str, name: str, **changes: int | None) -> Limits:
        """Sets (an int >= 0) or removes (None) the named limits of a key (scope "key", its
        id) or a tenant (scope "tenant", its name), leaving the others; returns them all.
        NotFound for an unknown key or tenant; StoreError for a bad field or value."""
        ...

    def get_limits(self, scope: str, name: str) -> Limits: ...

    def all_limits(self) -> list[LimitRow]:
        """Every key and tenant with at least one limit."""
        ...

    def tokens_since(self, since_ms: int) -> dict[str, int]:
        """Each tenant's input + output tokens in events from `since_ms` on."""
        ...

    def add_audit(self, kind: str, tenant: str, key_id: str, details: dict[str, Any]) -> str:
        """Appends an entry to the audit log; returns its id."""
        ...

    def audit_entries(self, since_ms: int | None = None, limit: int = 1000) -> list[AuditEntry]:
        """The audit log from `since_ms` on, oldest first."""
        ...

    def create_admin_token(self, name: str, scope: str) -> tuple[AdminToken, str]:
        """A new admin token and its secret, shown this once: only its
        SHA-256 is stored. Audited (actor `cli`)."""
        ...

    def admin_tokens(self) -> list[AdminToken]:
        """Every admin token (never a secret), oldest first."""
        ...

    def revoke_admin_token(self, token_id: str) -> AdminToken:
        """Revokes an admin token for good (NotFound; StoreError if it was already)."""
        ...

    def heartbeat(self, beat: HostBeat) -> None:
        """Writes (inserts or replaces) the host's row in cluster_hosts."""
        ...

    def cluster_hosts(self) -> list[HostBeat]:
        """Every host that ever sent a heartbeat, by host id."""
        ...

    def insert_events(self, events: Sequence[UsageEvent]) -> InsertResult:
        """Insert in one transaction, idempotent by request_id; existing rows are never
        overwritten (a different payload is reported as a conflict)."""
        ...

    def iter_events(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> Iterator[UsageEvent]:
        """Events with since_ms <= ts_ms < until_ms, ordered by (ts_ms, request_id), streamed."""
        ...

    def sync(self) -> bool:
        """Make every committed write durable against power loss; False if that could not be
        done now (try again later). The journal deletes segments only after this succeeds."""
        ...

    def close(self) -> None: ...


class InvalidEvents(StoreError):
    """Some events can never be stored (wrong types, out-of-range numbers). Nothing of the
    batch was written; `events` holds each offender with the reason."""

    def __init__(self, events: list[tuple[UsageEvent, str]]) -> None:
        self.events = events
        first = events[0]
        super().__init__(
            f"{len(events)} usage event(s) cannot be stored, e.g. "
            f"{_quote(str(getattr(first[0], 'request_id', '?')))}: {first[1]}"
        )


_INT_NAMES = (
    "ts_ms",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "status",
    "attempts",
)
_INT_FIELDS = tuple(i for i, name in enumerate(EVENT_FIELDS) if name in _INT_NAMES)


def event_problem(event: object) -> str | None:
    """Why `event` could not be stored, or None if it looks storable."""
    if not isinstance(event, UsageEvent):
        return f"not a UsageEvent but {type(event).__name__}"
    try:
        msgspec.convert(msgspec.structs.asdict(event), UsageEvent)
    except msgspec.ValidationError as e:
        return " ".join(str(e).split())
    row = msgspec.structs.astuple(event)
    for i in _INT_FIELDS:
        if not -(2**63) <= row[i] < 2**63:
            return f"{EVENT_FIELDS[i]} is out of the 64-bit range"
    return None


def check_tenant_name(name: str) -> None:
    if not TENANT_NAME.fullmatch(name):
        raise StoreError(
            f"invalid tenant name {_quote(name)}: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )


def check_secret(secret: str) -> None:
    if len(secret) < MIN_SECRET_LEN or len(secret) > 512 or not secret.isascii():
        raise StoreError(f"an API key must be {MIN_SECRET_LEN}-512 ASCII characters")
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise StoreError("an API key must not contain spaces or control characters")


def _quote(s: str, limit: int = 80) -> str:
    """A user-supplied value for a one-line message: quoted, escaped, shortened."""
    r = repr(s[:limit])
    return r + "..." if len(s) > limit else r


def database_path(url: str | None) -> str:
    """The SQLite file for a `sqlite:///abs/path.db` URL or a plain path (default
    ./tokenhub.db). `sqlite:///x.db` is the absolute path /x.db, as in any file URL."""
    from tokenhub.db.database import DatabaseError, sqlite_path

    try:
        return sqlite_path(url)
    except DatabaseError as e:
        raise StoreError(str(e)) from None


def open_store(url: str | None = None, *, create: bool = True) -> Store:
    """Open the store at `url`: a SQLite file (see `database_path`; with create=False a
    missing file is an error instead of a new empty database) or a `postgresql://` URL (the
    database must exist; `create` does not apply). Call `migrate()` before first use."""
    from tokenhub.db.database import is_postgres

    if url is not None and is_postgres(url):
        from tokenhub.store.postgres import PgStore

        return PgStore(url)
    from tokenhub.store.sqlite import SQLiteStore

    return SQLiteStore(database_path(url), create=create)


def iter_chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
