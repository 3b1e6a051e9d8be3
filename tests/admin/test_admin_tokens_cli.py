"""`tokenhub admin-tokens create|list|revoke`: the secret shown once and only its hash kept,
the exit-code table (2: refused as given, nothing changed), the writes in the admin audit log."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tokenhub.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_create_list_revoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    status, out, err = _run(
        capsys, "admin-tokens", "create", "ops", "--scope", "billing", "--db", db
    )
    assert status == 0 and "cannot show it again" in err
    secret = next(w for w in out.split() if w.startswith("tha-"))
    status, out, _ = _run(capsys, "admin-tokens", "list", "--json", "--db", db)
    [token] = json.loads(out)
    assert (token["name"], token["scope"], token["revoked_ms"]) == ("ops", "billing", None)
    assert secret not in out and token["prefix"] == secret[:9]
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT digest FROM admin_tokens").fetchall()
        audit = conn.execute("SELECT actor, action, target, after FROM admin_audit").fetchall()
    assert stored == [(hashlib.sha256(secret.encode()).hexdigest(),)]
    assert [(a, b, c) for a, b, c, _ in audit] == [("cli", "admin_token.create", token["id"])]
    assert secret not in audit[0][3]
    status, out, _ = _run(capsys, "admin-tokens", "revoke", token["id"], "--db", db)
    assert status == 0 and token["id"] in out
    status, out, _ = _run(capsys, "admin-tokens", "list", "--db", db)
    assert status == 0 and "REVOKED" in out and out.count("-") > 2


@pytest.mark.parametrize(
    "args, message",
    [
        (("revoke", "adm_000000000000"), "no admin token"),
        (("create", "bad name!", "--scope", "read"), "invalid token name"),
    ],
)
def test_refusals_exit_2_and_change_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    db = str(tmp_path / "t.db")
    assert _run(capsys, "admin-tokens", "list", "--db", db)[0] == 2  # no database yet
    assert _run(capsys, "admin-tokens", "create", "a", "--scope", "read", "--db", db)[0] == 0
    status, _, err = _run(capsys, "admin-tokens", *args, "--db", db)
    assert status == 2 and message in err and err.startswith("tokenhub: error: ")
    status, out, _ = _run(capsys, "admin-tokens", "list", "--json", "--db", db)
    assert [t["name"] for t in json.loads(out)] == ["a"]
    with pytest.raises(SystemExit) as e:
        main(["admin-tokens", "create", "b", "--scope", "root", "--db", db])
    assert e.value.code == 2
