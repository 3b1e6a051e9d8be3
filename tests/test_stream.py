"""Stream counting: for any split of a text into deltas, every ``feed`` returns the count of
everything fed so far, and the final total equals ``count`` of the whole text."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from textgen import cut, texts, texts_with_cuts

from tokenhub import Meter

STREAMED = ["cl100k_base", "qwen", "qwen3.6", "deepseek-v4", "deepseek-v4-fallback"]


@pytest.fixture(scope="session")
def stream_meters(meters, fallback_meter) -> dict[str, Meter]:
    return {**meters, "deepseek-v4-fallback": fallback_meter}


def check_feed(meter: Meter, deltas: list[str]) -> None:
    """Feeds ``deltas`` one by one; after each, the running total is the count of the prefix."""
    counter = meter.stream_counter()
    assert counter.total == 0
    prefix = ""
    for i, delta in enumerate(deltas):
        prefix += delta
        running = counter.feed(delta)
        want = meter.count(prefix)
        assert running == want, f"after delta {i} of {deltas!r}: {running} != count {want}"
        assert counter.total == want, f"total after delta {i} of {deltas!r}"


@pytest.mark.parametrize("name", STREAMED)
@settings(deadline=None, max_examples=400)
@given(deltas=texts_with_cuts)
def test_any_split_counts_like_the_whole(stream_meters, name, deltas):
    check_feed(stream_meters[name], deltas)


@pytest.mark.parametrize("name", STREAMED)
@settings(deadline=None, max_examples=150)
@given(text=texts)
def test_char_by_char_generated(stream_meters, name, text):
    check_feed(stream_meters[name], list(text))


@pytest.mark.parametrize("name", STREAMED)
def test_corpus_char_by_char(stream_meters, corpus, corpus_label, name):
    text = corpus[corpus_label][:800]
    meter = stream_meters[name]
    counter = meter.stream_counter()
    running = 0
    for ch in text:
        running = counter.feed(ch)
    assert running == counter.total == meter.count(text)


@pytest.mark.parametrize("name", STREAMED)
def test_corpus_in_chunks_of_1_to_7_chars(stream_meters, corpus, name):
    meter = stream_meters[name]
    rng = random.Random(1234)
    for label, whole in corpus.items():
        text = whole[:1_500]
        counter = meter.stream_counter()
        pos = 0
        running = 0
        while pos < len(text):
            step = rng.randint(1, 7)
            running = counter.feed(text[pos : pos + step])
            pos += step
        assert running == counter.total == meter.count(text), label


def test_final_total_equals_reference_count(stream_meters, references, corpus):
    # The stream total is exact, not merely consistent with count().
    for name, meter in stream_meters.items():
        ref = references[name.removesuffix("-fallback")]
        for label, whole in corpus.items():
            text = whole[:5_000]
            counter = meter.stream_counter()
            for piece in cut(text, list(range(0, len(text), 97))):
                counter.feed(piece)
            assert counter.total == len(ref.encode(text)), (name, label)


# Splits that change how earlier text is cut: a contraction completed later, whitespace
# re-split by what follows it, digit groups, NFC composition across deltas, CJK/digit
# boundaries, and added tokens (DeepSeek's <｜User｜> is one token only when whole).
ADVERSARIAL = [
    ["'l", "l"],
    ["we'", "ll"],
    ["I'", "LL be back"],
    ["'", "s"],
    ["don", "'", "t"],
    ["x", "'", "l", "l", "'", "v", "e"],
    ["   ", "x"],
    [" ", " ", " ", "x"],
    ["a  ", "\n", "b"],
    ["a ", "\t", " ", "b"],
    ["\n", "\n", "  ", "x"],
    ["\r", "\n", "\r\n", "x"],
    ["line\r", "\nnext"],
    ["end   "],
    ["\u00a0", "\u00a0", "b"],
    ["123", "4567", "89"],
    ["1", "2", "3", "4", "5", "6", "7"],
    ["12", "34 56", "7"],
    ["x1", "2", "a", "3"],
    ["e", "\u0301"],
    ["Cafe", "\u0301 ok"],
    ["A", "\u030a", "\u0301"],
    ["q", "\u0307", "\u0323"],
    ["\u1100", "\u1161", "\u11a8"],
    ["\uac00", "\u11a8"],
    ["中文", "123", "字"],
    ["中", "1", "中", "1"],
    ["日本", "語の", "テスト", "12", "3"],
    ["abc", "中", "def"],
    ["😀", "👍", "\U0001f3fd"],
    ["\U0001f468", "\u200d", "\U0001f469"],
    ["!", "!", "!", "a"],
    [" !", "!", "\n", "x"],
    ["<|endo", "ftext|>"],
    ["<|im_start|>", "user\n"],
    ["<｜User", "｜>"],
    ["<｜", "User｜>"],
    ["<", "｜", "User", "｜", ">"],
    ["hi <｜Us", "er｜> there"],
    ["<｜Assistant｜", ">"],
    ["<think", ">", "x", "</think>"],
    ["<｜begin▁of▁sent", "ence｜>"],
    ["<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool", "▁sep｜>f"],
]


@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("deltas", ADVERSARIAL, ids=repr)
def test_adversarial_splits(stream_meters, name, deltas):
    check_feed(stream_meters[name], deltas)


@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("deltas", ADVERSARIAL, ids=repr)
def test_adversarial_texts_char_by_char(stream_meters, name, deltas):
    check_feed(stream_meters[name], list("".join(deltas)))


def test_empty_deltas_change_nothing(stream_meters):
    for meter in stream_meters.values():
        counter = meter.stream_counter()
        assert counter.feed("") == 0
        assert counter.feed("hello") == meter.count("hello")
        assert counter.feed("") == meter.count("hello")
        assert counter.total == meter.count("hello")


def test_counters_are_independent(stream_meters):
    meter = stream_meters["cl100k_base"]
    a, b = meter.stream_counter(), meter.stream_counter()
    a.feed("hello world")
    b.feed("x")
    assert a.total == meter.count("hello world")
    assert b.total == meter.count("x")


@pytest.mark.parametrize("name", STREAMED)
def test_long_stream(stream_meters, corpus, name):
    # Many small deltas over a long natural text (all corpus files): the counter must not drift.
    text = "\n".join(corpus[label] for label in sorted(corpus) if "." in label)
    assert len(text) > 8_000
    meter = stream_meters[name]
    counter = meter.stream_counter()
    for piece in cut(text, list(range(0, len(text), 5))):
        counter.feed(piece)
    assert counter.total == meter.count(text)


def _feed_seconds(meter: Meter, text: str) -> float:
    start = time.perf_counter()
    counter = meter.stream_counter()
    for i in range(0, len(text), 4):
        counter.feed(text[i : i + 4])
    return time.perf_counter() - start


@pytest.mark.parametrize("name", STREAMED)
def test_stream_cost_grows_linearly(stream_meters, corpus, name):
    # A feed costs the delta plus a short kept tail, never a recount of the whole stream: so
    # four times the text costs about four times as much (quadratic cost would be 16 times).
    # Timings are taken large enough to measure, the fastest of three small runs is the base,
    # and a borderline ratio is measured again, so scheduling noise alone cannot fail it.
    meter = stream_meters[name]
    small = corpus["english.txt"][:1_300]
    while _feed_seconds(meter, small) < 0.02 and len(small) < 500_000:
        small *= 2
    base = min(_feed_seconds(meter, small) for _ in range(3))
    ratio = _feed_seconds(meter, small * 4) / base
    if 10 <= ratio < 20:
        ratio = min(ratio, _feed_seconds(meter, small * 4) / base)
    assert ratio < 10, f"feeding 4x the text ({len(small) * 4} chars) took {ratio:.1f}x as long"
