"""Typed application state keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tokenhub.gateway.service import Gateway
    from tokenhub.gateway.telemetry import Registry

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
METRICS: web.AppKey[Registry] = web.AppKey("metrics")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
# The client's dialect ("openai", "anthropic", "responses"), stored by the handler so that the
# error middleware renders errors in it (absent: "openai").
DIALECT: web.RequestKey[str] = web.RequestKey("dialect", str)
