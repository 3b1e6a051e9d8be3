"""PNG figures, with matplotlib (an optional bench dependency: requirements-bench.txt)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import PolicyReport
from .quality import Curve

__all__ = ["PlotError", "check_matplotlib", "plot_quality", "plot_sim"]


class PlotError(RuntimeError):
    """matplotlib is missing, or the figure could not be written."""


def _pyplot() -> Any:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib: pip install matplotlib (or -r requirements-bench.txt)"
        ) from None
    return plt


def check_matplotlib() -> None:
    """Raises PlotError before any work is done when --plot cannot be honoured."""
    _pyplot()


def _save(fig: Any, path: str | Path) -> None:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e.strerror or e}") from None


def plot_sim(
    path: str | Path, title: str, reports: Sequence[PolicyReport], ttfts: Sequence[Sequence[float]]
) -> None:
    """Left: the TTFT distribution per policy. Right: cost against SLO attainment."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r, values in zip(reports, ttfts, strict=True):
        s = sorted(values)
        if s:
            ax1.plot(s, [(k + 1) / len(s) for k in range(len(s))], label=r.policy)
    ax1.set_xscale("log")
    ax1.set_xlabel("time to first token (ms, log)")
    ax1.set_ylabel("share of served requests")
    ax1.set_title("TTFT distribution")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for r in reports:
        y = 100 * (r.slo_attainment if r.slo_attainment is not None else 0.0)
        x = r.cost_nanos / 1e9  # display only
        ax2.scatter([x], [y])
        ax2.annotate(r.policy, (x, y), textcoords="offset points", xytext=(4, 4))
    ax2.set_xlabel(f"cost ({reports[0].currency if reports else ''})")
    ax2.set_ylabel("SLO attainment (%)")
    ax2.set_title("cost against SLO")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_quality(path: str | Path, results: dict[str, list[Curve]]) -> None:
    """Per dataset: PGR against the strong-call share (top), cost against accuracy (bottom)."""
    plt = _pyplot()
    cols = len(results)
    fig, axes = plt.subplots(2, cols, figsize=(5.5 * cols, 9), squeeze=False)
    for c, (name, curves) in enumerate(results.items()):
        top, bottom = axes[0][c], axes[1][c]
        for cv in curves:
            xs = [p.strong_share for p in cv.points]
            top.plot(xs, [p.pgr for p in cv.points], label=f"{cv.router} (APGR {cv.apgr:.3f})")
            bottom.plot(
                [p.cost_nanos / 1e9 for p in cv.points],
                [p.perf for p in cv.points],
                label=cv.router,
            )
        top.set_title(f"{name}: performance gap recovered")
        top.set_xlabel("share of calls to the strong model")
        top.set_ylabel("PGR")
        top.grid(alpha=0.3)
        top.legend()
        bottom.set_title(f"{name}: cost against accuracy")
        bottom.set_xlabel(r"cost (USD at \$0.90 / \$20 per 1M tokens)")
        bottom.set_ylabel("accuracy" if name != "mtbench" else "mean judge score")
        bottom.grid(alpha=0.3)
        bottom.legend()
    _save(fig, path)
    plt.close(fig)
