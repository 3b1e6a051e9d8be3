"""What the tenant API tests share (tests/tenant_api/conftest.py builds the world): the seeded
world, one real HTTP call, the seed itself."""

from __future__ import annotations

import datetime as dt
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from harness import Hub, wait_until

from tokenhub.billing.service import Billing
from tokenhub.db.database import open_database
from tokenhub.usage import UsageEvent

__all__ = ["DAY_MS", "Hub", "Reply", "World", "day_ms", "seed", "wait_until"]

DAY_MS = 86_400_000


@dataclass
class World:
    hub: Hub
    secrets: dict[str, str]  # tenant -> its key's secret
    key_ids: dict[str, str]  # tenant -> its key's id
    day0: dt.date  # the day of acme's first usage (UTC)
    lot_id: str = ""
    codes: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.hub.base

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[tenant]}"}

    def call(
        self,
        method: str,
        path: str,
        tenant: str | None = None,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        secret: str | None = None,
    ) -> Reply:
        """One real HTTP request to the gateway as `tenant` (or with `secret`)."""
        h = dict(headers or {})
        if secret is not None:
            h["Authorization"] = f"Bearer {secret}"
        elif tenant is not None:
            h |= self.auth(tenant)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return Reply(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, dict(e.headers), e.read())


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def day_ms(d: dt.date) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp() * 1000)


def _event(rid: str, ts: int, tenant: str, key: str, model: str, **kw: Any) -> UsageEvent:
    return UsageEvent(
        request_id=rid, ts_ms=ts, tenant=tenant, key_id=key, endpoint="chat.completions",
        model=model, deployment=f"healthy/{model}", provider="healthy", upstream_model=model,
        **kw,
    )  # fmt: skip


async def seed(w: World) -> None:
    db = await open_database(w.hub.database)
    try:
        b = Billing(db)
        await b.set_profile("acme", currency="CNY", credit_limit="50")
        await b.set_fx("CNY", "USD", "0.14", effective_ms=0)
        await b.set_price(
            "gpt-4o-mini", currency="CNY", input_per_1m="2", output_per_1m="8", effective_ms=0
        )
        await b.set_price(
            "qwen-plus", currency="CNY", input_per_1m="1", output_per_1m="1", effective_ms=0
        )
        await b.topup("acme", "100", "CNY")
        await b.create_plan(
            "qwen-1k", price="10", currency="CNY", tokens=1000, models=("qwen-plus",)
        )
        lot = await b.assign("acme", "qwen-1k", start_ms=day_ms(w.day0) - DAY_MS)
        w.lot_id = lot.id
        await b.set_profile("bravo", currency="USD")
        await b.topup("bravo", "5", "USD")
        await b.set_profile("charlie", currency="EUR")
        w.codes = await b.create_codes(1, "3", "USD")
        t0 = day_ms(w.day0) + 3_600_000
        events = [
            _event("req_t1", t0, "acme", w.key_ids["acme"], "gpt-4o-mini",
                   input_tokens=1_000_000, output_tokens=500_000),
            _event("req_t2", t0 + DAY_MS, "acme", w.key_ids["acme"], "qwen-plus",
                   input_tokens=100, cached_input_tokens=20, output_tokens=50),
            _event("req_t3", t0 + DAY_MS + 1000, "acme", w.key_ids["acme"], "qwen-plus",
                   status=429, error="rate_limit_exceeded"),
            _event("req_b1", t0, "bravo", w.key_ids["bravo"], "gpt-4o-mini",
                   input_tokens=7, output_tokens=3),
        ]  # fmt: skip
        w.hub.store.insert_events(events)
        # The hub's settler settles them too; an event settles once, whoever comes first.
        res = await b.settle(events)
        assert not res.failed, res.failed
    finally:
        await db.close()
