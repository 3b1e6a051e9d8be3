"""What the admin API's handlers share: the route record, the app's keys, JSON bodies, money,
times, cursors, Idempotency-Key."""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import datetime as dt
import hashlib
import io
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import msgspec
from aiohttp import web

from tokenhub.db.database import Database, Tx, open_database
from tokenhub.gateway.errors import ApiError
from tokenhub.money import fmt
from tokenhub.store import sql
from tokenhub.store.base import AdminToken

T = TypeVar("T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Route(NamedTuple):
    """One admin API route; `scope` is the least an admin token needs (None: no token)."""

    method: str
    path: str
    scope: str | None
    handler: Handler


DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_IDEMPOTENCY_KEY = 255

_encode = msgspec.json.Encoder().encode


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=_encode(obj), content_type="application/json", headers=headers
    )


def money(nanos: int, currency: str) -> dict[str, str]:
    """{"amount": "12.34", "currency": "CNY"}: exact (every significant nano digit, never fewer
    decimals than the currency's minor unit), a string, never a float."""
    return {"amount": fmt(nanos, currency, exact=True).split()[0], "currency": currency}


async def read_json(request: web.Request, into: type[T]) -> T:
    """The request's JSON body as `into` (strict: unknown fields and wrong types are 400)."""
    if request.content_type != "application/json":
        raise ApiError.bad_request("send a JSON body with Content-Type: application/json")
    raw = await request.read()
    try:
        return msgspec.json.decode(raw, type=into, strict=True)
    except msgspec.ValidationError as e:
        raise ApiError.bad_request(f"invalid request body: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError.bad_request(f"malformed JSON: {e}") from None


# -- cursor pagination ------------------------------------------------------------------------


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError.bad_request(f"limit must be from 1 to {MAX_LIMIT}", param="limit")
    return int(raw)


def encode_cursor(position: list[Any]) -> str:
    """An opaque cursor for a keyset position (the last row's sort key)."""
    return base64.urlsafe_b64encode(_encode(position)).decode().rstrip("=")


def decode_cursor(request: web.Request, shape: tuple[type, ...]) -> list[Any] | None:
    """The `cursor` query parameter's position (types as `shape`), None when absent; 400 when
    it is not a cursor this API made."""
    raw = request.query.get("cursor")
    if raw is None:
        return None
    try:
        pos = msgspec.json.decode(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        pos = None
    ok = (
        isinstance(pos, list)
        and len(pos) == len(shape)
        and all(type(v) is t for v, t in zip(pos, shape, strict=True))
    )
    if not ok:
        raise ApiError.bad_request("invalid cursor: pass next_cursor as given", param="cursor")
    return list(pos)


def page(data: list[Any], rows: list[T], limit: int, position: Any) -> dict[str, Any]:
    """The list envelope: `rows` were fetched with limit + 1, so one more means more."""
    more = len(rows) > limit
    return {
        "object": "list",
        "data": data[:limit],
        "has_more": more,
        "next_cursor": encode_cursor(position(rows[limit - 1])) if more else None,
    }


# -- Idempotency-Key ----------------------------------------------------------------------------


class Idempotency:
    """A money-moving POST's Idempotency-Key (required). The handler calls `replay(tx)` first
    and `record(tx, ...)` last, in the transaction that moves the money: a replay of the same
    request returns the first response, another request under the same key gets 409, and a
    concurrent twin fails on the key's primary key (its transaction rolls back)."""

    def __init__(self, request: web.Request, actor: str, body: Any) -> None:
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            raise ApiError.bad_request(
                "this request moves money: send an Idempotency-Key header (any unique string "
                "up to 255 characters, e.g. a UUID)",
                param="Idempotency-Key",
            )
        if len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
            raise ApiError.bad_request(
                "Idempotency-Key must be 1-255 printable ASCII characters",
                param="Idempotency-Key",
            )
        self.key = key
        self.actor = actor
        # The request as decoded (key order and spacing do not matter), with its method and path.
        canonical = _encode([request.method, request.path, msgspec.to_builtins(body)])
        self.digest = hashlib.sha256(canonical).hexdigest()

    async def replay(self, tx: Tx) -> web.Response | None:
        prev = await sql.idempotent_response(tx, self.actor, self.key)
        if prev is None:
            return None
        if prev.request_digest != self.digest:
            raise ApiError(
                409,
                "this Idempotency-Key was used for another request; use a new key",
                code="idempotency_key_reused",
                param="Idempotency-Key",
            )
        return web.Response(
            status=prev.status,
            body=prev.response.encode(),
            content_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )

    async def record(self, tx: Tx, status: int, obj: Any) -> web.Response:
        body = _encode(obj)
        await sql.record_idempotent(tx, self.actor, self.key, self.digest, status, body.decode())
        return web.Response(status=status, body=body, content_type="application/json")


def time_param(request: web.Request, name: str) -> int | None:
    """Unix milliseconds, or an ISO 8601 date or datetime (UTC unless it has an offset)."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.lstrip("-").isdigit() and raw.isascii():
        if not -(2**63) <= int(raw) < 2**63:
            raise ApiError.bad_request(f"{name} is out of range", param=name)
        return int(raw)
    try:
        t = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError.bad_request(
            f"{name}: give Unix milliseconds or an ISO 8601 date or datetime", param=name
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


def csv_lines(rows: list[list[object]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


class DatabaseOpener:
    """Opens the database on first use (once, under a lock), closes it with the app."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._db: Database | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> Database:
        if self._db is None:
            async with self._lock:
                if self._db is None:
                    self._db = await open_database(self._url)
        return self._db

    async def close(self, app: web.Application) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None


DB = web.AppKey("admin_db", DatabaseOpener)
ACTOR = web.RequestKey("admin_actor", AdminToken)  # who authenticated


async def db(request: web.Request) -> Database:
    return await request.app[DB]()


def actor(request: web.Request) -> str:
    token: AdminToken = request[ACTOR]
    return token.name


async def money_moving(
    request: web.Request, idem: Idempotency, run: Callable[[Tx], Awaitable[web.Response]]
) -> web.Response:
    """Runs a money-moving POST's transaction (which replays, moves, audits and records)."""
    database = await db(request)
    try:
        return await database.transaction(run)
    except ApiError:
        raise
    except Exception:
        # A concurrent twin under the same key committed first (PostgreSQL: this one failed
        # on the key's primary key and rolled back): answer as a replay would.
        replayed = await database.read(idem.replay)
        if replayed is None:
            raise
        return replayed
