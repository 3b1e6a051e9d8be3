"""Usage-event writes: CPU per event of `SQLiteStore.insert_events`, and of the `sync()` after.

    .venv/bin/python benches/bench_store.py                    # ~15 s
    .venv/bin/python benches/bench_store.py --quick            # smoke test, a few seconds
    .venv/bin/python benches/bench_store.py --rows 1000000 --batches 10,50,1000 --json st.json

The sink's writer thread calls `insert_events` every 50 ms with what arrived meanwhile (tens to
~1000 events) and `sync()` about once per 8 MiB journal segment; it shares the machine's cores
with the event loop, so the figure that matters is CPU time, not events/s. Method: a template
database with ``--rows`` realistic events (time-ordered request ids ``req_`` + 12 hex ms + 20
random hex, 20 tenants, 50 keys, 5 models, 60% streams) is built once; every run copies it,
opens a store, writes 5 warm-up batches, then times ``--events`` new events in batches of each
size with ``time.thread_time`` (user + system CPU of this thread: the WAL writes and the
checkpoint's fsync included) and calls `sync()` every ``--sync-every`` events, timed apart.
Two implementations take turns within each round so machine noise hits them alike:

* ``multi-row``: the store as shipped (multi-row ``INSERT OR ROLLBACK``, see store/sqlite.py)
* ``row-per-statement``: the same store with the one-row ``executemany`` it used before

Each run checks its counts (every event inserted once, a replayed batch all duplicates, the row
count at the end): a mismatch is printed as MISMATCH and makes the script exit with status 1.
Nothing asserts on time. Read absolute figures on a shared machine as rough; the ratio within
one run is the result.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from tokenhub.store.sqlite import _INSERT_EVENT, SQLiteStore
from tokenhub.usage import UsageEvent

MODELS = (
    ("gpt-4o-mini", "openai"),
    ("gpt-4o", "openai"),
    ("qwen-plus", "dashscope"),
    ("claude-3-5-sonnet", "anthropic"),
    ("llama-3.1-70b", "together"),
)
WARMUP_BATCHES = 5


class RowPerStatement(SQLiteStore):
    """The store with its previous insert path: one row per statement via executemany."""

    def _insert(self, conn: sqlite3.Connection, events: Any) -> int:
        rows = [msgspec.structs.astuple(e) for e in events]
        return int(conn.executemany(_INSERT_EVENT, rows).rowcount)


IMPLEMENTATIONS: dict[str, type[SQLiteStore]] = {
    "multi-row": SQLiteStore,
    "row-per-statement": RowPerStatement,
}


class EventMaker:
    """Realistic events with increasing timestamps (about one per millisecond)."""

    def __init__(self, seed: int, start_ms: int) -> None:
        self.rng = random.Random(seed)
        self.ms = start_ms
        self.tenants = [f"tenant-{i:02d}" for i in range(20)]
        self.keys = [f"key_{self.rng.getrandbits(48):012x}" for _ in range(50)]

    def batch(self, n: int) -> list[UsageEvent]:
        rng = self.rng
        out = []
        for _ in range(n):
            self.ms += rng.choice((0, 1, 1, 2))
            model, provider = rng.choice(MODELS)
            stream = rng.random() < 0.6
            ok = rng.random() < 0.97
            tokens_in = rng.randint(10, 4000)
            out.append(
                UsageEvent(
                    request_id=f"req_{self.ms:012x}{rng.getrandbits(80):020x}",
                    ts_ms=self.ms,
                    tenant=rng.choice(self.tenants),
                    key_id=rng.choice(self.keys),
                    endpoint="chat.completions" if rng.random() < 0.9 else "embeddings",
                    model=model,
                    deployment=f"{model}@{provider}-a",
                    provider=f"{provider}-a",
                    upstream_model=f"{model}-2024-08-06",
                    stream=stream,
                    input_tokens=tokens_in,
                    cached_input_tokens=rng.choice((0, 0, 0, tokens_in // 2)),
                    output_tokens=rng.randint(1, 1000),
                    source="upstream" if ok else "metered",
                    status=200 if ok else rng.choice((429, 499, 502)),
                    error="" if ok else "upstream_error",
                    latency_ms=rng.uniform(50, 5000),
                    ttft_ms=rng.uniform(20, 800) if stream else None,
                    attempts=1 if ok else 2,
                )
            )
        return out


def build_template(path: Path, rows: int) -> None:
    maker = EventMaker(seed=7, start_ms=1_760_000_000_000 - 2 * rows)
    store = SQLiteStore(str(path))
    store.migrate()
    for done in range(0, rows, 1000):
        store.insert_events(maker.batch(min(1000, rows - done)))
    store.sync()
    store.close()


def run_once(
    cls: type[SQLiteStore],
    template: Path,
    workdir: Path,
    rows: int,
    batch: int,
    events: int,
    sync_every: int,
    seed: int,
) -> dict[str, Any]:
    db = workdir / "run.db"
    for p in workdir.glob("run.db*"):
        p.unlink()
    shutil.copyfile(template, db)
    maker = EventMaker(seed=seed, start_ms=1_760_000_000_000)
    batches = [maker.batch(batch) for _ in range(WARMUP_BATCHES + max(1, events // batch))]
    problems: list[str] = []
    store = cls(str(db))
    try:
        for b in batches[:WARMUP_BATCHES]:
            store.insert_events(b)
        store.sync()
        insert_s = sync_s = 0.0
        done = since_sync = 0
        wall0 = time.perf_counter()
        for b in batches[WARMUP_BATCHES:]:
            t0 = time.thread_time()
            result = store.insert_events(b)
            insert_s += time.thread_time() - t0
            if result != (len(b), 0, 0, ()):
                problems.append(f"batch of {len(b)}: {result}")
            done += len(b)
            since_sync += len(b)
            if since_sync >= sync_every:
                t0 = time.thread_time()
                store.sync()
                sync_s += time.thread_time() - t0
                since_sync = 0
        wall_s = time.perf_counter() - wall0
        replay = store.insert_events(batches[-1])
        if replay != (0, len(batches[-1]), 0, ()):
            problems.append(f"replayed batch: {replay}")
        expected = rows + sum(len(b) for b in batches)
        if (count := store.count_events()) != expected:
            problems.append(f"{count} rows stored, expected {expected}")
    finally:
        store.close()
    return {
        "insert_us": insert_s / done * 1e6,
        "sync_us": sync_s / done * 1e6,
        "wall_us": wall_s / done * 1e6,
        "problems": problems,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows already in the database")
    ap.add_argument("--events", type=int, default=20_000, help="events timed per run")
    ap.add_argument("--batches", default="50,1000", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each (size, implementation)")
    ap.add_argument("--sync-every", type=int, default=10_000, help="events between sync() calls")
    ap.add_argument(
        "--quick", action="store_true", help="20k rows, 4000 events, 2 rounds, sync every 2000"
    )
    ap.add_argument("--json", type=Path, help="write every result here")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.events, args.rounds, args.sync_every = 20_000, 4000, 2, 2000
    sizes = [int(x) for x in args.batches.split(",")]

    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        workdir = Path(tmp)
        template = workdir / "template.db"
        print(f"building a database of {args.rows} events ...", file=sys.stderr)
        build_template(template, args.rows)
        for r in range(args.rounds):
            for size in sizes:
                for name, cls in IMPLEMENTATIONS.items():
                    res = run_once(
                        cls, template, workdir, args.rows, size, args.events, args.sync_every, r
                    )
                    for p in res["problems"]:
                        print(f"MISMATCH {name}, batches of {size}: {p}", file=sys.stderr)
                        failed = True
                    results.setdefault((name, size), []).append(res)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(
        f"\nCPU µs per event, median of {args.rounds} runs (min in brackets); {args.rows} rows "
        f"stored before, {args.events} events per run, sync() every {args.sync_every}\n"
    )
    print("| implementation | batch | insert_events | + sync() | wall (insert + sync) |")
    print("|---|---:|---:|---:|---:|")
    for size in sizes:
        for name in IMPLEMENTATIONS:
            runs = results[name, size]
            ins = [x["insert_us"] for x in runs]
            syn = [x["sync_us"] for x in runs]
            wall = [x["wall_us"] for x in runs]
            print(
                f"| {name} | {size} | {statistics.median(ins):.2f} ({min(ins):.2f}) "
                f"| {statistics.median(syn):.2f} | {statistics.median(wall):.2f} |"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "sqlite": sqlite3.sqlite_version,
                    "python": platform.python_version(),
                    "machine": platform.platform(),
                    "results": [
                        {"implementation": n, "batch": s, **x}
                        for (n, s), runs in results.items()
                        for x in runs
                    ],
                },
                indent=2,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
