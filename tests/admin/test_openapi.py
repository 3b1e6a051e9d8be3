"""docs/openapi.json (static, in the repo) against the admin app's /admin routes: the same set
of paths and methods, each operation's scope as the route's, and every $ref resolving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenhub.admin.app import build_admin_app
from tokenhub.admin.routes import ROUTES

SPEC = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text("utf-8"))
METHODS = {"get", "post", "put", "patch", "delete"}


def test_spec_paths_and_methods_are_the_apps_routes() -> None:
    app = build_admin_app(":memory:")
    routed = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None
        and r.method != "HEAD"
        and r.resource.canonical.startswith("/admin/")  # the console shares the listener
    }
    documented = {
        (m.upper(), path) for path, ops in SPEC["paths"].items() for m in ops if m in METHODS
    }
    assert routed == documented
    assert routed == {(r.method, r.path) for r in ROUTES}


def test_spec_scopes_are_the_routes_scopes() -> None:
    for r in ROUTES:
        op = SPEC["paths"][r.path][r.method.lower()]
        assert op["x-tokenhub-scope"] == r.scope, (r.method, r.path)
        assert (op.get("security") == []) == (r.scope is None)


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
