"""Usage events in and out of the books: CloudEvents ingest, reconciliation against a provider's
own token counts, and exports (the event log with its settlements; a FOCUS cost export).

Everything here talks to the database through `tokenhub.db.database` (SQLite or PostgreSQL, the
same migrations), so it runs wherever the ledger runs. The command line is in
`tokenhub.cli.billing_io`.

**Ingest** (`ingest`): one CloudEvents 1.0 JSON object per line (structured mode). The
envelope must have `specversion` "1.0", `id`, `source`, `type`, `time` (RFC 3339 with an
offset) and `subject` (the tenant: 1-64 of A-Z a-z 0-9 . _ -); extension attributes are
ignored; `datacontenttype`, when present, must be JSON; `data_base64` is refused. Two types:

- `tokenhub.usage.v1`: `data` is a usage event without `request_id`, `ts_ms` and `tenant`
  (those come from the envelope): `model`, `input_tokens`, `output_tokens` required;
  `cached_input_tokens` (cache reads) and `cache_write_tokens` (prompt-cache writes, Anthropic's
  cache_creation_input_tokens), both included in `input_tokens` as OpenAI counts, `provider`,
  `key_id`, `endpoint` (default "chat.completions"), `deployment`, `upstream_model`,
  `stream`, `source`, `status`, `error`, `latency_ms`, `ttft_ms`, `attempts` optional.
  Unknown fields are refused: a misspelt optional count must not silently become 0.
- `com.openai.usage`: `data` is an OpenAI `usage` object beside `model` (and optionally
  `provider`): `prompt_tokens`, `completion_tokens` required, `total_tokens` (checked against
  their sum when present), `prompt_tokens_details.cached_tokens` and
  `prompt_tokens_details.cache_write_tokens` (as OpenRouter sends it) optional. Other fields
  are ignored, as OpenAI keeps adding detail objects.

The usage event's `request_id` comes from the envelope. CloudEvents only promises that
(`source`, `id`) is unique, so `id` is kept as it is only when it is globally unique by
construction: a tokenhub request id (`req_` + 32 hex digits, so a gateway's own events keep
their ids and still match the provider's records, which carry them as x-request-id), a UUID
or a ULID. Any other id becomes `SOURCE#ID` (injective, since such a source has no `#`), or
`ce_` + 32 hex digits of SHA-256 when the source contains `#` or the result would exceed 128
characters.

Lines go to the database in batches, one transaction each, idempotent by request_id as the
store's `insert_events`: a new id is inserted, an id stored with the same payload is a
duplicate (nothing written), one stored with a different payload is a conflict (the stored row
is kept). The same id twice in one batch is compared to its first line the same way. Every
line gets exactly one of: ingested, duplicate, conflict, invalid (line number and reason);
blank lines are skipped; a line longer than `max_line_bytes` is invalid without being read
into memory whole. With `settle=True` every batch's ingested and duplicate events are then
settled through `Billing.settle` (idempotent too, so re-running settles what an earlier run
did not).

The store's own `insert_events` is not used: it is SQLite-only and reports counts, while the
per-line report needs the outcome of each event. `store_events` is the same algorithm (INSERT
... ON CONFLICT DO NOTHING, then a field-by-field comparison of what was not inserted) on the
portable `Tx`, with `RETURNING` naming the inserted rows (SQLite >= 3.35, PostgreSQL).

**Reconcile** (`reconcile`): a provider's CSV of per-request counts against usage_events.
Matching is by request_id over every stored event; `provider`/`since`/`until` only decide
which stored events the file is expected to contain (the others are "extra" when the file
lacks them). See `reconcile` for the rules and the totals.

**Export**: `iter_event_log` (usage events joined with their settlement) and `focus_rows`
(a FinOps FOCUS 1.0 cost dataset built from ledger transactions and postings; see there).

Money is always integer nanos until it is printed with `money.decimal_str`: never a float.

Performance notes (2-core VM, SQLite, 200k events, 20 tenants, one process): ingest ~15k
lines/s (parsing ~11 us a line, the rest is SQLite index upkeep on the ledger connection, whose
page cache is the default 2 MiB, not the store's 64 MiB), re-ingest of the same file ~50k/s,
`--settle` adds Billing.settle's own cost (~8k/s); export csv ~21k events/s, focus ~14k
transactions/s (a json.loads per transaction); reconcile ~50k rows/s. Memory stays at ~40 MB
for all of them (reconcile adds one dict entry per request_id in the file).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import hashlib
import json
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO, Annotated, Any, Literal, TypeVar

import msgspec

from tokenhub.billing import terms
from tokenhub.billing.ledger import LedgerError, period_bounds
from tokenhub.billing.service import Billing, BillingError
from tokenhub.db.database import Database, Row, Tx
from tokenhub.money import POINTS, TOKENS, allocate, convert, decimal_str, rate
from tokenhub.usage import BILLED_FIELDS, EVENT_FIELDS, MAX_TOKENS, UsageEvent

T = TypeVar("T")

_IN_CHUNK = 500  # ids per IN (...) list


class BillingIOError(ValueError):
    """Bad input or arguments (a CSV without the needed columns, a bad time): one line."""


# -- times ----------------------------------------------------------------------------------

_MS = re.compile(r"-?\d+")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_time(value: str) -> int:
    """Unix milliseconds from an ISO 8601 date or datetime (UTC unless it has an offset) or a
    plain integer of Unix milliseconds."""
    s = value.strip()
    if _MS.fullmatch(s):
        return int(s)
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        raise BillingIOError(
            f"bad time {value!r}: give an ISO 8601 date or datetime (2026-11-01, "
            "2026-11-01T12:00:00Z, 2026-11-01T12:00+08:00) or Unix milliseconds"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return (t - _EPOCH) // dt.timedelta(milliseconds=1)


def iso_z(ms: int) -> str:
    """`2026-11-03T10:00:00Z` (milliseconds shown only when there are some)."""
    t = _EPOCH + dt.timedelta(milliseconds=ms)
    frac = f".{ms % 1000:03d}" if ms % 1000 else ""
    return t.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def time_window(
    period: str | None, since: str | None, until: str | None
) -> tuple[int | None, int | None]:
    """[since, until) in ms from `--period YYYY-MM` or `--since/--until` (not both)."""
    if period is not None:
        if since is not None or until is not None:
            raise BillingIOError("give --period or --since/--until, not both")
        try:
            return period_bounds(period)
        except LedgerError as e:
            raise BillingIOError(str(e)) from None
    lo = parse_time(since) if since is not None else None
    hi = parse_time(until) if until is not None else None
    if lo is not None and hi is not None and hi <= lo:
        raise BillingIOError("--until must be later than --since")
    return lo, hi


# -- CloudEvents ----------------------------------------------------------------------------

TYPE_TOKENHUB = "tokenhub.usage.v1"
TYPE_OPENAI = "com.openai.usage"
ACCEPTED_TYPES = (TYPE_TOKENHUB, TYPE_OPENAI)
MAX_REQUEST_ID = 128
DEFAULT_MAX_LINE_BYTES = 1 << 20

_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
# The bounds every usage event's counts obey (the gateway's check of upstream usage and
# settlement share them): an ingested count outside them is an invalid line, never stored.
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
Name = Annotated[str, msgspec.Meta(max_length=256)]


class CloudEvent(msgspec.Struct, kw_only=True):
    """The structured-mode envelope. Unknown attributes are CloudEvents extensions: ignored."""

    specversion: Literal["1.0"]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=_PRINTABLE)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=_PRINTABLE)]
    type: str
    time: Annotated[dt.datetime, msgspec.Meta(tz=True)]
    subject: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    datacontenttype: str | None = None
    dataschema: str | None = None
    data_base64: str | None = None
    data: msgspec.Raw = msgspec.Raw()  # decoded per `type` below


class TokenhubData(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`tokenhub.usage.v1`: a UsageEvent without request_id, ts_ms and tenant."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    input_tokens: Count
    output_tokens: Count
    cached_input_tokens: Count = 0
    cache_write_tokens: Count = 0
    provider: Name = ""
    key_id: Name = ""
    endpoint: Name = "chat.completions"
    deployment: Name = ""
    upstream_model: Name = ""
    stream: bool = False
    source: Literal["upstream", "metered"] = "upstream"
    status: Annotated[int, msgspec.Meta(ge=0, le=999)] = 200
    error: Name = ""
    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    ttft_ms: Annotated[float, msgspec.Meta(ge=0)] | None = None
    attempts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 1


class OpenAIPromptDetails(msgspec.Struct, kw_only=True):
    cached_tokens: Count = 0
    cache_write_tokens: Count = 0


class OpenAIData(msgspec.Struct, kw_only=True):
    """`com.openai.usage`: OpenAI's usage object with the model beside it."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count | None = None
    prompt_tokens_details: OpenAIPromptDetails | None = None
    provider: Name = ""


_decode_envelope = msgspec.json.Decoder(CloudEvent).decode
_decode_tokenhub = msgspec.json.Decoder(TokenhubData).decode
_decode_openai = msgspec.json.Decoder(OpenAIData).decode

# Ids unique by construction, kept as they are: tokenhub's request ids, UUIDs, ULIDs.
_GLOBAL_ID = re.compile(
    r"req_[0-9a-f]{32}"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}"
)


def request_id_for(source: str, event_id: str) -> str:
    """The usage event's request_id for a CloudEvent (the rule is in the module docstring)."""
    if _GLOBAL_ID.fullmatch(event_id):
        return event_id
    if "#" not in source and len(source) + 1 + len(event_id) <= MAX_REQUEST_ID:
        return f"{source}#{event_id}"
    digest = hashlib.sha256(f"{len(source)}:{source}{event_id}".encode()).hexdigest()
    return f"ce_{digest[:32]}"


class Parsed(msgspec.Struct, frozen=True):
    event: UsageEvent
    id: str  # the CloudEvent's id and source, for the report
    source: str


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _data_error(e: msgspec.ValidationError) -> str:
    msg = _one_line(e)
    if " - at `$" in msg:
        return msg.replace(" - at `$", " - at `$.data", 1)
    return f"{msg} - at `$.data`"


def parse_event(line: bytes) -> Parsed | str:
    """One line: the usage event, or why it is invalid."""
    try:
        ce = _decode_envelope(line)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return _one_line(e)
    except UnicodeDecodeError:
        return "not valid UTF-8"
    if ce.data_base64 is not None:
        return "data_base64 is not supported: send the usage as JSON in `data`"
    if not ce.data:
        return "Object missing required field `data`"
    ct = (ce.datacontenttype or "application/json").split(";")[0].strip().lower()
    if ct != "application/json" and not ct.endswith("+json"):
        return f"datacontenttype {ce.datacontenttype!r} is not JSON"
    try:
        if ce.type == TYPE_TOKENHUB:
            d = _decode_tokenhub(ce.data)
            fields: dict[str, Any] = msgspec.structs.asdict(d)
        elif ce.type == TYPE_OPENAI:
            o = _decode_openai(ce.data)
            total = o.prompt_tokens + o.completion_tokens
            if o.total_tokens is not None and o.total_tokens != total:
                return (
                    f"total_tokens {o.total_tokens} is not prompt_tokens + completion_tokens "
                    f"({o.prompt_tokens} + {o.completion_tokens}) - at `$.data.total_tokens`"
                )
            det = o.prompt_tokens_details or OpenAIPromptDetails()
            fields = {
                "key_id": "",
                "endpoint": "chat.completions",
                "model": o.model,
                "provider": o.provider,
                "input_tokens": o.prompt_tokens,
                "cached_input_tokens": det.cached_tokens,
                "output_tokens": o.completion_tokens,
                "cache_write_tokens": det.cache_write_tokens,
            }
        else:
            return f"unsupported type {ce.type!r} (accepted: {', '.join(ACCEPTED_TYPES)})"
    except msgspec.ValidationError as e:  # `data` is valid JSON already, of the wrong shape
        return _data_error(e)
    if fields["cached_input_tokens"] > fields["input_tokens"]:
        return (
            f"cached input tokens ({fields['cached_input_tokens']}) exceed input tokens "
            f"({fields['input_tokens']}): cached tokens are part of the input"
        )
    if fields["cached_input_tokens"] + fields["cache_write_tokens"] > fields["input_tokens"]:
        return (
            f"cached input tokens + cache write tokens ({fields['cached_input_tokens']} + "
            f"{fields['cache_write_tokens']}) exceed input tokens ({fields['input_tokens']}): "
            "both are part of the input"
        )
    ev = UsageEvent(
        request_id=request_id_for(ce.source, ce.id),
        ts_ms=(ce.time - _EPOCH) // dt.timedelta(milliseconds=1),
        tenant=ce.subject,
        **fields,
    )
    return Parsed(ev, ce.id, ce.source)


# -- storing usage events -----------------------------------------------------------------

_COLS = ", ".join(EVENT_FIELDS)
_WIDTH = len(EVENT_FIELDS)
# 50 rows x 19 columns = 950 parameters: under the oldest SQLite limit (999).
_ROWS_PER_INSERT = 50

Outcome = Literal["ingested", "duplicate", "conflict"]


@functools.lru_cache(maxsize=64)
def _insert_sql(n: int) -> str:
    rows = ", ".join(
        "(" + ", ".join(f"${i * _WIDTH + j + 1}" for j in range(_WIDTH)) + ")" for i in range(n)
    )
    return (
        f"INSERT INTO usage_events ({_COLS}) VALUES {rows} "
        "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
    )


def _marks(n: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + n))


def row_event(row: Sequence[Any]) -> UsageEvent:
    fields = dict(zip(EVENT_FIELDS, row, strict=True))
    fields["stream"] = bool(fields["stream"])
    return UsageEvent(**fields)


async def store_events(tx: Tx, events: Sequence[UsageEvent]) -> list[Outcome]:
    """Inserts what is new (request ids must be distinct); the outcome of each event in order.
    Stored rows are never changed."""
    inserted: set[str] = set()
    for i in range(0, len(events), _ROWS_PER_INSERT):
        chunk = events[i : i + _ROWS_PER_INSERT]
        params = [v for e in chunk for v in msgspec.structs.astuple(e)]
        for (rid,) in await tx.fetch(_insert_sql(len(chunk)), *params):
            inserted.add(rid)
    rest = [e.request_id for e in events if e.request_id not in inserted]
    stored: dict[str, UsageEvent] = {}
    for i in range(0, len(rest), _IN_CHUNK):
        chunk_ids = rest[i : i + _IN_CHUNK]
        for r in await tx.fetch(
            f"SELECT {_COLS} FROM usage_events WHERE request_id IN ({_marks(len(chunk_ids))})",
            *chunk_ids,
        ):
            stored[r[0]] = row_event(r)
    out: list[Outcome] = []
    for e in events:
        if e.request_id in inserted:
            out.append("ingested")
        elif stored.get(e.request_id) == e:
            out.append("duplicate")
        else:
            out.append("conflict")
    return out


# -- ingest -----------------------------------------------------------------------------------

LineStatus = Literal[
    "ingested", "duplicate", "conflict", "invalid", "settle_failed", "settle_conflict"
]
PROBLEMS = frozenset({"conflict", "invalid", "settle_failed", "settle_conflict"})


class LineResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What happened to one line (a line may get a second result from settlement)."""

    line: int
    status: LineStatus
    reason: str = ""
    id: str = ""
    source: str = ""
    request_id: str = ""


@dataclass
class IngestSummary:
    lines: int = 0
    blank: int = 0
    ingested: int = 0
    duplicate: int = 0
    conflict: int = 0
    invalid: int = 0
    settle: bool = False
    settled: int = 0
    already_settled: int = 0
    settle_failed: int = 0
    settle_conflict: int = 0

    @property
    def ok(self) -> bool:
        """True when every line was stored (ingested or duplicate) and, with settlement,
        settled."""
        return not (self.conflict or self.invalid or self.settle_failed or self.settle_conflict)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "lines": self.lines,
            "blank": self.blank,
            "ingested": self.ingested,
            "duplicate": self.duplicate,
            "conflict": self.conflict,
            "invalid": self.invalid,
        }
        if self.settle:
            d |= {
                "settled": self.settled,
                "already_settled": self.already_settled,
                "settle_failed": self.settle_failed,
                "settle_conflict": self.settle_conflict,
            }
        return d

    def text(self) -> str:
        s = (
            f"{self.lines} lines: {self.ingested} ingested, {self.duplicate} duplicate, "
            f"{self.conflict} conflict, {self.invalid} invalid, {self.blank} blank"
        )
        if self.settle:
            s += (
                f"; {self.settled} settled, {self.already_settled} already settled, "
                f"{self.settle_failed} settle failed, {self.settle_conflict} settle conflict"
            )
        return s


def read_lines(f: IO[bytes], limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line without its newline, or None when longer than `limit` bytes; bytes consumed).
    An oversized line is skipped in pieces, never held in memory whole."""
    while True:
        chunk = f.readline(limit + 1)
        if not chunk:
            return
        size = len(chunk)
        if chunk.endswith(b"\n"):
            yield chunk[:-1], size
        elif size <= limit:
            yield chunk, size  # the last line, without a newline
        else:
            while not chunk.endswith(b"\n"):
                chunk = f.readline(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
            yield None, size


Progress = Callable[[int, int], None]  # (lines read, bytes read)


async def ingest(
    db: Database,
    f: IO[bytes],
    *,
    settle: bool = False,
    batch_size: int = 1000,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    on_result: Callable[[LineResult], None] = lambda r: None,
    progress: Progress | None = None,
    progress_every_s: float = 2.0,
) -> IngestSummary:
    """Ingests a CloudEvents JSON-lines file (see the module docstring). `on_result` gets every
    line's result in line order, batch by batch. Database errors propagate: what earlier
    batches stored stays stored, and running again is safe."""
    summary = IngestSummary(settle=settle)
    billing = Billing(db) if settle else None
    batch: list[tuple[int, Parsed]] = []
    results: list[LineResult] = []
    bytes_read = 0
    last_progress = time.monotonic()

    async def flush() -> None:
        await _ingest_batch(db, billing, batch, results, summary)
        results.sort(key=lambda r: r.line)  # stable: a line's settle result follows it
        for r in results:
            on_result(r)
        batch.clear()
        results.clear()

    for number, (raw, size) in enumerate(read_lines(f, max_line_bytes), 1):
        summary.lines = number
        bytes_read += size
        if raw is None:
            summary.invalid += 1
            results.append(
                LineResult(
                    line=number,
                    status="invalid",
                    reason=f"line is longer than {max_line_bytes} bytes",
                )
            )
        elif not raw.strip():
            summary.blank += 1
        else:
            parsed = parse_event(raw)
            if isinstance(parsed, str):
                summary.invalid += 1
                results.append(LineResult(line=number, status="invalid", reason=parsed))
            else:
                batch.append((number, parsed))
        if len(batch) >= batch_size or len(results) >= batch_size:
            await flush()
        if progress is not None and time.monotonic() - last_progress >= progress_every_s:
            progress(number, bytes_read)
            last_progress = time.monotonic()
    await flush()
    return summary


async def _ingest_batch(
    db: Database,
    billing: Billing | None,
    batch: list[tuple[int, Parsed]],
    results: list[LineResult],
    summary: IngestSummary,
) -> None:
    first: dict[str, tuple[int, Parsed]] = {}
    repeats: list[tuple[int, Parsed, int]] = []  # (line, event, the first line of its id)
    for number, p in batch:
        seen = first.setdefault(p.event.request_id, (number, p))
        if seen[0] != number:
            repeats.append((number, p, seen[0]))
    unique = list(first.values())
    if not unique:
        return
    events = [p.event for _, p in unique]
    outcomes = await db.transaction(lambda tx: store_events(tx, events))
    line_of: dict[str, tuple[int, Parsed]] = {}
    outcome_of: dict[str, Outcome] = {}
    to_settle: list[UsageEvent] = []
    for (number, p), outcome in zip(unique, outcomes, strict=True):
        line_of[p.event.request_id] = (number, p)
        outcome_of[p.event.request_id] = outcome
        _count_line(summary, results, number, p, outcome, _REASONS[outcome])
        if outcome != "conflict":
            to_settle.append(p.event)
    for number, p, at in repeats:
        # Compared with the first line of its id, which was compared with the database: a
        # repeat of a conflicting line conflicts too.
        same = first[p.event.request_id][1].event == p.event
        if same and outcome_of[p.event.request_id] != "conflict":
            _count_line(summary, results, number, p, "duplicate", f"same as line {at}")
        else:
            why = f"same request_id as line {at}, " + (
                "which conflicts with the stored event" if same else "different payload"
            )
            _count_line(summary, results, number, p, "conflict", why + " (line ignored)")
    if billing is None or not to_settle:
        return
    res = await billing.settle(to_settle)
    summary.settled += res.settled
    summary.already_settled += res.duplicates
    for rid, why in res.failed:
        summary.settle_failed += 1
        number, p = line_of[rid]
        results.append(LineResult(line=number, status="settle_failed", reason=why, id=p.id,
                                  source=p.source, request_id=rid))  # fmt: skip
    for rid in res.conflicts:
        summary.settle_conflict += 1
        number, p = line_of[rid]
        results.append(LineResult(line=number, status="settle_conflict", id=p.id,
                                  source=p.source, request_id=rid,
                                  reason="settled before with a different payload"))  # fmt: skip


_REASONS: dict[Outcome, str] = {
    "ingested": "",
    "duplicate": "already stored with the same payload",
    "conflict": "already stored with a different payload (the stored event is kept)",
}


def _count_line(
    summary: IngestSummary,
    results: list[LineResult],
    number: int,
    p: Parsed,
    outcome: Outcome,
    reason: str,
) -> None:
    setattr(summary, outcome, getattr(summary, outcome) + 1)
    results.append(
        LineResult(
            line=number,
            status=outcome,
            reason=reason,
            id=p.id,
            source=p.source,
            request_id=p.event.request_id,
        )
    )


# -- paging through usage events -----------------------------------------------------------


class _Where:
    """A WHERE clause with numbered placeholders."""

    def __init__(self) -> None:
        self.conds: list[str] = []
        self.args: list[Any] = []

    def add(self, cond: str, *values: Any) -> _Where:
        marks = []
        for v in values:
            self.args.append(v)
            marks.append(f"${len(self.args)}")
        self.conds.append(cond.format(*marks))
        return self

    def copy(self) -> _Where:
        w = _Where()
        w.conds, w.args = list(self.conds), list(self.args)
        return w

    def sql(self) -> str:
        return " WHERE " + " AND ".join(self.conds) if self.conds else ""


def _event_filter(
    *,
    since: int | None = None,
    until: int | None = None,
    tenant: str | None = None,
    provider: str | None = None,
) -> _Where:
    w = _Where()
    if since is not None:
        w.add("e.ts_ms >= {}", since)
    if until is not None:
        w.add("e.ts_ms < {}", until)
    if tenant is not None:
        w.add("e.tenant = {}", tenant)
    if provider is not None:
        w.add("e.provider = {}", provider)
    return w


async def _event_pages(
    db: Database,
    columns: str,
    where: _Where,
    then: Callable[[Tx, list[Row]], Awaitable[T]],
    *,
    join: str = "",
    page: int = 1000,
) -> AsyncIterator[tuple[list[Row], T]]:
    """usage_events `e` in (ts_ms, request_id) order, a page per transaction (keyset paging,
    so memory stays flat and no transaction is long). `columns` must start with
    e.ts_ms, e.request_id; `then` runs in the page's transaction."""
    last: tuple[int, str] | None = None
    while True:
        w = where.copy()
        if last is not None:
            w.add("(e.ts_ms, e.request_id) > ({}, {})", *last)
        sql = (
            f"SELECT {columns} FROM usage_events e {join}{w.sql()} "
            f"ORDER BY e.ts_ms, e.request_id LIMIT {int(page)}"
        )

        async def run(tx: Tx, sql: str = sql, args: list[Any] = w.args) -> tuple[list[Row], T]:
            rows = await tx.fetch(sql, *args)
            return rows, await then(tx, rows)

        rows, extra = await db.transaction(run)
        if not rows:
            return
        yield rows, extra
        if len(rows) < page:
            return
        last = (rows[-1][0], rows[-1][1])


async def _nothing(tx: Tx, rows: list[Row]) -> None:
    return None


# -- reconcile ------------------------------------------------------------------------------

TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "cache_write_tokens")
_ALIASES: dict[str, tuple[str, ...]] = {
    "request_id": ("request_id",),
    "input_tokens": ("input_tokens", "prompt_tokens"),
    "output_tokens": ("output_tokens", "completion_tokens"),
    "cached_input_tokens": ("cached_input_tokens", "cached_tokens"),
    "cache_write_tokens": ("cache_write_tokens",),
    "model": ("model",),
}
_REQUIRED = ("request_id", "input_tokens", "output_tokens")


@dataclass(frozen=True)
class ProviderRow:
    line: int
    request_id: str
    tokens: dict[str, int]  # the token fields the file has
    model: str | None


@dataclass
class ReconcileReport:
    compared: tuple[str, ...]  # token fields compared (cached, cache writes: when the file has it)
    compare_model: bool
    rows: int = 0  # valid rows in the file
    matched: int = 0  # rows whose request_id tokenhub has
    matched_out_of_scope: int = 0  # of those, events outside the provider or window
    ignored_empty: int = 0  # in-scope tokenhub events with no tokens, absent from the file
    missing: list[dict[str, Any]] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    differing: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    file_totals: dict[str, int] = field(default_factory=dict)
    tokenhub_totals: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.differing or self.malformed)

    @property
    def difference(self) -> dict[str, int]:
        return {k: self.file_totals[k] - self.tokenhub_totals[k] for k in self.compared}

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "compared": list(self.compared),
            "rows": self.rows,
            "matched": self.matched,
            "matched_out_of_scope": self.matched_out_of_scope,
            "ignored_empty": self.ignored_empty,
            "missing": self.missing,
            "extra": self.extra,
            "differing": self.differing,
            "malformed": self.malformed,
            "totals": {
                "file": self.file_totals,
                "tokenhub": self.tokenhub_totals,
                "difference": self.difference,
            },
        }


def _columns(header: list[str]) -> dict[str, int]:
    norm = [h.strip().lower() for h in header]
    cols: dict[str, int] = {}
    for name, aliases in _ALIASES.items():
        found = [a for a in aliases if a in norm]
        if len(found) > 1:
            raise BillingIOError(f"columns {' and '.join(found)} both give {name}: keep one")
        if found:
            if norm.count(found[0]) > 1:
                raise BillingIOError(f"column {found[0]} appears twice")
            cols[name] = norm.index(found[0])
    missing = [n for n in _REQUIRED if n not in cols]
    if missing:
        need = "; ".join(" or ".join(_ALIASES[n]) for n in missing)
        raise BillingIOError(f"the CSV header has no column for {need}")
    return cols


def _count(text: str, what: str) -> int:
    s = text.strip()
    if not s.isdigit() or not s.isascii():
        raise ValueError(f"{what} {text!r} is not a whole number >= 0")
    n = int(s)
    if n >= 2**63:
        raise ValueError(f"{what} {text!r} is out of range")
    return n


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str
    request_id: str = ""  # when the row has one


def read_provider_csv(
    f: IO[str],
) -> tuple[tuple[str, ...], bool, Iterator[ProviderRow | Malformed]]:
    """(token fields in the file, has a model column, rows): each row a `ProviderRow` or a
    `Malformed` one. Streams; the header is read first (BillingIOError when it lacks a needed
    column). Line numbers are physical lines, where the row starts."""
    reader = csv.reader(f)
    header: list[str] | None = None
    while header is None:
        try:
            row = next(reader)
        except StopIteration:
            raise BillingIOError("the CSV file is empty (it needs a header)") from None
        except csv.Error as e:
            raise BillingIOError(f"line {reader.line_num}: {e}") from None
        if any(c.strip() for c in row):
            header = row
    header[0] = header[0].removeprefix("\ufeff")
    cols = _columns(header)
    tokens = tuple(k for k in TOKEN_FIELDS if k in cols)
    width = len(header)

    def parse(line: int, row: list[str]) -> ProviderRow | Malformed:
        if len(row) != width:
            return Malformed(line, f"expected {width} fields as in the header, got {len(row)}")
        if any("\ufffd" in c for c in row):
            return Malformed(line, "not valid UTF-8")
        rid = row[cols["request_id"]].strip()
        if not rid:
            return Malformed(line, "empty request_id")
        try:
            counts = {k: _count(row[cols[k]], k) for k in tokens}
        except ValueError as e:
            return Malformed(line, str(e), rid)
        if counts.get("cached_input_tokens", 0) > counts["input_tokens"]:
            return Malformed(line, "cached_input_tokens exceed input_tokens", rid)
        if (
            counts.get("cached_input_tokens", 0) + counts.get("cache_write_tokens", 0)
            > counts["input_tokens"]
        ):
            return Malformed(
                line, "cached_input_tokens + cache_write_tokens exceed input_tokens", rid
            )
        model = row[cols["model"]].strip() if "model" in cols else ""
        return ProviderRow(line, rid, counts, model or None)

    def rows() -> Iterator[ProviderRow | Malformed]:
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Malformed(start, f"not CSV: {e}")
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if any(c.strip() for c in row):
                yield parse(line, row)

    return tokens, "model" in cols, rows()


_RECON_COLS = (
    "e.ts_ms, e.request_id, e.provider, e.model, e.upstream_model, "
    "e.input_tokens, e.cached_input_tokens, e.output_tokens, e.cache_write_tokens"
)


def _th_tokens(r: Row) -> dict[str, int]:
    return {
        "input_tokens": r[5],
        "cached_input_tokens": r[6],
        "output_tokens": r[7],
        "cache_write_tokens": r[8],
    }


async def reconcile(
    db: Database,
    f: IO[str],
    *,
    provider: str | None = None,
    since: int | None = None,
    until: int | None = None,
    chunk: int = _IN_CHUNK,
) -> ReconcileReport:
    """Compares a provider's per-request token counts with tokenhub's usage events.

    - **missing**: a file row whose request_id tokenhub does not have at all.
    - **differing**: same request_id, different token counts (the columns the file has;
      input includes cached, as OpenAI counts), a model the event knows under neither its
      `model` nor its `upstream_model` (when the file has a model column), or, with
      `provider`, an event recorded for another provider.
    - **extra**: a tokenhub event in scope (the provider and time window given) with tokens,
      whose request_id is not in the file (malformed rows with a request_id count as present,
      they are reported as malformed). Scope-events without any tokens are only counted.
    - **totals**: the file's valid rows against the tokenhub events compared, i.e. every
      event in scope plus every event a file row matched outside it; so, when no row is
      malformed, the difference is exactly missing - extra + the differing rows' differences.

    The file is streamed and looked up in chunks; what stays in memory is one entry per
    request_id seen (to find extras and repeated ids) and the discrepancies themselves."""
    tokens, has_model, rows = read_provider_csv(f)
    report = ReconcileReport(compared=tokens, compare_model=has_model)
    report.file_totals = dict.fromkeys(tokens, 0)
    report.tokenhub_totals = dict.fromkeys(tokens, 0)
    seen: dict[str, int] = {}  # request_id -> its line

    def in_window(ts: int) -> bool:
        return (since is None or ts >= since) and (until is None or ts < until)

    async def check(batch: list[ProviderRow]) -> None:
        ids = [r.request_id for r in batch]

        async def fetch(tx: Tx) -> list[Row]:
            return await tx.fetch(
                f"SELECT {_RECON_COLS} FROM usage_events e "
                f"WHERE e.request_id IN ({_marks(len(ids))})",
                *ids,
            )

        found = {r[1]: r for r in await db.transaction(fetch)}
        for pr in batch:
            for k in tokens:
                report.file_totals[k] += pr.tokens[k]
            ev = found.get(pr.request_id)
            if ev is None:
                row: dict[str, Any] = {"line": pr.line, "request_id": pr.request_id}
                row |= pr.tokens
                if has_model:
                    row["model"] = pr.model
                report.missing.append(row)
                continue
            report.matched += 1
            th = _th_tokens(ev)
            scoped = in_window(ev[0]) and (provider is None or ev[2] == provider)
            if not scoped:
                # Outside the scan below: its tokens count on tokenhub's side here.
                for k in tokens:
                    report.tokenhub_totals[k] += th[k]
                report.matched_out_of_scope += 1
            fields = [k for k in tokens if pr.tokens[k] != th[k]]
            if has_model and pr.model is not None and pr.model not in (ev[3], ev[4]):
                fields.append("model")
            if provider is not None and ev[2] != provider:
                fields.append("provider")
            if fields:
                report.differing.append({
                    "line": pr.line,
                    "request_id": pr.request_id,
                    "fields": fields,
                    "file": {**pr.tokens, **({"model": pr.model} if has_model else {})},
                    "tokenhub": {**{k: th[k] for k in tokens}, "model": ev[3],
                                 "upstream_model": ev[4], "provider": ev[2],
                                 "ts": iso_z(ev[0])},
                })  # fmt: skip

    batch: list[ProviderRow] = []
    for item in rows:
        first = seen.get(item.request_id) if item.request_id else None
        if first is not None:
            item = Malformed(item.line, f"request_id {item.request_id!r} again "
                             f"(first on line {first})")  # fmt: skip
        elif item.request_id:
            # A malformed row with a request_id is reported as malformed, not its event as
            # an extra.
            seen[item.request_id] = item.line
        if isinstance(item, Malformed):
            report.malformed.append({"line": item.line, "reason": item.reason})
            continue
        report.rows += 1
        batch.append(item)
        if len(batch) >= chunk:
            await check(batch)
            batch = []
    if batch:
        await check(batch)
    where = _event_filter(since=since, until=until, provider=provider)
    async for page, _ in _event_pages(db, _RECON_COLS, where, _nothing):
        for ev in page:
            th = _th_tokens(ev)
            for k in tokens:
                report.tokenhub_totals[k] += th[k]
            if ev[1] in seen:
                continue
            if not any(th.values()):
                report.ignored_empty += 1
                continue
            report.extra.append({"request_id": ev[1], "ts": iso_z(ev[0]), "provider": ev[2],
                                 "model": ev[3], **{k: th[k] for k in tokens}})  # fmt: skip
    return report


# -- the event log export -----------------------------------------------------------------

SETTLEMENT_FIELDS = (
    "settlement",  # unsettled | settled | refunded
    "txn_id",  # the usage transaction ('' when settled without a charge: no tokens)
    "currency",  # the tenant's settlement currency
    "charged",  # what the usage took from wallet, credit line, overrun (exact decimal)
    "package_tokens",  # tokens drawn from packages
    "points",  # points drawn from point packs (decimal string)
    "refund_txn_id",
)
EVENT_LOG_FIELDS = (*BILLED_FIELDS, *SETTLEMENT_FIELDS)
_MONEY_KINDS = frozenset({"wallet", "receivable", "overrun"})


def _account_kind(account: str) -> str:
    parts = account.split(":")
    return parts[2] if parts[0] == "t" and len(parts) > 2 else ""


async def _fetch_in(tx: Tx, sql: str, ids: Sequence[str]) -> list[Row]:
    """`sql` with one `{}` for an IN list, run over `ids` in chunks."""
    out: list[Row] = []
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        out += await tx.fetch(sql.format(_marks(len(chunk))), *chunk)
    return out


async def iter_event_log(
    db: Database,
    *,
    since: int | None = None,
    until: int | None = None,
    tenant: str | None = None,
    page: int = 1000,
) -> AsyncIterator[dict[str, Any]]:
    """Usage events in (ts_ms, request_id) order, every field, each joined with its
    settlement (`SETTLEMENT_FIELDS`). Streams a page per transaction."""
    currencies: dict[str, str] = {}
    columns = "e.ts_ms, e.request_id, " + ", ".join(f"e.{c}" for c in BILLED_FIELDS[2:])
    columns += ", s.txn_id"
    assert BILLED_FIELDS[:2] == ("request_id", "ts_ms")

    async def extra(tx: Tx, rows: list[Row]) -> tuple[list[Row], dict[str, str]]:
        txns = sorted({r[-1] for r in rows if r[-1]})
        postings = await _fetch_in(
            tx,
            "SELECT txn_id, account, unit, amount FROM postings WHERE txn_id IN ({}) "
            "AND account LIKE 't:%'",
            txns,
        )
        refunds = await _fetch_in(
            tx,
            "SELECT ref, id FROM ledger_txns WHERE kind = 'refund' AND ref IN ({})",
            [r[1] for r in rows if r[-1] is not None],
        )
        for t in sorted({r[2] for r in rows} - currencies.keys()):
            cur = await tx.fetchval("SELECT currency FROM billing_profiles WHERE tenant = $1", t)
            currencies[t] = cur or "USD"
        return postings, {ref: tid for ref, tid in refunds}

    where = _event_filter(since=since, until=until, tenant=tenant)
    join = "LEFT JOIN settlements s ON s.event_id = e.request_id "
    async for rows, (postings, refunds) in _event_pages(
        db, columns, where, extra, join=join, page=page
    ):
        money: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        lot_units: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for tid, account, unit, amount in postings:
            kind = _account_kind(account)
            if kind in _MONEY_KINDS:
                money[tid][unit] += int(amount)
            elif kind == "lot":
                lot_units[tid][unit] += int(amount)
        for r in rows:
            ts, rid, *rest = r[:-1]
            txn_id = r[-1]
            ev: dict[str, Any] = {"request_id": rid, "ts_ms": ts}
            ev |= dict(zip(BILLED_FIELDS[2:], rest, strict=True))
            ev["stream"] = bool(ev["stream"])
            if txn_id is None:
                ev |= dict.fromkeys(SETTLEMENT_FIELDS, "")
                ev["settlement"] = "unsettled"
            else:
                m = money.get(txn_id, {})
                units = sorted(m) or [currencies[ev["tenant"]]]
                ev |= {
                    "settlement": "refunded" if rid in refunds else "settled",
                    "txn_id": txn_id,
                    "currency": ",".join(units),
                    "charged": ",".join(decimal_str(m.get(u, 0)) for u in units),
                    "package_tokens": lot_units.get(txn_id, {}).get(TOKENS, 0),
                    "points": decimal_str(lot_units.get(txn_id, {}).get(POINTS, 0)),
                    "refund_txn_id": refunds.get(rid, ""),
                }
            yield ev


def csv_cell(v: object) -> object:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


# -- FOCUS ------------------------------------------------------------------------------------

FOCUS_COLUMNS = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_TokenKind",
    "x_PaidFrom",
    "x_Transactions",
    "x_TransactionId",
    "x_PriceVersion",
    "x_FxRate",
    "x_Points",
)
# The price book's lines (input = uncached), as a usage transaction's details list them
# (tokenhub.usage.billed_lines); transactions settled before cache writes list the first three.
_KINDS = ("input", "cached_input", "output", "cache_write")
_KIND_TEXT = {
    "input": "input",
    "cached_input": "cached input",
    "output": "output",
    "cache_write": "cache write",
    "": "other",
}
# Transactions that are not charges: money received is a payment, not a cost.
NOT_CHARGES = frozenset({"topup", "payment"})
_AI = "AI and Machine Learning"


@dataclass
class _Line:
    """One usage line of one transaction: tokens of one kind paid one way."""

    kind: str  # input | cached_input | output | cache_write | '' (money the details do not explain)
    paid_from: str  # package | points | priced | overrun | overage | other
    tokens: int = 0
    lot: str = ""
    money_cur: str = ""
    money_w: int = 0  # the billed amount the details give (a weight for the postings)
    earned_cur: str = ""
    earned_w: int = 0  # the lot price earned (an amortized prepayment)
    points: int = 0
    price_cur: str = ""
    per_1m: int | None = None  # the overage price (price-book lines are looked up)
    price_version: str = ""
    fx: Decimal | None = None  # the settlement's rate price_cur -> billing currency
    billed: int = 0
    effective: int = 0


@dataclass
class _Acc:
    """One FOCUS row being summed up."""

    attrs: dict[str, str]
    billed: int = 0
    effective: int = 0
    tokens: int = 0
    points: int = 0
    txns: int = 0
    last_txn: str = ""
    # Usage rows: unit prices (nanos per 1M tokens, pricing currency) and the rate to the
    # billing currency, to price the row's summed tokens once.
    list_per_1m: int | None = None
    applied_per_1m: int | None = None
    fx: Decimal | None = None
    usage: bool = False


def _money_legs(legs: Sequence[Row]) -> tuple[dict[str, int], dict[str, int]]:
    """(billed, deferred) per unit: the tenant's money accounts, and its lots' deferred
    revenue (debited as a prepayment is earned, credited when one is bought)."""
    billed: dict[str, int] = defaultdict(int)
    deferred: dict[str, int] = defaultdict(int)
    for account, unit, amount in legs:
        kind = _account_kind(account)
        if kind in _MONEY_KINDS:
            billed[unit] += int(amount)
        elif kind == "deferred":
            deferred[unit] += int(amount)
    return billed, deferred


def _split(total: int, weights: Sequence[int]) -> list[int]:
    """`total` in proportion to `weights` (all to the first when they sum to 0), exactly."""
    if sum(weights) <= 0:
        return [total] + [0] * (len(weights) - 1)
    return allocate(total, list(weights))


def _per_kind(x: Sequence[Any] | None) -> list[int]:
    """A details list of per-line figures, one per _KINDS (a shorter, older one padded)."""
    out = [int(v) for v in (x or ())]
    return out + [0] * (len(_KINDS) - len(out))


def _usage_lines(d: dict[str, Any]) -> list[_Line]:
    """A usage transaction's lines, from its details (the settlement's own record)."""
    total = [int(d.get("tokens", {}).get(k, 0)) for k in _KINDS]
    price = d.get("price") or {}
    pcur, version = price.get("currency", ""), str(price.get("version", ""))
    lines: list[_Line] = []
    lot_took = [0] * len(_KINDS)
    draws = d.get("draws", [])
    for dr in draws:
        src = dr.get("from")
        if src not in ("package", "points"):
            continue
        took = _per_kind(dr.get("tokens"))
        earned = _split(int(dr.get("earned", 0)), took)
        points = _split(int(dr.get("points", 0)), took) if src == "points" else [0] * len(took)
        for i, kind in enumerate(_KINDS):
            lot_took[i] += took[i]
            if took[i] or earned[i] or points[i]:
                lines.append(_Line(kind, src, took[i], dr.get("lot", ""),
                                   earned_cur=dr.get("currency", ""), earned_w=earned[i],
                                   points=points[i], price_cur=pcur,
                                   price_version=version))  # fmt: skip
    money = [dr for dr in draws if dr.get("from") in ("wallet", "overrun", "overage")]

    def paid(srcs: tuple[str, ...]) -> tuple[int, str, Decimal | None]:
        amount, cur, fx = 0, "", None
        for dr in money:
            if dr["from"] in srcs:
                amount += int(dr.get("converted", dr.get("amount", 0)))
                cur = dr.get("tenant_currency", dr.get("currency", ""))
                fx = Decimal(dr["fx_rate"]) if "fx_rate" in dr else None
        return amount, cur, fx

    if "overage" in d:
        # Overage takes every token the lots left, of each kind, at one price.
        o = d["overage"]
        toks = [max(0, t - k) for t, k in zip(total, lot_took, strict=True)]
        amount, cur, fx = paid(("overage",))
        for i, part in enumerate(_split(amount, toks)):
            if toks[i] or part:
                lines.append(_Line(_KINDS[i], "overage", toks[i], o.get("lot", ""),
                                   money_cur=cur, money_w=part, price_cur=o.get("currency", ""),
                                   per_1m=o.get("per_1m"), price_version="overage",
                                   fx=fx))  # fmt: skip
    if "priced" in d:
        p = d["priced"]
        toks = _per_kind(p.get("tokens"))
        amounts = _per_kind(p.get("amounts"))
        amount, cur, fx = paid(("wallet", "overrun"))
        src = "overrun" if any(dr["from"] == "overrun" for dr in money) else "priced"
        for i, part in enumerate(_split(amount, amounts if sum(amounts) else toks)):
            if toks[i] or part:
                lines.append(_Line(_KINDS[i], src, toks[i], money_cur=cur, money_w=part,
                                   price_cur=pcur, price_version=version, fx=fx))  # fmt: skip
    return lines


def _settle_amounts(lines: list[_Line], billed: dict[str, int], deferred: dict[str, int]) -> None:
    """Each line's billed and effective amounts, adding up exactly to the postings: the
    details only weight the split. Money they cannot place goes to a line of its own."""
    for unit, total in billed.items():
        mine = [ln for ln in lines if ln.money_cur == unit]
        if total and sum(abs(ln.money_w) for ln in mine) == 0:
            mine = [_Line("", "other", money_cur=unit, money_w=1)]
            lines += mine
        for ln, part in zip(mine, _split(total, [abs(ln.money_w) for ln in mine]), strict=True):
            ln.billed += part
            ln.effective += part
    for unit, total in deferred.items():
        mine = [ln for ln in lines if ln.earned_cur == unit]
        if total and sum(abs(ln.earned_w) for ln in mine) == 0:
            mine = [_Line("", "other", earned_cur=unit, earned_w=1)]
            lines += mine
        for ln, part in zip(mine, _split(total, [abs(ln.earned_w) for ln in mine]), strict=True):
            ln.effective += part


class _Lookups:
    """Price-book rows, FX rates, lots and tenant currencies, cached for one export."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str, int], Row | None] = {}
        self.lists: dict[str, list[Row]] = {}
        self.fx: dict[tuple[str, str], list[tuple[int, Decimal]]] | None = None
        self.lots: dict[str, tuple[str, str]] = {}  # lot id -> (plan, kind)
        self.currencies: dict[str, str] = {}

    async def applied(self, tx: Tx, model: str, tenant: str, version: int) -> Row | None:
        """(currency, input, cached input, output per 1M) of one price-book version."""
        key = (model, tenant, version)
        if key not in self.versions:
            self.versions[key] = await terms.price_version(tx, model, tenant, version)
        return self.versions[key]

    async def listed(self, tx: Tx, model: str, ts: int) -> Row | None:
        """The public (not a tenant's) price effective at ts, as `applied` gives it."""
        if model not in self.lists:
            self.lists[model] = await terms.list_prices(tx, model)
        return next((r[1:] for r in self.lists[model] if r[0] <= ts), None)

    async def rate(self, tx: Tx, base: str, quote: str, ts: int) -> Decimal | None:
        """The FX rate base -> quote at ts, as settlement finds it (direct, else the inverse
        to 12 decimals)."""
        if self.fx is None:
            self.fx = await terms.fx_rates(tx)
        found = terms.fx_in(self.fx, base, quote, ts)
        return None if found is None else found[0]

    async def load(self, tx: Tx, lot_ids: set[str], tenants: set[str]) -> None:
        for lid, plan, kind in await _fetch_in(
            tx, "SELECT id, plan, kind FROM lots WHERE id IN ({})", sorted(lot_ids - {""})
        ):
            self.lots[lid] = (plan, kind)
        for t in sorted(tenants - self.currencies.keys()):
            cur = await tx.fetchval("SELECT currency FROM billing_profiles WHERE tenant = $1", t)
            self.currencies[t] = cur or "USD"


def _day(ms: int) -> int:
    return ms - ms % 86_400_000


def _qty_1m(tokens: int) -> str:
    """tokens in millions, exactly ("0.001234")."""
    s = f"{Decimal(tokens).scaleb(-6):f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


async def focus_rows(
    db: Database,
    *,
    period: str | None = None,
    since: int | None = None,
    until: int | None = None,
    tenant: str | None = None,
    issuer: str = "tokenhub",
    page: int = 500,
) -> list[dict[str, str]]:
    """A FOCUS 1.0 cost dataset (plus PricingCurrency from FOCUS 1.2, and `x_` columns) from
    the ledger's transactions and postings, sorted. `period` selects the billing period a
    transaction was booked to (a later one than its date when its month was closed);
    `since`/`until` select transaction times.

    - **Usage**: one row per tenant, billing period, UTC day, model, provider, token kind
      (`input` is uncached input, as the price book has it; `cache_write` the prompt-cache
      writes, at the cache-write price), how it was paid (`x_PaidFrom`:
      package, points, priced = the price book via wallet or credit line, overrun, overage)
      and price. ConsumedQuantity is in Tokens, PricingQuantity in "1M Tokens" (the unit
      prices are per 1M). BilledCost is the money taken from the tenant's wallet, credit line
      or overrun; EffectiveCost adds the share of a prepaid package or point pack the tokens
      used up (PricingCategory "Committed", the lot as the commitment discount). ListCost
      prices the row's tokens at the public price book, ContractedCost at the price the
      settlement applied (the tenant's own price when it has one), both before the tenant's
      percentage discount (not recorded per event; it is part of the gap down to
      EffectiveCost) and in the billing currency at the settlement's FX rate.
    - **Usage refunds** repeat the refunded lines negated, on the original usage day;
      ChargeClass "Correction" when booked to a later period than the usage.
    - **Unused commitment**: a package or point pack that expired unused is a Usage row with
      BilledCost 0 and EffectiveCost the price not earned (CommitmentDiscountStatus
      "Unused"). A rollover carries it on to a new lot instead: no row.
    - **Purchase**: a plan bought, or an auto top-up block: BilledCost the price,
      EffectiveCost 0 (it covers later usage, above).
    - **Credit**: a redemption code (negative). **Adjustment**: an operator's adjustment and
      anything else that moves a tenant's money.
    - Wallet top-ups and payments are **not** rows: money received is not a cost, and adding
      it would count the usage it pays for twice.

    So per tenant and currency the BilledCost sum is exactly the sum of the postings on the
    tenant's wallet, receivable and overrun accounts over every transaction but top-ups and
    payments; and over a prepaid lot's life its EffectiveCost adds up to its price."""
    where = _Where()
    if period is not None:
        period_bounds(period)  # validates
        where.add("t.period = {}", period)
    if since is not None:
        where.add("t.ts_ms >= {}", since)
    if until is not None:
        where.add("t.ts_ms < {}", until)
    if tenant is not None:
        where.add("t.tenant = {}", tenant)
    look = _Lookups()
    acc: dict[tuple[Any, ...], _Acc] = {}
    last = ""
    while True:
        w = where.copy()
        if last:
            w.add("t.id > {}", last)
        sql = (
            "SELECT t.id, t.kind, t.tenant, t.ts_ms, t.period, t.ref, t.memo, t.details "
            f"FROM ledger_txns t{w.sql()} ORDER BY t.id LIMIT {int(page)}"
        )

        async def run(tx: Tx, sql: str = sql, args: list[Any] = w.args) -> str:
            rows = await tx.fetch(sql, *args)
            if not rows:
                return ""
            await _focus_page(tx, rows, look, acc, issuer)
            return str(rows[-1][0]) if len(rows) == page else ""

        last = await db.transaction(run)
        if not last:
            break
    out = [_focus_row(a) for a in acc.values()]
    out.sort(key=lambda r: tuple(r[c] for c in _FOCUS_ORDER))
    return out


_FOCUS_ORDER = (
    "BillingAccountId", "BillingCurrency", "BillingPeriodStart", "ChargePeriodStart",
    "ChargeCategory", "ChargeClass", "ServiceName", "PublisherName", "SkuId", "x_PaidFrom",
    "CommitmentDiscountId", "SkuPriceId", "x_FxRate", "ChargeDescription", "x_TransactionId",
)  # fmt: skip


async def _focus_page(
    tx: Tx, rows: list[Row], look: _Lookups, acc: dict[tuple[Any, ...], _Acc], issuer: str
) -> None:
    ids = [r[0] for r in rows]
    legs: dict[str, list[Row]] = defaultdict(list)
    for tid, account, unit, amount in await _fetch_in(
        tx,
        "SELECT txn_id, account, unit, amount FROM postings WHERE txn_id IN ({}) "
        "AND account LIKE 't:%' ORDER BY txn_id, leg",
        ids,
    ):
        legs[tid].append((account, unit, amount))
    details = {r[0]: json.loads(r[7]) for r in rows}
    # A refund is split like the usage it reverses, which may be in another page or period.
    originals: dict[str, tuple[int, str, dict[str, Any]]] = {
        r[0]: (r[3], r[4], details[r[0]]) for r in rows
    }
    want = {details[r[0]].get("reverses", "") for r in rows if r[1] == "refund"}
    for tid, ts, period, det in await _fetch_in(
        tx,
        "SELECT id, ts_ms, period, details FROM ledger_txns WHERE id IN ({})",
        sorted(want - originals.keys() - {""}),
    ):
        originals[tid] = (ts, period, json.loads(det))
    lot_ids = {r[5] for r in rows if r[1] in ("purchase", "expiry")}
    for _, _, det in originals.values():
        lot_ids.update(dr.get("lot", "") for dr in det.get("draws", []))
    await look.load(tx, lot_ids, {r[2] for r in rows})

    for tid, kind, tenant, ts, period, ref, memo, _ in rows:
        if kind in NOT_CHARGES:
            continue
        billed, deferred = _money_legs(legs.get(tid, []))
        start, end = period_bounds(period)
        base = {
            "BillingAccountId": tenant,
            "BillingAccountName": tenant,
            "BillingPeriodStart": iso_z(start),
            "BillingPeriodEnd": iso_z(end),
            "InvoiceIssuerName": issuer,
            "ProviderName": issuer,
        }
        d = details[tid]
        if kind in ("usage", "refund"):
            src, usage_ts, cls, sign = d, ts, "", 1
            if kind == "refund":
                sign = -1
                orig = originals.get(d.get("reverses", ""))
                src = orig[2] if orig else {}
                if orig is not None:
                    usage_ts = orig[0]
                    cls = "Correction" if period > orig[1] else ""
            lines = _usage_lines(src)
            for ln in lines:
                ln.tokens *= sign
                ln.points *= sign
            _settle_amounts(lines, billed, deferred)
            await _add_usage(tx, look, acc, lines, src, base, tenant, usage_ts, kind, cls, tid)
            continue
        for unit in sorted(set(billed) | set(deferred)):
            b = billed.get(unit, 0)
            e = b + deferred.get(unit, 0)
            if b or e:
                attrs = base | _one_off(kind, ts, ref, memo, d, look, b, issuer)
                attrs |= {"BillingCurrency": unit, "x_TransactionId": tid}
                acc[(tid, unit)] = _Acc(attrs, billed=b, effective=e, txns=1)


def _one_off(
    kind: str,
    ts: int,
    ref: str,
    memo: str,
    d: dict[str, Any],
    look: _Lookups,
    billed: int,
    issuer: str,
) -> dict[str, str]:
    """The attributes of a transaction that is a row of its own."""
    day = _day(ts)
    common = {
        "ChargePeriodStart": iso_z(day),
        "ChargePeriodEnd": iso_z(day + 86_400_000),
        "ChargeFrequency": "One-Time",
        "ChargeDescription": memo or kind,
        "PublisherName": issuer,
    }
    if kind in ("purchase", "expiry"):
        plan, lot_kind = look.lots.get(ref, (str(d.get("plan", "")), "package"))
        points = lot_kind == "points"
        commitment = {
            "CommitmentDiscountId": ref,
            "CommitmentDiscountName": plan,
            "CommitmentDiscountCategory": "Usage",
            "CommitmentDiscountType": "Points pack" if points else "Token package",
            "PricingCategory": "Committed",
            "ServiceCategory": _AI,
            "ServiceName": "Points packs" if points else "Token packages",
            "SkuId": f"plan/{plan}",
        }
        if kind == "purchase":
            price = decimal_str(billed)
            return (
                common
                | commitment
                | {
                    "ChargeCategory": "Purchase",
                    "PricingQuantity": "1",
                    "PricingUnit": "Plan",
                    "ListCost": price,
                    "ListUnitPrice": price,
                    "ContractedCost": price,
                    "ContractedUnitPrice": price,
                    "SkuPriceId": f"plan/{plan}",
                }
            )
        unused = int(d.get("unused", 0))
        return (
            common
            | commitment
            | {
                "ChargeCategory": "Usage",
                "ChargeFrequency": "Usage-Based",
                "CommitmentDiscountStatus": "Unused",
                "PricingQuantity": decimal_str(unused) if points else _qty_1m(unused),
                "PricingUnit": "Points" if points else "1M Tokens",
                "ListCost": "0",
                "ContractedCost": "0",
            }
        )
    credit = kind == "redeem"
    return common | {
        "ChargeCategory": "Credit" if credit else "Adjustment",
        "ServiceCategory": "Other",
        "ServiceName": "Credits" if credit else "Adjustments",
        "SkuId": kind,
        "ListCost": decimal_str(billed),
        "ContractedCost": decimal_str(billed),
    }


_PAID_TEXT = {
    "package": " from package {lot}",
    "points": " from points pack {lot}",
    "overrun": " (overrun: no contract covered it)",
    "overage": " (overage beyond package {lot})",
    "other": " (not itemised in the settlement record)",
}


async def _add_usage(
    tx: Tx,
    look: _Lookups,
    acc: dict[tuple[Any, ...], _Acc],
    lines: list[_Line],
    d: dict[str, Any],
    base: dict[str, str],
    tenant: str,
    usage_ts: int,
    kind: str,
    cls: str,
    tid: str,
) -> None:
    model = str(d.get("model", ""))
    publisher = str(d.get("provider", "")) or "unknown"
    price = d.get("price") or {}
    override = bool(price.get("tenant_override"))
    applied_row: Row | None = None
    if price.get("version") is not None:
        applied_row = await look.applied(tx, model, tenant if override else "", price["version"])
    list_row = await look.listed(tx, model, usage_ts) if override else applied_row
    day = _day(usage_ts)
    for ln in lines:
        cur = ln.money_cur or ln.earned_cur or look.currencies[tenant]
        applied = list_price = ln.per_1m
        if ln.kind in _KINDS and ln.paid_from != "overage":
            i = 1 + _KINDS.index(ln.kind)
            applied = (
                int(applied_row[i]) if applied_row and applied_row[0] == ln.price_cur else None
            )
            list_price = int(list_row[i]) if list_row and list_row[0] == ln.price_cur else None
        fx = ln.fx
        if ln.price_cur and ln.price_cur != cur:
            fx = fx or await look.rate(tx, ln.price_cur, cur, usage_ts)
            if fx is None:  # no rate: the row cannot be priced in the billing currency
                applied = list_price = None
        else:
            fx = None
        key = (tenant, cur, base["BillingPeriodStart"], day, kind, cls, model, publisher,
               ln.kind, ln.paid_from, ln.lot, ln.price_cur, ln.price_version, applied,
               list_price, fx)  # fmt: skip
        a = acc.get(key)
        if a is None:
            a = acc[key] = _Acc(
                _usage_attrs(base, ln, look, model, publisher, cur, day, kind, cls, override),
                list_per_1m=list_price,
                applied_per_1m=applied,
                fx=fx,
                usage=True,
            )
            a.attrs["ListUnitPrice"] = _unit_price(list_price, fx)
            a.attrs["ContractedUnitPrice"] = _unit_price(applied, fx)
            a.attrs["x_FxRate"] = str(fx) if fx is not None else ""
        a.billed += ln.billed
        a.effective += ln.effective
        a.tokens += ln.tokens
        a.points += ln.points
        if a.last_txn != tid:  # a transaction's lines are consecutive
            a.txns += 1
            a.last_txn = tid


def _usage_attrs(
    base: dict[str, str],
    ln: _Line,
    look: _Lookups,
    model: str,
    publisher: str,
    cur: str,
    day: int,
    kind: str,
    cls: str,
    override: bool,
) -> dict[str, str]:
    committed = ln.paid_from in ("package", "points")
    plan, lot_kind = look.lots.get(ln.lot, ("", "points" if ln.paid_from == "points" else ""))
    sku = f"{model}/{ln.kind or 'other'}"
    if ln.paid_from == "overage":
        sku_price = f"{sku}/overage/{ln.lot}"
    else:
        sku_price = f"{sku}/v{ln.price_version}" + ("/tenant" if override else "")
    what = f"{model} {_KIND_TEXT[ln.kind]} tokens" + _PAID_TEXT.get(ln.paid_from, "").format(
        lot=ln.lot
    )
    return base | {
        "BillingCurrency": cur,
        "ChargeCategory": "Usage",
        "ChargeClass": cls,
        "ChargeDescription": ("Refund: " if kind == "refund" else "") + what,
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodStart": iso_z(day),
        "ChargePeriodEnd": iso_z(day + 86_400_000),
        "CommitmentDiscountId": ln.lot if committed else "",
        "CommitmentDiscountName": plan if committed else "",
        "CommitmentDiscountCategory": "Usage" if committed else "",
        "CommitmentDiscountType": (
            ("Points pack" if lot_kind == "points" else "Token package") if committed else ""
        ),
        "CommitmentDiscountStatus": "Used" if committed else "",
        "ConsumedUnit": "Tokens",
        "PricingCategory": (
            "Committed" if committed else "Other" if ln.paid_from == "overage" else "Standard"
        ),
        "PricingCurrency": ln.price_cur,
        "PricingUnit": "1M Tokens",
        "PublisherName": publisher,
        "ServiceCategory": _AI,
        "ServiceName": model,
        "SkuId": sku,
        "SkuPriceId": sku_price,
        "x_TokenKind": ln.kind,
        "x_PaidFrom": ln.paid_from,
        "x_PriceVersion": ln.price_version,
    }


def _unit_price(per_1m: int | None, fx: Decimal | None) -> str:
    if per_1m is None:
        return ""
    return decimal_str(convert(per_1m, fx) if fx is not None else per_1m)


def _focus_row(a: _Acc) -> dict[str, str]:
    attrs = dict(a.attrs)
    if a.usage:
        attrs["ConsumedQuantity"] = str(a.tokens)
        attrs["PricingQuantity"] = _qty_1m(a.tokens)

        def cost(per_1m: int | None) -> str:
            if per_1m is None:
                return ""
            amount = rate(a.tokens, per_1m)
            return decimal_str(convert(amount, a.fx) if a.fx is not None else amount)

        attrs["ListCost"] = cost(a.list_per_1m)
        attrs["ContractedCost"] = cost(a.applied_per_1m)
        attrs["x_Points"] = decimal_str(a.points) if a.points else ""
    attrs["BilledCost"] = decimal_str(a.billed)
    attrs["EffectiveCost"] = decimal_str(a.effective)
    attrs["x_Transactions"] = str(a.txns)
    return {c: attrs.get(c, "") for c in FOCUS_COLUMNS}


__all__ = [
    "ACCEPTED_TYPES",
    "EVENT_LOG_FIELDS",
    "FOCUS_COLUMNS",
    "NOT_CHARGES",
    "BillingError",
    "BillingIOError",
    "IngestSummary",
    "LineResult",
    "ReconcileReport",
    "csv_cell",
    "focus_rows",
    "ingest",
    "iter_event_log",
    "parse_event",
    "parse_time",
    "reconcile",
    "request_id_for",
    "store_events",
    "time_window",
]
