"""docs/openapi-tenant.json (static, in the repo) against the tenant API's routes on the
gateway app: the same set of paths and methods, and every $ref resolving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from tokenhub.tenant.routes import ROUTES, setup_tenant_routes

SPEC = json.loads((Path(__file__).parents[2] / "docs" / "openapi-tenant.json").read_text("utf-8"))
METHODS = {"get", "post", "put", "patch", "delete"}


def test_spec_paths_and_methods_are_the_routes() -> None:
    app = web.Application()
    setup_tenant_routes(app, ":memory:")
    routed = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {
        (m.upper(), path) for path, ops in SPEC["paths"].items() for m in ops if m in METHODS
    }
    assert routed == documented
    assert routed == {(m, p) for m, p, _ in ROUTES}


def test_the_gateway_serves_them(tmp_path: Path) -> None:
    """The gateway app as serve builds it (runtime.resources.build_app) holds every tenant
    route (and OpenAI's own beside them)."""
    from tokenhub.config import from_mapping
    from tokenhub.runtime.journal import Journal
    from tokenhub.runtime.resources import build_app
    from tokenhub.runtime.shared import SharedState
    from tokenhub.store import open_store

    cfg = from_mapping({"server": {"database": str(tmp_path / "t.db")}, "models": []})
    store = open_store(cfg.server.database)
    store.migrate()
    try:
        app = build_app(cfg, SharedState(), store=store, journal=Journal(tmp_path / "journal"))
        routed = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    finally:
        store.close()
    assert {(m, p) for m, p, _ in ROUTES} <= routed
    assert ("POST", "/v1/chat/completions") in routed


def test_every_ref_resolves() -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [x for v in node.values() for x in refs(v)]
        if isinstance(node, list):
            return [x for v in node for x in refs(v)]
        return []

    found = refs(SPEC)
    assert found
    for ref in found:
        node = SPEC
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
