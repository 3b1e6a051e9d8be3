"""Calibrates the tier scorer's default weights and threshold on RouteLLM's outcome tables.

    .venv/bin/python benches/calibrate_tier.py [--outcomes DIR]

The method (the figures it prints are quoted in ``rust/router/tier.rs``):

1. Each dataset (GSM8K, MMLU) is split in halves by a hash of the prompt
   (``tokenhub.routing_bench.quality.split``). Everything below is fitted on the fit halves only.
2. The target is the gain of routing a prompt to the strong model, ``strong - weak`` correctness
   (-1, 0 or 1): APGR rewards ranking prompts by its expected value.
3. Each candidate term is scaled to [0, 1] as the scorer does. Non-negative least squares of the
   gain on the terms, with the terms and the gain centred per dataset (the score only has to rank
   prompts within a dataset, not tell GSM8K from MMLU) and each dataset weighted equally.
4. Terms are chosen by greedy forward selection on two-fold cross-validation inside the fit
   half (mean APGR over the datasets), starting from the prompt-length rule; a term stays only if
   it adds at least 0.002. Some candidates (sentences, negations, parentheses, question marks,
   digits) are computed here in Python for the selection only: they are in the scorer only if
   selected.
5. The ratio of the selected weights is refined by a grid search of the fit-half APGR; the scale
   is a choice (small talk stays below 0.2; see the module docs); the threshold is the score at
   which a quarter of the fit-half prompts (each dataset weighted equally) would go strong.

Then the held-out table: APGR and CPT(50%)/CPT(80%) for the tier scorer with the shipped
defaults, the previous defaults, the prompt-length rule and random routing, and the strong share
and PGR at the default threshold. MT-Bench (not used for fitting) is reported whole.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tokenhub.router import Contract, TierScorer
from tokenhub.routing_bench import quality
from tokenhub.routing_bench.quality import (
    Curve,
    Dataset,
    curve,
    decide,
    length_scores,
    load_dataset,
    random_baseline,
    split,
)

OLD_WEIGHTS = {
    "prompt_tokens": 0.35,
    "words": 0.0,
    "commas": 0.0,
    "depth": 0.15,
    "tools": 0.15,
    "code": 0.4,
    "math": 0.4,
    "keywords": 0.5,
}
OLD_THRESHOLD = 0.5
SHARE = 0.25  # of the fit-half prompts that the default threshold sends strong
NEGATIONS = ("not", "n't", "never", "except", "no ")


def _log(n: float, cap: float) -> float:
    return min(1.0, math.log1p(n) / math.log1p(cap))


def terms(scorer: TierScorer, text: str, tokens: int) -> dict[str, float]:
    """The candidate terms of one prompt, each in [0, 1] (the scorer's own where it has one)."""
    f = scorer.features(text, depth=1, prompt_tokens=tokens)
    lo = text.lower()
    return {
        "prompt_tokens": _log(f.prompt_tokens, 8192),
        "words": _log(f.words, 4096),
        "commas": min(1.0, f.commas / 10),
        "math": min(1.0, f.math_markers / 3),
        "sentences": min(1.0, len(re.findall(r"[.?!](?:\s|$)", text)) / 10),
        "negations": min(1.0, sum(lo.count(m) for m in NEGATIONS) / 2),
        "parentheses": min(1.0, text.count("(") / 3),
        "questions": min(1.0, text.count("?") / 2),
        "digits": min(1.0, sum(c.isdigit() for c in text) / 20),
    }


class Part:
    """One dataset's fit half as arrays."""

    def __init__(self, ds: Dataset, names: list[str]) -> None:
        scorer = TierScorer()
        rows = [terms(scorer, p, n) for p, n in zip(ds.prompts, ds.prompt_tokens, strict=True)]
        self.ds = ds
        self.x = np.array([[r[k] for k in names] for r in rows])
        self.gain = np.array(ds.strong) - np.array(ds.weak)
        # the CV folds: the second byte of the prompt's SHA-256 (the split used the first)
        self.fold = np.array([hashlib.sha256(p.encode()).digest()[1] & 1 for p in ds.prompts])


def nnls(parts: Sequence[Part], cols: list[int], rows: Callable[[Part], np.ndarray]) -> np.ndarray:
    a, b = [], []
    for p in parts:
        r = rows(p)
        x, g = p.x[r][:, cols], p.gain[r]
        w = 1 / math.sqrt(len(g))  # each dataset weighs the same
        a.append((x - x.mean(0)) * w)
        b.append((g - g.mean()) * w)
    am, bm = np.vstack(a), np.concatenate(b)
    active = list(range(len(cols)))
    while True:  # drop the negative coefficients and refit until none is left
        coef = np.zeros(len(cols))
        sol = np.linalg.lstsq(am[:, active], bm, rcond=None)[0]
        coef[active] = sol
        if (sol >= 0).all():
            return coef
        active = [i for i, c in zip(active, sol, strict=True) if c > 0]


def sub(ds: Dataset, keep: np.ndarray) -> Dataset:
    return quality.subset(ds, [int(k) for k in np.flatnonzero(keep)])


def apgr(parts: Sequence[Part], cols: list[int], coef: np.ndarray, fold: int | None) -> float:
    out = []
    for p in parts:
        keep = np.ones(len(p.gain), bool) if fold is None else p.fold == fold
        out.append(curve("", sub(p.ds, keep), list(p.x[keep][:, cols] @ coef)).apgr)
    return sum(out) / len(out)


def cv(parts: Sequence[Part], cols: list[int]) -> float:
    total = 0.0
    for f in (0, 1):
        coef = nnls(parts, cols, lambda p, f=f: p.fold != f)
        if not coef.any():
            coef = np.ones(len(cols))
        total += apgr(parts, cols, coef, f) / 2
    return total


def scores(ds: Dataset, scorer: TierScorer) -> list[float]:
    return [
        scorer.score_text(t, depth=1, prompt_tokens=n)
        for t, n in zip(ds.prompts, ds.prompt_tokens, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outcomes", default=str(Path("..") / "shared/traces/router_outcomes"))
    args = ap.parse_args(argv)
    data = {n: load_dataset(args.outcomes, n) for n in ("gsm8k", "mmlu")}
    names = list(terms(TierScorer(), "x", 1))
    parts = [Part(split(ds, "fit"), names) for ds in data.values()]

    print("1. forward selection, 2-fold CV APGR inside the fit halves (mean of GSM8K, MMLU)")
    chosen = [names.index("prompt_tokens")]
    best = cv(parts, chosen)
    print(f"   {'prompt_tokens':<14} {best:.4f}")
    while True:
        trials = sorted((cv(parts, [*chosen, j]), j) for j in range(len(names)) if j not in chosen)
        top, j = trials[-1]
        print(
            f"   + {names[j]:<12} {top:.4f}   (next: "
            + ", ".join(f"{names[k]} {v:.4f}" for v, k in trials[-4:-1][::-1])
            + ")"
        )
        if top < best + 0.002:
            break
        chosen.append(j)
        best = top
    fit_all = nnls(parts, chosen, lambda p: np.ones(len(p.gain), bool))
    print(
        "   NNLS on the whole fit half:",
        {names[c]: round(float(v), 4) for c, v in zip(chosen, fit_all, strict=True)},
    )

    print("2. the weights' ratio by fit-half APGR (words = 1)")
    w, c = names.index("words"), names.index("commas")
    for r in (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5):
        print(f"   commas {r:4.2f}: {apgr(parts, [w, c], np.array([1.0, r]), None):.4f}")

    default = TierScorer()
    print(f"3. shipped defaults: {default.weights}, threshold {default.threshold}")
    fit_scores = {n: scores(split(ds, "fit"), default) for n, ds in data.items()}
    grid = sorted({round(s, 2) for v in fit_scores.values() for s in v})
    share = {
        t: sum(sum(s >= t for s in v) / len(v) for v in fit_scores.values()) / len(fit_scores)
        for t in grid
    }
    target = min(grid, key=lambda t: abs(share[t] - SHARE))
    print(
        f"   the fit-half score with {SHARE:.0%} strong (datasets weighted equally): "
        f"{target} ({share[target]:.1%})"
    )

    print("4. held-out halves (MT-Bench whole: not used for fitting)")
    old = TierScorer(threshold=OLD_THRESHOLD, weights=OLD_WEIGHTS)
    open_ = Contract()
    print(f"   {'dataset':<16} {'router':<14} {'APGR':>6} {'CPT50':>7} {'CPT80':>7}", end="")
    print("   at its default threshold")
    for name, part in (("gsm8k", "heldout"), ("mmlu", "heldout"), ("mtbench", "all")):
        try:
            ds = split(data[name] if name in data else load_dataset(args.outcomes, name), part)
        except Exception as e:  # MT-Bench is optional
            print(f"   {name}: {e}")
            continue
        rows = [
            ("tier (new)", scores(ds, default), default),
            ("tier (old)", scores(ds, old), old),
            ("prompt-length", length_scores(ds), None),
        ]
        label = f"{name} ({part})"
        for router, s, sc in rows:
            cv_ = curve(router, ds, s)
            at = ""
            if sc is not None:
                p = decide(ds, [sc.tier(x, open_) == "strong" for x in s], sc.threshold)
                at = f"{sc.threshold}: strong {p.strong_share:.1%}, PGR {p.pgr:.3f}"
            print(f"   {label:<16} {router:<14} {_row(cv_)}   {at}")
        rb = random_baseline(ds)
        print(f"   {label:<16} {'random':<14} {_row(rb)}")
    return 0


def _row(c: Curve) -> str:
    return f"{c.apgr:6.3f} {_pct(c.cpt50):>7} {_pct(c.cpt80):>7}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
