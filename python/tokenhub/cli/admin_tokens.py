"""`tokenhub admin-tokens create|list|revoke`: the bearer tokens of the admin API (/admin/v1).

A token has a name (the admin audit log's actor) and a scope: `read` (GET only), `billing`
(also money: top-ups), `admin` (also tenants and keys). Only its SHA-256 is stored, so the
secret is printed once, by `create`. The admin listener checks every request against the
database, so a revoked token is refused at once. Exit statuses as in tokenhub.cli (2: an
unknown scope, a bad name, an unknown or already revoked token; nothing changed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from tokenhub.cli.admin import _add_db, _command, _store, group_help, iso_time, print_table
from tokenhub.store.base import ADMIN_SCOPES, AdminToken


def _token_json(t: AdminToken) -> dict[str, Any]:
    return msgspec.structs.asdict(t)


@_command
def cmd_create(args: argparse.Namespace) -> int:
    with _store(args, create=True) as store:
        token, secret = store.create_admin_token(args.name, args.scope)
    if args.json:
        print(msgspec.json.encode({**_token_json(token), "secret": secret}).decode())
    else:
        print(f"created admin token {token.id} '{token.name}' (scope {token.scope})")
        print(f"  secret: {secret}")
    print(
        "Save the secret now: tokenhub keeps only its SHA-256 hash and cannot show it again.",
        file=sys.stderr,
    )
    return 0


@_command
def cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        tokens = store.admin_tokens()
    if args.json:
        print(msgspec.json.encode([_token_json(t) for t in tokens]).decode())
        return 0
    if not tokens:
        print(
            "no admin tokens (create one with: tokenhub admin-tokens create NAME --scope read)",
            file=sys.stderr,
        )
        return 0
    rows = [
        [t.id, t.name, t.scope, t.prefix, iso_time(t.created_ms), iso_time(t.revoked_ms)]
        for t in tokens
    ]
    print_table(["ID", "NAME", "SCOPE", "PREFIX", "CREATED", "REVOKED"], rows)
    return 0


@_command
def cmd_revoke(args: argparse.Namespace) -> int:
    with _store(args) as store:
        token = store.revoke_admin_token(args.token_id)
    print(f"revoked admin token {token.id} '{token.name}'; the admin API refuses it at once")
    return 0


def add_cli(sub: Any) -> None:
    """Add `admin-tokens` to `sub` (from `parser.add_subparsers()`)."""
    group = sub.add_parser(
        "admin-tokens",
        help="create, list and revoke the admin API's tokens",
        description="Bearer tokens of the admin API (/admin/v1 on [admin] listen). Scopes: "
        "read (GET only) < billing (also top-ups) < admin (also tenants and keys). tokenhub "
        "stores only a SHA-256 hash of each token, so its secret is shown once.",
    )
    group.set_defaults(func=group_help(group))
    acts = group.add_subparsers(dest="action", metavar="ACTION")
    p = acts.add_parser(
        "create",
        help="create an admin token and print its secret (once)",
        description="Create an admin token; its NAME is the actor in the admin audit log.",
    )
    p.add_argument("name", metavar="NAME", help="1-64 characters from A-Z a-z 0-9 . _ -")
    p.add_argument("--scope", required=True, choices=ADMIN_SCOPES, help="what it may do")
    p.add_argument("--json", action="store_true", help="print the token and secret as JSON")
    _add_db(p)
    p.set_defaults(func=cmd_create)
    p = acts.add_parser("list", help="list admin tokens (never their secrets)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    _add_db(p)
    p.set_defaults(func=cmd_list)
    p = acts.add_parser(
        "revoke",
        help="revoke an admin token",
        description="Revoke an admin token for good; the admin API refuses it at once.",
    )
    p.add_argument("token_id", metavar="ID", help="the token's id (adm_ and 12 hex digits)")
    _add_db(p)
    p.set_defaults(func=cmd_revoke)
