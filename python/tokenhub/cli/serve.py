"""`tokenhub serve`: the command line of the gateway's runtime (tokenhub.runtime)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tokenhub.cli import EXIT_REFUSED, PROG, CliError, Refused
from tokenhub.config import Config, ConfigError, from_mapping, load_config
from tokenhub.runtime.cluster import HostIdError, host_id
from tokenhub.runtime.demo import DEMO_DB, DEMO_KEY_ENV, DEMO_PASSWORD_ENV, configure_console
from tokenhub.runtime.resources import WORKER_HEADER
from tokenhub.runtime.supervisor import CRASH_WINDOW_S, MAX_CRASHES, MAX_WORKERS


def _demo_key(args: argparse.Namespace) -> str | None:
    """The demo's key from --demo-key-file or TOKENHUB_DEMO_KEY (None: a new random one)."""
    if args.demo_key is not None:
        raise Refused(
            f"--demo-key puts the key in the process list; set {DEMO_KEY_ENV} or use "
            "--demo-key-file FILE"
        )
    if args.demo_key_file:
        try:
            with open(args.demo_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise CliError(f"cannot read --demo-key-file: {why}") from None
        if not key:
            raise Refused(f"--demo-key-file {args.demo_key_file!r} holds no key")
        return key
    return os.environ.get(DEMO_KEY_ENV) or None


def _demo_password(args: argparse.Namespace) -> str | None:
    """The demo console's password from --demo-password-file or TOKENHUB_DEMO_PASSWORD (None:
    a new random one per login)."""
    from tokenhub.console.passwords import check_password

    password: str | None
    if args.demo_password_file:
        try:
            with open(args.demo_password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise CliError(f"cannot read --demo-password-file: {why}") from None
    else:
        password = os.environ.get(DEMO_PASSWORD_ENV) or None
    if password is not None:
        try:
            check_password(password)
        except ValueError as e:
            raise Refused(f"the demo console password: {e}") from None
    return password


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenhub.gateway.protocol import raise_fd_limit
    from tokenhub.runtime import ServeError
    from tokenhub.runtime.journal import JournalError
    from tokenhub.runtime.serve import run_loop, serve
    from tokenhub.runtime.shared import before_fork
    from tokenhub.runtime.supervisor import serve_workers
    from tokenhub.store import StoreError

    workers: int = args.workers
    if not 1 <= workers <= MAX_WORKERS:
        print(
            f"{PROG}: error: --workers must be between 1 and {MAX_WORKERS} (got {workers})",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if args.demo:
        cfg = from_mapping(
            {
                # The admin commands' rule too: --db, else $TOKENHUB_DB, else the demo's file.
                "server": {"database": args.db or os.environ.get("TOKENHUB_DB") or DEMO_DB},
                "billing": {"settle_interval_s": 1.0, "admission": True},
            },
            "<demo>",
        )
    elif not args.config:
        raise Refused("give --config FILE (or --demo for the built-in demo)")
    else:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise Refused(str(e)) from None
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.db and not args.demo:
        cfg.server.database = args.db
    if args.admin_listen is not None:
        from tokenhub.config import split_listen

        if args.admin_listen:
            try:
                split_listen(args.admin_listen)
            except ValueError as e:
                raise Refused(f"--admin-listen: {e}") from None
        cfg.admin.listen = args.admin_listen
    if args.demo:
        configure_console(cfg.admin.listen, _demo_password(args))
    if args.host_id is not None:
        cfg.server.host_id = args.host_id
    if args.redis is not None:
        if args.redis and not args.redis.startswith(("redis://", "rediss://", "unix://")):
            raise Refused("--redis must be a redis://, rediss:// or unix:// URL")
        cfg.cluster.redis_url = args.redis
    try:
        host_id(cfg)
    except HostIdError as e:
        raise Refused(str(e)) from None
    demo_key = _demo_key(args) if args.demo else None
    if not args.demo:  # the demo seeds its own prices (and the wallet that goes with them)
        _apply_config_prices(cfg)
    logging.basicConfig(
        level=os.environ.get("TOKENHUB_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Each client connection is a descriptor: the default soft limit (often 1024) would make
    # a few hundred idle clients deny service. Before any fork: workers inherit it.
    raise_fd_limit()
    try:
        if workers > 1:
            return serve_workers(cfg, workers, demo=args.demo, demo_key=demo_key)
        shared = before_fork(cfg)
        try:
            run_loop(serve(cfg, demo=args.demo, demo_key=demo_key, shared=shared))
        except OSError as e:
            where = f"{cfg.server.host}:{cfg.server.port}"
            raise CliError(f"cannot listen on {where}: {e.strerror or e}") from None
        finally:
            shared.close()
    except (StoreError, JournalError, ServeError) as e:
        raise CliError(str(e)) from None
    return 0


def _apply_config_prices(cfg: Config) -> None:
    """The config's prices bill without a `prices import`: a model's first price is in force
    from the epoch, a changed one from now (tokenhub.cli.billing.apply_config_prices); each
    price written is said on stderr."""
    from tokenhub.cli.billing import apply_config_prices
    from tokenhub.db.database import DatabaseError

    try:
        lines = apply_config_prices(cfg)
    except ConfigError as e:
        raise Refused(str(e)) from None
    except DatabaseError as e:
        raise CliError(str(e)) from None
    for line in lines:
        print(f"tokenhub: {line}", file=sys.stderr, flush=True)


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gateway (OpenAI and Anthropic APIs)",
        description="Run the gateway: OpenAI's chat completions and Responses APIs and "
        "Anthropic's Messages API in front of the providers (OpenAI-compatible or "
        "Anthropic-native) and models of the config file, routing each request (the models' "
        "policies, health and affinity), enforcing the keys' and tenants' limits, and "
        "metering every request into the database (SQLite or PostgreSQL). With [billing] "
        "settle_interval_s it also starts a settler process that bills the usage into the "
        "ledger, and with [billing] admission = true it admits a request only if the tenant's "
        "contracts can pay for it. The deployments' prices in the config go into the price "
        "book at start where they differ from it (a model's first price in force from the "
        "epoch, a changed one from now; each said on stderr). Tenants, keys and limits are "
        "managed with 'tokenhub tenants' and 'tokenhub keys'.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config: server, providers, models")
    p.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default from config: 8080)")
    p.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="the admin API's and web console's listener (overrides [admin] listen, default "
        '127.0.0.1:8081; "" turns them off)',
    )
    p.add_argument(
        "--db",
        metavar="URL_OR_PATH",
        help="database: a SQLite path (or sqlite:///ABSOLUTE/PATH) or a PostgreSQL URL "
        "postgresql://USER@HOST/DB (overrides server.database)",
    )
    p.add_argument(
        "--host-id",
        metavar="ID",
        help="this host's name among the hosts on one database, 1 to 64 of [A-Za-z0-9._-] "
        "(default from config, else the machine's hostname); its heartbeat goes into the "
        "database every [server] heartbeat_s seconds (default 5) for 'tokenhub cluster status'. "
        "Given (or set in config), on PostgreSQL and with [billing] admission: cluster mode, "
        "where this host admits within budget it leases from the database (its settler's lease "
        "agent), so several hosts enforce one budget; each host needs its own id",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        help="with --host-id: the Redis (redis://HOST:PORT/DB) where the hosts split each "
        "key's and tenant's rate limits by demand (overrides [cluster] redis_url); without "
        "one, or while it is down, each host takes floor(limit / hosts)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=f"serve with N processes, 1 to {MAX_WORKERS} (default 1: this process serves). "
        "With N > 1 this process supervises N workers, each a whole gateway on its own "
        "SO_REUSEPORT socket of the port, with its own usage journal (JOURNAL_DIR/worker-K); "
        "it restarts a worker that dies, stops them all on SIGTERM or SIGINT, and gives up "
        f"when workers exit more than {MAX_CRASHES} times in {CRASH_WINDOW_S:g} s. Responses "
        f"then carry '{WORKER_HEADER}: K'. About one worker per CPU core",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"run the demo: built-in mock upstream, three models and 'auto', SQLite {DEMO_DB} "
        "here (or --db, or $TOKENHUB_DB), a demo tenant with a 10 USD wallet and a key, the "
        "settler with money admission, and printed commands that work as printed (curl, the "
        "openai client, and tokenhub's own with TOKENHUB_DB set to the demo's database), and "
        "the web console's logins: operator 'admin' and the demo tenant's 'demo', each with a "
        "new random password at every start (printed)",
    )
    p.add_argument(
        "--demo-password-file",
        metavar="FILE",
        help=f"with --demo: the console logins' password from FILE (its first line) instead of "
        f"random ones; or set {DEMO_PASSWORD_ENV}",
    )
    p.add_argument(
        "--demo-key-file",
        metavar="FILE",
        help=f"with --demo: use the API key in FILE (its first line) instead of a new random "
        f"one; or set {DEMO_KEY_ENV}. Not a key on the command line: any local user can read "
        "a process's arguments",
    )
    # Gone (the key was in `ps`); explicit, so that argparse does not take it for an
    # abbreviation of --demo-key-file and read a "file" named by the key.
    p.add_argument("--demo-key", metavar="KEY", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
