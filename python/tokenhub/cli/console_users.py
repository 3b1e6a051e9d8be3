"""`tokenhub console-users create|list|disable|passwd`: who may sign in to the web console.

Operators have role admin, billing or read; a tenant's own user has role tenant and its
tenant (--tenant). Passwords are hashed with scrypt (tokenhub.console.passwords) and never
taken from the command line: --password-file F (its first line), else the
TOKENHUB_CONSOLE_PASSWORD environment variable, else a prompt (twice) on a terminal.
Disabling a user or changing its password ends its console sessions at once. Exit statuses as
in tokenhub.cli (2: a bad name, role, tenant or password, an unknown user; nothing changed).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from tokenhub.cli.admin import (
    AdminError,
    _add_db,
    _command,
    _store,
    db_url,
    group_help,
    iso_time,
    print_table,
)
from tokenhub.console.passwords import check_password, hash_password
from tokenhub.db.database import Tx, open_database
from tokenhub.store import console as cstore

ENV_PASSWORD = "TOKENHUB_CONSOLE_PASSWORD"
T = TypeVar("T")


def _run(args: argparse.Namespace, fn: Callable[[Tx], Awaitable[T]], *, create: bool) -> T:
    """`fn` in one transaction on the migrated database (only `create` may make a SQLite file)."""
    with _store(args, create=create):
        pass  # migrated, and a missing database refused as the other commands refuse it

    async def go() -> T:
        db = await open_database(db_url(args))
        try:
            return await db.transaction(fn)
        finally:
            await db.close()

    return asyncio.run(go())


def read_password(args: argparse.Namespace) -> str:
    """The new password: --password-file, $TOKENHUB_CONSOLE_PASSWORD, or a prompt."""
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise AdminError(f"cannot read {args.password_file}: {e.strerror or e}") from None
    elif os.environ.get(ENV_PASSWORD):
        password = os.environ[ENV_PASSWORD]
    elif sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise AdminError("the passwords differ; nothing changed")
    else:
        raise AdminError(
            f"give the password with --password-file F or ${ENV_PASSWORD} (not on the "
            "command line), or run on a terminal to be asked"
        )
    try:
        check_password(password)
    except ValueError as e:
        raise AdminError(str(e)) from None
    return password


def _user_json(u: cstore.ConsoleUser) -> dict[str, Any]:
    return msgspec.structs.asdict(u)


@_command
def cmd_create(args: argparse.Namespace) -> int:
    cstore.check_user(args.name, args.role, args.tenant, args.lang)
    pw_hash = hash_password(read_password(args))
    user = _run(
        args,
        lambda tx: cstore.create_user_in(tx, args.name, pw_hash, args.role, args.tenant, args.lang),
        create=True,
    )
    where = f" of tenant '{user.tenant}'" if user.tenant else ""
    print(f"created console user '{user.name}' (role {user.role}{where})")
    return 0


@_command
def cmd_list(args: argparse.Namespace) -> int:
    users = _run(args, lambda tx: cstore.users_in(tx, args.tenant), create=False)
    if args.json:
        print(msgspec.json.encode([_user_json(u) for u in users]).decode())
        return 0
    if not users:
        print(
            "no console users (create one with: tokenhub console-users create NAME --role admin)",
            file=sys.stderr,
        )
        return 0
    rows = [
        [u.name, u.role, u.tenant or "-", u.lang, iso_time(u.created_ms), iso_time(u.disabled_ms)]
        for u in users
    ]
    print_table(["NAME", "ROLE", "TENANT", "LANG", "CREATED", "DISABLED"], rows)
    return 0


@_command
def cmd_disable(args: argparse.Namespace) -> int:
    _run(args, lambda tx: cstore.disable_user_in(tx, args.name), create=False)
    print(f"disabled console user '{args.name}'; its sessions ended")
    return 0


@_command
def cmd_passwd(args: argparse.Namespace) -> int:
    pw_hash = hash_password(read_password(args))
    _run(
        args,
        lambda tx: cstore.set_password_in(tx, args.name, pw_hash, enable=args.enable),
        create=False,
    )
    print(f"changed the password of console user '{args.name}'; its sessions ended")
    return 0


def _add_password(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-file",
        metavar="F",
        help=f"read the password from F's first line (else ${ENV_PASSWORD}, else a prompt)",
    )


def add_cli(sub: Any) -> None:
    """Add `console-users` to `sub` (from `parser.add_subparsers()`)."""
    group = sub.add_parser(
        "console-users",
        help="create, list, disable console users and set their passwords",
        description="Users of the web console (/console on [admin] listen). Roles: read < "
        "billing < admin (operators), tenant (a tenant's own user, with --tenant). Passwords "
        "are never given on the command line.",
    )
    group.set_defaults(func=group_help(group))
    acts = group.add_subparsers(dest="action", metavar="ACTION")
    p = acts.add_parser("create", help="create a console user")
    p.add_argument("name", metavar="NAME", help="1-64 characters from A-Z a-z 0-9 . _ -")
    p.add_argument("--role", required=True, choices=cstore.ROLES, help="what it may do")
    p.add_argument("--tenant", help="the tenant of a user with role tenant")
    p.add_argument("--lang", default="en", choices=cstore.LANGS, help="the console's language")
    _add_password(p)
    _add_db(p)
    p.set_defaults(func=cmd_create)
    p = acts.add_parser("list", help="list console users (never their passwords)")
    p.add_argument("--tenant", help="only this tenant's users")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    _add_db(p)
    p.set_defaults(func=cmd_list)
    p = acts.add_parser("disable", help="disable a console user and end its sessions")
    p.add_argument("name", metavar="NAME")
    _add_db(p)
    p.set_defaults(func=cmd_disable)
    p = acts.add_parser("passwd", help="set a console user's password (its sessions end)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--enable", action="store_true", help="also enable a disabled user")
    _add_password(p)
    _add_db(p)
    p.set_defaults(func=cmd_passwd)
