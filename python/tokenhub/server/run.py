"""`tokenhub serve`: wire the store, journal, sink and key table to the app, and run it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from tokenhub.config import Config, ConfigError, from_mapping, load_config

log = logging.getLogger("tokenhub.serve")

DEMO_DB = "tokenhub-demo.db"
DEMO_TENANT = "demo"


def demo_config(mock_port: int, database: str) -> Config:
    """Three models on the built-in mock upstream; gpt-4o-mini has two deployments (3:1)."""

    def price(cur: str, i: str, c: str, o: str) -> dict[str, Any]:
        return {
            "currency": cur,
            "input_per_1m": Decimal(i),
            "cached_input_per_1m": Decimal(c),
            "output_per_1m": Decimal(o),
        }

    base = f"http://127.0.0.1:{mock_port}/v1"
    data: dict[str, Any] = {
        "server": {"database": database},
        "providers": [
            {"name": "mock-a", "base_url": base},
            {"name": "mock-b", "base_url": base},
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
        ],
    }  # fmt: skip
    return from_mapping(data, "<demo>")


def _journal_dir(cfg: Config) -> str:
    from tokenhub.journal import default_journal_dir

    return cfg.server.journal_dir or default_journal_dir(cfg.server.database)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so several worker processes can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(cfg: Config, *, demo: bool = False, demo_key: str | None = None) -> None:
    from tokenhub import mock_upstream
    from tokenhub.journal import Journal
    from tokenhub.server.app import create_app
    from tokenhub.server.auth import KeyCache
    from tokenhub.server.state import METRICS
    from tokenhub.sink import UsageSink
    from tokenhub.store import open_store

    mock_runner: web.AppRunner | None = None
    if demo:
        mock_app = mock_upstream.build_app(mock_upstream.MockOptions())
        mock_runner = web.AppRunner(mock_app, access_log=None)
        await mock_runner.setup()
        mock_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        mock_sock.bind(("127.0.0.1", 0))
        mock_sock.listen(1024)
        mock_sock.setblocking(False)
        await web.SockSite(mock_runner, mock_sock).start()
        mock_port = mock_sock.getsockname()[1]
        demo_cfg = demo_config(mock_port, cfg.server.database)
        demo_cfg.server = cfg.server
        demo_cfg.billing = cfg.billing
        cfg = demo_cfg

    store = open_store(cfg.server.database)
    store.migrate()
    if demo:
        secret = _ensure_demo_key(store, demo_key)
    journal = Journal(_journal_dir(cfg))
    sink = UsageSink(store, journal)
    keys = KeyCache(store.key_digests, store.change_marker, refresh_s=cfg.server.key_refresh_s)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await sink.start()
        await keys.start()
        settler = await _start_settler(cfg, demo=demo)
        yield
        if settler is not None:
            await settler()
        await keys.close()
        # Bounded: whatever the database cannot take now stays in the journal for next start.
        await sink.close(timeout=30)

    app = create_app(cfg, keys=keys, sink=sink, extra_cleanup=[lifecycle])
    stats = app[METRICS].gauge("tokenhub_usage_sink", "Usage sink counters by name.")

    def collect_sink_stats() -> None:
        for name, value in sink.stats().items():
            stats.set(value, name=name)

    app[METRICS].on_collect(collect_sink_stats)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
    await runner.setup()
    sock = _reuse_port_socket(cfg.server.host, cfg.server.port)
    site = web.SockSite(runner, sock, backlog=4096)  # aiohttp's default 128 drops bursts
    await site.start()
    # Everything loaded so far (vocabularies' Python side, config, aiohttp internals) lives for
    # the whole run: move it out of the cyclic collector's sight so collections stay short.
    gc.collect()
    gc.freeze()
    # Requests make short-lived, acyclic garbage that reference counting frees; a youngest
    # generation of 700 objects (the default) runs the collector every few requests.
    gc.set_threshold(20_000, 20, 20)
    host, port = sock.getsockname()[:2]
    print(
        f"tokenhub: serving on http://{host}:{port}/v1 (database {cfg.server.database})", flush=True
    )
    if demo:
        _print_demo(host, port, secret)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("tokenhub: shutting down (flushing usage events)", file=sys.stderr, flush=True)
        await runner.cleanup()
        if mock_runner is not None:
            await mock_runner.cleanup()
        store.close()


async def _start_settler(cfg: Config, *, demo: bool) -> Callable[[], Awaitable[None]] | None:
    """Settles usage into the ledger in the background when `[billing] settle_interval_s` is
    set (the demo sets it, and prices its models); returns the function that stops it."""
    interval = cfg.billing.settle_interval_s
    if interval <= 0:
        return None
    from tokenhub.billing.db import open_database
    from tokenhub.billing.service import Billing
    from tokenhub.billing.settler import follow

    db = await open_database(cfg.server.database)
    billing = Billing(db)
    if demo:
        await _seed_demo_billing(billing, cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(
        follow(billing, interval_s=interval, stop=stop, batch=cfg.billing.settle_batch)
    )

    async def close() -> None:
        stop.set()
        await task
        with contextlib.suppress(Exception):
            # A last pass, so what was served before shutdown is billed.
            from tokenhub.billing.settler import settle_pending

            await settle_pending(billing, batch=cfg.billing.settle_batch)
        await db.close()

    return close


async def _seed_demo_billing(billing: Any, cfg: Config) -> None:
    """The demo tenant settles in USD with a 10 USD wallet; each demo model gets a price-book
    entry from its first deployment's price (once)."""
    prices = {p.model for p in await billing.prices()}
    for m in cfg.models:
        price = m.deployments[0].price
        if price is None or m.id in prices:
            continue
        await billing.set_price(
            m.id,
            currency=price.currency,
            input_per_1m=price.input_per_1m,
            cached_input_per_1m=price.cached_input_per_1m,
            output_per_1m=price.output_per_1m,
            effective_ms=0,
        )
    if not await billing.lots(DEMO_TENANT) and not prices:
        await billing.set_profile(DEMO_TENANT, currency="USD", draw_order=["wallet", "postpaid"])
        await billing.set_fx("CNY", "USD", "0.14", effective_ms=0)
        await billing.topup(DEMO_TENANT, "10.00", "USD")


def _ensure_demo_key(store: Any, demo_key: str | None) -> str:
    from tokenhub.store import AlreadyExists

    with contextlib.suppress(AlreadyExists):
        store.create_tenant(DEMO_TENANT)
    if demo_key:
        # A malformed key raises StoreError here, before anything is printed.
        with contextlib.suppress(AlreadyExists):
            store.create_key(DEMO_TENANT, secret=demo_key)
        return demo_key
    _, secret = store.create_key(DEMO_TENANT)
    return str(secret)


def _print_demo(host: str, port: int, key: str) -> None:
    url = f"http://{host}:{port}/v1"
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'
    lines = [
        "",
        f"Demo ready: tenant '{DEMO_TENANT}', models gpt-4o-mini, qwen-plus and deepseek-chat",
        "on the built-in mock upstream. Try:",
        "",
        f"  curl -s {url}/chat/completions \\",
        f'    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
        f"    -d '{body}'",
        "",
        f"  {sys.executable} - <<'EOF'",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{url}", api_key="{key}")',
        "r = client.chat.completions.create(",
        '    model="qwen-plus", messages=[{"role": "user", "content": "Hi"}])',
        "print(r.choices[0].message.content)",
        "print(r.usage)",
        "EOF",
        "",
        f"Usage events: tokenhub events export --db {DEMO_DB} --format jsonl",
        f"Billing:      tokenhub wallet show {DEMO_TENANT} --db {DEMO_DB}",
        f"              tokenhub billing statement {DEMO_TENANT} --period {_this_month()} "
        f"--db {DEMO_DB}",
        f"Metrics:      curl -s http://{host}:{port}/metrics",
        "Stop:         Ctrl-C",
    ]
    print("\n".join(lines), flush=True)


def _this_month() -> str:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    return f"{now.year:04d}-{now.month:02d}"


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenhub.cli import CliError

    if args.demo:
        cfg = from_mapping(
            {"server": {"database": args.db or DEMO_DB}, "billing": {"settle_interval_s": 1.0}},
            "<demo>",
        )
    elif not args.config:
        raise CliError("give --config FILE (or --demo for the built-in demo)")
    else:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise CliError(str(e)) from None
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.db and not args.demo:
        cfg.server.database = args.db
    logging.basicConfig(
        level=os.environ.get("TOKENHUB_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as r:
            r.run(serve(cfg, demo=args.demo, demo_key=args.demo_key))
    except OSError as e:
        where = f"{cfg.server.host}:{cfg.server.port}"
        raise CliError(f"cannot listen on {where}: {e.strerror or e}") from None
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway",
        description="Run the gateway: an OpenAI-compatible API in front of the providers and "
        "models of the config file, metering every request into the database. Tenants and "
        "keys are managed with 'tokenhub tenants' and 'tokenhub keys'.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config: server, providers, models")
    p.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default from config: 8080)")
    p.add_argument("--db", metavar="URL_OR_PATH", help="database (overrides server.database)")
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"run the demo: built-in mock upstream, three models, SQLite {DEMO_DB} here, a demo "
        "tenant and key, and a printed curl command",
    )
    p.add_argument("--demo-key", metavar="KEY", help="with --demo: use this API key")
    p.set_defaults(func=cmd_serve)
