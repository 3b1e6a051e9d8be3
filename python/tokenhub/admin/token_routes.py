"""The admin API's own tokens (`tokenhub admin-tokens create|list|revoke`), admin scope only: a
token can make tokens of any scope, an admin one's equal at most, so nothing is escalated that
the caller does not hold already. The secret is in the creating response only; listings and
the audit log keep the record (name, prefix, scope), never the secret or its digest.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from tokenhub.admin.web import Route, actor, db, json_response, read_json
from tokenhub.db.database import Tx
from tokenhub.store import sql
from tokenhub.store.base import AdminToken

V1 = "/admin/v1"


def _token_json(t: AdminToken) -> dict[str, Any]:
    return {"object": "admin_token", **msgspec.structs.asdict(t)}


async def list_admin_tokens(request: web.Request) -> web.Response:
    rows = await (await db(request)).read(sql.admin_tokens_in)
    data = [_token_json(t) for t in rows]
    return json_response({"object": "list", "data": data, "has_more": False, "next_cursor": None})


class TokenCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str  # 1-64 characters from A-Z a-z 0-9 . _ - (the audit log's actor)
    scope: str  # read | billing | admin


async def create_admin_token(request: web.Request) -> web.Response:
    body = await read_json(request, TokenCreate)
    who = actor(request)

    async def run(tx: Tx) -> tuple[AdminToken, str]:
        token, secret = await sql.create_admin_token_in(tx, body.name, body.scope)
        await sql.add_admin_audit(tx, who, "admin_token.create", token.id, None, token)
        return token, secret

    token, secret = await (await db(request)).transaction(run)
    return json_response({**_token_json(token), "secret": secret}, status=201)


async def revoke_admin_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    who = actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        token = await sql.revoke_admin_token_in(tx, token_id)
        before = msgspec.structs.replace(token, revoked_ms=None)
        await sql.add_admin_audit(tx, who, "admin_token.revoke", token.id, before, token)
        return _token_json(token)

    return json_response(await (await db(request)).transaction(run))


ROUTES: tuple[Route, ...] = (
    Route("GET", f"{V1}/admin-tokens", "admin", list_admin_tokens),
    Route("POST", f"{V1}/admin-tokens", "admin", create_admin_token),
    Route("POST", f"{V1}/admin-tokens/{{id}}/revoke", "admin", revoke_admin_token),
)
