"""What the admin API tests share (tests/admin/conftest.py builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

from tokenhub.store import Store


@dataclass
class Admin:
    client: TestClient[Any, Any]
    store: Store
    db: str
    tokens: dict[str, str]  # scope -> secret (the token's name is the scope's, e.g. "ops-read")

    def auth(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}
