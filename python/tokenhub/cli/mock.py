"""`tokenhub mock-upstream`: serve the upstream simulator (tokenhub.mock) on a port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tokenhub.cli import EXIT_FAILED, EXIT_REFUSED
from tokenhub.mock.upstream import (
    ANY_MODEL,
    DEFAULT_MODELS,
    DEFAULT_PORT,
    MOCK,
    MockOptions,
    build_app,
)

_DESCRIPTION = """\
An upstream simulator for the demo, tests and benchmarks. It serves OpenAI's
POST /v1/chat/completions (tool calls and reasoning_content included), /v1/completions and
/v1/embeddings, GET /v1/models, and Anthropic's POST /v1/messages (thinking, tool use,
prompt caching) and /v1/messages/count_tokens, streaming included. Replies are
deterministic text whose token counts are exact under a real vocabulary. GET /mock/ledger
lists every request served with its tokens (streams cut short count what was written);
POST /mock/reset clears it.
"""

_EPILOG = """\
Per-request overrides: send x-mock-<option> headers, e.g. x-mock-latency-ms: 200,
x-mock-ttft-ms, x-mock-tokens-per-second, x-mock-completion-tokens, x-mock-error-rate-429,
x-mock-error-rate-500, x-mock-status: 429, x-mock-omit-usage: true, x-mock-stall: 3 (or 0 or
null), x-mock-seed, x-mock-vocab, x-mock-tool-calls: auto, x-mock-min-cache-tokens,
x-mock-cache-ttl-s, x-mock-cache-lookback-blocks, x-mock-stream-error-after: 5.

Examples:
  tokenhub mock-upstream --port 9999
  tokenhub mock-upstream --latency-ms 50 --ttft-ms 200 --tokens-per-second 60
  tokenhub mock-upstream --error-rate-429 0.05 --seed 7 --model my-model=qwen --any-model
"""


def _model_arg(value: str) -> tuple[str, str]:
    name, _, vocab = value.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=VOCAB, got {value!r}")
    return name, vocab


def add_cli(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``mock-upstream`` subcommand to an argparse subparsers object."""
    d = MockOptions()
    p: argparse.ArgumentParser = sub.add_parser(
        "mock-upstream",
        help="run an OpenAI-compatible mock upstream with exact token counts",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument(
        "--vocab",
        default=d.vocab,
        metavar="NAME",
        help="default vocabulary for counting (default: %(default)s); Qwen and "
        "DeepSeek models keep their own",
    )
    p.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        metavar="NAME[=VOCAB]",
        help="serve this model (repeatable); replaces the built-in list of "
        "OpenAI, Qwen and DeepSeek model ids",
    )
    p.add_argument(
        "--any-model",
        action="store_true",
        help="serve any model id (with the default vocabulary) instead of 404",
    )
    p.add_argument(
        "--completion-tokens",
        type=int,
        default=d.completion_tokens,
        metavar="N",
        help="reply length in tokens before max_tokens caps it (default: %(default)s)",
    )
    p.add_argument(
        "--latency-ms", type=float, default=0.0, metavar="MS", help="delay before each response"
    )
    p.add_argument(
        "--ttft-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="further delay before the first token (streams: after the headers)",
    )
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=0.0,
        metavar="R",
        help="stream pace per choice (default: 0 = as fast as possible)",
    )
    p.add_argument(
        "--error-rate-429",
        type=float,
        default=0.0,
        metavar="P",
        help="share of requests answered 429 rate_limit_exceeded (with retry-after)",
    )
    p.add_argument(
        "--error-rate-500",
        type=float,
        default=0.0,
        metavar="P",
        help="share of requests answered 500 server_error",
    )
    p.add_argument(
        "--status",
        type=int,
        default=None,
        metavar="CODE",
        help="answer every request with this error status",
    )
    p.add_argument(
        "--omit-usage", action="store_true", help="never send usage (no usage key, no usage chunk)"
    )
    p.add_argument(
        "--stall",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="K",
        help="stall until the client gives up: before any byte (no K, or 0), or "
        "after K stream events",
    )
    p.add_argument(
        "--stream-error-after",
        type=int,
        default=None,
        metavar="K",
        help="end each stream after K events with a mid-stream error event",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed for error injection and reply text (default: %(default)s)",
    )
    p.add_argument(
        "--require-key",
        default=None,
        metavar="KEY",
        help="accept only 'Authorization: Bearer KEY' (default: any or none)",
    )
    p.add_argument(
        "--embedding-dim",
        type=int,
        default=d.embedding_dim,
        metavar="N",
        help="embedding length when a request has no 'dimensions' (default: %(default)s)",
    )
    p.add_argument(
        "--ledger-size",
        type=int,
        default=d.ledger_size,
        metavar="N",
        help="ledger entries kept; totals never drop (default: %(default)s)",
    )
    p.add_argument(
        "--tool-calls",
        choices=("forced", "auto"),
        default=d.tool_calls,
        help="when replies call a tool: only when tool_choice forces one, or also whenever "
        "tools are offered and the last message is not a tool result (default: %(default)s)",
    )
    p.add_argument(
        "--min-cache-tokens",
        type=int,
        default=d.min_cache_tokens,
        metavar="N",
        help="Anthropic prompt caching: smallest cacheable prefix (default: %(default)s)",
    )
    p.add_argument(
        "--cache-ttl-s",
        type=float,
        default=d.cache_ttl_s,
        metavar="S",
        help="Anthropic prompt caching: entry lifetime after write or read (default: %(default)s)",
    )
    p.add_argument(
        "--cache-lookback-blocks",
        type=int,
        default=d.cache_lookback_blocks,
        metavar="N",
        help="Anthropic prompt caching: block boundaries before a breakpoint also read "
        "(default: %(default)s)",
    )
    p.set_defaults(func=run)
    return p


def options_from_args(args: argparse.Namespace) -> MockOptions:
    models = dict(args.model) if args.model else dict(DEFAULT_MODELS)
    if args.any_model:
        models[ANY_MODEL] = ""
    return MockOptions(
        models=models,
        vocab=args.vocab,
        completion_tokens=args.completion_tokens,
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        error_rate_429=args.error_rate_429,
        error_rate_500=args.error_rate_500,
        status=args.status,
        omit_usage=args.omit_usage,
        stall=args.stall,
        stream_error_after=args.stream_error_after,
        seed=args.seed,
        require_key=args.require_key,
        embedding_dim=args.embedding_dim,
        ledger_size=args.ledger_size,
        tool_calls=args.tool_calls,
        min_cache_tokens=args.min_cache_tokens,
        cache_ttl_s=args.cache_ttl_s,
        cache_lookback_blocks=args.cache_lookback_blocks,
    )


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
        await site.start()
        addrs = runner.addresses
        bound = addrs[0][1] if addrs else port
        models = [m for m in app[MOCK].options.models if m != ANY_MODEL]
        print(
            f"tokenhub mock-upstream: listening on http://{host}:{bound}/v1 "
            f"({len(models)} models; ledger at /mock/ledger)",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not on Windows, nor outside the main thread.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    """Serves until SIGINT/SIGTERM; returns the exit status."""
    try:
        app = build_app(options_from_args(args))
    except ValueError as e:  # options refused as given
        print(f"tokenhub mock-upstream: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is not built for Windows
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(app, args.host, args.port))
    except OSError as e:
        print(
            f"tokenhub mock-upstream: error: cannot listen on {args.host}:{args.port}: {e}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenhub.mock [OPTIONS]`: the same as `tokenhub mock-upstream [OPTIONS]`."""
    parser = argparse.ArgumentParser(prog="python -m tokenhub.mock")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mock-upstream", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
