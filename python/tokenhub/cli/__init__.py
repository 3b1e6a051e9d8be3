"""The `tokenhub` command line: `main()`, the one error hierarchy and the one exit-code table.

Each command lives in a module of this package (meter.py: count, vocabs; serve.py; mock.py:
mock-upstream; admin.py: tenants, keys, events, audit; admin_tokens.py: admin-tokens, the admin
API's tokens; console_users.py: console-users, the web console's logins; billing.py and
billing_io.py: the ledger's commands; cluster.py: cluster status;
bench-routing is tokenhub.routing_bench.cli).
Every command exits with

    0  ok
    1  failed (the database, a file, the network, a server that could not start or stopped
       in failure) or found something (a check or reconciliation that reports problems,
       events that could not settle)
    2  refused as given: the command line or a value it names is wrong (a bad option or
       value, an unknown name, a missing database), nothing was done

and, as Unix tools do, 130 after Ctrl-C and 141 when its output's reader went away. Errors are
one line on stderr: `tokenhub: error: ...`. A command raises CliError (1) or Refused (2); the
command groups' own error types subclass them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tokenhub import __version__

PROG = "tokenhub"


# The exit status of a command whose reader went away (`tokenhub events export | head`): what
# a program killed by SIGPIPE reports (128 + 13), as `yes | head` does; no message.
BROKEN_PIPE_STATUS = 141


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2


class CliError(Exception):
    """A user-facing error: printed as one line; exit status `status` (1: failed)."""

    status = EXIT_FAILED


class Refused(CliError):
    """The command line or a value it names is wrong; nothing was done (exit status 2)."""

    status = EXIT_REFUSED


def quiet_broken_pipe() -> int:
    """Standard output's reader is gone: point stdout at /dev/null, so that nothing more (not
    even the interpreter's last flush) fails on it, and return BROKEN_PIPE_STATUS."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_STATUS


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
    from tokenhub.cli import meter

    meter.add_cli(sub)

    # Gateway commands pull in aiohttp; imported here so `import tokenhub.cli` stays light.
    from tokenhub.cli import admin, admin_tokens, billing, cluster, console_users, mock, serve
    from tokenhub.routing_bench import cli as routing_bench_cli

    serve.add_cli(sub)
    mock.add_cli(sub)
    admin.add_cli(sub)
    admin_tokens.add_cli(sub)
    console_users.add_cli(sub)
    billing.add_cli(sub)
    cluster.add_cli(sub)
    routing_bench_cli.add_cli(sub)
    meter.add_vocabs_cli(sub)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_REFUSED
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return status
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
