"""Request traces: the Azure LLM inference CSVs and the Mooncake JSONL, as `Request` lists.

Both formats are read whole (the largest shipped file is 3 MB). Arrival times become integer
milliseconds from the first request, so the simulator's virtual clock starts at 0.

Affinity keys, which the router uses to keep a shared prompt prefix on one deployment:

- **Mooncake**: `hash_ids` are 512-token prefix blocks, chained (an id names the whole prefix up
  to and including its block). Block 0 opens every request of the conversation trace (a common
  system prompt), so the key is the id of block `affinity_blocks` (default 2: the first block
  that tells conversations apart), or the last block of a shorter prompt.
- **Azure**: no prefix information and no session ids, so no affinity key (`None`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

__all__ = [
    "BLOCK_TOKENS",
    "Request",
    "TraceError",
    "load_trace",
    "trace_kind",
]

BLOCK_TOKENS = 512  # tokens per Mooncake hash block


class TraceError(ValueError):
    """A trace file is missing or malformed (the message names the file and the line)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a trace, as the simulator replays it."""

    arrival_ms: int
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    affinity: int | None = None
    # Index of the trace row the request came from (replicated burst copies share it).
    row: int = field(default=0, compare=False)


def trace_kind(path: str | Path) -> str:
    """'mooncake' for JSON lines, 'azure' for CSV (by extension)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    raise TraceError(f"{path}: unknown trace format (expected an Azure .csv or a Mooncake .jsonl)")


def load_trace(
    path: str | Path,
    *,
    limit: int | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    affinity_blocks: int = 2,
) -> list[Request]:
    """Reads a trace and keeps the slice [start_s, start_s + duration_s) of it, at most `limit`
    requests. Arrival times are rebased so the slice starts at 0."""
    kind = trace_kind(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if kind == "azure":
                rows = _azure_rows(f, str(path))
            else:
                rows = _mooncake_rows(f, str(path), affinity_blocks)
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return _slice(rows, limit=limit, start_s=start_s, duration_s=duration_s)


def _slice(
    rows: Sequence[Request], *, limit: int | None, start_s: float, duration_s: float | None
) -> list[Request]:
    lo = round(start_s * 1000)
    hi = None if duration_s is None else lo + round(duration_s * 1000)
    out: list[Request] = []
    for r in rows:
        if r.arrival_ms < lo or (hi is not None and r.arrival_ms >= hi):
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(r)
    if not out:
        return out
    base = out[0].arrival_ms
    return [
        Request(
            arrival_ms=r.arrival_ms - base,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            hash_ids=r.hash_ids,
            affinity=r.affinity,
            row=r.row,
        )
        for r in out
    ]


def _parse_azure_time(text: str) -> int:
    """'2023-11-16 18:15:46.6805900' (7 fractional digits, no zone) as integer microseconds
    since the epoch, read as UTC; only differences matter."""
    date, _, frac = text.strip().partition(".")
    whole = datetime.fromisoformat(date)
    micros = int((frac + "000000")[:6]) if frac else 0
    epoch = datetime(1970, 1, 1, tzinfo=whole.tzinfo)
    return int((whole - epoch).total_seconds()) * 1_000_000 + micros


def _azure_rows(f: Iterable[str], name: str) -> list[Request]:
    reader = csv.reader(f)
    header = next(reader, None)
    want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    if header is None or [h.strip() for h in header[:3]] != want:
        raise TraceError(f"{name}: expected the Azure header {','.join(want)}")
    stamps: list[tuple[int, int, int, int]] = []
    for lineno, rec in enumerate(reader, start=2):
        if not rec:
            continue
        try:
            t = _parse_azure_time(rec[0])
            inp, out = int(rec[1]), int(rec[2])
        except (ValueError, IndexError):
            raise TraceError(f"{name}:{lineno}: bad row {','.join(rec)!r}") from None
        if inp < 0 or out < 0:
            raise TraceError(f"{name}:{lineno}: negative token count")
        stamps.append((t, inp, out, lineno - 2))
    stamps.sort(key=lambda s: s[0])  # stable: equal stamps keep file order
    t0 = stamps[0][0] if stamps else 0
    return [
        Request(arrival_ms=(t - t0) // 1000, input_tokens=i, output_tokens=o, row=row)
        for t, i, o, row in stamps
    ]


def _mooncake_rows(f: Iterable[str], name: str, affinity_blocks: int) -> list[Request]:
    out: list[Request] = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            t = int(obj["timestamp"])
            inp, outp = int(obj["input_length"]), int(obj["output_length"])
            hashes = tuple(int(h) for h in obj.get("hash_ids", ()))
        except (ValueError, KeyError, TypeError):
            raise TraceError(
                f"{name}:{lineno}: expected timestamp, input_length, output_length, hash_ids"
            ) from None
        if inp < 0 or outp < 0:
            raise TraceError(f"{name}:{lineno}: negative token count")
        key = hashes[min(affinity_blocks, len(hashes)) - 1] if hashes else None
        out.append(
            Request(
                arrival_ms=t,
                input_tokens=inp,
                output_tokens=outp,
                hash_ids=hashes,
                affinity=key,
                row=lineno - 1,
            )
        )
    out.sort(key=lambda r: r.arrival_ms)
    t0 = out[0].arrival_ms if out else 0
    return [
        Request(r.arrival_ms - t0, r.input_tokens, r.output_tokens, r.hash_ids, r.affinity, r.row)
        for r in out
    ]
