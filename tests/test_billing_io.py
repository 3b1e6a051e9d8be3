"""CloudEvents ingest, provider reconciliation and exports (tokenhub.billing.io and billing_io),
through the commands on real files and databases: SQLite, and PostgreSQL when there is one."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tokenhub.billing import io as bio
from tokenhub.billing.service import Billing
from tokenhub.cli import billing_io
from tokenhub.db.database import Tx, open_database
from tokenhub.usage import BILLED_FIELDS, UsageEvent

T = TypeVar("T")
NOV = bio.parse_time("2026-11-01")
HOUR = 3_600_000


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "billing.db")
    return str(request.getfixturevalue("pg_database"))


def with_billing(url: str, fn: Callable[[Billing], Coroutine[Any, Any, T]]) -> T:
    async def go() -> T:
        db = await open_database(url)
        try:
            return await fn(Billing(db))
        finally:
            await db.close()

    return arun(go())


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async def go(b: Billing) -> list[tuple[Any, ...]]:
        async def q(tx: Tx) -> list[tuple[Any, ...]]:
            return await tx.fetch(sql, *args)

        return await b.db.transaction(q)

    return with_billing(url, go)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenhub")
    sub = p.add_subparsers(dest="command")
    es = sub.add_parser("events").add_subparsers(dest="action")
    bs = sub.add_parser("billing").add_subparsers(dest="action")
    billing_io.add_commands(es, bs)
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def ce(
    event_id: str,
    *,
    tenant: str = "acme",
    ts: int = NOV,
    type: str = bio.TYPE_TOKENHUB,
    source: str = "gw-a",
    **data: Any,
) -> str:
    """One CloudEvent line."""
    if type == bio.TYPE_TOKENHUB:
        data = {
            "model": "gpt-x",
            "provider": "openai",
            "input_tokens": 10,
            "output_tokens": 5,
        } | data
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": type,
            "time": bio.iso_z(ts),
            "subject": tenant,
            "data": data,
        }
    )


def write(path: Path, lines: list[str], *, final_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")
    return path


# -- request ids and parsing -----------------------------------------------------------------


def test_request_id_rule() -> None:
    tokenhub_id = "req_0190a1b2c3d4" + "ab" * 10
    uuid = "0b9a6c1e-5f7d-4c1a-9d3e-2a8b7c6d5e4f"
    ulid = "01HZX3M9Q8V7K2P4R6T8W0Y2B4"
    for kept in (tokenhub_id, uuid, ulid):
        assert bio.request_id_for("gw-a", kept) == kept
    assert bio.request_id_for("gw-a", "42") == "gw-a#42"
    assert bio.request_id_for("https://gw/b", "a#b") == "https://gw/b#a#b"
    # A source with '#', or a long result: hashed, so that distinct pairs stay distinct.
    a = bio.request_id_for("x#y", "z")
    b = bio.request_id_for("x", "y#z")
    assert a.startswith("ce_") and len(a) == 35 and a != b == "x#y#z"
    long = bio.request_id_for("s" * 120, "12345678")
    assert long.startswith("ce_") and long != bio.request_id_for("s" * 121, "2345678")


def test_read_lines_bounds_memory() -> None:
    data = b"a" * 10 + b"\n" + b"b" * 11 + b"\n" + b"c" * 25 + b"\n\nlast"
    got = list(bio.read_lines(io.BytesIO(data), 10))
    assert got == [(b"a" * 10, 11), (None, 12), (None, 26), (b"", 1), (b"last", 4)]


def test_parse_event_maps_both_types() -> None:
    p = bio.parse_event(
        ce(
            "1",
            input_tokens=100,
            cached_input_tokens=40,
            output_tokens=7,
            stream=True,
            latency_ms=12.5,
        ).encode()
    )
    assert isinstance(p, bio.Parsed)
    assert p.event == UsageEvent(
        request_id="gw-a#1",
        ts_ms=NOV,
        tenant="acme",
        key_id="",
        endpoint="chat.completions",
        model="gpt-x",
        provider="openai",
        input_tokens=100,
        cached_input_tokens=40,
        output_tokens=7,
        stream=True,
        latency_ms=12.5,
    )
    line = ce(
        "2",
        type=bio.TYPE_OPENAI,
        model="gpt-x",
        prompt_tokens=50,
        completion_tokens=9,
        total_tokens=59,
        prompt_tokens_details={"cached_tokens": 20, "audio_tokens": 0},
        completion_tokens_details={"reasoning_tokens": 3},
    )
    p = bio.parse_event(line.encode())
    assert isinstance(p, bio.Parsed)
    assert (p.event.input_tokens, p.event.cached_input_tokens, p.event.output_tokens) == (50, 20, 9)
    assert p.event.provider == "" and p.event.model == "gpt-x"


# -- ingest --------------------------------------------------------------------------------------


def ingest_file(tmp_path: Path) -> Path:
    big = json.loads(ce("big"))
    big["x_padding"] = "p" * 700  # an extension attribute making the line too long
    no_offset = json.loads(ce("t"))
    no_offset["time"] = "2026-11-01T00:00:00"
    b64 = json.loads(ce("b"))
    del b64["data"]
    b64["data_base64"] = "e30="
    no_subject = json.loads(ce("s"))
    del no_subject["subject"]
    return write(
        tmp_path / "events.jsonl",
        [
            ce("1", input_tokens=100, cached_input_tokens=40, output_tokens=7),  # 1
            ce(
                "0b9a6c1e-5f7d-4c1a-9d3e-2a8b7c6d5e4f",
                type=bio.TYPE_OPENAI,
                model="gpt-x",
                prompt_tokens=50,
                completion_tokens=9,
                provider="openai",
            ),  # 2
            "",  # 3
            "not json",  # 4
            ce("1", input_tokens=100, cached_input_tokens=40, output_tokens=7),  # 5
            ce("1", input_tokens=101, cached_input_tokens=40, output_tokens=7),  # 6
            "[1]",  # 7
            json.dumps(no_subject),  # 8
            ce("v").replace('"1.0"', '"0.3"'),  # 9
            ce("u", type="com.example.tokens", tokens=5),  # 10
            ce("n", input_tokens=-1),  # 11
            ce("c", input_tokens=5, cached_input_tokens=6),  # 12
            ce("k", input_token=5),  # 13
            ce(
                "o",
                type=bio.TYPE_OPENAI,
                model="m",
                prompt_tokens=1,
                completion_tokens=1,
                total_tokens=3,
            ),  # 14
            json.dumps(big),  # 15
            json.dumps(no_offset),  # 16
            json.dumps(b64),  # 17
            "   ",  # 18
            ce("2", ts=NOV + HOUR, input_tokens=3, output_tokens=4),  # 19, no final newline
        ],
        final_newline=False,
    )


EXPECTED_REASONS = {
    4: "JSON is malformed: invalid character (byte 4)",
    7: "Expected `object`, got `array`",
    8: "Object missing required field `subject`",
    9: "Invalid enum value '0.3' - at `$.specversion`",
    10: "unsupported type 'com.example.tokens' (accepted: tokenhub.usage.v1, com.openai.usage)",
    11: "Expected `int` >= 0 - at `$.data.input_tokens`",
    12: "cached input tokens (6) exceed input tokens (5): cached tokens are part of the input",
    13: "Object contains unknown field `input_token` - at `$.data`",
    14: "total_tokens 3 is not prompt_tokens + completion_tokens (1 + 1) - at "
    "`$.data.total_tokens`",
    15: "line is longer than 600 bytes",
    16: "Expected `datetime` with a timezone component - at `$.time`",
    17: "data_base64 is not supported: send the usage as JSON in `data`",
}


@pytest.mark.parametrize("batch", ["1000", "2"])
def test_ingest_reports_every_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, batch: str
) -> None:
    path = ingest_file(tmp_path)
    argv = [
        "events",
        "ingest",
        str(path),
        "--database",
        url,
        "--format",
        "jsonl",
        "-v",
        "--max-line-bytes",
        "600",
        "--batch-size",
        batch,
    ]
    code, out, err = run(capsys, *argv)
    assert (code, err) == (1, "")
    *lines, last = [json.loads(x) for x in out.splitlines()]
    assert last == {
        "summary": {
            "lines": 19,
            "blank": 2,
            "ingested": 3,
            "duplicate": 1,
            "conflict": 1,
            "invalid": 12,
        }
    }
    expected = {1: "ingested", 2: "ingested", 5: "duplicate", 6: "conflict", 19: "ingested"}
    expected |= dict.fromkeys(EXPECTED_REASONS, "invalid")
    assert [(r["line"], r["status"]) for r in lines] == sorted(expected.items())  # blanks: none
    assert {r["line"]: r["reason"] for r in lines if r["status"] == "invalid"} == EXPECTED_REASONS
    by_line = {r["line"]: r for r in lines}
    assert by_line[1] == {
        "line": 1,
        "status": "ingested",
        "id": "1",
        "source": "gw-a",
        "request_id": "gw-a#1",
    }
    assert by_line[2]["request_id"] == "0b9a6c1e-5f7d-4c1a-9d3e-2a8b7c6d5e4f"
    if batch == "1000":  # line 1 in the same batch: compared with it
        assert by_line[5]["reason"] == "same as line 1"
        assert by_line[6]["reason"] == (
            "same request_id as line 1, different payload (line ignored)"
        )
    else:  # line 1 was stored by an earlier batch; lines 5 and 6 share one
        assert by_line[5]["reason"] == "already stored with the same payload"
        assert by_line[6]["reason"] == (
            "same request_id as line 5, different payload (line ignored)"
        )

    stored = query(
        url,
        "SELECT request_id, ts_ms, tenant, input_tokens, cached_input_tokens, "
        "output_tokens, provider FROM usage_events ORDER BY request_id",
    )
    assert [tuple(r) for r in stored] == [
        ("0b9a6c1e-5f7d-4c1a-9d3e-2a8b7c6d5e4f", NOV, "acme", 50, 0, 9, "openai"),
        ("gw-a#1", NOV, "acme", 100, 40, 7, "openai"),  # the first payload was kept
        ("gw-a#2", NOV + HOUR, "acme", 3, 0, 4, "openai"),
    ]

    # Again: everything valid is a duplicate now; the conflict and the invalid lines stay.
    code, out, _ = run(capsys, *argv)
    assert code == 1
    assert json.loads(out.splitlines()[-1])["summary"] == {
        "lines": 19,
        "blank": 2,
        "ingested": 0,
        "duplicate": 4,
        "conflict": 1,
        "invalid": 12,
    }


def test_ingest_text_output_and_exit_status(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str
) -> None:
    good = write(tmp_path / "good.jsonl", [ce("1"), ce("2", ts=NOV + 1)])
    code, out, err = run(capsys, "events", "ingest", str(good), "--database", url)
    assert (code, out, err) == (
        0,
        "ingest: 2 lines: 2 ingested, 0 duplicate, 0 conflict, 0 invalid, 0 blank\n",
        "",
    )
    # Only problems are listed without -v; the same id with another payload conflicts with
    # the stored event, which is kept.
    bad = write(tmp_path / "bad.jsonl", [ce("1"), ce("2", output_tokens=6), "{"])
    code, out, _ = run(capsys, "events", "ingest", str(bad), "--database", url)
    assert code == 1
    assert out.splitlines() == [
        "line 2: conflict gw-a#2 (id '2' from 'gw-a'): already stored with a different payload "
        "(the stored event is kept)",
        "line 3: invalid: Input data was truncated",
        "ingest: 3 lines: 0 ingested, 1 duplicate, 1 conflict, 1 invalid, 0 blank",
    ]
    assert query(url, "SELECT output_tokens FROM usage_events WHERE request_id = 'gw-a#2'") == [
        (5,)
    ]
    code, _, err = run(capsys, "events", "ingest", str(tmp_path / "nope.jsonl"), "--db", url)
    # A file that cannot be read failed (1); what is refused as given is 2.
    assert code == 1 and err.startswith("tokenhub: error: ") and "nope.jsonl" in err


def test_ingest_progress(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", [ce(str(i), ts=NOV + i) for i in range(5)])
    seen: list[tuple[int, int]] = []

    async def go() -> bio.IngestSummary:
        db = await open_database(str(tmp_path / "p.db"))
        try:
            with path.open("rb") as f:
                return await bio.ingest(
                    db, f, batch_size=2, progress=lambda *a: seen.append(a), progress_every_s=0
                )
        finally:
            await db.close()

    summary = arun(go())
    assert summary.ingested == 5 and summary.ok
    assert [n for n, _ in seen] == [1, 2, 3, 4, 5]
    assert seen[-1][1] == path.stat().st_size


def prices(b: Billing) -> Coroutine[Any, Any, None]:
    async def go() -> None:
        await b.set_price(
            "gpt-x",
            currency="USD",
            input_per_1m="0.15",
            cached_input_per_1m="0.075",
            output_per_1m="0.60",
            effective_ms=0,
        )
        await b.set_price(
            "gpt-y",
            currency="USD",
            input_per_1m="1.00",
            output_per_1m="3.00",
            points_per_1m="500",
            effective_ms=0,
        )

    return go()


def test_ingest_settle(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str) -> None:
    with_billing(url, prices)
    with_billing(url, lambda b: b.topup("acme", "1.00", "USD", ts_ms=NOV))
    path = write(
        tmp_path / "e.jsonl",
        [
            ce("1", input_tokens=1000, cached_input_tokens=200, output_tokens=500),
            ce("2", model="unpriced"),
            ce("3", tenant="beta", model="gpt-y", input_tokens=2000, output_tokens=1000),
        ],
    )
    argv = ["events", "ingest", str(path), "--database", url, "--settle"]
    code, out, _ = run(capsys, *argv)
    assert code == 1
    assert out.splitlines() == [
        "line 2: settle failed gw-a#2 (id '2' from 'gw-a'): no price for model 'unpriced' at "
        f"{NOV} (it has none): set one in force by then with `tokenhub prices set unpriced "
        "--currency CUR --input N --output N --from DATE` or `tokenhub prices import --config "
        "FILE --from DATE`, then run `tokenhub billing settle --retry-failed`",
        "ingest: 3 lines: 3 ingested, 0 duplicate, 0 conflict, 0 invalid, 0 blank; 2 settled, "
        "0 already settled, 1 settle failed, 0 settle conflict",
    ]
    # 800 x 0.15 + 200 x 0.075 + 500 x 0.60 per 1M = 0.000435 USD from acme's wallet; beta has
    # no money: 0.005 USD of overrun.
    legs = query(
        url,
        "SELECT t.ref, p.account, p.amount FROM ledger_txns t JOIN postings p "
        "ON p.txn_id = t.id WHERE t.kind = 'usage' AND p.account LIKE 't:%' "
        "ORDER BY t.ref",
    )
    assert [tuple(r) for r in legs] == [
        ("gw-a#1", "t:acme:wallet:USD", 435_000),
        ("gw-a#3", "t:beta:overrun:USD", 5_000_000),
    ]
    assert with_billing(url, lambda b: b.invariants()) == []
    # Again: nothing new is stored or posted; the unpriced event still fails.
    code, out, _ = run(capsys, *argv)
    assert code == 1 and out.splitlines()[-1] == (
        "ingest: 3 lines: 0 ingested, 3 duplicate, 0 conflict, 0 invalid, 0 blank; 0 settled, "
        "2 already settled, 1 settle failed, 0 settle conflict"
    )
    assert len(query(url, "SELECT id FROM ledger_txns WHERE kind = 'usage'")) == 2


# -- reconcile -----------------------------------------------------------------------------------


def stored(url: str, events: list[UsageEvent]) -> None:
    async def go(b: Billing) -> list[bio.Outcome]:
        return await b.db.transaction(lambda tx: bio.store_events(tx, events))

    assert with_billing(url, go) == ["ingested"] * len(events)


def ev(
    rid: str,
    ts: int,
    provider: str = "openai",
    i: int = 10,
    c: int = 0,
    o: int = 5,
    model: str = "gpt-x",
    upstream: str = "",
) -> UsageEvent:
    return UsageEvent(
        request_id=rid,
        ts_ms=ts,
        tenant="acme",
        key_id="key_0123456789ab",
        endpoint="chat.completions",
        model=model,
        upstream_model=upstream,
        provider=provider,
        input_tokens=i,
        cached_input_tokens=c,
        output_tokens=o,
    )


def test_reconcile(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str) -> None:
    stored(
        url,
        [
            ev("r1", NOV + 1, i=100, c=20, o=50, upstream="gpt-x-2026-08-01"),
            ev("r2", NOV + 2, i=200, c=0, o=80),
            ev("r3", NOV + 3, i=300, c=30, o=90),  # differs in the file
            ev("r4", NOV + 4, i=7, o=3),  # extra: not in the file
            ev("r5", NOV + 5, i=0, o=0),  # no tokens: ignored when absent
            ev("r6", NOV + 6, provider="azure", i=1, o=1),  # another provider: out of scope
            ev("r7", NOV - 10, i=11, o=12),  # before the window, but in the file
            ev("r8", NOV + 8, provider="azure", i=5, o=5),  # in the file, recorded for azure
            ev("r9", NOV + 9, i=4, o=4),  # its row is malformed: not an extra
        ],
    )
    path = tmp_path / "provider.csv"
    path.write_text(
        "\ufeffRequest_ID,prompt_tokens,completion_tokens,cached_tokens,model,note\n"
        "r1,100,50,20,gpt-x-2026-08-01,\n"  # line 2: matches the upstream model name
        'r2,200,80,0,gpt-x,"multi\nline"\n'  # line 3 (4)
        "r3,301,90,30,gpt-z,\n"  # line 5: input and model differ
        "\n"  # line 6: blank
        "r7,11,12,0,gpt-x,\n"  # line 7: outside the window, matched
        "r8,5,5,0,gpt-x,\n"  # line 8: provider differs
        "r10,9,9,1,gpt-x,\n"  # line 9: missing
        "r9,4,x,0,gpt-x,\n"  # line 10: malformed count
        "r2,200,80,0,gpt-x,\n"  # line 11: repeated id
        ",1,1,0,gpt-x,\n"  # line 12: no id
        "r11,1,1\n"  # line 13: short row
        "r12,1,1,2,gpt-x,\n",  # line 14: cached > input
        encoding="utf-8",
    )
    argv = [
        "billing",
        "reconcile",
        str(path),
        "--database",
        url,
        "--provider",
        "openai",
        "--since",
        bio.iso_z(NOV),
        "--until",
        "2026-12-01",
        "--format",
        "json",
    ]
    code, out, err = run(capsys, *argv)
    assert (code, err) == (1, "")
    rep = json.loads(out)
    fields = ["input_tokens", "cached_input_tokens", "output_tokens"]
    assert rep["compared"] == fields and not rep["ok"]
    assert (rep["rows"], rep["matched"], rep["matched_out_of_scope"], rep["ignored_empty"]) == (
        6,
        5,
        2,
        1,
    )
    assert rep["missing"] == [
        {
            "line": 9,
            "request_id": "r10",
            "input_tokens": 9,
            "cached_input_tokens": 1,
            "output_tokens": 9,
            "model": "gpt-x",
        }
    ]
    assert rep["extra"] == [
        {
            "request_id": "r4",
            "ts": bio.iso_z(NOV + 4),
            "provider": "openai",
            "model": "gpt-x",
            "input_tokens": 7,
            "cached_input_tokens": 0,
            "output_tokens": 3,
        }
    ]
    assert [(d["line"], d["request_id"], d["fields"]) for d in rep["differing"]] == [
        (5, "r3", ["input_tokens", "model"]),
        (8, "r8", ["provider"]),
    ]
    assert rep["differing"][0]["file"] == {
        "input_tokens": 301,
        "cached_input_tokens": 30,
        "output_tokens": 90,
        "model": "gpt-z",
    }
    assert rep["differing"][0]["tokenhub"]["input_tokens"] == 300
    assert rep["malformed"] == [
        {"line": 10, "reason": "output_tokens 'x' is not a whole number >= 0"},
        {"line": 11, "reason": "request_id 'r2' again (first on line 3)"},
        {"line": 12, "reason": "empty request_id"},
        {"line": 13, "reason": "expected 6 fields as in the header, got 3"},
        {"line": 14, "reason": "cached_input_tokens exceed input_tokens"},
    ]
    # File: r1 r2 r3 r7 r8 r10. Tokenhub: in scope r1 r2 r3 r4 r5 r9, plus r7 and r8 matched
    # outside it.
    file_t = {
        "input_tokens": 100 + 200 + 301 + 11 + 5 + 9,
        "cached_input_tokens": 20 + 30 + 1,
        "output_tokens": 50 + 80 + 90 + 12 + 5 + 9,
    }
    th_t = {
        "input_tokens": 100 + 200 + 300 + 7 + 4 + 11 + 5,
        "cached_input_tokens": 20 + 30,
        "output_tokens": 50 + 80 + 90 + 3 + 4 + 12 + 5,
    }
    assert rep["totals"] == {
        "file": file_t,
        "tokenhub": th_t,
        "difference": {k: file_t[k] - th_t[k] for k in fields},
    }

    code, out, _ = run(capsys, *argv[:-2])
    assert code == 1
    text = out.splitlines()
    assert text[:2] == [
        "missing in tokenhub (1):",
        "  line 9  r10  input_tokens=9 cached_input_tokens=1 output_tokens=9",
    ]
    assert (
        "  line 5  r3  input_tokens file 301 tokenhub 300; model file gpt-z tokenhub gpt-x" in text
    )
    assert text[-1] == (
        "6 rows, 5 matched (2 outside the provider/time scope), 1 tokenhub events without "
        "tokens ignored: 9 discrepancies"
    )


def test_reconcile_clean_and_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str
) -> None:
    stored(url, [ev("a", NOV, i=3, o=4), ev("b", NOV + 1, i=5, c=2, o=6), ev("z", NOV, i=0, o=0)])
    ok = tmp_path / "ok.csv"
    ok.write_text("request_id,input_tokens,output_tokens\nb,5,6\na,3,4\n")
    code, out, _ = run(capsys, "billing", "reconcile", str(ok), "--database", url)
    assert code == 0 and out.endswith("tokens ignored: everything matches\n")
    assert "cached" not in out  # not in the file: not compared
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt_tokens,input_tokens\n")
    code, out, err = run(capsys, "billing", "reconcile", str(bad), "--database", url)
    assert (code, out) == (2, "")
    assert err == (
        "tokenhub: error: columns input_tokens and prompt_tokens both give input_tokens: keep one\n"
    )
    bad.write_text("id,input_tokens,output_tokens\n")
    code, _, err = run(capsys, "billing", "reconcile", str(bad), "--database", url)
    assert err == "tokenhub: error: the CSV header has no column for request_id\n"
    code, _, err = run(
        capsys, "billing", "reconcile", str(ok), "--database", str(tmp_path / "none.db")
    )
    assert code == 2 and err.startswith("tokenhub: error: no database at ")


# -- exports -------------------------------------------------------------------------------------


class Scenario:
    """A settled month: packages with overage, a wallet, overrun, FX, points, a refund, a
    redemption code, an adjustment, an expired lot, and one event that could not be settled."""

    def __init__(self, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        with_billing(url, self.setup)
        lines = [
            ce(
                "e1",
                ts=NOV + 1 * HOUR,
                input_tokens=300,
                cached_input_tokens=100,
                output_tokens=200,
            ),
            ce("e2", ts=NOV + 2 * HOUR, input_tokens=400, output_tokens=300),
            ce("e3", ts=NOV + 3 * HOUR, model="gpt-y", input_tokens=1000, output_tokens=1000),
            ce("e4", ts=NOV + 4 * HOUR, model="unpriced"),
            ce(
                "e5",
                ts=NOV + 5 * HOUR,
                tenant="beta",
                model="gpt-y",
                provider="azure",
                input_tokens=2000,
                output_tokens=1000,
            ),
            ce(
                "e6",
                ts=NOV + 30 * HOUR,
                tenant="gamma",
                model="gpt-y",
                input_tokens=20000,
                cached_input_tokens=5000,
                output_tokens=4000,
            ),
            ce("e7", ts=NOV + 31 * HOUR, model="gpt-x", input_tokens=0, output_tokens=0),
        ]
        path = write(tmp_path / "scenario.jsonl", lines)
        code, _, _ = run(capsys, "events", "ingest", str(path), "--database", url, "--settle")
        assert code == 1  # e4 has no price
        with_billing(url, self.after)

    async def setup(self, b: Billing) -> None:
        await prices(b)
        await b.topup("acme", "10.00", "USD", ts_ms=NOV)
        await b.create_plan(
            "starter",
            price="1.00",
            currency="USD",
            tokens=1000,
            overage_per_1m="2.00",
            models=["gpt-x"],
        )
        self.lot = (await b.assign("acme", "starter", start_ms=NOV)).id
        await b.set_profile("gamma", currency="CNY")
        await b.set_fx("USD", "CNY", "7.1", effective_ms=0)
        await b.topup("gamma", "100.00", "CNY", ts_ms=NOV)
        await b.create_plan("pts", price="10.00", currency="CNY", points="5")
        self.points_lot = (await b.assign("gamma", "pts", start_ms=NOV)).id

    async def after(self, b: Billing) -> None:
        await b.refund("gw-a#e1", ts_ms=NOV + 40 * HOUR)
        await b.refund("gw-a#e3", ts_ms=bio.parse_time("2026-12-02"))  # booked to December
        [code] = await b.create_codes(1, "2.00", "USD")
        await b.redeem("acme", code, ts_ms=NOV + 41 * HOUR)
        await b.adjust("acme", "-0.50", "USD", "goodwill reversed", ts_ms=NOV + 42 * HOUR)
        await b.expire(now=bio.parse_time("2026-12-01T00:00:01Z"))
        assert await b.invariants() == []

    def charges(self) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
        """(billed, effective) per (tenant, currency), straight from the postings."""
        out: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for tenant, kind, account, unit, amount in query(
            self.url,
            "SELECT t.tenant, t.kind, p.account, p.unit, p.amount FROM ledger_txns t "
            "JOIN postings p ON p.txn_id = t.id WHERE p.account LIKE 't:%'",
        ):
            if kind in ("topup", "payment"):
                continue
            acc_kind = account.split(":")[2]
            if acc_kind in ("wallet", "receivable", "overrun"):
                out[(tenant, unit)][0] += amount
                out[(tenant, unit)][1] += amount
            elif acc_kind == "deferred":
                out[(tenant, unit)][1] += amount
        return {k: (Decimal(b).scaleb(-9), Decimal(e).scaleb(-9)) for k, (b, e) in out.items()}


def test_export_focus(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str) -> None:
    s = Scenario(url, tmp_path, capsys)
    out_file = tmp_path / "focus.csv"
    code, out, err = run(
        capsys, "billing", "export", "--format", "focus", "--database", url, "-o", str(out_file)
    )
    assert (code, out) == (0, "")
    with out_file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == bio.FOCUS_COLUMNS
        rows = list(reader)
    assert err == f"exported {len(rows)} FOCUS rows\n"

    # Exactly the ledger's charges, per tenant and currency, never through a float.
    sums: dict[tuple[str, str], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for r in rows:
        assert "e" not in r["BilledCost"].lower() and "e" not in r["EffectiveCost"].lower()
        sums[(r["BillingAccountId"], r["BillingCurrency"])][0] += Decimal(r["BilledCost"])
        sums[(r["BillingAccountId"], r["BillingCurrency"])][1] += Decimal(r["EffectiveCost"])
    assert {k: tuple(v) for k, v in sums.items()} == s.charges()
    assert set(sums) == {("acme", "USD"), ("beta", "USD"), ("gamma", "CNY")}

    # Over a prepaid lot's life (bought, used, refunded, expired) it earns its price exactly.
    for lot, price in ((s.lot, "1.00"), (s.points_lot, "10.00")):
        mine = [r for r in rows if r["CommitmentDiscountId"] == lot]
        assert sum(Decimal(r["EffectiveCost"]) for r in mine) == Decimal(price)
        [purchase] = [r for r in mine if r["ChargeCategory"] == "Purchase"]
        assert (Decimal(purchase["BilledCost"]), purchase["EffectiveCost"]) == (Decimal(price), "0")

    by = defaultdict(list)
    for r in rows:
        by[(r["BillingAccountId"], r["ChargeCategory"], r["x_PaidFrom"])].append(r)
    # No top-up row: money received is not a charge.
    assert not [r for r in rows if "top-up" in r["ChargeDescription"]]
    [credit] = by[("acme", "Credit", "")]
    [adjustment] = by[("acme", "Adjustment", "")]
    assert (credit["BilledCost"], adjustment["BilledCost"]) == ("-2", "0.5")
    # e1 (300 input of which 100 cached, 200 output) from the package, then refunded.
    package = {
        (r["SkuId"], r["ChargeDescription"].startswith("Refund")): r
        for r in by[("acme", "Usage", "package")]
    }
    used = package[("gpt-x/input", False)]
    assert used["ConsumedQuantity"] == "600"  # e1 200 + e2 400, same day, same lot
    assert used["BilledCost"] == "0" and Decimal(used["EffectiveCost"]) > 0
    assert (used["PricingCategory"], used["CommitmentDiscountStatus"]) == ("Committed", "Used")
    refunded = package[("gpt-x/cached_input", True)]
    assert (refunded["ConsumedQuantity"], refunded["ChargeClass"]) == ("-100", "")
    # e2: 500 tokens left in the package, 200 output tokens at the 2.00 overage price.
    [overage] = by[("acme", "Usage", "overage")]
    assert (overage["SkuId"], overage["ConsumedQuantity"], overage["BilledCost"]) == (
        "gpt-x/output",
        "200",
        "0.0004",
    )
    assert (overage["ListUnitPrice"], overage["PricingCategory"]) == ("2", "Other")
    # e3 from the wallet at list price; e5 priced too, though beta has no money (the postings
    # go to its overrun account).
    priced = {r["SkuId"]: r for r in by[("acme", "Usage", "priced")] if not r["ChargeClass"]}
    assert priced["gpt-y/output"]["BilledCost"] == "0.003"
    assert priced["gpt-y/output"]["ListCost"] == "0.003"
    assert priced["gpt-y/output"]["PricingQuantity"] == "0.001"
    overrun = {r["SkuId"]: r for r in by[("beta", "Usage", "priced")]}
    assert overrun["gpt-y/input"]["BilledCost"] == "0.002"
    assert overrun["gpt-y/input"]["PublisherName"] == "azure"
    # gamma: 5 points pay for 10,000 tokens (input first), the rest is priced in USD and
    # converted to CNY at 7.1.
    gamma = {(r["x_PaidFrom"], r["SkuId"]): r for r in rows if r["BillingAccountId"] == "gamma"}
    assert gamma[("points", "gpt-y/input")]["ConsumedQuantity"] == "10000"
    assert gamma[("points", "gpt-y/input")]["x_Points"] == "5"
    cached = gamma[("priced", "gpt-y/cached_input")]
    assert (cached["PricingCurrency"], cached["BillingCurrency"], cached["x_FxRate"]) == (
        "USD",
        "CNY",
        "7.1",
    )
    assert cached["ListUnitPrice"] == "7.1"  # 1.00 USD per 1M
    assert cached["BilledCost"] == "0.0355"  # 5000 x 1.00 / 1M x 7.1
    # e3 refunded in December: a correction of November's usage, on e3's day.
    [corr] = [r for r in rows if r["ChargeClass"] == "Correction" and r["SkuId"] == "gpt-y/output"]
    assert (corr["BillingPeriodStart"], corr["ChargePeriodStart"]) == (
        "2026-12-01T00:00:00Z",
        "2026-11-01T00:00:00Z",
    )
    assert (corr["ConsumedQuantity"], corr["BilledCost"], corr["ListCost"]) == (
        "-1000",
        "-0.003",
        "-0.003",
    )
    assert corr["ChargeDescription"] == "Refund: gpt-y output tokens"
    # The expired package: 500 tokens never used (the refund gave e1's back).
    [unused] = [r for r in rows if r["CommitmentDiscountStatus"] == "Unused"]
    assert unused["CommitmentDiscountId"] == s.lot and unused["PricingQuantity"] == "0.0005"
    [(period,)] = query(
        url, "SELECT period FROM ledger_txns WHERE kind = 'expiry' AND ref = $1", s.lot
    )
    assert unused["BillingPeriodStart"] == f"{period}-01T00:00:00Z"

    # --period selects the billing period; --tenant the account.
    code, out, _ = run(
        capsys,
        "billing",
        "export",
        "--format",
        "focus",
        "--database",
        url,
        "--period",
        "2026-11",
        "--tenant",
        "acme",
    )
    nov = list(csv.DictReader(io.StringIO(out)))
    assert nov == [
        r
        for r in rows
        if r["BillingAccountId"] == "acme" and r["BillingPeriodStart"] == "2026-11-01T00:00:00Z"
    ]
    assert len(nov) >= 10


def test_export_event_log(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str) -> None:
    Scenario(url, tmp_path, capsys)
    code, out, err = run(capsys, "billing", "export", "--format", "jsonl", "--database", url)
    assert (code, err) == (0, "exported 7 usage events\n")
    events = [json.loads(x) for x in out.splitlines()]
    assert [tuple(e) for e in events] == [bio.EVENT_LOG_FIELDS] * 7
    assert [e["request_id"] for e in events] == [f"gw-a#e{i}" for i in range(1, 8)]
    by = {e["request_id"]: e for e in events}
    # Charged: straight from the usage transaction's postings on the tenant's money.
    money = defaultdict(int)
    for txn, amount in query(
        url,
        "SELECT p.txn_id, p.amount FROM postings p WHERE "
        "p.account LIKE 't:%:wallet:%' OR p.account LIKE "
        "'t:%:receivable:%' OR p.account LIKE 't:%:overrun:%'",
    ):
        money[txn] += amount
    for e in events:
        if e["txn_id"]:
            assert Decimal(e["charged"]) == Decimal(money[e["txn_id"]]).scaleb(-9)
    assert (by["gw-a#e1"]["settlement"], by["gw-a#e1"]["package_tokens"]) == ("refunded", 500)
    assert by["gw-a#e1"]["refund_txn_id"].startswith("txn_")
    assert (by["gw-a#e2"]["charged"], by["gw-a#e2"]["package_tokens"]) == ("0.0004", 500)
    assert by["gw-a#e4"]["settlement"] == "unsettled"
    assert by["gw-a#e4"]["txn_id"] == by["gw-a#e4"]["charged"] == ""
    assert (by["gw-a#e6"]["currency"], by["gw-a#e6"]["points"]) == ("CNY", "5")
    assert (
        by["gw-a#e7"] | {"settlement": "settled", "txn_id": "", "charged": "0", "currency": "USD"}
        == by["gw-a#e7"]
    )
    ev1 = by["gw-a#e1"]
    assert {k: ev1[k] for k in BILLED_FIELDS} == {
        "request_id": "gw-a#e1",
        "ts_ms": NOV + HOUR,
        "tenant": "acme",
        "key_id": "",
        "endpoint": "chat.completions",
        "model": "gpt-x",
        "deployment": "",
        "provider": "openai",
        "upstream_model": "",
        "stream": False,
        "input_tokens": 300,
        "cached_input_tokens": 100,
        "output_tokens": 200,
        "source": "upstream",
        "status": 200,
        "error": "",
        "latency_ms": 0.0,
        "ttft_ms": None,
        "attempts": 1,
        "route": "",
        "tier": "",
        "usage_anomaly": "",
        "cache_write_tokens": 0,
    }

    # CSV: the same rows, and it parses back.
    code, out, _ = run(capsys, "billing", "export", "--format", "csv", "--database", url)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["request_id"] for r in rows] == [e["request_id"] for e in events]
    for r, e in zip(rows, events, strict=True):
        assert r == {k: str(bio.csv_cell(v)) for k, v in e.items()}

    # Filters: the tenant, and usage times.
    code, out, err = run(
        capsys, "billing", "export", "--format", "jsonl", "--database", url, "--tenant", "gamma"
    )
    assert [json.loads(x)["request_id"] for x in out.splitlines()] == ["gw-a#e6"]
    code, out, _ = run(
        capsys,
        "billing",
        "export",
        "--format",
        "jsonl",
        "--database",
        url,
        "--since",
        bio.iso_z(NOV + 2 * HOUR),
        "--until",
        bio.iso_z(NOV + 5 * HOUR),
    )
    assert [json.loads(x)["request_id"] for x in out.splitlines()] == [
        "gw-a#e2",
        "gw-a#e3",
        "gw-a#e4",
    ]
    code, _, err = run(
        capsys,
        "billing",
        "export",
        "--format",
        "csv",
        "--database",
        url,
        "--period",
        "2026-11",
        "--since",
        "2026-11-02",
    )
    assert (code, err) == (2, "tokenhub: error: give --period or --since/--until, not both\n")


def test_event_log_pages(tmp_path: Path) -> None:
    """Keyset paging: equal timestamps across a page boundary lose and repeat nothing."""
    url = str(tmp_path / "pages.db")
    stored(url, [ev(f"r{i:02d}", NOV + i // 3) for i in range(10)])

    async def go(b: Billing) -> list[str]:
        return [e["request_id"] async for e in bio.iter_event_log(b.db, page=2)]

    assert with_billing(url, go) == [f"r{i:02d}" for i in range(10)]


def test_database_is_shared_with_the_store(tmp_path: Path) -> None:
    """Events ingested here are the store's events (one schema, one table)."""
    from tokenhub.store import open_store

    url = str(tmp_path / "shared.db")
    stored(url, [ev("r1", NOV)])
    store = open_store(url, create=False)
    try:
        store.migrate()
        assert list(store.iter_events()) == [ev("r1", NOV)]
        assert store.insert_events([ev("r1", NOV)]).duplicates == 1
    finally:
        store.close()
