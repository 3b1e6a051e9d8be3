"""Count the tokens of a few files with every installed vocabulary (an example script)."""

from __future__ import annotations

import sys
from pathlib import Path

from tokenhub import Meter


def main(paths: list[str]) -> int:
    meters = {name: Meter.load(name) for name in Meter.available()}
    if not meters:
        print("no vocabularies installed: pip install 'tokenhub[vocab]'", file=sys.stderr)
        return 1
    width = max(len(p) for p in paths) if paths else 4
    print(f"{'file':<{width}}  " + "  ".join(f"{n:>12}" for n in meters))
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        counts = meters_counts(meters, text)
        print(f"{path:<{width}}  " + "  ".join(f"{c:>12,}" for c in counts))
    return 0


def meters_counts(meters: dict[str, Meter], text: str) -> list[int]:
    # One call per vocabulary; each releases the GIL while it counts.
    return [meter.count(text) for meter in meters.values()]


def stream_demo(meter: Meter, deltas: list[str]) -> None:
    """Feeds a reply in pieces, as a streaming API delivers it, and shows the running total."""
    counter = meter.stream_counter()
    for delta in deltas:
        total = counter.feed(delta)
        print(f"{delta!r:>16} -> {total}")
    assert counter.total == meter.count("".join(deltas))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--stream":
        deltas = ["Hel", "lo, ", "wor", "ld! ", "I'", "ll ", "be", " back."]
        stream_demo(Meter.load("cl100k_base"), deltas)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
