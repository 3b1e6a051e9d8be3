"""A small Prometheus text-format registry: counters and gauges with labels, no dependencies.

Counters are plain dict increments on the event loop thread (no locks needed there); the
exposition is built only when /metrics is scraped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]


def labels_key(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Family:
    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.values: defaultdict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[labels_key(**labels)] += amount

    def add(self, key: Labels, amount: float = 1.0) -> None:
        """`inc` with a key made once by `labels_key` (the request path's fast form)."""
        self.values[key] += amount

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for labels, v in sorted(self.values.items()):
            num = int(v) if float(v).is_integer() else v
            lines.append(f"{self.name}{_fmt_labels(labels)} {num}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help: str) -> Family:
        return self._add(Family(name, help, "counter"))

    def gauge(self, name: str, help: str) -> Family:
        return self._add(Family(name, help, "gauge"))

    def _add(self, f: Family) -> Family:
        if f.name in self._families:
            raise ValueError(f"metric {f.name} registered twice")
        self._families[f.name] = f
        return f

    def on_collect(self, fn: Callable[[], None]) -> None:
        """`fn` refreshes gauges just before each scrape."""
        self._collectors.append(fn)

    def render(self) -> str:
        for fn in self._collectors:
            fn()
        lines: list[str] = []
        for f in self._families.values():
            lines.extend(f.render())
        return "\n".join(lines) + "\n"
