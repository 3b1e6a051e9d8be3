"""URL map: thin handlers that decode nothing themselves and call the gateway service."""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from tokenhub.gateway.errors import ApiError
from tokenhub.gateway.request import ANTHROPIC_MESSAGES, CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from tokenhub.gateway.state import GATEWAY, METRICS

_encode = msgspec.json.Encoder().encode


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy(request, COMPLETIONS)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy(request, EMBEDDINGS)


async def messages(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy(request, ANTHROPIC_MESSAGES)


async def count_tokens(request: web.Request) -> web.Response:
    return await request.app[GATEWAY].count_tokens(request)


async def responses(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy(request, RESPONSES)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    who = gw.authenticate(request)
    created = int(request.app[GATEWAY].started_at)
    data = [
        {"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by}
        for m in gw.allowed_models(who)
    ]
    return web.Response(
        body=_encode({"object": "list", "data": data}), content_type="application/json"
    )


async def retrieve_model(request: web.Request) -> web.Response:
    """OpenAI's model object, or 404 model_not_found for a model this key may not use."""
    gw = request.app[GATEWAY]
    who = gw.authenticate(request)
    model_id = request.match_info["model"]
    for m in gw.allowed_models(who):
        if m.id == model_id:
            body = {"id": m.id, "object": "model", "created": int(gw.started_at)}
            body["owned_by"] = m.owned_by
            return web.Response(body=_encode(body), content_type="application/json")
    raise ApiError.model_not_found(model_id)


async def healthz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body: dict[str, object] = {
        "status": "ok",
        "models": len(gw.models),
        "uptime_s": round(time.time() - gw.started_at, 1),
    }
    # Usage that cannot be persisted means requests are refused (503 journal_unavailable).
    if (why := gw.sink.unavailable) is not None:
        body |= {"status": "unavailable", "reason": why}
        return web.Response(status=503, body=_encode(body), content_type="application/json")
    return web.Response(body=_encode(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        text=await request.app[METRICS].scrape(),  # every worker's, under --workers N
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
