"""The billing commands (`tokenhub plans|wallet|codes|fx|prices|billing`), run through the real
`tokenhub` entry point in process (exit status, stdout, stderr) and as a separate process,
against a temporary SQLite database (and PostgreSQL when the test server is there)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tokenhub import cli
from tokenhub.billing.settler import event_from_row
from tokenhub.cli import billing as billing_cli
from tokenhub.store.sqlite import SQLiteStore
from tokenhub.usage import BILLED_FIELDS, EVENT_FIELDS, UsageEvent

TABLES = (
    "accounts", "ledger_txns", "postings", "plans", "lots", "redemption_codes",
    "billing_profiles", "prices", "fx_rates", "revenue_splits", "settlements",
    "settlement_failures", "closed_periods",
)  # fmt: skip

# The statement period is this month: top-ups are dated now, and a statement shows a month.
NOW = dt.datetime.now(dt.UTC)
PERIOD = f"{NOW.year:04d}-{NOW.month:02d}"
NEXT = f"{NOW.year + (NOW.month == 12):04d}-{NOW.month % 12 + 1:02d}"
START_MS = int(dt.datetime(NOW.year, NOW.month, 1, tzinfo=dt.UTC).timestamp() * 1000)
HOUR = 3_600_000


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str], db: str) -> None:
        self.capsys = capsys
        self.db = db

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = cli.main([*argv, "--db", self.db])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, (argv, out, err)
        return out

    def refused(self, *argv: str, status: int = 2) -> str:
        """The one-line error of a refused command; checks that nothing changed."""
        before = snapshot(self.db)
        code, out, err = self(*argv)
        assert (code, out) == (status, ""), (argv, out, err)
        assert err.count("\n") == 1 and err.startswith("tokenhub: error: "), err
        assert snapshot(self.db) == before, argv
        assert self("billing", "check")[0] == 0
        return err.removeprefix("tokenhub: error: ").rstrip("\n")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "billing.db")


@pytest.fixture
def th(capsys: pytest.CaptureFixture[str], db: str) -> Cli:
    return Cli(capsys, db)


def snapshot(db: str) -> dict[str, list[Any]]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return {t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}


def query(db: str, sql: str, *args: Any) -> list[Any]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute(sql, args).fetchall()


def event(i: int, **kw: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "request_id": f"req_{i:04d}",
        "ts_ms": START_MS + (i + 1) * HOUR,
        "tenant": "acme",
        "key_id": "key_0123456789ab",
        "endpoint": "chat.completions",
        "model": "qwen-plus",
        "provider": "dashscope",
        "latency_ms": 12.5,
        "stream": i % 2 == 1,
        "ttft_ms": 3.25 if i % 2 else None,
    }
    fields.update(kw)
    return UsageEvent(**fields)


def insert_events(db: str, events: list[UsageEvent]) -> None:
    store = SQLiteStore(db)
    try:
        store.migrate()
        assert store.insert_events(events).inserted == len(events)
    finally:
        store.close()


# -- the telecom flow -------------------------------------------------------------------------


def test_telecom_flow(th: Cli, db: str) -> None:
    """A CNY tenant on a 1M-token package for qwen-plus with USD overage, plus list-priced
    gpt-4o usage in USD from the wallet: every figure below is exact."""
    assert th("wallet", "show", "acme")[2] == f"tokenhub: error: no database at {db!r}\n"
    assert "low balance   150.00 CNY" in th.ok(
        "billing", "profile", "acme", "--currency", "CNY", "--low-balance", "150"
    )
    assert th.ok("fx", "set", "USD", "CNY", "7.1", "--from", "2020-01-01") == (
        "FX USD/CNY = 7.1 from 2020-01-01T00:00:00Z (1 USD = 7.1 CNY)\n"
    )
    th.ok("prices", "set", "gpt-4o", "--currency", "USD", "--input", "2.5", "--output", "10",
          "--from", "2020-01-01")  # fmt: skip
    out = th.ok("prices", "set", "qwen-plus", "--currency", "CNY", "--input", "2",
                "--cached-input", "0.5", "--output", "8", "--from", "2020-01-01")  # fmt: skip
    assert out.startswith("price qwen-plus v1 from 2020-01-01T00:00:00Z: input 2, cached input")
    th.ok("billing", "split", "openai", "--platform", "20", "--from", "2020-01-01")
    th.ok("billing", "split", "dashscope", "--platform", "30", "--channel", "10",
          "--from", "2020-01-01")  # fmt: skip
    out = th.ok(
        "plans", "create", "telecom-1m", "--price", "99.00", "--currency", "CNY",
        "--tokens", "1000000", "--period", "month", "--overage-per-1m", "0.8",
        "--overage-currency", "USD", "--models", "qwen-plus",
    )  # fmt: skip
    assert out == (
        "created plan 'telecom-1m': 1,000,000 tokens for 99.00 CNY, period month, when used "
        "up: overage 0.8 USD per 1M, models qwen-plus\n"
    )
    [plan] = json.loads(th.ok("plans", "list", "--json"))
    assert plan | {"price": "99.00", "quantity": 1_000_000, "overage_per_1m": "0.8"} == plan
    out = th.ok("wallet", "topup", "acme", "200", "CNY")
    assert re.fullmatch(
        r"topped up acme's wallet with 200\.00 CNY \(txn_\w+\); wallet now 200\.00 CNY\n", out
    )
    out = th.ok("plans", "assign", "acme", "telecom-1m", "--start", f"{PERIOD}-01")
    m = re.fullmatch(
        r"assigned plan 'telecom-1m' to acme: lot (lot_\w+), 1,000,000 tokens for 99\.00 CNY, "
        r"valid from (\S+) until (\S+)\n",
        out,
    )
    assert m and m.groups()[1:] == (f"{PERIOD}-01T00:00:00Z", f"{NEXT}-01T00:00:00Z"), out
    lot = m[1]

    insert_events(db, [
        # 800,000 tokens from the package
        event(0, input_tokens=600_000, cached_input_tokens=100_000, output_tokens=200_000),
        # 200,000 from the package, 200,000 overage: 0.16 USD = 1.136 CNY
        event(1, input_tokens=300_000, output_tokens=100_000),
        # list price: 0.0025 + 0.005 USD = 0.0075 USD = 0.05325 CNY
        event(2, model="gpt-4o", provider="openai", input_tokens=1000, output_tokens=500),
    ])  # fmt: skip
    assert th.ok("billing", "settle") == "settled 3, duplicates 0, conflicts 0, failed 0\n"
    assert th.ok("billing", "settle") == "settled 0, duplicates 0, conflicts 0, failed 0\n"

    wallet = 200_000_000_000 - 99_000_000_000 - 1_136_000_000 - 53_250_000
    assert wallet == 99_810_750_000
    st = json.loads(th.ok("billing", "statement", "acme", "--period", PERIOD, "--format", "json"))
    assert st["closed"] is False and st["opening"] == []
    assert [(p["plan"], p["price"], p["currency"]) for p in st["purchases"]] == [
        ("telecom-1m", 99_000_000_000, "CNY")
    ]
    assert st["usage"] == [
        {"model": "gpt-4o", "tokens": 1_500, "package_tokens": 0,
         "amounts": {"CNY": 53_250_000}},
        {"model": "qwen-plus", "tokens": 1_200_000, "package_tokens": 1_000_000,
         "amounts": {"CNY": 1_136_000_000}},
    ]  # fmt: skip
    assert st["overage"] == {"CNY": 1_136_000_000}
    assert st["other"] == {"topup": {"CNY": 200_000_000_000}}
    closing = {r["account"]: (r["balance"], r["text"]) for r in st["closing"]}
    assert closing == {
        f"t:acme:lot:{lot}": (0, "0 tokens"),
        "t:acme:wallet:CNY": (wallet, "99.81075 CNY"),
    }

    text = th.ok("billing", "statement", "acme", "--period", PERIOD)
    assert text.startswith(f"Statement for acme, {PERIOD}\n")
    assert re.search(r"\n  plan telecom-1m +99\.00 CNY\n", text)
    assert re.search(r"\n  qwen-plus +1,200,000 tokens +1,000,000 from packages +1\.136 CNY\n",
                     text)  # fmt: skip
    assert re.search(r"\n  gpt-4o +1,500 tokens +0\.05325 CNY\n", text)
    assert re.search(r"\nOverage \(included above\)\n  overage +1\.136 CNY\n", text)
    assert re.search(r"\n  t:acme:wallet:CNY +99\.81075 CNY\n", text)

    out = th.ok("wallet", "show", "acme")
    assert re.search(r"\n  wallet +99\.81075 CNY\n", out)
    assert re.search(rf"\n  {lot} +telecom-1m +0 tokens +1,000,000 tokens +{PERIOD}-01T", out)
    assert out.endswith(
        "warning: the wallet holds 99.81075 CNY, below the low-balance threshold of 150.00 CNY\n"
    )
    shown = json.loads(th.ok("wallet", "show", "acme", "--json"))
    assert shown["wallet"] == {"CNY": "99.81075"} and shown["low_balance_warning"] is True
    assert [(x["id"], x["left"], x["quantity"]) for x in shown["lots"]] == [(lot, 0, 1_000_000)]

    # Providers: openai keeps 80% of 0.0075 USD; dashscope 60% of the package's 99 CNY
    # (earned as its tokens were used) and of the 0.16 USD overage.
    out = th.ok("billing", "settlement", "openai", "--period", PERIOD)
    assert re.search(r"\ngpt-4o +USD +0\.006 USD +1\n", out), out
    st = json.loads(
        th.ok("billing", "settlement", "dashscope", "--period", PERIOD, "--format", "json")
    )
    assert {(x["model"], x["currency"], x["owed"]) for x in st["lines"]} == {
        ("qwen-plus", "CNY", 59_400_000_000),
        ("qwen-plus", "USD", 96_000_000),
    }
    assert th.ok("billing", "check").startswith("ledger OK: ")

    # A refund gives the gpt-4o charge back, once.
    assert th.ok("billing", "refund", "req_0002", "--memo", "outage").startswith(
        "refunded usage event req_0002 (txn_"
    )
    assert th.refused("billing", "refund", "req_0002") == "event req_0002 has already been refunded"
    assert json.loads(th.ok("wallet", "show", "acme", "--json"))["wallet"] == {"CNY": "99.864"}

    # Closing freezes the statement.
    assert th.ok("billing", "close", "acme", "--period", PERIOD) == (
        f"closed acme's statement for {PERIOD} (closing 99.864 CNY); postings dated in it now "
        f"go to {NEXT}\n"
    )
    assert th.refused("billing", "close", "acme", "--period", PERIOD) == (
        f"acme {PERIOD} is already closed"
    )
    st = json.loads(th.ok("billing", "statement", "acme", "--period", PERIOD, "--format", "json"))
    assert st["closed"] is True


def test_settle_reads_events_back_exactly(th: Cli, db: str) -> None:
    """Events are settled as they were written (the payload hash is of the same UsageEvent),
    whatever the SQLite column types gave back (0/1 for booleans, NULL, floats)."""
    th.ok("prices", "set", "qwen-plus", "--currency", "USD", "--input", "1", "--output", "2",
          "--from", "2020-01-01")  # fmt: skip
    th.ok("wallet", "topup", "acme", "10", "USD")
    evs = [event(i, input_tokens=10, output_tokens=5) for i in range(4)]
    insert_events(db, evs)
    assert th.ok("billing", "settle", "--batch", "3") == (
        "settled 4, duplicates 0, conflicts 0, failed 0\n"
    )
    stored = dict(query(db, "SELECT event_id, payload_sha256 FROM settlements"))
    # The hash covers the billed fields (all but the gateway's `holds`, which comes last), and
    # leaves out the fields added later while they hold their default (`usage_anomaly`,
    # `cache_write_tokens`: these events have neither), so that events settled before they
    # existed hash as they did.
    n = len(BILLED_FIELDS)
    assert EVENT_FIELDS[n:] == ("holds",)
    assert BILLED_FIELDS[n - 2 :] == ("usage_anomaly", "cache_write_tokens")
    assert not any(e.usage_anomaly or e.cache_write_tokens for e in evs)
    n -= 2
    assert stored == {
        e.request_id: hashlib.sha256(
            msgspec.json.encode(msgspec.structs.astuple(e)[:n])
        ).hexdigest()
        for e in evs
    }
    assert event_from_row(tuple(msgspec.structs.astuple(evs[1]))) == evs[1]


def test_settle_follow_options_are_checked(th: Cli, db: str, tmp_path: Path) -> None:
    th.ok("wallet", "topup", "acme", "1", "USD")  # a database to check stays unchanged
    assert th.refused("billing", "settle", "--quota", "/dev/shm/x") == (
        "--quota and --parent go with --follow"
    )
    assert th.refused("billing", "settle", "--parent", "1") == (
        "--quota and --parent go with --follow"
    )
    assert th.refused("billing", "settle", "--follow", "0") == (
        "--follow needs a positive interval in seconds"
    )
    missing = tmp_path / "no-such-table"
    msg = th.refused("billing", "settle", "--follow", "1", "--quota", str(missing))
    assert msg.startswith("--quota: ") and str(missing) in msg, msg


NO_PRICE_M1 = (
    "no price for model 'm1' (it has none): set one in force by then with `tokenhub prices set "
    "m1 --currency CUR --input N --output N --from DATE` or `tokenhub prices import --config "
    "FILE --from DATE`, then run `tokenhub billing settle --retry-failed`"
)


def test_settle_failures_are_recorded_then_retried(th: Cli, db: str) -> None:
    th.ok("prices", "set", "m2", "--currency", "USD", "--input", "1", "--output", "1",
          "--from", "2020-01-01")  # fmt: skip
    th.ok("wallet", "topup", "acme", "10", "USD")
    insert_events(db, [
        event(0, model="m1", input_tokens=1_000_000),
        event(1, model="m2", input_tokens=1_000_000),
        event(2, model="m1", input_tokens=500_000, output_tokens=500_000),
        event(3, model="m2", input_tokens=0, output_tokens=0, status=500),  # nothing to charge
    ])  # fmt: skip

    code, out, err = th("billing", "settle")
    assert (code, err) == (1, "")
    assert out == (f"settled 2, duplicates 0, conflicts 0, failed 2 ({NO_PRICE_M1}: 2)\n")
    failures = query(db, "SELECT event_id, reason, attempts FROM settlement_failures ORDER BY 1")
    assert [(f[0], f[2]) for f in failures] == [("req_0000", 1), ("req_0002", 1)]
    assert failures[0][1] == NO_PRICE_M1.replace("'m1' (", f"'m1' at {START_MS + HOUR} (")
    wallet = json.loads(th.ok("wallet", "show", "acme", "--json"))["wallet"]
    assert wallet == {"USD": "9.00"}

    # Later runs skip them until asked to retry.
    assert th.ok("billing", "settle") == (
        "settled 0, duplicates 0, conflicts 0, failed 0; "
        "2 earlier failures skipped (--retry-failed retries them)\n"
    )
    # Retrying without a price fails again (one event per batch: the run still ends).
    code, out, _ = th("billing", "settle", "--retry-failed", "--batch", "1")
    assert code == 1 and out.startswith("settled 0, duplicates 0, conflicts 0, failed 2 (no price")
    assert query(db, "SELECT attempts FROM settlement_failures") == [(2,), (2,)]

    th.ok("prices", "set", "m1", "--currency", "USD", "--input", "0.5", "--output", "1",
          "--from", "2020-01-01")  # fmt: skip
    assert th.ok("billing", "settle", "--retry-failed") == (
        "settled 2, duplicates 0, conflicts 0, failed 0\n"
    )
    assert query(db, "SELECT COUNT(*) FROM settlement_failures") == [(0,)]
    assert query(db, "SELECT COUNT(*) FROM settlements") == [(4,)]
    # 1 USD (m2) + 0.5 USD + 0.25 + 0.5 (m1)
    wallet = json.loads(th.ok("wallet", "show", "acme", "--json"))["wallet"]
    assert wallet == {"USD": "7.75"}
    assert th.ok("billing", "settle", "--retry-failed") == (
        "settled 0, duplicates 0, conflicts 0, failed 0\n"
    )
    assert th.ok("billing", "check").startswith("ledger OK: ")


def test_settle_progress_and_batches(
    th: Cli, db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    th.ok("prices", "set", "qwen-plus", "--currency", "USD", "--input", "1", "--output", "1",
          "--from", "2020-01-01")  # fmt: skip
    insert_events(db, [event(i, input_tokens=1) for i in range(5)])
    monkeypatch.setattr(billing_cli, "PROGRESS_EVERY_S", 0.0)
    code, out, err = th("billing", "settle", "--batch", "2")
    assert (code, out) == (0, "settled 5, duplicates 0, conflicts 0, failed 0\n")
    progress = err.splitlines()
    assert [line.split(" (")[0] for line in progress] == [
        "tokenhub billing settle: 2 events read, 2 settled, 0 not settled",
        "tokenhub billing settle: 4 events read, 4 settled, 0 not settled",
        "tokenhub billing settle: 5 events read, 5 settled, 0 not settled",
    ]
    # Without prices the events went to the overrun account (USD, the default profile).
    assert json.loads(th.ok("wallet", "show", "acme", "--json"))["overrun"] == {"USD": "0.000005"}
    assert th.refused("billing", "settle", "--batch", "0") == "--batch must be from 1 to 100000"


def test_commands_that_need_data_do_not_create_the_database(th: Cli, db: str) -> None:
    for argv in (
        ("plans", "assign", "acme", "basic"),
        ("wallet", "adjust", "acme", "1", "USD", "--memo", "x"),
        ("codes", "redeem", "acme", "thc-x"),
        ("billing", "settle"),
        ("billing", "check"),
        ("billing", "profile", "acme"),
        ("prices", "list"),
    ):
        assert th(*argv) == (2, "", f"tokenhub: error: no database at {db!r}\n"), argv
    assert not Path(db).exists()


# -- refused requests change nothing ------------------------------------------------------------


@pytest.fixture
def acme(th: Cli) -> Cli:
    """A CNY tenant with 100 CNY and a plan on offer."""
    th.ok("billing", "profile", "acme", "--currency", "CNY")
    th.ok("wallet", "topup", "acme", "100", "CNY")
    th.ok("plans", "create", "basic", "--price", "9.90", "--currency", "CNY", "--tokens",
          "1000", "--period", "month")  # fmt: skip
    return th


def test_bad_amounts_and_currencies(acme: Cli) -> None:
    r = acme.refused
    assert r("wallet", "topup", "acme", "10", "XYZ") == (
        "unknown currency 'XYZ': use an ISO 4217 code such as USD or CNY"
    )
    assert r("wallet", "topup", "acme", "10", "cny").startswith(
        "unknown currency 'cny' (did you mean CNY?)"
    )
    assert r("wallet", "topup", "acme", "9.999", "CNY") == (
        "amount 9.999 CNY has more decimals than CNY's 2 (smallest unit 0.01 CNY)"
    )
    assert r("wallet", "topup", "acme", "1.5", "JPY").startswith("amount 1.5 JPY has more")
    assert r("wallet", "topup", "acme", "ten", "CNY") == "amount 'ten' is not a decimal number"
    assert r("plans", "create", "x", "--price", "9.999", "--currency", "CNY", "--tokens", "1",
             "--period", "day").startswith("amount 9.999 CNY has more decimals")  # fmt: skip
    assert r("prices", "set", "m", "--currency", "USD", "--input", "0.0000000001",
             "--output", "1") == "input price 0.0000000001 has more than 9 decimals"  # fmt: skip
    assert r("fx", "set", "USD", "USD", "1", "--from", "2026-01-01") == (
        "an FX rate needs two different currencies"
    )
    assert r("fx", "set", "USD", "CNY", "0", "--from", "2026-01-01") == (
        "rate must be positive (got 0)"
    )


def test_negative_amounts(acme: Cli) -> None:
    r = acme.refused
    assert r("wallet", "topup", "acme", "-5", "CNY") == "amount must not be negative (got -5)"
    assert r("codes", "create", "--count", "1", "--amount", "-1", "--currency", "CNY") == (
        "amount must not be negative (got -1)"
    )
    assert r("plans", "create", "neg", "--price", "-1", "--currency", "CNY", "--tokens", "1",
             "--period", "day") == "amount must not be negative (got -1)"  # fmt: skip
    assert r("billing", "profile", "acme", "--credit-limit", "-1") == (
        "amount must not be negative (got -1)"
    )
    assert r("prices", "set", "m", "--currency", "USD", "--input", "-1", "--output", "1") == (
        "input price must not be negative (got -1)"
    )
    # A negative adjustment is allowed, but never below zero.
    assert r("wallet", "adjust", "acme", "-100.01", "CNY", "--memo", "x") == (
        "t:acme:wallet:CNY cannot cover 100.01 CNY: 100.00 CNY available"
    )
    assert acme.ok("wallet", "adjust", "acme", "-0.50", "CNY", "--memo", "fix").startswith(
        "adjusted acme's wallet by -0.50 CNY (txn_"
    )
    assert r("wallet", "adjust", "acme", "0", "CNY", "--memo", "x") == (
        "an adjustment must not be zero"
    )


def test_plans_refused(acme: Cli) -> None:
    r = acme.refused
    assert r("plans", "assign", "acme", "nope") == "no plan named 'nope'"
    assert r("plans", "create", "basic", "--price", "1", "--currency", "CNY", "--tokens", "5",
             "--period", "day") == "plan 'basic' already exists"  # fmt: skip
    assert r("plans", "create", "bad name", "--price", "1", "--currency", "CNY", "--tokens",
             "5", "--period", "day").startswith("invalid plan name 'bad name'")  # fmt: skip
    assert r("plans", "create", "zero", "--price", "1", "--currency", "CNY", "--tokens", "0",
             "--period", "day") == "--tokens must be positive"  # fmt: skip
    assert r("plans", "create", "o", "--price", "1", "--currency", "CNY", "--tokens", "5",
             "--period", "day", "--overage-currency", "USD") == (
        "--overage-currency goes with --overage-per-1m"
    )  # fmt: skip
    assert r("plans", "assign", "acme", "basic", "--start", "tomorrow").startswith(
        "bad time 'tomorrow'"
    )
    # Not enough money: the purchase is refused as a whole.
    acme.ok("plans", "create", "big", "--price", "100.01", "--currency", "CNY", "--tokens",
            "1000", "--period", "month")  # fmt: skip
    assert r("plans", "assign", "acme", "big") == (
        "t:acme:wallet:CNY cannot cover 100.01 CNY: 100.00 CNY available"
    )
    # A plan in another currency than the tenant's.
    acme.ok("plans", "create", "usd", "--price", "1", "--currency", "USD", "--tokens", "1000",
            "--period", "month")  # fmt: skip
    assert r("plans", "assign", "acme", "usd").startswith("tenant acme settles in CNY; this costs")


def test_wallet_refused(acme: Cli) -> None:
    r = acme.refused
    assert r("wallet", "topup", "acme", "10", "USD") == "tenant acme settles in CNY; top up in CNY"
    assert r("wallet", "adjust", "acme", "10", "USD", "--memo", "x") == (
        "tenant acme settles in CNY; adjust in CNY"
    )
    assert r("wallet", "adjust", "acme", "10", "CNY", "--memo", " ") == (
        "an adjustment needs a memo saying why"
    )
    assert r("billing", "profile", "acme", "--currency", "USD") == (
        "tenant acme already holds CNY balances; its settlement currency cannot change to USD"
    )
    assert r("billing", "profile", "acme", "--order", "wallet,cash") == (
        "draw order must be distinct names from package, points, wallet, postpaid"
    )
    assert r("billing", "profile", "acme", "--discount", "abc") == (
        "--discount must be a percentage from 0 to 100 (got 'abc')"
    )
    assert r("billing", "split", "openai", "--platform", "NaN") == (
        "--platform must be a percentage from 0 to 100 (got 'NaN')"
    )
    assert r("billing", "split", "openai", "--platform", "60", "--channel", "50").startswith(
        "platform and channel percentages must be >= 0 and sum to at most 100"
    )
    assert r("billing", "statement", "acme", "--period", "2026-1") == (
        "period must look like 2026-11 (got '2026-1')"
    )
    assert r("wallet", "topup", "a:b", "10", "CNY") == (
        "invalid tenant name 'a:b': use 1-64 characters from A-Z a-z 0-9 . _ -"
    )
    assert r("billing", "refund", "req_nope") == (
        "event req_nope has not been settled (or had no charge)"
    )


def test_codes(acme: Cli) -> None:
    code, out, err = acme("codes", "create", "--count", "3", "--amount", "5", "--currency", "CNY")
    codes = out.splitlines()
    assert code == 0 and len(codes) == 3 and len(set(codes)) == 3
    assert err == (
        "created 3 single-use codes worth 5.00 CNY each. They are shown only once: tokenhub "
        "keeps only their SHA-256 hashes.\n"
    )
    assert not any(c in str(snapshot(acme.db)) for c in codes)  # only hashes are stored
    out = acme.ok("codes", "redeem", "acme", codes[0])
    assert re.fullmatch(
        r"redeemed a code for acme: 5\.00 CNY into the wallet \(txn_\w+\); wallet now "
        r"105\.00 CNY\n",
        out,
    )
    r = acme.refused
    assert r("codes", "redeem", "acme", codes[0]) == "this redemption code has already been used"
    assert r("codes", "redeem", "acme", "thc-nope") == "unknown redemption code"
    acme.ok("billing", "profile", "bob", "--currency", "USD")
    assert r("codes", "redeem", "bob", codes[1]) == "this code is in CNY; tenant bob settles in USD"
    code, out, _ = acme("codes", "create", "--count", "1", "--amount", "1", "--currency", "CNY",
                        "--expires", "2020-01-01")  # fmt: skip
    assert r("codes", "redeem", "acme", out.strip()) == "this redemption code has expired"
    assert r("codes", "create", "--count", "0", "--amount", "1", "--currency", "CNY") == (
        "--count must be from 1 to 100000"
    )


def test_expire(acme: Cli) -> None:
    acme.ok("plans", "create", "day", "--price", "1", "--currency", "CNY", "--tokens", "100",
            "--period", "day")  # fmt: skip
    acme.ok("plans", "assign", "acme", "day", "--start", "2020-01-01")
    assert "ended (tokenhub billing expire)" in acme.ok("wallet", "show", "acme")
    out = acme.ok("billing", "expire", "--now", "2020-01-03")
    assert out.startswith("expired 1 lots ended by 2020-01-03T00:00:00Z\n  txn_")
    assert "lots: none" in acme.ok("wallet", "show", "acme")
    assert acme.ok("billing", "expire", "--now", "2020-01-04") == (
        "expired 0 lots ended by 2020-01-04T00:00:00Z\n"
    )
    assert acme.ok("billing", "check").startswith("ledger OK")


def test_lists(acme: Cli) -> None:
    acme.ok("fx", "set", "USD", "CNY", "7.1", "--from", "2026-01-01")
    acme.ok("fx", "set", "USD", "CNY", "7.2", "--from", "2026-02-01T00:00:00+08:00")
    assert acme.ok("fx", "list").splitlines() == [
        "BASE  QUOTE  RATE  FROM",
        "USD   CNY    7.1   2026-01-01T00:00:00Z",
        "USD   CNY    7.2   2026-01-31T16:00:00Z",
    ]
    acme.ok("prices", "set", "m", "--currency", "USD", "--input", "0.15", "--output", "0.6",
            "--points", "12.5", "--from", "2026-01-01")  # fmt: skip
    acme.ok("prices", "set", "m", "--currency", "CNY", "--input", "1", "--output", "2",
            "--tenant", "acme", "--from", "2026-01-01")  # fmt: skip
    prices = json.loads(acme.ok("prices", "list", "--json"))
    assert [(p["tenant"], p["version"], p["input_per_1m"], p["cached_input_per_1m"],
             p["cache_write_per_1m"], p["cache_write_set"], p["points_per_1m"])
            for p in prices] == [
        (None, 1, "0.15", "0.15", "0.15", False, "12.5"),
        ("acme", 1, "1", "1", "1", False, None),
    ]  # fmt: skip
    assert acme.ok("prices", "list").splitlines()[1].split() == [
        "m", "-", "1", "2026-01-01T00:00:00Z", "USD", "0.15", "0.15", "0.6", "0.15", "12.5",
    ]  # fmt: skip
    # A cache-write price of its own (both spellings of the option), shown and listed.
    out = acme.ok("prices", "set", "m", "--currency", "USD", "--input", "3", "--output",
                  "15", "--cached-input", "0.3", "--cache-write", "3.75",
                  "--from", "2026-03-01")  # fmt: skip
    assert out.endswith(
        ": input 3, cached input 0.3, output 15, cache write 3.75 USD per 1M tokens\n"
    )
    acme.ok("prices", "set", "m", "--currency", "USD", "--input", "3", "--output", "15",
            "--cache-write-per-1m", "6", "--tenant", "acme", "--from", "2026-03-01")  # fmt: skip
    prices = json.loads(acme.ok("prices", "list", "--json"))
    assert [(p["tenant"], p["version"], p["cache_write_per_1m"], p["cache_write_set"])
            for p in prices] == [
        (None, 1, "0.15", False), (None, 2, "3.75", True),
        ("acme", 1, "1", False), ("acme", 2, "6", True),
    ]  # fmt: skip
    # A bad one is refused and writes nothing.
    assert acme.refused("prices", "set", "m", "--currency", "USD", "--input", "3", "--output",
                        "15", "--cache-write", "-1") == (
        "cache-write price must not be negative (got -1)"
    )  # fmt: skip
    assert len(json.loads(acme.ok("prices", "list", "--json"))) == 4
    assert acme.ok("plans", "list").splitlines()[1].split()[:5] == [
        "basic", "package", "9.90", "CNY", "1,000",
    ]  # fmt: skip


def test_prices_import(th: Cli, tmp_path: Path) -> None:
    config = tmp_path / "tokenhub.toml"

    def write(input_price: str) -> None:
        config.write_text(f"""
[[providers]]
name = "dashscope"
base_url = "https://dashscope.example/v1"
api_key_env = "TOKENHUB_TEST_KEY_THAT_IS_NOT_SET"

[[models]]
id = "qwen-plus"
  [[models.deployments]]
  provider = "dashscope"
  upstream_model = "qwen-plus"
  price = {{ currency = "CNY", input_per_1m = {input_price}, output_per_1m = "8" }}
  [[models.deployments]]
  provider = "dashscope"
  upstream_model = "qwen-plus-backup"
  price = {{ currency = "CNY", input_per_1m = "99", output_per_1m = "99" }}

[[models]]
id = "free"
  [[models.deployments]]
  provider = "dashscope"
  upstream_model = "free"
""")

    write("0.8")
    code, out, err = th("prices", "import", "--config", str(config))
    assert code == 0, err
    assert "price qwen-plus v1 from " in out
    assert "input 0.8, cached input 0.8, output 8, cache write 0.8 CNY" in out
    assert err == f"imported 1 prices from {config}; 0 unchanged, 1 without a price (free)\n"
    code, out, err = th("prices", "import", "--config", str(config))
    assert (code, out) == (0, "")
    assert err.startswith(f"imported 0 prices from {config}; 1 unchanged")
    # A points price (not in the config) survives a new list price.
    th.ok("prices", "set", "qwen-plus", "--currency", "CNY", "--input", "0.8", "--output", "8",
          "--points", "3")  # fmt: skip
    write("0.9")
    th.ok("prices", "import", "--config", str(config))
    last = json.loads(th.ok("prices", "list", "--json"))[-1]
    assert (last["version"], last["input_per_1m"], last["points_per_1m"]) == (3, "0.9", "3")

    write("0.0000000001")
    assert th.refused("prices", "import", "--config", str(config)) == (
        f"{config}: model qwen-plus: input price 0.0000000001 has more than 9 decimals"
    )
    assert th.refused("prices", "import", "--config", str(tmp_path / "none.toml")).startswith(
        f"{tmp_path / 'none.toml'}: cannot read: "
    )
    # A cache-write price in the config is a change; importing it twice, once.
    write('"0.9", cache_write_per_1m = "1.125"')
    out = th.ok("prices", "import", "--config", str(config))
    assert "input 0.9, cached input 0.9, output 8, cache write 1.125 CNY" in out
    assert th("prices", "import", "--config", str(config))[1] == ""
    last = json.loads(th.ok("prices", "list", "--json"))[-1]
    assert (last["version"], last["cache_write_per_1m"], last["cache_write_set"]) == (
        4,
        "1.125",
        True,
    )


def test_check_reports_problems(th: Cli, db: str) -> None:
    th.ok("wallet", "topup", "acme", "10", "USD")
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("UPDATE accounts SET balance = 5 WHERE id = 't:acme:wallet:USD'")
        c.commit()
    code, out, err = th("billing", "check")
    assert code == 1
    assert out.splitlines() == [
        "account t:acme:wallet:USD balance 5 != postings -10000000000",
        "account t:acme:wallet:USD balance 5 is over its ceiling 0",
    ]
    assert err == "tokenhub: error: the ledger check found 2 problems\n"


def test_group_and_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    for group in ("plans", "wallet", "codes", "fx", "prices", "billing"):
        code = cli.main([group])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"usage: tokenhub {group}"), err

    def help_text(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    commands = [
        ("plans", "create"), ("plans", "list"), ("plans", "assign"), ("wallet", "topup"),
        ("wallet", "show"), ("wallet", "adjust"), ("codes", "create"), ("codes", "redeem"),
        ("fx", "set"), ("fx", "list"), ("prices", "set"), ("prices", "list"),
        ("prices", "import"), ("billing", "profile"), ("billing", "split"),
        ("billing", "settle"), ("billing", "expire"), ("billing", "refund"),
        ("billing", "statement"), ("billing", "close"), ("billing", "settlement"),
        ("billing", "check"),
    ]  # fmt: skip
    for argv in commands:
        assert "postgresql://" in help_text(*argv), argv
    assert "9.999 CNY is refused, never rounded" in help_text("wallet", "topup")
    assert "half-to-even" in help_text("plans", "create")
    assert "largest remainder" in help_text("billing", "split")
    assert "shown only once" in help_text("codes", "create")
    assert "YYYY-MM-DD (00:00 UTC)" in help_text("fx", "set")
    assert "per 1M tokens" in help_text("prices", "set")
    assert "--retry-failed" in help_text("billing", "settle")


def test_real_process(tmp_path: Path) -> None:
    """As a user runs it: `python -m tokenhub`, exit statuses, one-line errors."""
    db = str(tmp_path / "p.db")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokenhub", *argv, "--db", db],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    r = run("billing", "profile", "acme", "--currency", "CNY")
    assert r.returncode == 0, r.stderr
    r = run("wallet", "topup", "acme", "9.999", "CNY")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "tokenhub: error: amount 9.999 CNY has more decimals than CNY's 2 (smallest unit 0.01 "
        "CNY)\n"
    )
    r = run("wallet", "topup", "acme", "12.30", "CNY")
    assert r.returncode == 0 and r.stdout.endswith("wallet now 12.30 CNY\n")
    r = run("wallet", "adjust", "acme", "1", "CNY")  # argparse: --memo is required
    assert r.returncode == 2 and "the following arguments are required: --memo" in r.stderr
    r = run("billing", "check")
    assert r.returncode == 0 and r.stdout.startswith("ledger OK: 1 transactions, 2 postings")
    r = subprocess.run(
        [sys.executable, "-m", "tokenhub", "wallet", "show", "acme", "--db",
         "mysql://x/y"], capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (
        "tokenhub: error: unsupported database URL scheme 'mysql' (use a SQLite path, "
        "sqlite:///ABSOLUTE/PATH or postgresql://...)\n"
    )


# -- PostgreSQL ---------------------------------------------------------------------------------


def test_postgresql(pg_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The same commands against a postgresql:// URL."""
    th = Cli(capsys, pg_database)
    th.ok("billing", "profile", "acme", "--currency", "CNY")
    th.ok("fx", "set", "USD", "CNY", "7.1", "--from", "2020-01-01")
    th.ok("prices", "set", "gpt-4o", "--currency", "USD", "--input", "2.5", "--output", "10",
          "--from", "2020-01-01")  # fmt: skip
    th.ok("wallet", "topup", "acme", "200", "CNY")
    th.ok("plans", "create", "p", "--price", "99", "--currency", "CNY", "--tokens", "1000",
          "--period", "month", "--overage-per-1m", "2", "--overage-currency", "USD")  # fmt: skip
    th.ok("plans", "assign", "acme", "p", "--start", f"{PERIOD}-01")
    code, _, err = th("wallet", "topup", "acme", "9.999", "CNY")
    assert (code, err) == (2, "tokenhub: error: amount 9.999 CNY has more decimals than CNY's 2 "
                              "(smallest unit 0.01 CNY)\n")  # fmt: skip

    async def insert() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg_database)
        try:
            cols = ", ".join(EVENT_FIELDS)
            marks = ", ".join(f"${i + 1}" for i in range(len(EVENT_FIELDS)))
            await conn.executemany(
                f"INSERT INTO usage_events ({cols}) VALUES ({marks})",
                [
                    msgspec.structs.astuple(e)
                    for e in (
                        event(0, model="gpt-4o", input_tokens=400, output_tokens=300),
                        event(1, model="gpt-4o", input_tokens=400, output_tokens=300),
                        event(2, model="nope", input_tokens=1),
                    )
                ],
            )
        finally:
            await conn.close()

    asyncio.run(insert())
    code, out, _ = th("billing", "settle")
    assert code == 1 and out.startswith("settled 2, duplicates 0, conflicts 0, failed 1 (no price")
    assert th.ok("billing", "settle").endswith("1 earlier failures skipped (--retry-failed "
                                               "retries them)\n")  # fmt: skip
    code, out, _ = th("billing", "settle", "--retry-failed")
    assert code == 1 and out.startswith("settled 0, duplicates 0, conflicts 0, failed 1")
    st = json.loads(th.ok("billing", "statement", "acme", "--period", PERIOD, "--format", "json"))
    # 1000 package tokens, 400 overage tokens at 2 USD per 1M = 0.0008 USD = 0.00568 CNY
    assert st["overage"] == {"CNY": 5_680_000}
    wallet = json.loads(th.ok("wallet", "show", "acme", "--json"))["wallet"]
    assert wallet == {"CNY": "100.99432"}
    assert th.ok("billing", "check").startswith("ledger OK: ")
