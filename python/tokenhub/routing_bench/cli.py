"""`tokenhub bench-routing`: replay a trace against simulated deployments, one run per routing
policy, or (`--quality`) score routers on RouteLLM's outcome tables."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec

from .bench import load_requests, router_policies, run_policy
from .plot import PlotError, check_matplotlib, plot_quality, plot_sim
from .quality import (
    DATASETS,
    RANDOM_SEEDS,
    SPLITS,
    STRONG_PRICE,
    WEAK_PRICE,
    Curve,
    Dataset,
    Point,
    QualityError,
    RouterScore,
    decide,
    evaluate,
    load_dataset,
    split,
)
from .report import ATTRIBUTION, money, render_json, render_text
from .scenario import ScenarioError, load_scenario
from .traces import TraceError, trace_kind

__all__ = ["add_cli", "cmd_bench_routing"]

PROG = "tokenhub"
KNOWN_POLICIES = ("swrr", "random", "p2c", "latency", "cheapest", "priority")

_DESCRIPTION = """\
Replay a request trace as a discrete-event simulation against simulated deployments, once per
routing policy, with the gateway's own Router (tokenhub.router) deciding every request on the
virtual clock. Prints per policy: cost, p50/p95/p99 time to first token and end-to-end latency,
SLO attainment, rejections, failures, retries, each deployment's share of served requests against
its weight share, the prompt-cache hit share of input tokens, and a conservation check.

Traces: the Azure LLM inference CSVs (TIMESTAMP, ContextTokens, GeneratedTokens) and the Mooncake
JSONL (timestamp, input_length, output_length, hash_ids). Mooncake requests carry an affinity key
(a prefix block, see [trace] affinity_blocks) and cacheable 512-token prefix blocks; Azure
requests carry neither. The scenario TOML (--deployments) describes the deployments (latency,
speed, slots, queue, rpm/tpm, failure windows, prompt cache, prices), the SLO, the load shape
and the trace slice; examples/routing/*.toml are annotated examples.

--quality scores routers on RouteLLM's outcome tables instead: for the tier policy
(TierScorer.score_text), random routing and the prompt-length rule, the share of strong calls,
accuracy and cost as the threshold sweeps, APGR, and CPT(50%)/CPT(80%), the strong-call share
needed to recover 50% and 80% of the weak-to-strong quality gap. By default on the held-out half
of each table (--split): the tier scorer's defaults were fitted on the other half."""

_EPILOG = """\
examples:
  tokenhub bench-routing --trace ../shared/traces/AzureLLMInferenceTrace_conv_2023.csv \\
      --deployments examples/routing/steady.toml --policies swrr,cheapest,latency
  tokenhub bench-routing --trace ../shared/traces/mooncake_conversation_trace.jsonl \\
      --deployments examples/routing/steady.toml --limit 3000 --json
  tokenhub bench-routing --quality --outcomes ../shared/traces/router_outcomes \\
      --dataset gsm8k,mmlu --plot quality.png

Errors (a missing file, bad TOML, an unknown policy) are one line on stderr and exit status 2."""


class _Usage(Exception):
    """Bad input: one line on stderr, exit status 2."""


def add_cli(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``bench-routing`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench-routing",
        help="replay a trace against simulated deployments and compare routing policies",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--trace", metavar="FILE", help="request trace: an Azure .csv or a Mooncake .jsonl"
    )
    p.add_argument(
        "--deployments",
        "--scenario",
        metavar="FILE.toml",
        dest="scenario",
        help="scenario TOML: [[deployments]], [slo], [load], [trace], [router]",
    )
    p.add_argument(
        "--policies",
        metavar="P1,P2,...",
        help="routing policies to compare, comma-separated (default: all of "
        f"{', '.join(KNOWN_POLICIES)})",
    )
    p.add_argument(
        "--speed",
        type=float,
        metavar="X",
        help="time compression: X=2 replays the trace twice as fast "
        "(default: the scenario's load.speed, else 1)",
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="replay at most N requests of the trace (overrides trace.limit)",
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="replay only the first S seconds of the trace slice (overrides trace.duration_s)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (costs as exact integer nanos) instead of tables",
    )
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="also write a figure: TTFT distributions and cost against SLO per policy "
        "(with --quality: PGR and cost/accuracy curves); needs matplotlib",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bar (it is shown on stderr only when it is a terminal)",
    )
    q = p.add_argument_group("quality track (--quality)")
    q.add_argument(
        "--quality",
        action="store_true",
        help="score routers on RouteLLM outcome tables instead of replaying a trace",
    )
    q.add_argument(
        "--outcomes",
        metavar="DIR",
        help="the router_outcomes/ directory (default: shared/traces/router_outcomes "
        "in the current directory or its parent)",
    )
    q.add_argument(
        "--dataset",
        default="gsm8k,mmlu",
        metavar="NAMES",
        help=f"comma-separated, from {', '.join(DATASETS)} (default: %(default)s)",
    )
    q.add_argument(
        "--split",
        choices=SPLITS,
        default="heldout",
        help="which half of each table to score: the held-out half (the tier defaults were "
        "fitted on the other, benches/calibrate_tier.py), the fit half, or all "
        "(default: %(default)s)",
    )
    q.add_argument(
        "--thresholds",
        default="0.2,0.3,0.4,0.44,0.48,0.52,0.56,0.6,0.7",
        metavar="T1,T2,...",
        help="tier thresholds to tabulate, each decided by TierScorer.tier (default: %(default)s)",
    )
    p.set_defaults(func=cmd_bench_routing)
    return p


def cmd_bench_routing(args: argparse.Namespace) -> int:
    try:
        if args.quality:
            return _quality(args)
        return _simulate(args)
    except (_Usage, ScenarioError, TraceError, QualityError, PlotError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


class _Progress:
    """A single-line progress bar on stderr, drawn only on a terminal and after the first
    second (short runs stay silent)."""

    def __init__(self, label: str, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.t0 = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or time.monotonic() - self.t0 < 1.0:
            return
        width = 30
        fill = width * done // max(total, 1)
        bar = "#" * fill + "-" * (width - fill)
        self.stream.write(f"\r{self.label:<10} [{bar}] {done:,}/{total:,}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _policies(text: str | None) -> list[str]:
    try:
        known = router_policies()
    except ImportError:
        known = KNOWN_POLICIES
    if text is None:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise _Usage("--policies is empty")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _Usage(f"unknown policy {unknown[0]!r} (choose from {', '.join(known)})")
    return names


def _simulate(args: argparse.Namespace) -> int:
    if not args.trace:
        raise _Usage("bench-routing needs --trace FILE (or --quality)")
    if not args.scenario:
        raise _Usage("bench-routing needs --deployments FILE.toml")
    if args.speed is not None and not args.speed > 0:
        raise _Usage("--speed must be > 0")
    if args.limit is not None and args.limit < 1:
        raise _Usage("--limit must be >= 1")
    if args.duration is not None and not args.duration > 0:
        raise _Usage("--duration must be > 0")
    policies = _policies(args.policies)
    if not Path(args.trace).is_file():
        raise _Usage(f"{args.trace}: no such trace file")
    kind = trace_kind(args.trace)
    sc = load_scenario(args.scenario)
    reqs = load_requests(
        sc, args.trace, limit=args.limit, duration_s=args.duration, speed=args.speed
    )
    if not reqs:
        raise _Usage(f"{args.trace}: the trace slice is empty")
    if args.plot:
        check_matplotlib()
    try:
        from tokenhub.router import Router  # noqa: F401
    except ImportError as e:
        print(f"{PROG}: error: the router is not available ({e})", file=sys.stderr)
        return 1

    reports = []
    ttfts = []
    for policy in policies:
        bar = _Progress(policy, not args.quiet)
        try:
            rep, res = run_policy(sc, reqs, policy, progress=bar)
        finally:
            bar.close()
        reports.append(rep)
        ttfts.append([t for t in res.ttft_ms if t is not None])
    speed = args.speed if args.speed is not None else sc.load.speed
    header: dict[str, Any] = {
        "scenario": sc.name or Path(args.scenario).stem,
        "scenario_file": str(args.scenario),
        "trace": Path(args.trace).name,
        "trace_kind": kind,
        "requests": len(reqs),
        "span_s": reqs[-1].arrival_ms * speed / 1000,
        "speed": speed,
        "burst": None
        if sc.load.burst is None
        else {
            "start_s": sc.load.burst.start_s,
            "end_s": sc.load.burst.end_s,
            "factor": sc.load.burst.factor,
        },
        "attribution": ATTRIBUTION[kind],
    }
    if args.plot:
        plot_sim(args.plot, f"{header['scenario']} on {header['trace']}", reports, ttfts)
    print(render_json(header, reports) if args.json else render_text(header, reports))
    return 0 if all(r.conservation.ok for r in reports) else 1


def _find_outcomes(arg: str | None) -> Path:
    if arg:
        p = Path(arg)
        if not p.is_dir():
            raise _Usage(f"{arg}: no such directory")
        return p
    for base in (Path.cwd(), Path.cwd().parent):
        p = base / "shared" / "traces" / "router_outcomes"
        if p.is_dir():
            return p
    raise _Usage("cannot find shared/traces/router_outcomes: give --outcomes DIR")


def _tier_scores(ds: Dataset) -> list[float]:
    """The tier policy's score of each prompt (one user turn, no tools)."""
    from tokenhub.router import TierScorer

    scorer = TierScorer()
    return [
        float(scorer.score_text(t, depth=1, tools=False, prompt_tokens=n))
        for t, n in zip(ds.prompts, ds.prompt_tokens, strict=True)
    ]


def _tier_sweep(ds: Dataset, scores: Sequence[float], thresholds: Sequence[float]) -> list[Point]:
    """Each threshold decided prompt by prompt by the tier policy itself (TierScorer.tier under
    a contract that allows the strong model), not by comparing scores here."""
    from tokenhub.router import Contract, TierScorer

    contract = Contract(allow_strong=True, max_strong_share=None)
    rows = []
    for t in thresholds:
        scorer = TierScorer(threshold=t)
        strong = [scorer.tier(s, contract, holder="bench-routing") == "strong" for s in scores]
        rows.append(decide(ds, strong, t))
    return rows


def _thresholds(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _Usage(f"--thresholds {text!r}: expected numbers between 0 and 1") from None
    if not out or not all(0.0 <= t <= 1.0 for t in out):
        raise _Usage(f"--thresholds {text!r}: expected numbers between 0 and 1")
    return out


def _quality(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.dataset.split(",") if n.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad or not names:
        raise _Usage(
            f"unknown dataset {bad[0] if bad else ''!r} (choose from {', '.join(DATASETS)})"
        )
    thresholds = _thresholds(args.thresholds)
    directory = _find_outcomes(args.outcomes)
    if args.plot:
        check_matplotlib()
    tier_error = None
    try:
        from tokenhub.router import TierScorer  # noqa: F401
    except ImportError as e:
        tier_error = str(e)
    results: dict[str, list[Curve]] = {}
    sweeps: dict[str, list[Point]] = {}
    data: dict[str, Dataset] = {}
    for name in names:
        ds = split(load_dataset(directory, name), args.split)
        data[name] = ds
        routers: dict[str, RouterScore] = {}
        if tier_error is None:
            scores = _tier_scores(ds)
            routers["tier"] = lambda _ds, scores=scores: scores  # type: ignore[misc]
            sweeps[name] = _tier_sweep(ds, scores, thresholds)
        results[name] = evaluate(ds, routers)
    if args.plot:
        plot_quality(args.plot, results)
    if args.json:
        doc = {
            "datasets": {
                name: {
                    "split": data[name].part,
                    "prompts": len(data[name].prompts),
                    "contaminated_dropped": data[name].dropped,
                    "weak_perf": data[name].weak_perf,
                    "strong_perf": data[name].strong_perf,
                    "token_counter": data[name].token_counter,
                    "routers": curves,
                    "tier_sweep": sweeps.get(name),
                }
                for name, curves in results.items()
            },
            "prices_nanos_per_1m": {"weak": WEAK_PRICE, "strong": STRONG_PRICE},
            "random_seeds": RANDOM_SEEDS,
            "tier_unavailable": tier_error,
            "attribution": ATTRIBUTION["routellm"],
        }
        print(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode())
        return 0
    print(_quality_text(results, data, sweeps, tier_error))
    return 0


def _nearest(c: Curve, share: float) -> Point:
    return min(c.points, key=lambda p: abs(p.strong_share - share))


def _quality_text(
    results: dict[str, list[Curve]],
    data: dict[str, Dataset],
    sweeps: dict[str, list[Point]],
    tier_error: str | None,
) -> str:
    out: list[str] = []
    for name, curves in results.items():
        ds = data[name]
        perf = "accuracy" if name != "mtbench" else "mean score"
        part = {"heldout": "held-out half", "fit": "fit half", "all": "all"}[ds.part]
        out.append(
            f"{name} ({part}): {len(ds.prompts):,} prompts ({ds.dropped} contaminated dropped); "
            f"{perf} weak {ds.weak_perf:.3f}, strong {ds.strong_perf:.3f}; "
            f"tokens by {ds.token_counter}"
        )
        out.append(f"  {'router':<14} {'APGR':>6} {'CPT(50%)':>9} {'CPT(80%)':>9}")
        for c in curves:
            cpt50 = "-" if c.cpt50 is None else f"{100 * c.cpt50:.1f}%"
            cpt80 = "-" if c.cpt80 is None else f"{100 * c.cpt80:.1f}%"
            out.append(f"  {c.router:<14} {c.apgr:>6.3f} {cpt50:>9} {cpt80:>9}")
        out.append(f"  sweep (share of strong calls -> {perf}, cost USD):")
        for c in curves:
            cells = []
            for target in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
                p = _nearest(c, target)
                cells.append(f"{100 * p.strong_share:.0f}%: {p.perf:.3f} ${money(p.cost_nanos, 2)}")
            out.append(f"    {c.router:<14} " + "  ".join(cells))
        if name in sweeps:
            out.append(
                f"  tier policy by threshold (TierScorer.tier): strong share, {perf}, cost USD"
            )
            for p in sweeps[name]:
                out.append(
                    f"    {p.threshold:4.2f}: {100 * p.strong_share:5.1f}%  {p.perf:.3f}  "
                    f"${money(p.cost_nanos, 2)}  (PGR {p.pgr:.3f})"
                )
        out.append("")
    if tier_error:
        out.append(f"(tier policy not scored: tokenhub.router is unavailable: {tier_error})")
    out.append(
        f"Random: mean of {RANDOM_SEEDS} seeds. Prices: weak $0.90, strong $20 per 1M tokens."
    )
    out.append(ATTRIBUTION["routellm"])
    return "\n".join(out)
