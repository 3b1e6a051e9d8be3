"""Meter benchmark: tokenhub's exact counting against the reference tokenizers, side by side.

    .venv/bin/python benches/bench_meter.py              # full run, ~1.5 min on 2 cores
    .venv/bin/python benches/bench_meter.py --quick      # smoke test, under ~30 s
    .venv/bin/python benches/bench_meter.py --corpus chinese --vocab cl100k_base --json out.json

Every library counts the same text from the same vocabulary file where it can load one:
tiktoken gets the rank file and pattern tokenhub loads (``tokenhub.vocabs``), HF ``tokenizers``
the same ``tokenizer.json``. bpe-openai and quicktok can only use the cl100k_base (and, for
quicktok, Qwen) tables they ship; their counts are checked against tiktoken like tokenhub's.

Correctness sits beside speed (as in orjson's benchmarks): every timed text is first counted by
every library and compared with the vocabulary's reference (tiktoken, or HF for tokenizer.json).
A tokenhub count that differs is printed as MISMATCH and makes the script exit with status 1;
nothing here asserts on time.

Method: ``time.perf_counter``; each library is warmed up on the text, then timed in samples of
at least 50 ms (5 ms with --quick) of back-to-back calls on the same text; the libraries of one
row take their samples in turn (so machine noise hits them alike) and the best of 5 (2) samples
is reported, the median is in the JSON. MB is 10^6 bytes of UTF-8. Recounting one text favours
libraries that cache across calls (HF keeps a word cache); tokenhub's ``count`` does not. The
machine may be shared: read absolute figures as rough, ratios within one run as the result.

Corpora are real text found on this machine, nothing is fetched (see ``benches/corpus/README.md``):
english (Debian's common licences, Python's pydoc topics and stdlib docstrings), chinese
(Debian's fortunes-zh, or the excerpt shipped in benches/corpus/), code (Python's stdlib),
json (RouteLLM MT-Bench judgements from ../shared/traces, JSON lines), and mixed (all four
interleaved in ~1.5 KB pieces).
"""

from __future__ import annotations

import argparse
import ast
import base64
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import sysconfig
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS_DIR = HERE / "corpus"
TRACES = Path(os.environ.get("TOKENHUB_TRACES", HERE.parent.parent / "shared" / "traces"))
JUDGEMENTS = TRACES / "router_outcomes" / "routellm_mtbench_judgements.jsonl"
FORTUNES_ZH = Path("/usr/share/games/fortunes/chinese")
ZH_EXCERPT = CORPUS_DIR / "zh_fortunes_excerpt.txt"
ZH_EXCERPT_BYTES = 250_000
LICENSES = Path("/usr/share/common-licenses")

CORPORA = ("english", "chinese", "code", "json", "mixed")
VOCAB_NAMES = ("cl100k_base", "deepseek-v4", "qwen", "qwen3.6")
SIZES = (("1 KB", 1_000), ("100 KB", 100_000), ("800 KB", 800_000))
LARGEST = SIZES[-1][1]

# Bars from the issue: tokenhub / reference throughput on every corpus and size.
BARS = {"cl100k_base": 2.0, "deepseek-v4": 10.0}

# About 50 cl100k tokens: a typical short chat turn.
SMALL_MESSAGE = (
    "Hi! Could you help me write a short, polite email to my landlord about the broken heating "
    "in my flat? It has been cold for three days now, and I'd like it fixed before Friday. "
    "Thanks a lot!"
)

MB = 1e6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- corpora ----------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    text: str
    source: str
    notes: list[str] = field(default_factory=list)


def _fill(text: str, nbytes: int, corpus: Corpus) -> str:
    """``text`` repeated until it has ``nbytes`` bytes (noted on the corpus when it happens)."""
    size = len(text.encode())
    if size >= nbytes:
        return text
    times = math.ceil(nbytes / (size + 2))
    corpus.notes.append(f"only {size / 1e3:.0f} KB of real text: repeated {times}x to fill")
    return "\n\n".join([text] * times)


def cut(text: str, nbytes: int) -> str:
    """A prefix of about ``nbytes`` UTF-8 bytes, cut at a line break (or a space) if one is near."""
    window = text[:nbytes]  # at least nbytes bytes unless it is all of text
    raw = window.encode()
    if len(raw) <= nbytes:
        return window
    head = raw[:nbytes].decode("utf-8", errors="ignore")
    slack = max(nbytes // 20, 50)
    for sep in ("\n", " "):
        i = head.rfind(sep)
        if i >= 0 and len(head[i:].encode()) <= slack:
            return head[: i + 1]
    return head


def _docstrings(min_bytes: int) -> list[str]:
    out: list[str] = []
    total = 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append(doc)
                    total += len(doc.encode())
        if total >= min_bytes:
            break
    return out


def english() -> Corpus:
    parts: list[str] = []
    sources = []
    if LICENSES.is_dir():
        files = sorted(
            (p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()),
            key=lambda p: (p.name != "GPL-3", p.name),  # start with plain prose, not a title page
        )
        parts += [p.read_text(encoding="utf-8", errors="replace") for p in files]
        sources.append(f"{LICENSES}/* ({len(files)} licences)")
    try:
        from pydoc_data.topics import topics

        parts += [topics[k] for k in sorted(topics)]
        sources.append("Python's pydoc_data.topics")
    except ImportError:
        pass
    have = sum(len(p.encode()) for p in parts)
    if have < LARGEST + 50_000:
        parts += _docstrings(LARGEST + 50_000 - have)
        sources.append("stdlib docstrings")
    c = Corpus("english", "", "; ".join(sources))
    c.text = _fill("\n\n".join(parts), LARGEST, c)
    return c


CODE_FIRST = (
    "argparse.py", "dataclasses.py", "functools.py", "json/decoder.py", "json/encoder.py",
    "asyncio/base_events.py", "typing.py", "subprocess.py", "pathlib.py", "logging/__init__.py",
)  # fmt: skip


def code() -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / p for p in CODE_FIRST] + sorted(stdlib.glob("*.py"))
    parts: list[str] = []
    seen = set()
    total = 0
    for path in paths:
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            src = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(src)
        total += len(src.encode())
        if total >= LARGEST + 50_000:
            break
    c = Corpus("code", "", f"Python {platform.python_version()} stdlib sources under {stdlib}")
    c.text = _fill("\n\n".join(parts), LARGEST, c)
    return c


def json_lines() -> Corpus | str:
    if not JUDGEMENTS.is_file():
        return (
            f"{JUDGEMENTS} not found (set TOKENHUB_TRACES to the shared traces folder, "
            "see /work/shared/traces/README.md)"
        )
    c = Corpus(
        "json",
        "",
        "RouteLLM MT-Bench GPT-4 judgements, JSON lines "
        "(lm-sys/RouteLLM, Apache-2.0; via shared/traces/router_outcomes)",
    )
    c.text = _fill(JUDGEMENTS.read_text(encoding="utf-8"), LARGEST, c)
    return c


def _fortune_entries(raw: str) -> list[str]:
    """Entries of a fortune file, ANSI colours removed."""
    raw = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    return [e.strip("\n") for e in raw.split("\n%\n") if e.strip()]


def _mostly_chinese(entry: str) -> bool:
    chars = [c for c in entry if not c.isspace()]
    han = sum(
        1
        for c in chars
        if "\u3400" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef"
    )
    return han >= 0.5 * max(1, len(chars))


def zh_entries_from_debian() -> list[str]:
    """fortunes-zh's mostly-Chinese entries, every third one first (that prefix is the excerpt)."""
    entries = [
        e for e in _fortune_entries(FORTUNES_ZH.read_text(encoding="utf-8")) if _mostly_chinese(e)
    ]
    return entries[::3] + [e for i, e in enumerate(entries) if i % 3]


def chinese() -> Corpus | str:
    if FORTUNES_ZH.is_file():
        entries = zh_entries_from_debian()
        c = Corpus(
            "chinese",
            "",
            f"{FORTUNES_ZH} (Debian fortunes-zh, GPL-3.0+; entries at least half Chinese)",
        )
    elif ZH_EXCERPT.is_file():
        entries = _fortune_entries(ZH_EXCERPT.read_text(encoding="utf-8"))
        c = Corpus(
            "chinese",
            "",
            f"{ZH_EXCERPT.relative_to(HERE.parent)} (excerpt of Debian fortunes-zh, GPL-3.0+); "
            "`apt-get install fortunes-zh` for the full text",
        )
    else:
        return f"neither {FORTUNES_ZH} (apt-get install fortunes-zh) nor {ZH_EXCERPT} exists"
    c.text = _fill("\n\n".join(entries), LARGEST, c)
    return c


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut into consecutive pieces of about ``size`` bytes, at line breaks if possible."""
    out = []
    pos = 0
    while pos < len(text):
        window = text[pos : pos + size]
        piece = cut(window, size) or window
        out.append(piece)
        pos += len(piece)
    return out


def mixed(parts: Sequence[Corpus]) -> Corpus:
    streams = [_pieces(c.text[: 2 * LARGEST // max(1, len(parts))], 1_500) for c in parts]
    out: list[str] = []
    total = 0
    i = 0
    while total < LARGEST + 20_000 and any(i < len(s) for s in streams):
        for s in streams:
            if i < len(s):
                out.append(s[i])
                total += len(s[i].encode())
        i += 1
    c = Corpus("mixed", "", "~1.5 KB pieces of " + ", ".join(p.name for p in parts) + " in turn")
    c.text = _fill("".join(out), LARGEST, c)
    return c


def load_corpora(wanted: Sequence[str], skipped: list[str]) -> list[Corpus]:
    found: dict[str, Corpus] = {}
    for name, make in (("english", english), ("chinese", chinese), ("code", code)):
        if name in wanted or "mixed" in wanted:
            c = make()
            if isinstance(c, str):
                skipped.append(f"corpus {name}: {c}")
            else:
                found[name] = c
    if "json" in wanted or "mixed" in wanted:
        j = json_lines()
        if isinstance(j, str):
            skipped.append(f"corpus json: {j}")
        else:
            found["json"] = j
    if "mixed" in wanted:
        found["mixed"] = mixed(
            [found[n] for n in ("english", "chinese", "code", "json") if n in found]
        )
    return [found[n] for n in wanted if n in found]


# -- engines ----------------------------------------------------------------------------------

Count = Callable[[str], int]
Batch = Callable[[list[str]], list[int]]


@dataclass
class Engine:
    lib: str
    vocab: str
    count: Count
    batch: Batch | None = None


@dataclass
class Engines:
    by_vocab: dict[str, list[Engine]] = field(default_factory=dict)
    reference: dict[str, str] = field(default_factory=dict)  # vocab -> reference library
    versions: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, vocab: str, lib: str) -> Engine | None:
        return next((e for e in self.by_vocab.get(vocab, []) if e.lib == lib), None)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _git_describe() -> str:
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head})" if head else ""


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tiktoken_engine(name: str, spec: Any, path: Path, ncpu: int) -> Engine:
    import tiktoken

    enc = tiktoken.Encoding(
        f"{name} ({path.name})",
        pat_str=spec.pattern,
        mergeable_ranks=_read_ranks(path),
        special_tokens=dict(spec.special_tokens),
    )
    ordinary, ordinary_batch = enc.encode_ordinary, enc.encode_ordinary_batch
    if spec.nfc:

        def count(text: str) -> int:
            return len(ordinary(unicodedata.normalize("NFC", text)))

        def batch(texts: list[str]) -> list[int]:
            nfc = [unicodedata.normalize("NFC", t) for t in texts]
            return [len(ids) for ids in ordinary_batch(nfc, num_threads=ncpu)]

    else:

        def count(text: str) -> int:
            return len(ordinary(text))

        def batch(texts: list[str]) -> list[int]:
            return [len(ids) for ids in ordinary_batch(texts, num_threads=ncpu)]

    return Engine("tiktoken", name, count, batch)


def _hf_engine(name: str, path: Path) -> Engine:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    encode, encode_batch = tok.encode, tok.encode_batch

    def count(text: str) -> int:
        return len(encode(text, add_special_tokens=False))

    def batch(texts: list[str]) -> list[int]:
        return [len(e) for e in encode_batch(texts, add_special_tokens=False)]

    return Engine("HF tokenizers", name, count, batch)


def load_engines(vocab_names: Sequence[str], ncpu: int) -> Engines:
    import tokenhub
    from tokenhub import Meter, vocabs

    out = Engines()
    out.versions["tokenhub"] = tokenhub.__version__ + _git_describe()
    for lib, module in (("tiktoken", "tiktoken"), ("HF tokenizers", "tokenizers")):
        try:
            out.versions[lib] = importlib.import_module(module).__version__
        except ImportError as e:
            out.skipped.append(f"{lib}: import failed ({e}); pip install {module}")

    for name in vocab_names:
        spec = vocabs.spec_for(name)
        try:
            path = vocabs.locate(spec)
            meter = Meter.load(name)
        except ValueError as e:
            out.skipped.append(f"vocabulary {name}: {e}")
            continue
        engines = [Engine("tokenhub", name, meter.count, meter.count_batch)]
        if spec.kind == "tiktoken":
            out.reference[name] = "tiktoken"
            if "tiktoken" in out.versions:
                engines.append(_tiktoken_engine(name, spec, path, ncpu))
        else:
            out.reference[name] = "HF tokenizers"
            if "HF tokenizers" in out.versions:
                engines.append(_hf_engine(name, path))
        out.by_vocab[name] = engines

    if "cl100k_base" in out.by_vocab:
        try:
            from bpe_openai import _bindings as bpe

            counter = bpe.tokenizer_for_encoding("cl100k_base")
            out.by_vocab["cl100k_base"].append(Engine("bpe-openai", "cl100k_base", counter.count))
            out.versions["bpe-openai"] = f"{_version('bpe-openai')}"
            out.notes.append(
                "bpe-openai: PyPI `bpe-openai` (Pathlit's bindings of rust-gems' `bpe-openai` "
                "crate), raw `PyTokenizer.count`; it uses its own bundled cl100k_base table."
            )
        except Exception as e:
            out.skipped.append(f"bpe-openai: {type(e).__name__}: {e}; pip install bpe-openai")

    want_qt = [v for v in ("cl100k_base", "qwen") if v in out.by_vocab]
    if want_qt:
        try:
            import numpy  # noqa: F401  (quicktok.count_batch needs it)
            import quicktok

            if not hasattr(quicktok, "get_encoding"):
                raise ImportError(
                    "the installed `quicktok` is the unrelated PyPI package `quicktok` "
                    f"{_version('quicktok')} (a minbpe-style trainer, no cl100k_base); "
                    "the C++ quicktok is `pip install quicktok-v1`"
                )
            out.versions["quicktok"] = f"{_version('quicktok-v1')} (quicktok-v1)"
            for vocab, qt_name in (("cl100k_base", "cl100k_base"), ("qwen", "qwen3")):
                if vocab not in want_qt:
                    continue
                enc = quicktok.get_encoding(qt_name)

                def qt_batch(texts: list[str], enc: Any = enc) -> list[int]:
                    return [int(n) for n in quicktok.count_batch(enc, texts)]

                out.by_vocab[vocab].append(Engine("quicktok", vocab, enc.count, qt_batch))
            out.notes.append(
                "quicktok: PyPI `quicktok-v1` (C++, pybind11), `Tokenizer.count`; it loads only "
                "the tables it ships (cl100k_base, and `qwen3` compared with tokenhub's `qwen`)."
            )
        except Exception as e:
            out.skipped.append(f"quicktok: {type(e).__name__}: {e}; pip install quicktok-v1")
    return out


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    best: float  # seconds per call
    median: float
    samples: int
    loops: int  # calls per sample
    cpu_per_wall: float


def time_calls(
    fns: Sequence[Callable[[Any], Any]], arg: Any, reps: int, min_time: float
) -> list[Timing]:
    """Per-call times of each fn on ``arg``: calibrate, then ``reps`` samples taken in turn.

    Each fn has already run once on ``arg`` (the correctness count doubles as the warm-up).
    """
    loops = []
    samples: list[list[float]] = []
    cpu: list[float] = []
    wall: list[float] = []
    for fn in fns:
        # Calibrate: grow the number of calls until they take a quarter of a sample.
        n = 1
        while True:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn(arg)
            dt = time.perf_counter() - t0
            if dt >= min_time / 4 or n >= 1 << 24:
                break
            n *= 4
        # A single call that already takes a whole sample is a sample in its own right.
        whole = n == 1 and dt >= min_time
        loops.append(1 if whole else max(1, math.ceil(n * min_time / max(dt, 1e-9))))
        samples.append([dt] if whole else [])
        cpu.append(time.process_time() - c0 if whole else 0.0)
        wall.append(dt if whole else 0.0)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if len(samples[i]) >= reps:
                continue
            n = loops[i]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn(arg)
            dt = time.perf_counter() - t0
            cpu[i] += time.process_time() - c0
            wall[i] += dt
            samples[i].append(dt / n)
    return [
        Timing(min(s), statistics.median(s), len(s), n, c / w if w else 0.0)
        for s, n, c, w in zip(samples, loops, cpu, wall, strict=True)
    ]


# -- sections ---------------------------------------------------------------------------------


@dataclass
class Config:
    reps: int
    min_time: float
    latency_time: float
    batch_texts: int
    session_reps: int
    quick: bool


def throughput(
    engines: Engines, corpora: Sequence[Corpus], cfg: Config, mismatches: list[str]
) -> list[dict[str, Any]]:
    rows = []
    jobs = [(v, c, s) for v in engines.by_vocab for c in corpora for s in SIZES]
    for k, (vocab, corpus, (label, nbytes)) in enumerate(jobs, 1):
        text = cut(corpus.text, nbytes)
        size = len(text.encode())
        engs = engines.by_vocab[vocab]
        log(f"[{k}/{len(jobs)}] single thread: {vocab} / {corpus.name} / {label}")
        counts = {e.lib: e.count(text) for e in engs}
        timings = time_calls([e.count for e in engs], text, cfg.reps, cfg.min_time)
        ref = engines.reference[vocab]
        row: dict[str, Any] = {
            "vocab": vocab,
            "corpus": corpus.name,
            "size": label,
            "bytes": size,
            "reference": ref,
            "tokens": counts.get(ref),
            "libs": {},
        }
        for e, t in zip(engs, timings, strict=True):
            match = None if ref not in counts else counts[e.lib] == counts[ref]
            row["libs"][e.lib] = {
                "count": counts[e.lib],
                "matches_reference": match,
                "best_s": t.best,
                "median_s": t.median,
                "samples": t.samples,
                "calls_per_sample": t.loops,
                "cpu_per_wall": round(t.cpu_per_wall, 2),
                "mb_per_s": size / t.best / MB,
            }
            if match is False:
                mismatches.append(
                    f"{e.lib} {vocab} {corpus.name} {label} ({size} bytes): "
                    f"{e.lib} {counts[e.lib]} vs {ref} {counts[ref]}"
                )
        th, rf = row["libs"].get("tokenhub"), row["libs"].get(ref)
        row["speedup"] = (
            th["mb_per_s"] / rf["mb_per_s"] if th and rf and ref != "tokenhub" else None
        )
        rows.append(row)
    return rows


def latency(engines: Engines, cfg: Config, mismatches: list[str]) -> list[dict[str, Any]]:
    log("latency: ~50-token message")
    picks = [
        ("cl100k_base", "tokenhub"),
        ("cl100k_base", "tiktoken"),
        ("cl100k_base", "bpe-openai"),
        ("cl100k_base", "quicktok"),
        ("deepseek-v4", "tokenhub"),
        ("deepseek-v4", "HF tokenizers"),
    ]
    engs = [e for v, lib in picks if (e := engines.get(v, lib)) is not None]
    counts = [e.count(SMALL_MESSAGE) for e in engs]
    timings = time_calls([e.count for e in engs], SMALL_MESSAGE, cfg.reps, cfg.latency_time)
    rows = []
    for e, n, t in zip(engs, counts, timings, strict=True):
        ref = engines.get(e.vocab, engines.reference[e.vocab])
        ref_n = ref.count(SMALL_MESSAGE) if ref else None
        if ref_n is not None and n != ref_n:
            mismatches.append(f"{e.lib} {e.vocab} small message: {e.lib} {n} vs reference {ref_n}")
        rows.append(
            {
                "lib": e.lib,
                "vocab": e.vocab,
                "tokens": n,
                "matches_reference": None if ref_n is None else n == ref_n,
                "us_per_call": t.best * 1e6,
                "median_us": t.median * 1e6,
                "calls_per_sample": t.loops,
            }
        )
    return rows


BATCH_API = {
    "tokenhub": "count_batch",
    "tiktoken": "encode_ordinary_batch (threads)",
    "HF tokenizers": "encode_batch",
    "quicktok": "count_batch",
}


def _loop(count: Count) -> Batch:
    def run(texts: list[str]) -> list[int]:
        return [count(t) for t in texts]

    return run


def batch(
    engines: Engines, corpora: Sequence[Corpus], cfg: Config, mismatches: list[str], ncpu: int
) -> list[dict[str, Any]]:
    streams = [_pieces(c.text, 4_000) for c in corpora]
    texts: list[str] = []
    i = 0
    while len(texts) < cfg.batch_texts and any(i < len(s) for s in streams):
        texts += [s[i] for s in streams if i < len(s)]
        i += 1
    texts = texts[: cfg.batch_texts]
    size = sum(len(t.encode()) for t in texts)
    rows = []
    for vocab in ("cl100k_base", "deepseek-v4"):
        ref_lib = engines.reference.get(vocab)
        ref = engines.get(vocab, ref_lib) if ref_lib else None
        engs = [e for e in engines.by_vocab.get(vocab, []) if e.batch is not None]
        if not engs:
            continue
        log(f"batch: {vocab}, {len(texts)} texts of ~4 KB, all cores")
        ref_counts = ref.batch(texts) if ref and ref.batch else None
        th = engines.get(vocab, "tokenhub")
        fns: list[tuple[str, Callable[[list[str]], list[int]]]] = []
        if th is not None:
            fns.append(("tokenhub, 1 thread (count in a loop)", _loop(th.count)))
        fns += [(f"{e.lib} {BATCH_API[e.lib]}", e.batch) for e in engs if e.batch is not None]
        results = [fn(texts) for _, fn in fns]
        timings = time_calls([fn for _, fn in fns], texts, cfg.reps, cfg.min_time * 4)
        for (label, _), got, t in zip(fns, results, timings, strict=True):
            match = None if ref_counts is None else list(got) == list(ref_counts)
            if ref_counts is not None and not match:
                bad = [j for j, (a, b) in enumerate(zip(got, ref_counts, strict=True)) if a != b]
                mismatches.append(
                    f"{label} {vocab} batch: {len(bad)} of {len(texts)} texts differ "
                    f"(first: text {bad[0]}, {got[bad[0]]} vs {ref_lib} {ref_counts[bad[0]]})"
                )
            rows.append(
                {
                    "vocab": vocab,
                    "lib": label,
                    "texts": len(texts),
                    "bytes": size,
                    "tokens": sum(got),
                    "matches_reference": match,
                    "best_s": t.best,
                    "mb_per_s": size / t.best / MB,
                    "cpu_per_wall": round(t.cpu_per_wall, 2),
                    "is_reference": label.startswith(f"{ref_lib} "),
                }
            )
    return rows


def build_conversation(
    corpora: Sequence[Corpus], n: int = 200
) -> tuple[list[dict[str, str]], list[str]]:
    """~200 messages, ~200k cl100k tokens of real text, and fresh user messages to append."""
    pool = mixed(list(corpora)).text
    pos = 0

    def take(nbytes: int) -> str:
        nonlocal pos
        if pos >= len(pool) - nbytes:
            pos = 0
        piece = cut(pool[pos : pos + nbytes], nbytes)
        pos += len(piece)
        return piece

    conv = [{"role": "system", "content": take(2_000)}]
    for i in range(1, n):
        if i % 2:
            conv.append({"role": "user", "content": take(1_000 + (i * 617) % 1_600)})
        else:
            conv.append({"role": "assistant", "content": take(4_500 + (i * 911) % 3_200)})
    fresh = [f"Follow-up {i}: " + take(1_000) for i in range(16)]
    return conv, fresh


def session(
    engines: Engines, corpora: Sequence[Corpus], cfg: Config, mismatches: list[str]
) -> dict[str, Any] | None:
    if "cl100k_base" not in engines.by_vocab:
        return None
    from tokenhub import Meter, templates

    log("long session: ~200 messages, cl100k_base")
    conv, fresh = build_conversation(corpora)
    runs, overhead = templates.plan("openai", conv)
    size = sum(len(r.encode()) for r in runs)
    reps = cfg.session_reps

    # Cold: a fresh meter (empty cache) for each sample.
    meters = [Meter.load("cl100k_base") for _ in range(reps + 1)]
    total = meters[0].count_messages(conv)
    cold = []
    for m in meters[1:]:
        t0 = time.perf_counter()
        m.count_messages(conv)
        cold.append(time.perf_counter() - t0)

    out: dict[str, Any] = {
        "vocab": "cl100k_base",
        "messages": len(conv),
        "bytes": size,
        "tokens": total,
        "count_messages_cold_s": min(cold),
    }
    per_message = {}
    ref = engines.get("cl100k_base", "tiktoken")
    want = overhead + sum(ref.count(r) for r in runs) if ref else total
    if want != total:
        mismatches.append(
            f"tokenhub count_messages {len(conv)} messages: {total} vs tiktoken {want}"
        )
    for e in engines.by_vocab["cl100k_base"]:

        def count_all(rs: list[str], count: Count = e.count) -> int:
            return overhead + sum(count(r) for r in rs)

        n = count_all(runs)
        label = "tokenhub count (no cache)" if e.lib == "tokenhub" else e.lib
        if n != want:
            mismatches.append(f"{label}, session of {len(conv)} messages: {n} vs tiktoken {want}")
        (t,) = time_calls([count_all], runs, reps, cfg.min_time)
        per_message[label] = {"s": t.best, "tokens": n, "matches_reference": n == want}
    out["per_message_count_s"] = per_message

    # Warm: the conversation is cached; append one new message (a different one each sample).
    warm_meter = meters[0]
    (unchanged,) = time_calls([warm_meter.count_messages], conv, reps, cfg.min_time)
    appended = [[*conv, {"role": "user", "content": f}] for f in fresh]
    warm = []
    for msgs in appended:
        t0 = time.perf_counter()
        n = warm_meter.count_messages(msgs)
        warm.append(time.perf_counter() - t0)
    if ref is not None:
        new_runs, new_overhead = templates.plan("openai", appended[-1])
        want = new_overhead + sum(ref.count(r) for r in new_runs)
        if n != want:
            mismatches.append(f"tokenhub count_messages, appended, warm: {n} vs tiktoken {want}")
    new_text = fresh[-1]
    (alone,) = time_calls([warm_meter.count], new_text, reps, cfg.min_time / 5)
    out.update(
        {
            "appended_message_bytes": len(new_text.encode()),
            "count_messages_warm_unchanged_s": unchanged.best,
            "count_messages_warm_append_s": min(warm),
            "count_new_message_s": alone.best,
            "warm_append_over_new": min(warm) / alone.best,
            "cold_over_warm_append": min(cold) / min(warm),
        }
    )
    return out


# -- report -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def headline(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for vocab, bar in BARS.items():
        rows = [r for r in results["throughput"] if r["vocab"] == vocab and r["speedup"]]
        if not rows:
            continue
        ref = rows[0]["reference"]
        worst = min(rows, key=lambda r: r["speedup"])
        ok = all(r["speedup"] >= bar for r in rows)
        fails = [f"{r['corpus']} {r['size']}" for r in rows if r["speedup"] < bar]
        measured = (
            f"min {fmt_ratio(worst['speedup'])} ({worst['corpus']} {worst['size']}), "
            f"median {fmt_ratio(statistics.median(r['speedup'] for r in rows))}"
        )
        verdict = "pass" if ok else "**FAIL**: " + ", ".join(fails)
        out.append(
            (f"tokenhub / {ref}, {vocab}, every corpus and size: >= {bar:g}x", measured, verdict)
        )
    lat = {(r["vocab"], r["lib"]): r["us_per_call"] for r in results["latency"]}
    if ("cl100k_base", "tokenhub") in lat and ("cl100k_base", "tiktoken") in lat:
        th, tk = lat["cl100k_base", "tokenhub"], lat["cl100k_base", "tiktoken"]
        out.append(
            (
                "~50-token message, tokenhub vs tiktoken (cl100k_base): no slower",
                f"{th:.2f} µs vs {tk:.2f} µs ({fmt_ratio(tk / th)})",
                "pass" if th <= tk else "**FAIL**",
            )
        )
    checked = results["counts_checked"]
    bad = results["mismatches"]
    out.append(
        (
            "identical counts, tokenhub and baselines vs reference",
            f"{checked} counts checked",
            "pass" if not bad else f"**MISMATCH** ({len(bad)})",
        )
    )
    return out


VERDICT = {True: "identical", False: "**MISMATCH**", None: "-"}


def md_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


LIB_ORDER = ("tokenhub", "tiktoken", "bpe-openai", "quicktok", "HF tokenizers")


def render(results: dict[str, Any], cfg: Config) -> str:
    m, lines = results["machine"], []
    add = lines.append
    add(
        "## tokenhub meter benchmark"
        + (" (quick run: smoke test, not for publication)" if cfg.quick else "")
    )
    add("")
    add(
        f"- machine: {m['cpu']}, {m['nproc']} CPUs, {m['platform']}, Python {m['python']}, "
        f"load average {m['loadavg_at_start']:.2f} at start"
    )
    share = results.get("cpu_share") or 1.0
    if (m["loadavg_at_start"] or 0.0) > 0.5 * m["nproc"] or share < 0.9:
        add(
            f"- **warning**: the machine was busy (load average {m['loadavg_at_start']:.1f} on "
            f"{m['nproc']} CPUs at start; single-thread timings got {share:.0%} of a core): "
            "absolute figures are low and batch scaling is capped; ratios within this run "
            "still compare"
        )
    add("- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    add(
        f"- method: time.perf_counter, warm-up, best of {cfg.reps} samples of >= "
        f"{cfg.min_time * 1e3:g} ms of calls, libraries interleaved; MB = 10^6 bytes of UTF-8"
    )
    for c in results["corpora"]:
        note = f" ({'; '.join(c['notes'])})" if c["notes"] else ""
        add(f"- corpus {c['name']}: {c['source']}{note}")
    for note in results["notes"]:
        add(f"- {note}")
    for s in results["skipped"]:
        add(f"- skipped: {s}")
    add("")

    add("### Headline")
    add("")
    add("| bar | measured | result |")
    add("|---|---|---|")
    for bar, measured, verdict in headline(results):
        add(f"| {bar} | {measured} | {verdict} |")
    add("")

    add("### Single-thread count throughput (MB/s, higher is better)")
    for vocab in dict.fromkeys(r["vocab"] for r in results["throughput"]):
        rows = [r for r in results["throughput"] if r["vocab"] == vocab]
        libs = [lib for lib in LIB_ORDER if lib in rows[0]["libs"]]
        ref = rows[0]["reference"]
        add("")
        add(f"**{vocab}** (reference: {ref})")
        add("")
        add("| corpus | size | tokens | " + " | ".join(libs) + f" | tokenhub / {ref} | counts |")
        add("|---|---|---:|" + "---:|" * len(libs) + "---:|---|")
        for r in rows:
            cells = [fmt_rate(r["libs"][lib]["mb_per_s"]) for lib in libs]
            wrong = [
                f"**MISMATCH** {lib} {r['libs'][lib]['count']} vs {r['tokens']}"
                for lib in libs
                if r["libs"][lib]["matches_reference"] is False
            ]
            counts = "; ".join(wrong) if wrong else "identical"
            tokens = "-" if r["tokens"] is None else r["tokens"]
            add(md_row(r["corpus"], r["size"], tokens, *cells, fmt_ratio(r["speedup"]), counts))
    add("")

    if results["latency"]:
        add("### Per-call latency, ~50-token chat message (lower is better)")
        add("")
        add("| library | vocabulary | tokens | µs/call | counts |")
        add("|---|---|---:|---:|---|")
        for r in results["latency"]:
            ok = VERDICT[r["matches_reference"]]
            add(md_row(r["lib"], r["vocab"], r["tokens"], f"{r['us_per_call']:.2f}", ok))
        add("")

    if results["batch"]:
        b0 = results["batch"][0]
        add(
            f"### Batch throughput, {b0['texts']} texts of ~4 KB ({b0['bytes'] / 1e6:.2f} MB), "
            f"all {m['nproc']} cores"
        )
        add("")
        add("| library | vocabulary | MB/s | / reference | CPU/wall | counts |")
        add("|---|---|---:|---:|---:|---|")
        refs = {r["vocab"]: r["mb_per_s"] for r in results["batch"] if r["is_reference"]}
        for r in results["batch"]:
            ok = VERDICT[r["matches_reference"]]
            rate, cores = fmt_rate(r["mb_per_s"]), f"{r['cpu_per_wall']:.2f}"
            vs = fmt_ratio(r["mb_per_s"] / refs[r["vocab"]]) if r["vocab"] in refs else "-"
            add(md_row(r["lib"], r["vocab"], rate, vs, cores, ok))
        add("")

    s = results["session"]
    if s:
        add(
            f"### Long session: {s['messages']} messages, {s['tokens']:,} tokens "
            f"({s['bytes'] / 1e6:.2f} MB), {s['vocab']}"
        )
        add("")
        add("| measurement | time |")
        add("|---|---:|")
        add(
            md_row(
                "tokenhub count_messages, cold (empty cache)", fmt_time(s["count_messages_cold_s"])
            )
        )
        for label, v in s["per_message_count_s"].items():
            flag = "" if v["matches_reference"] else f" **MISMATCH** {v['tokens']}"
            add(f"| {label}, each message, summed | {fmt_time(v['s'])}{flag} |")
        add(
            md_row(
                "tokenhub count_messages again, unchanged (all cached)",
                fmt_time(s["count_messages_warm_unchanged_s"]),
            )
        )
        kb = s["appended_message_bytes"] / 1e3
        add(
            md_row(
                f"tokenhub count_messages after appending one ~{kb:.0f} KB message (rest cached)",
                fmt_time(s["count_messages_warm_append_s"]),
            )
        )
        add(md_row("tokenhub count of that new message alone", fmt_time(s["count_new_message_s"])))
        add(md_row("ratio, cold / warm append", f"{s['cold_over_warm_append']:.0f}x"))
        add(md_row("ratio, warm append / new message alone", f"{s['warm_append_over_new']:.1f}x"))
        add("")

    if results["mismatches"]:
        add("### COUNT MISMATCHES")
        add("")
        for line in results["mismatches"]:
            add(f"- **MISMATCH** {line}")
        add("")
    if any(r["vocab"] for r in results["throughput"]):
        multi = [
            f"{r['vocab']} {r['corpus']} {r['size']} ({lib} {v['cpu_per_wall']})"
            for r in results["throughput"]
            for lib, v in r["libs"].items()
            if v["cpu_per_wall"] > 1.3
        ]
        if multi:
            add(
                "Note: these single-thread rows used more than one core of CPU time: "
                + ", ".join(multi)
            )
            add("")
    if "json" in {c["name"] for c in results["corpora"]}:
        add(
            "JSON corpus: RouteLLM (lm-sys/RouteLLM, Apache-2.0) MT-Bench judgements; "
            "Chinese corpus: Debian fortunes-zh (GPL-3.0+)."
        )
    return "\n".join(lines)


def make_zh_excerpt() -> None:
    """Writes benches/corpus/zh_fortunes_excerpt.txt from the installed fortunes-zh."""
    if not FORTUNES_ZH.is_file():
        sys.exit(f"{FORTUNES_ZH} not found: apt-get install fortunes-zh")
    out, size = [], 0
    for e in zh_entries_from_debian():
        n = len(e.encode()) + 3
        if size + n > ZH_EXCERPT_BYTES:
            break
        out.append(e)
        size += n
    ZH_EXCERPT.write_text("\n%\n".join(out) + "\n", encoding="utf-8")
    log(f"wrote {ZH_EXCERPT} ({ZH_EXCERPT.stat().st_size} bytes, {len(out)} entries)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="two short samples each: a smoke test")
    ap.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    ap.add_argument(
        "--corpus", action="append", choices=CORPORA, help="only this corpus (repeatable)"
    )
    ap.add_argument(
        "--vocab", action="append", choices=VOCAB_NAMES, help="only this vocabulary (repeatable)"
    )
    ap.add_argument("--reps", type=int, help="samples per measurement (default 5, quick 2)")
    ap.add_argument("--make-zh-excerpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_zh_excerpt:
        make_zh_excerpt()
        return 0

    quick = args.quick
    cfg = Config(
        reps=args.reps or (2 if quick else 5),
        min_time=0.005 if quick else 0.05,
        latency_time=0.01 if quick else 0.2,
        batch_texts=32 if quick else 320,
        session_reps=1 if quick else 5,
        quick=quick,
    )
    started = time.perf_counter()
    info = machine()
    ncpu = info["nproc"] or 1
    skipped: list[str] = []
    log("loading corpora")
    corpora = load_corpora(args.corpus or CORPORA, skipped)
    log("loading tokenizers")
    engines = load_engines(args.vocab or VOCAB_NAMES, ncpu)
    skipped += engines.skipped
    for s in skipped:
        log(f"skipped: {s}")

    mismatches: list[str] = []
    results: dict[str, Any] = {
        "machine": info,
        "versions": engines.versions,
        "config": {k: v for k, v in vars(cfg).items()},
        "corpora": [
            {"name": c.name, "source": c.source, "notes": c.notes, "bytes": len(c.text.encode())}
            for c in corpora
        ],
        "notes": engines.notes,
        "skipped": skipped,
    }
    results["throughput"] = throughput(engines, corpora, cfg, mismatches) if corpora else []
    results["latency"] = latency(engines, cfg, mismatches)
    results["batch"] = batch(engines, corpora, cfg, mismatches, ncpu) if corpora else []
    results["session"] = session(engines, corpora, cfg, mismatches) if corpora else None
    results["mismatches"] = mismatches
    results["counts_checked"] = (
        sum(len(r["libs"]) for r in results["throughput"])
        + len(results["latency"])
        + sum(r["texts"] for r in results["batch"])
        + (len(results["session"]["per_message_count_s"]) if results["session"] else 0)
    )
    results["headline"] = [{"bar": b, "measured": m, "result": v} for b, m, v in headline(results)]
    shares = [v["cpu_per_wall"] for r in results["throughput"] for v in r["libs"].values()]
    results["cpu_share"] = statistics.median(shares) if shares else None
    results["elapsed_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = os.getloadavg()[0]

    print(render(results, cfg))
    log(f"done in {results['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {args.json}")
    tokenhub_wrong = [m for m in mismatches if m.startswith("tokenhub")]
    return 1 if tokenhub_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
