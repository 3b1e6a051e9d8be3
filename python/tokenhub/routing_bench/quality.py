"""The quality track: cost against accuracy for a router score, on RouteLLM's outcome tables.

Each table says, per prompt, whether the weak model (Mixtral-8x7B-Instruct) and the strong model
(GPT-4-1106-preview) answered correctly (MT-Bench: their GPT-4 judge scores, 1-10, averaged over
the two turns). Prompts RouteLLM found in its training data (`*_contaminated_prompts.jsonl`,
matched on `eval_prompt`) are dropped first, as RouteLLM's own evaluation does.

A router is a score per prompt; a threshold sends the prompts scoring at or above it to the
strong model. Sweeping the threshold over every distinct score traces a curve of (share of
strong calls, accuracy, cost). The metrics are RouteLLM's:

- PGR (performance gap recovered) = (accuracy - weak accuracy) / (strong accuracy - weak).
- APGR = the area under PGR against the strong-call share in [0, 1] (trapezoids between the
  curve's points; tied scores move together, so the curve only has points where a threshold can
  actually fall). Random routing has an expected APGR of 0.5.
- CPT(x%) = the smallest strong-call share whose PGR reaches x% (linear between curve points).

The fit/held-out split: a prompt is in the held-out half when the first byte of the SHA-256 of
its UTF-8 text is odd, else in the fit half (deterministic, and independent of row order and of
the dataset). The tier scorer's default weights and threshold were fitted on the fit halves of
GSM8K and MMLU (`benches/calibrate_tier.py`), so its honest figures are the held-out ones; the
CLI reports the held-out half unless told otherwise.

Prices are RouteLLM's example, $0.90 (weak) and $20 (strong) per 1M tokens, charged on the
prompt's tokens plus, where the table has the answers (GSM8K), the chosen model's answer tokens.
Tokens are counted with the cl100k_base vocabulary when it is installed, else estimated as
UTF-8 bytes / 4 (the report says which).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from tokenhub.money import rate

__all__ = [
    "DATASETS",
    "SPLITS",
    "STRONG_MODEL",
    "STRONG_PRICE",
    "WEAK_MODEL",
    "WEAK_PRICE",
    "Curve",
    "Dataset",
    "QualityError",
    "RouterScore",
    "curve",
    "decide",
    "evaluate",
    "length_scores",
    "load_dataset",
    "random_scores",
    "split",
]

WEAK_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG_MODEL = "gpt-4-1106-preview"
WEAK_PRICE = 900_000_000  # nanos per 1M tokens: $0.90
STRONG_PRICE = 20_000_000_000  # $20
DATASETS = ("gsm8k", "mmlu", "mtbench")
SPLITS = ("heldout", "fit", "all")
RANDOM_SEEDS = 20  # the random baseline's figures are a mean over this many seeds


class QualityError(ValueError):
    """An outcome table is missing or does not have the expected columns."""


class Dataset(msgspec.Struct, kw_only=True):
    name: str
    prompts: list[str]
    weak: list[float]  # 1.0 correct / 0.0 wrong, or a judge score
    strong: list[float]
    prompt_tokens: list[int]
    weak_tokens: list[int]  # prompt + answer tokens billed when routed weak
    strong_tokens: list[int]
    dropped: int  # contaminated prompts removed
    token_counter: str
    part: str = "all"  # one of SPLITS

    @property
    def weak_perf(self) -> float:
        return sum(self.weak) / len(self.weak)

    @property
    def strong_perf(self) -> float:
        return sum(self.strong) / len(self.strong)


class Point(msgspec.Struct, array_like=True):
    threshold: float
    strong_share: float
    perf: float
    pgr: float
    cost_nanos: int


class Curve(msgspec.Struct, kw_only=True):
    router: str
    points: list[Point]
    apgr: float
    cpt50: float | None
    cpt80: float | None


def _counter() -> tuple[str, Callable[[list[str]], list[int]]]:
    try:
        from tokenhub import Meter

        meter = Meter.load("cl100k_base")
        return "cl100k_base", meter.count_batch
    except Exception:  # the vocabulary is an optional extra: fall back to an estimate
        return "bytes/4", lambda texts: [(len(t.encode()) + 3) // 4 for t in texts]


def _contaminated(path: Path) -> set[str]:
    if not path.exists():
        return set()
    out: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.add(json.loads(line)["eval_prompt"])
    return out


def _bool(text: str, where: str) -> float:
    if text in ("True", "true", "1"):
        return 1.0
    if text in ("False", "false", "0"):
        return 0.0
    raise QualityError(f"{where}: expected True/False, got {text!r}")


def _read_csv(path: Path, need: Sequence[str]) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or ())]
            if missing:
                raise QualityError(f"{path}: missing column(s) {', '.join(missing)}")
            return list(reader)
    except OSError as e:
        raise QualityError(f"{path}: {e.strerror or e}") from None


def load_dataset(directory: str | Path, name: str, *, limit: int | None = None) -> Dataset:
    """One RouteLLM outcome table from `directory` (the shared `router_outcomes/`), without its
    contaminated prompts; `limit` keeps the first rows (for tests)."""
    d = Path(directory)
    label, count = _counter()
    weak_extra: list[int] | None = None
    strong_extra: list[int] | None = None
    if name in ("gsm8k", "mmlu"):
        fname = "routellm_gsm8k_responses.csv" if name == "gsm8k" else "routellm_mmlu_outcomes.csv"
        path = d / fname
        rows = _read_csv(path, ["prompt", WEAK_MODEL, STRONG_MODEL])
        bad = _contaminated(d / f"routellm_{name}_contaminated_prompts.jsonl")
        kept = [r for r in rows if r["prompt"] not in bad]
        dropped = len(rows) - len(kept)
        kept = kept[:limit] if limit is not None else kept
        prompts = [r["prompt"] for r in kept]
        weak = [_bool(r[WEAK_MODEL], f"{path}: {WEAK_MODEL}") for r in kept]
        strong = [_bool(r[STRONG_MODEL], f"{path}: {STRONG_MODEL}") for r in kept]
        if kept and f"{WEAK_MODEL}_response" in kept[0]:
            weak_extra = count([r[f"{WEAK_MODEL}_response"] for r in kept])
            strong_extra = count([r[f"{STRONG_MODEL}_response"] for r in kept])
    elif name == "mtbench":
        prompts, weak, strong, dropped = _mtbench(d, limit)
    else:
        raise QualityError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if not prompts:
        raise QualityError(f"{d}: no {name} prompts left")
    ptoks = count(prompts)
    return Dataset(
        name=name,
        prompts=prompts,
        weak=weak,
        strong=strong,
        prompt_tokens=ptoks,
        weak_tokens=[p + e for p, e in zip(ptoks, weak_extra or [0] * len(ptoks), strict=True)],
        strong_tokens=[p + e for p, e in zip(ptoks, strong_extra or [0] * len(ptoks), strict=True)],
        dropped=dropped,
        token_counter=label,
    )


def _mtbench(d: Path, limit: int | None) -> tuple[list[str], list[float], list[float], int]:
    qpath = d / "routellm_mtbench_questions.jsonl"
    turns: dict[int, list[str]] = {}
    try:
        with qpath.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    q = json.loads(line)
                    turns[int(q["question_id"])] = list(q["turns"])
    except OSError as e:
        raise QualityError(f"{qpath}: {e.strerror or e}") from None
    scores: dict[tuple[int, str], list[float]] = {}
    for r in _read_csv(d / "routellm_mtbench_scores.csv", ["question_id", "model", "score"]):
        scores.setdefault((int(r["question_id"]), r["model"]), []).append(float(r["score"]))
    bad = _contaminated(d / "routellm_mt_bench_contaminated_prompts.jsonl")
    prompts: list[str] = []
    weak: list[float] = []
    strong: list[float] = []
    dropped = 0
    for qid in sorted(turns):
        w, s = scores.get((qid, WEAK_MODEL)), scores.get((qid, STRONG_MODEL))
        if not w or not s:
            continue
        if turns[qid][0].strip() in bad:
            dropped += 1
            continue
        prompts.append("\n".join(turns[qid]))
        weak.append(sum(w) / len(w))
        strong.append(sum(s) / len(s))
    if limit is not None:
        prompts, weak, strong = prompts[:limit], weak[:limit], strong[:limit]
    return prompts, weak, strong, dropped


def heldout(prompt: str) -> bool:
    """Whether `prompt` is in the held-out half (see the module docstring)."""
    return bool(hashlib.sha256(prompt.encode()).digest()[0] & 1)


def split(ds: Dataset, part: str) -> Dataset:
    """The `part` of `ds`: "heldout", "fit" (the other half) or "all"."""
    if part not in SPLITS:
        raise QualityError(f"unknown split {part!r} (choose from {', '.join(SPLITS)})")
    if part == "all":
        return ds
    keep = [k for k, p in enumerate(ds.prompts) if heldout(p) == (part == "heldout")]
    if not keep:
        raise QualityError(f"{ds.name}: no prompts in the {part} half")
    return msgspec.structs.replace(subset(ds, keep), part=part)


def subset(ds: Dataset, keep: Sequence[int]) -> Dataset:
    """The prompts of `ds` at the indexes `keep`, with their outcomes and token counts."""

    def pick(xs: list[Any]) -> list[Any]:
        return [xs[k] for k in keep]

    return msgspec.structs.replace(
        ds,
        prompts=pick(ds.prompts),
        weak=pick(ds.weak),
        strong=pick(ds.strong),
        prompt_tokens=pick(ds.prompt_tokens),
        weak_tokens=pick(ds.weak_tokens),
        strong_tokens=pick(ds.strong_tokens),
    )


def curve(router: str, ds: Dataset, scores: Sequence[float]) -> Curve:
    """The threshold sweep of one router score over a dataset (see the module docstring)."""
    n = len(scores)
    order = sorted(range(n), key=lambda k: -scores[k])
    weak_perf, strong_perf = ds.weak_perf, ds.strong_perf
    gap = strong_perf - weak_perf
    base_cost = sum(rate(t, WEAK_PRICE) for t in ds.weak_tokens)
    perf_sum = sum(ds.weak)
    cost = base_cost

    def point(threshold: float, k: int) -> Point:
        perf = perf_sum / n
        return Point(threshold, k / n, perf, (perf - weak_perf) / gap if gap else 0.0, cost)

    pts = [point(float("inf"), 0)]
    k = 0
    while k < n:
        s = scores[order[k]]
        while k < n and scores[order[k]] == s:  # tied scores change side together
            j = order[k]
            perf_sum += ds.strong[j] - ds.weak[j]
            cost += rate(ds.strong_tokens[j], STRONG_PRICE) - rate(ds.weak_tokens[j], WEAK_PRICE)
            k += 1
        pts.append(point(s, k))
    apgr = sum(
        (b.strong_share - a.strong_share) * (a.pgr + b.pgr) / 2 for a, b in itertools.pairwise(pts)
    )
    return Curve(router=router, points=pts, apgr=apgr, cpt50=_cpt(pts, 0.5), cpt80=_cpt(pts, 0.8))


def _cpt(pts: Sequence[Point], target: float) -> float | None:
    for a, b in itertools.pairwise(pts):
        if a.pgr >= target:
            return a.strong_share
        if b.pgr >= target:
            return a.strong_share + (b.strong_share - a.strong_share) * (target - a.pgr) / (
                b.pgr - a.pgr
            )
    return None


def decide(ds: Dataset, strong: Sequence[bool], threshold: float) -> Point:
    """The outcome of explicit per-prompt decisions (True = strong model)."""
    n = len(ds.prompts)
    perf = sum(s if go else w for go, w, s in zip(strong, ds.weak, ds.strong, strict=True)) / n
    cost = sum(
        rate(st, STRONG_PRICE) if go else rate(wt, WEAK_PRICE)
        for go, wt, st in zip(strong, ds.weak_tokens, ds.strong_tokens, strict=True)
    )
    gap = ds.strong_perf - ds.weak_perf
    pgr = (perf - ds.weak_perf) / gap if gap else 0.0
    return Point(threshold, sum(strong) / n, perf, pgr, cost)


RouterScore = Callable[[Dataset], list[float]]


def random_scores(seed: int) -> RouterScore:
    def score(ds: Dataset) -> list[float]:
        rng = random.Random(seed)
        return [rng.random() for _ in ds.prompts]

    return score


def length_scores(ds: Dataset) -> list[float]:
    """The prompt-length rule: the longer the prompt (in tokens), the stronger the model."""
    return [float(t) for t in ds.prompt_tokens]


def random_baseline(ds: Dataset, seeds: int = RANDOM_SEEDS) -> Curve:
    """Random routing: the curve of seed 0, with APGR and CPT averaged over `seeds` seeds."""
    curves = [curve("random", ds, random_scores(s)(ds)) for s in range(seeds)]

    def mean(xs: list[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return sum(vals) / len(vals) if len(vals) == len(xs) else None

    c0 = curves[0]
    return Curve(
        router="random",
        points=c0.points,
        apgr=sum(c.apgr for c in curves) / seeds,
        cpt50=mean([c.cpt50 for c in curves]),
        cpt80=mean([c.cpt80 for c in curves]),
    )


def evaluate(ds: Dataset, routers: dict[str, RouterScore]) -> list[Curve]:
    """Curves for the random baseline, the prompt-length rule and each named router score."""
    out = [random_baseline(ds), curve("prompt-length", ds, length_scores(ds))]
    out += [curve(name, ds, fn(ds)) for name, fn in routers.items()]
    return out
