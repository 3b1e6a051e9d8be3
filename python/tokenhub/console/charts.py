"""Server-rendered charts: inline SVG (no script, CSP-safe), each mark with a <title> tooltip.

`bar_chart(labels, series)` stacks the series per label, `line_chart(labels, series)` draws one
polyline per series, `sparkline(values)` a small trend line. Values are integers (counts,
tokens, nanos: pass `fmt` to format tooltips and the axis, e.g. money). Colours come from the
stylesheet (classes s0..s5), so the chart follows the page's theme. Pair every chart with a
table of the same data: the SVG is a picture, the table is the record.

Performance notes: a 31-label x 3-series bar chart renders in about 0.3 ms (string joins, no
XML library), small beside a page's database reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from markupsafe import Markup, escape

W, H = 640, 220
# The top margin holds the axis' unit; the right one half of the last x label (a date or
# "MM-DD HH:00", centred under its bar).
PAD_L, PAD_R, PAD_T, PAD_B = 56, 32, 22, 28
SERIES_CLASSES = 6


def _fmt_default(v: int) -> str:
    return f"{v:,}"


def compact(v: int) -> str:
    """An axis label: 950, 1.5k, 20k, 2M, 1.2G (tooltips and tables keep every digit)."""
    for div, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if abs(v) >= div:
            text = f"{v / div:.1f}".removesuffix(".0")
            return f"{text}{suffix}"
    return str(v)


def _nice_max(v: int) -> int:
    """The smallest 1/2/5 x 10^k at or above v (at least 1): the axis' top."""
    if v <= 0:
        return 1
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= v:
                return m * step
        step *= 10


def _legend(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    items = "".join(
        f'<li><span class="swatch s{i % SERIES_CLASSES}"></span>{escape(n)}</li>'
        for i, n in enumerate(names)
    )
    return f'<ul class="legend">{items}</ul>'


def _axis(top: int, unit: str, fmt: Callable[[int], str]) -> str:
    if fmt is _fmt_default:
        fmt = compact
    # The unit once, above the axis (on every tick it did not fit the left margin).
    out = [f'<text class="axis unit" x="4" y="12">{escape(unit.strip())}</text>'] if unit else []
    for frac in (0, 0.5, 1):
        y = PAD_T + (H - PAD_T - PAD_B) * (1 - frac)
        value = int(top * frac)
        out.append(
            f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(value))}</text>"
        )
    return "".join(out)


def _xlabels(labels: Sequence[str], x_of: Callable[[int], float]) -> str:
    n = len(labels)
    every = max(1, (n + 7) // 8)  # at most ~8 labels under the axis
    # Counted back from the last label (today, on a time axis), evenly spaced.
    shown = sorted(range(n - 1, -1, -every))
    return "".join(
        f'<text class="axis" x="{x_of(i):.1f}" y="{H - 8}" text-anchor="middle">'
        f"{escape(labels[i])}</text>"
        for i in shown
    )


def _svg(body: str, title: str, names: Sequence[str]) -> Markup:
    return Markup(
        f'<figure class="chart"><svg viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>{body}</svg>{_legend(names)}</figure>"
    )


def bar_chart(
    labels: Sequence[str],
    series: Mapping[str, Sequence[int]],
    *,
    unit: str = "",
    title: str = "",
    fmt: Callable[[int], str] = _fmt_default,
) -> Markup:
    """Stacked bars: one bar per label, one segment per series (negative values count 0)."""
    names = list(series)
    n = len(labels)
    totals = [sum(max(0, series[s][i]) for s in names) for i in range(n)]
    top = _nice_max(max(totals, default=0))
    plot_w = W - PAD_L - PAD_R
    plot_h = H - PAD_T - PAD_B
    slot = plot_w / max(n, 1)
    bar_w = max(1.0, slot * 0.7)

    def x_of(i: int) -> float:
        return PAD_L + slot * i + slot / 2

    parts = [_axis(top, unit, fmt)]
    for i in range(n):
        y = float(PAD_T + plot_h)
        for k, s in enumerate(names):
            v = max(0, series[s][i])
            if v == 0:
                continue
            h = plot_h * v / top
            y -= h
            tip = (
                f"{labels[i]} · {s}: {fmt(v)}{unit}"
                if len(names) > 1
                else (f"{labels[i]}: {fmt(v)}{unit}")
            )
            parts.append(
                f'<rect class="bar s{k % SERIES_CLASSES}" x="{x_of(i) - bar_w / 2:.1f}" '
                f'y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}"><title>{escape(tip)}'
                "</title></rect>"
            )
    parts.append(_xlabels(labels, x_of))
    return _svg("".join(parts), title, names)


def line_chart(
    labels: Sequence[str],
    series: Mapping[str, Sequence[int]],
    *,
    unit: str = "",
    title: str = "",
    fmt: Callable[[int], str] = _fmt_default,
) -> Markup:
    """One line per series, a dot with a tooltip at every point."""
    names = list(series)
    n = len(labels)
    top = _nice_max(max((v for s in names for v in series[s]), default=0))
    plot_w = W - PAD_L - PAD_R
    plot_h = H - PAD_T - PAD_B
    step = plot_w / max(n - 1, 1)

    def x_of(i: int) -> float:
        return PAD_L + step * i if n > 1 else PAD_L + plot_w / 2

    def y_of(v: int) -> float:
        return PAD_T + plot_h * (1 - max(0, v) / top)

    parts = [_axis(top, unit, fmt)]
    for k, s in enumerate(names):
        cls = f"s{k % SERIES_CLASSES}"
        pts = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(series[s]))
        parts.append(f'<polyline class="line {cls}" points="{pts}"/>')
        for i, v in enumerate(series[s]):
            tip = f"{labels[i]} · {s}: {fmt(v)}{unit}"
            parts.append(
                f'<circle class="dot {cls}" cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3">'
                f"<title>{escape(tip)}</title></circle>"
            )
    parts.append(_xlabels(labels, x_of))
    return _svg("".join(parts), title, names)


def sparkline(values: Sequence[int], *, title: str = "") -> Markup:
    """A 100x20 trend line (no axis), its last value's tooltip on the whole."""
    n = len(values)
    top = max(max(values, default=0), 1)
    w, h = 100, 20
    step = w / max(n - 1, 1)
    pts = " ".join(
        f"{step * i:.1f},{h - 1 - (h - 2) * max(0, v) / top:.1f}" for i, v in enumerate(values)
    )
    tip = title or (f"{values[-1]:,}" if values else "")
    return Markup(
        f'<svg class="sparkline" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(tip)}</title>'
        f'<polyline class="line s0" points="{pts}"/></svg>'
    )
