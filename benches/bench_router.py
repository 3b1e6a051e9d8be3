"""Routing: the cost of one decision, in Rust and from Python, beside a pure-Python SWRR.

    .venv/bin/python benches/bench_router.py                # ~1 minute
    .venv/bin/python benches/bench_router.py --quick        # smoke test, ~15 s
    .venv/bin/python benches/bench_router.py --json router.json

For each policy with 3 and 16 deployments (weights 1..n, distinct prices, priorities 0-2, no
capacity limits; the same setup as examples/router_bench.rs) on a virtual clock:

* ``Rust choose`` / ``Rust cycle``: examples/router_bench.rs (``cargo run --release --example
  router_bench``), the core without Python: a decision alone, and a decision plus the
  on_start/on_success reports of its first choice.
* ``_core.choose``: ``tokenhub._core.Router.choose`` called directly (one crossing).
* ``router.choose``: through the ``tokenhub.router.Router`` wrapper the gateway uses.
* ``router cycle``: the wrapper's choose + on_start + on_success (three crossings).
* ``pure-Python swrr``: nginx's SWRR with the same fallback ordering, written in Python, as the
  baseline (swrr rows only).

Each figure is the best of 5 runs of a timed loop (µs per call, loop overhead included, as a
caller would see it). Then ``TierScorer.score_text`` on a ~2 KB prompt (prose and code), from
Python and in Rust. Correctness beside speed: the pure-Python SWRR and the core must produce the
same first choices over 7,000 decisions, or the bench prints MISMATCH and exits with status 1.
Nothing asserts on time; the bar (under 2 µs per ``choose`` from Python) is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenhub import _core
from tokenhub.router import POLICIES, DeploymentSpec, Router, TierScorer

ROOT = Path(__file__).resolve().parent.parent
BAR_US = 2.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def specs(n: int) -> list[DeploymentSpec]:
    return [
        DeploymentSpec(
            name=f"d{i}",
            weight=1 + i,
            priority=i % 3,
            input_per_1m=100_000_000 + 7_000_000 * i,
            cached_input_per_1m=50_000_000,
            output_per_1m=400_000_000 + 11_000_000 * i,
        )
        for i in range(n)
    ]


def prompt_2kb() -> str:
    """The same prompt examples/router_bench.rs builds."""
    prose = (
        "Please review the following change and explain what it does, whether the "
        "error handling is right, and how we could make it faster without changing "
        "its behaviour. "
    )
    code = (
        "```python\ndef merge(a, b):\n    out = {}\n    for k in a:\n"
        "        out[k] = a[k];\n    return out\n```\n"
    )
    s = ""
    while len(s) < 2048:
        s += prose + code
    return s[:2048]


class PySwrr:
    """nginx's smooth weighted round robin in plain Python, with fallbacks by current weight."""

    def __init__(self, weights: list[int], max_attempts: int = 3) -> None:
        self.weights = weights
        self.current = [0] * len(weights)
        self.max_attempts = max_attempts

    def choose(self, now_ms: int) -> tuple[tuple[int, ...], str]:
        cur = self.current
        total = 0
        best = -1
        for i, w in enumerate(self.weights):
            cur[i] += w
            total += w
            if best < 0 or cur[i] > cur[best]:
                best = i
        cur[best] -= total
        rest = sorted((i for i in range(len(cur)) if i != best), key=lambda i: (-cur[i], i))
        return (best, *rest[: self.max_attempts - 1]), "policy"


def per_call_us(fn: Callable[[int], object], calls: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for t in range(calls):
            fn(t)
        best = min(best, (time.perf_counter_ns() - t0) / calls)
    return best / 1_000


def rust_figures(secs: float) -> dict[str, Any] | None:
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "router_bench"]
    try:
        out = subprocess.run(
            [*cmd, "--", "--secs", str(secs), "--json"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"note: {' '.join(cmd)} failed ({e}); the Rust columns are n/a")
        return None
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def check_swrr() -> bool:
    r = _core.Router([s.as_tuple() for s in specs(3)], policy="swrr")
    py = PySwrr([1, 2, 3])
    for t in range(7_000):
        d = r.choose(t)
        if d.order != py.choose(t)[0]:
            log(f"MISMATCH at decision {t}: core {d.order} vs Python {py.choose(t)[0]}")
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (fewer calls)")
    ap.add_argument("--json", type=Path, help="write every result here")
    args = ap.parse_args()
    calls = 20_000 if args.quick else 200_000

    ok = check_swrr()
    log("Rust: cargo run --release --example router_bench ...")
    rust = rust_figures(0.1 if args.quick else 0.5)
    rust_by = {(d["policy"], d["deployments"]): d for d in (rust or {}).get("decisions", [])}

    rows: list[dict[str, Any]] = []
    for policy in POLICIES:
        for n in (3, 16):
            log(f"{policy} x {n}")
            core = _core.Router([s.as_tuple() for s in specs(n)], policy=policy, seed=1)
            wrapped = Router(specs(n), policy=policy, seed=1)
            cycled = Router(specs(n), policy=policy, seed=1)

            def cycle(t: int, r: Router = cycled) -> None:
                i = r.choose(t, 1_000).first
                r.on_start(i, t, 1_000)
                r.on_success(i, t, 100.0 + 10.0 * i, 20.0)

            row: dict[str, Any] = {
                "policy": policy,
                "deployments": n,
                "rust_choose_ns": rust_by.get((policy, n), {}).get("choose_ns"),
                "rust_cycle_ns": rust_by.get((policy, n), {}).get("cycle_ns"),
                "core_choose_us": per_call_us(lambda t, c=core: c.choose(t, 1_000), calls),
                "router_choose_us": per_call_us(lambda t, w=wrapped: w.choose(t, 1_000), calls),
                "router_cycle_us": per_call_us(cycle, calls // 2),
                "python_swrr_us": None,
            }
            if policy == "swrr":
                py = PySwrr([s.weight for s in specs(n)])
                row["python_swrr_us"] = per_call_us(py.choose, calls)
            rows.append(row)

    scorer = TierScorer(threshold=0.5, keywords=("prove", "refactor"))
    text = prompt_2kb()
    score_us = per_call_us(
        lambda _t: scorer.score_text(text, depth=3, prompt_tokens=500), calls // 20
    )

    def fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "n/a" if v is None else f"{v * scale:.{digits}f}"

    print(
        "| policy | n | Rust choose µs | Rust cycle µs | _core.choose µs | "
        "router.choose µs | router cycle µs | pure-Python swrr µs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['deployments']} | {fmt(r['rust_choose_ns'], 1e-3, 3)} | "
            f"{fmt(r['rust_cycle_ns'], 1e-3, 3)} | {fmt(r['core_choose_us'])} | "
            f"{fmt(r['router_choose_us'])} | {fmt(r['router_cycle_us'])} | "
            f"{fmt(r['python_swrr_us'])} |"
        )
    worst = max(r["router_choose_us"] for r in rows)
    rust_score = None if rust is None else rust["score_text_ns"] / 1_000
    print()
    print(
        f"TierScorer.score_text on a {len(text.encode())}-byte prompt: {score_us:.2f} µs "
        f"from Python, {fmt(rust_score)} µs in Rust"
    )
    print(
        f"Bar: router.choose under {BAR_US} µs from Python: worst {worst:.2f} µs "
        f"({'met' if worst < BAR_US else 'NOT met'})"
    )
    if not ok:
        print("MISMATCH: pure-Python SWRR and the core disagree")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": platform.platform(),
                    "python": sys.version,
                    "rows": rows,
                    "score_text_us": score_us,
                    "score_text_rust_us": rust_score,
                    "swrr_matches_python": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
