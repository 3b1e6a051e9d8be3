"""Screenshots of the console's main pages for the README (docs/screenshots/*.png, 1280x800),
taken from a real `serve --demo` after real traffic through the gateway, with 13 days of
history before today (usage events for the same tenants and keys, stored and settled through
billing by `tokenhub events ingest --settle`, so that the charts have days to show). Written
only when TOKENHUB_SCREENSHOTS=1, so that test runs (CI) never rewrite tracked files:

    TOKENHUB_SCREENSHOTS=1 .venv/bin/pytest -q tests/browser/test_screenshots.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from browser_kit import SECRET, Demo, chat, sign_in, submit, unsettled, wait_until

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PROMPTS = [
    ("gpt-4o-mini", "Hello! What's the weather like on Mars?"),
    ("qwen-plus", "用一句话介绍一下杭州。"),
    ("deepseek-chat", "Write a Python function that merges two sorted lists."),
    ("auto", "Prove that the square root of 2 is irrational."),
    ("auto", "Thanks!"),
]

pytestmark = pytest.mark.skipif(
    os.environ.get("TOKENHUB_SCREENSHOTS") != "1",
    reason="writes docs/screenshots/: set TOKENHUB_SCREENSHOTS=1",
)


def shot(page: Any, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=False)


def traffic(demo: Demo, key: str, rounds: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=demo.api, api_key=key, max_retries=0, timeout=30)
    try:
        for i in range(rounds):
            model, text = PROMPTS[i % len(PROMPTS)]
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"{text} ({i})"}]
            )
    finally:
        client.close()


DAY_MS = 86_400_000
# (model, deployments, share): the demo's models on its mock upstreams
MIX = [
    ("gpt-4o-mini", ("mock-a/gpt-4o-mini", "mock-b/gpt-4o-mini"), 5),
    ("qwen-plus", ("mock-a/qwen-plus",), 3),
    ("deepseek-chat", ("mock-b/deepseek-chat",), 2),
]


def history(demo: Demo, tmp: Path, days: int = 13) -> None:
    """`days` days of usage before today for every tenant's keys, ingested and settled."""
    with contextlib.closing(sqlite3.connect(f"file:{demo.db}?mode=ro", uri=True)) as conn:
        keys = conn.execute(
            "SELECT t.name, k.id FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
            "WHERE k.revoked_ms IS NULL ORDER BY k.id"
        ).fetchall()
    rng = random.Random(14)
    today = time.time_ns() // 1_000_000 // DAY_MS * DAY_MS
    lines = []
    for d in range(days, 0, -1):
        for tenant, key in keys:
            for _ in range(rng.randrange(10, 40) + 4 * (days - d)):
                model, deployments, _w = rng.choices(MIX, [w for *_, w in MIX])[0]
                deployment = rng.choice(deployments)
                ok = rng.random() > 0.04
                inp = rng.randrange(200, 6000)
                data = {
                    "model": model, "deployment": deployment,
                    "provider": deployment.split("/")[0], "upstream_model": model,
                    "key_id": key, "input_tokens": inp,
                    "cached_input_tokens": inp // 3 if rng.random() < 0.3 else 0,
                    "output_tokens": rng.randrange(50, 900) if ok else 0,
                    "status": 200 if ok else 502, "error": "" if ok else "upstream_error",
                    "latency_ms": round(rng.uniform(300, 4000), 1),
                }  # fmt: skip
                ts = today - d * DAY_MS + rng.randrange(DAY_MS)
                lines.append({
                    "specversion": "1.0", "type": "tokenhub.usage.v1", "source": "screenshots",
                    "id": str(uuid.UUID(int=rng.getrandbits(128))), "subject": tenant,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts / 1000)),
                    "data": data,
                })  # fmt: skip
    path = tmp / "history.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    demo.cli("events", "ingest", str(path), "--settle")


def provider_csv(demo: Demo, tmp: Path, provider: str) -> Path:
    """A provider's usage file for this month as the provider would send it: its requests'
    counts, with one request it counted differently, one tokenhub never saw, one missing."""
    month = time.strftime("%Y-%m", time.gmtime())
    since = f"{month}-01"
    rows = [
        e
        for e in map(json.loads, demo.cli("events", "export", "--format", "jsonl",
                                          "--since", since).stdout.splitlines())
        if e["provider"] == provider and e["status"] == 200
    ]  # fmt: skip
    rows[0]["output_tokens"] += 17  # counted differently
    del rows[1]  # the provider's file lacks it
    lines = ["request_id,model,input_tokens,cached_input_tokens,output_tokens"]
    lines += [
        f"{e['request_id']},{e['model']},{e['input_tokens']},{e['cached_input_tokens']},"
        f"{e['output_tokens']}"
        for e in rows
    ]
    lines.append("req_0123456789abcdef0123456789abcdef,gpt-4o-mini,1200,0,300")  # unknown here
    path = tmp / f"{provider}-{month}.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_screenshots(demo: Demo, new_context: Any, tmp_path: Path) -> None:
    ctx = new_context()
    page = ctx.new_page()
    sign_in(page, demo, *demo.operator)

    # A token package, and two more tenants with keys and money (acme-labs buys the package),
    # so the pages have more than one row.
    page.goto(demo.url("/console/billing/plans"))
    submit(
        page,
        "/console/billing/plans",
        {"name": "starter-2m", "price": "4.00", "currency": "USD", "quantity": "2000000"},
    )
    keys = {"demo": demo.key}
    for name in ("acme-labs", "lotus-ai"):
        page.goto(demo.url("/console/tenants/new"))
        submit(page, "/console/tenants/new", {"name": name, "currency": "USD"})
        tenant_path = page.url[len(demo.base) :]
        submit(page, f"{tenant_path}/topup", {"amount": "50.00", "currency": "USD"})
        if name == "acme-labs":
            submit(page, f"{tenant_path}/plan", {"plan": "starter-2m"})
        page.goto(demo.url("/console/keys"))
        submit(page, "/console/keys", {"tenant": name})
        keys[name] = SECRET.findall(page.content())[0]
    history(demo, tmp_path)
    for i, key in enumerate(keys.values()):
        traffic(demo, key, 12 + 8 * i)
    chat(demo, demo.key, "and one more")
    wait_until("the traffic to settle", lambda: unsettled(demo) == 0, 30)

    page.goto(demo.console)
    shot(page, "overview")
    page.goto(demo.url("/console/usage?range=7d&period=day&group=model"))
    page.locator("#usage-window").evaluate("e => e.scrollIntoView()")  # the chart, the table
    shot(page, "usage-explorer")
    page.goto(demo.url("/console/tenants"))
    page.locator("a", has_text="acme-labs").first.click()
    page.wait_for_load_state()
    shot(page, "tenant-detail")
    page.goto(demo.url("/console/keys"))
    submit(page, "/console/keys", {"tenant": "acme-labs"})
    shot(page, "key-secret-once")
    month = time.strftime("%Y-%m", time.gmtime())
    page.goto(demo.url(f"/console/billing/statements?tenant=acme-labs&period={month}"))
    shot(page, "billing-statements")
    page.goto(demo.url("/console/billing/reconcile"))
    page.locator("#reconcile-form input[name=file]").set_input_files(
        str(provider_csv(demo, tmp_path, "mock-a"))
    )
    submit(page, "/console/billing/reconcile", {"provider": "mock-a", "period": month})
    shot(page, "billing-reconcile")
    page.goto(demo.url("/console/routing"))
    shot(page, "routing")
    with page.expect_navigation():
        page.locator("#lang-form button[value='zh-CN']").click()
    page.goto(demo.url("/console/usage?range=7d&period=day&group=tenant"))
    page.locator("#usage-window").evaluate("e => e.scrollIntoView()")
    shot(page, "usage-explorer-zh-CN")
    with page.expect_navigation():
        page.locator("#lang-form button[value='en']").click()

    tenant = new_context().new_page()
    sign_in(tenant, demo, *demo.tenant)
    submit(
        tenant,
        "/console/my/alert",
        {"amount": "5.00", "webhook_url": "https://hooks.example.com/tokenhub"},
    )
    tenant.reload()  # the signing secret was shown once; the card without it
    shot(tenant, "tenant-balance")
    tenant.goto(demo.url("/console/my/usage"))
    shot(tenant, "tenant-usage")
    tenant.goto(demo.url("/console/my/requests"))
    shot(tenant, "tenant-requests")
