"""`tokenhub serve --demo`: the built-in mock upstream, its models and prices, the demo
tenant, key and wallet, and the commands printed to try it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from tokenhub.config import Config, from_mapping

DEMO_DB = "tokenhub-demo.db"
DEMO_TENANT = "demo"
# The demo's API key, when it is not to be a new random one: never on the command line, where
# any local user reads it (`ps`), but in this variable or a file (`--demo-key-file`).
DEMO_KEY_ENV = "TOKENHUB_DEMO_KEY"
# The demo's console password (both logins), likewise never on the command line: this variable
# or `--demo-password-file`; else a new random one per login at every start.
DEMO_PASSWORD_ENV = "TOKENHUB_DEMO_PASSWORD"
CONSOLE_OPERATOR = "admin"  # the demo's operator login (role admin)
CONSOLE_TENANT_USER = "demo"  # the demo tenant's own login


@dataclass
class ConsoleDemo:
    """The demo's web console logins. `tokenhub serve --demo` (tokenhub.cli.serve) sets
    `listen` (the admin listener, "" for none) and `password` (given, or None for random ones)
    before serving; `ensure_demo_key` creates or resets the logins and keeps their passwords
    here, in the process that then calls `print_demo` (the single process, or the workers'
    supervisor), which prints them."""

    listen: str = ""
    password: str | None = None
    logins: dict[str, str] = field(default_factory=dict)  # user -> password


CONSOLE = ConsoleDemo()


def configure_console(listen: str, password: str | None) -> None:
    CONSOLE.listen = listen
    CONSOLE.password = password
    CONSOLE.logins.clear()


def demo_config(mock_port: int, database: str) -> Config:
    """Four models on the built-in mock upstream (gpt-4o-mini has two deployments, 3:1; the
    Claude model is served over the mock's native Messages API, `kind = "anthropic"`, with a
    cache-write price), and `auto`, which picks one of two of them by the prompt's
    complexity."""

    def price(cur: str, i: str, c: str, o: str, w: str | None = None) -> dict[str, Any]:
        p = {
            "currency": cur,
            "input_per_1m": Decimal(i),
            "cached_input_per_1m": Decimal(c),
            "output_per_1m": Decimal(o),
        }
        if w is not None:
            p["cache_write_per_1m"] = Decimal(w)
        return p

    base = f"http://127.0.0.1:{mock_port}/v1"
    data: dict[str, Any] = {
        "server": {"database": database},
        "providers": [
            {"name": "mock-a", "base_url": base},
            {"name": "mock-b", "base_url": base},
            {"name": "mock-claude", "base_url": base, "kind": "anthropic"},
        ],
        "models": [
            {
                "id": "gpt-4o-mini",
                "deployments": [
                    {"provider": "mock-a", "upstream_model": "gpt-4o-mini", "weight": 3,
                     "vocab": "cl100k_base", "price": price("USD", "0.15", "0.075", "0.60")},
                    {"provider": "mock-b", "upstream_model": "gpt-4o-mini", "weight": 1,
                     "vocab": "cl100k_base", "price": price("USD", "0.15", "0.075", "0.60")},
                ],
            },
            {
                "id": "qwen-plus",
                "deployments": [
                    {"provider": "mock-a", "upstream_model": "qwen-plus", "vocab": "qwen",
                     "price": price("CNY", "0.8", "0.16", "2")},
                ],
            },
            {
                "id": "deepseek-chat",
                "deployments": [
                    {"provider": "mock-b", "upstream_model": "deepseek-chat",
                     "vocab": "deepseek-v4", "price": price("CNY", "2", "0.5", "8")},
                ],
            },
            {
                "id": "claude-sonnet-4-5",
                "deployments": [
                    {"provider": "mock-claude", "upstream_model": "claude-sonnet-4-5",
                     "vocab": "cl100k_base", "price": price("USD", "3", "0.30", "15", "3.75")},
                ],
            },
            # Routes by the prompt's complexity: small talk to gpt-4o-mini, code, math and
            # long prompts to deepseek-chat.
            {"id": "auto", "tiers": {"cheap": "gpt-4o-mini", "strong": "deepseek-chat"}},
        ],
    }  # fmt: skip
    return from_mapping(data, "<demo>")


async def seed_demo_billing(billing: Any, cfg: Config) -> None:
    """The demo tenant settles in USD with a 10 USD wallet; each demo model gets a price-book
    entry from its first deployment's price (once)."""
    prices = {p.model for p in await billing.prices()}
    for m in cfg.models:
        price = m.deployments[0].price if m.deployments else None  # a tiered model: none
        if price is None or m.id in prices:
            continue
        await billing.set_price(
            m.id,
            currency=price.currency,
            input_per_1m=price.input_per_1m,
            cached_input_per_1m=price.cached_input_per_1m,
            cache_write_per_1m=price.cache_write_per_1m,  # None: the input price
            output_per_1m=price.output_per_1m,
            effective_ms=0,
        )
    if not await billing.lots(DEMO_TENANT) and not prices:
        await billing.set_profile(DEMO_TENANT, currency="USD", draw_order=["wallet", "postpaid"])
        await billing.set_fx("CNY", "USD", "0.14", effective_ms=0)
        await billing.topup(DEMO_TENANT, "10.00", "USD")


def ensure_demo_key(store: Any, demo_key: str | None) -> str:
    """The demo tenant and its key (the secret returned), and, when the console is on
    (CONSOLE.listen), its logins: created, or reset to a new password and enabled."""
    from tokenhub.store import AlreadyExists

    with contextlib.suppress(AlreadyExists):
        store.create_tenant(DEMO_TENANT)
    if CONSOLE.listen:
        ensure_console_logins(store)
    if demo_key:
        # A malformed key raises StoreError here, before anything is printed.
        with contextlib.suppress(AlreadyExists):
            store.create_key(DEMO_TENANT, secret=demo_key)
        return demo_key
    _, secret = store.create_key(DEMO_TENANT)
    return str(secret)


def ensure_console_logins(store: Any) -> dict[str, str]:
    """The operator login `admin` (role admin) and the demo tenant's login `demo`, each with
    CONSOLE.password or a new random one; an existing one gets the new password, is enabled,
    and its sessions end."""
    from tokenhub.console.passwords import hash_password
    from tokenhub.store import console as cstore
    from tokenhub.store.base import NotFound

    logins = {}
    for name, role, tenant in (
        (CONSOLE_OPERATOR, "admin", None),
        (CONSOLE_TENANT_USER, "tenant", DEMO_TENANT),
    ):
        password = CONSOLE.password or secrets.token_urlsafe(12)
        pw_hash = hash_password(password)

        async def put(tx: Any, name: str = name, role: str = role, tenant: str | None = tenant,
                      pw_hash: str = pw_hash) -> None:  # fmt: skip
            try:
                await cstore.user_in(tx, name)
            except NotFound:
                await cstore.create_user_in(tx, name, pw_hash, role, tenant)
            else:
                await cstore.set_password_in(tx, name, pw_hash, enable=True)

        store._write(put)
        logins[name] = password
    CONSOLE.logins = logins
    return logins


def print_demo(host: str, port: int, key: str, database: str) -> None:
    """How to call the demo: commands that work as printed, pasted into another shell (the
    venv's tokenhub by its path, the database in TOKENHUB_DB)."""
    url = f"http://{host}:{port}/v1"
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'
    exe, where = _tokenhub_command()
    lines = [
        "",
        f"Demo ready: tenant '{DEMO_TENANT}', models gpt-4o-mini, qwen-plus, deepseek-chat and",
        "claude-sonnet-4-5 (over the Messages API) on the built-in mock upstream, and auto",
        "(picks gpt-4o-mini or deepseek-chat by the prompt's complexity). Try:",
        "",
        f"  curl -s {url}/chat/completions \\",
        f'    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
        f"    -d '{body}'",
        "",
        f"  {shlex.quote(sys.executable)} - <<'EOF'",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{url}", api_key="{key}")',
        "r = client.chat.completions.create(",
        '    model="qwen-plus", messages=[{"role": "user", "content": "Hi"}])',
        "print(r.choices[0].message.content)",
        "print(r.usage)",
        "EOF",
        "",
        "Anthropic's Messages API (any model above; Claude Code: ANTHROPIC_BASE_URL and",
        "ANTHROPIC_AUTH_TOKEN as below), and OpenAI's Responses API:",
        "",
        f'  curl -s http://{host}:{port}/v1/messages -H "x-api-key: {key}" \\',
        '    -H "anthropic-version: 2023-06-01" -H "Content-Type: application/json" \\',
        '    -d \'{"model": "claude-sonnet-4-5", "max_tokens": 64, '
        '"messages": [{"role": "user", "content": "Hi"}]}\'',
        f"  ANTHROPIC_BASE_URL=http://{host}:{port} ANTHROPIC_AUTH_TOKEN={key} claude",
        f'  curl -s {url}/responses -H "Authorization: Bearer {key}" \\',
        '    -H "Content-Type: application/json" \\',
        '    -d \'{"model": "gpt-4o-mini", "input": "Hi"}\'',
        "",
        *_console_lines(),
        f"Keys, usage events and billing ({where}):",
        "",
        f"  export TOKENHUB_DB={_shell_database(database)}",
        f"  {exe} keys list",
        f"  {exe} events export --format jsonl | head -3",
        f"  {exe} wallet show {DEMO_TENANT}",
        f"  {exe} billing statement {DEMO_TENANT} --period {_this_month()}",
        "",
        f"Metrics:      curl -s http://{host}:{port}/metrics",
        "Stop:         Ctrl-C",
    ]
    print("\n".join(lines), flush=True)


def _console_lines() -> list[str]:
    if not CONSOLE.listen or not CONSOLE.logins:
        return []
    op, tenant = CONSOLE.logins[CONSOLE_OPERATOR], CONSOLE.logins[CONSOLE_TENANT_USER]
    return [
        f"console: http://{CONSOLE.listen}/console/  operator login: {CONSOLE_OPERATOR} / {op}  "
        f"tenant login: {CONSOLE_TENANT_USER} / {tenant}",
        "",
    ]


def _tokenhub_command() -> tuple[str, str]:
    """The `tokenhub` command as a plain shell finds it, and where it works: the bare name
    when PATH has this one outside a virtual environment (make puts .venv/bin on its own
    PATH only), else the script beside this Python (relative to the working directory when
    under it), else `python -m tokenhub`."""
    script = Path(sys.executable).with_name("tokenhub")
    in_venv = sys.prefix != sys.base_prefix
    found = shutil.which("tokenhub")
    if not in_venv and found and script.exists() and Path(found).samefile(script):
        return "tokenhub", "in any shell"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m tokenhub", "in any shell"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd()))), "in a shell in this directory"
    except ValueError:
        return shlex.quote(str(script)), "in any shell"


def _shell_database(database: str) -> str:
    """The demo's database for TOKENHUB_DB: a path made absolute; a URL with a password is not
    printed (stdout is often a log)."""
    if "://" not in database:
        return shlex.quote(os.path.abspath(database))
    from urllib.parse import urlsplit

    if urlsplit(database).password:
        return "'<the --db URL>'"
    return shlex.quote(database)


def _this_month() -> str:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    return f"{now.year:04d}-{now.month:02d}"


async def start_demo_upstream(cfg: Config) -> tuple[web.AppRunner, Config]:
    """The demo's mock upstream on a port of its own, and the demo's config pointing at it
    (with `cfg`'s [server], [billing] and [admin]). Each worker runs its own: simpler than
    sharing one across processes, and the mock's state (its ledger) is not part of the demo."""
    from tokenhub import mock

    runner = web.AppRunner(mock.build_app(mock.MockOptions()), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    await web.SockSite(runner, sock).start()
    demo_cfg = demo_config(sock.getsockname()[1], cfg.server.database)
    demo_cfg.server = cfg.server
    demo_cfg.billing = cfg.billing
    demo_cfg.admin = cfg.admin
    return runner, demo_cfg
