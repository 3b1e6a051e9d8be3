"""The meter's counts, ids and decodings equal the reference tokenizers', on every vocabulary."""

from __future__ import annotations

import base64
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textgen import texts
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenhub import Meter, vocabs

FAST = settings(deadline=None, max_examples=600, suppress_health_check=[HealthCheck.too_slow])


def expected_roundtrip(name: str, text: str) -> str:
    """What decode(encode(text)) gives back: the text, NFC-normalized for Qwen."""
    return unicodedata.normalize("NFC", text) if vocabs.VOCABS[name].nfc else text


# -- exactness on the corpus ------------------------------------------------------------------


def test_corpus_ids_and_count_match_reference(meters, references, corpus, vocab_name, corpus_label):
    meter, ref, text = meters[vocab_name], references[vocab_name], corpus[corpus_label]
    want = ref.encode(text)
    assert meter.encode(text) == want
    assert meter.count(text) == len(want)


def test_corpus_roundtrip(meters, corpus, vocab_name, corpus_label):
    meter, text = meters[vocab_name], corpus[corpus_label]
    ids = meter.encode(text)
    want = expected_roundtrip(vocab_name, text)
    assert meter.decode(ids) == want
    assert meter.decode_bytes(ids) == want.encode("utf-8")


def test_fallback_equals_fast_path_and_reference(
    meters, fallback_meter, references, corpus, corpus_label
):
    text = corpus[corpus_label]
    want = references["deepseek-v4"].encode(text)
    assert fallback_meter.encode(text) == want
    assert fallback_meter.count(text) == len(want) == meters["deepseek-v4"].count(text)
    assert fallback_meter.decode(want) == text


def test_whole_corpus_as_one_text(meters, references, corpus, vocab_name):
    # Long texts take the per-call merge cache; the joins also create new piece boundaries.
    text = "\n".join(corpus.values())
    want = references[vocab_name].encode(text)
    assert meters[vocab_name].count(text) == len(want)
    assert meters[vocab_name].encode(text) == want


def test_fast_path_is_used_for_named_vocabularies(meters, fallback_meter):
    for meter in meters.values():
        assert meter.fallback_reason is None, meter
    assert fallback_meter.fallback_reason


def test_vocab_size_matches_reference(meters, fallback_meter, references, vocab_name):
    assert meters[vocab_name].vocab_size == references[vocab_name].vocab_size
    if vocab_name == "deepseek-v4":
        assert fallback_meter.vocab_size == references[vocab_name].vocab_size


def test_long_whitespace_and_digit_runs(meters, references, vocab_name):
    meter, ref = meters[vocab_name], references[vocab_name]
    for unit in [" ", "\t", "\n", "\r\n", " \n", "\u00a0", "0", "12", "!", "a", "中"]:
        for n in [1, 2, 3, 4, 63, 64, 65, 4095, 4096, 4097, 20_000]:
            for text in [unit * n, unit * n + "x", "x" + unit * n, "x " + unit * n + " y"]:
                assert meter.count(text) == len(ref.encode(text)), (unit, n, text[:8])


# -- exactness on generated text --------------------------------------------------------------


@FAST
@given(text=texts)
def test_generated_text_matches_reference(meters, references, vocab_name, text):
    meter = meters[vocab_name]
    want = references[vocab_name].encode(text)
    assert meter.encode(text) == want
    assert meter.count(text) == len(want)
    assert meter.decode(want) == expected_roundtrip(vocab_name, text)


@FAST
@given(text=texts)
def test_generated_text_fallback_matches_reference(fallback_meter, references, text):
    want = references["deepseek-v4"].encode(text)
    assert fallback_meter.encode(text) == want
    assert fallback_meter.count(text) == len(want)


# -- special-token text is plain text ---------------------------------------------------------

SPECIAL_LOOKALIKES = [
    "<|endoftext|>",
    "<|im_start|>user",
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|endofprompt|>",
    "<|extra_0|>",
    "<think>",
    "<tool_call>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "hello <|endoftext|> world",
    "<|endoftext|><|endoftext|>",
]


@pytest.mark.parametrize("text", SPECIAL_LOOKALIKES)
def test_special_token_text_counts_as_plain_text(meters, references, vocab_name, text):
    meter, ref = meters[vocab_name], references[vocab_name]
    want = ref.encode(text)
    assert meter.encode(text) == want
    assert meter.count(text) == len(want)
    if text not in ref.plain_added_tokens:
        assert len(want) > 1


def test_every_special_token_of_the_vocabulary_is_plain_text(meters, references, vocab_name):
    meter, ref = meters[vocab_name], references[vocab_name]
    assert ref.specials
    for special in ref.specials:
        want = ref.encode(special)
        assert meter.encode(special) == want, special
        assert len(want) > 1, special


def test_deepseek_plain_added_tokens_are_matched_as_the_reference_matches_them(
    meters, fallback_meter, references
):
    # <｜User｜> and friends are non-special added tokens in DeepSeek's tokenizer.json: the
    # reference matches them in text even with encode_special_tokens=True.
    ref = references["deepseek-v4"]
    tok = Tokenizer.from_file(str(vocabs.locate(vocabs.VOCABS["deepseek-v4"])))
    plain_added = [t.content for t in tok.get_added_tokens_decoder().values() if not t.special]
    assert "<｜User｜>" in plain_added
    for content in plain_added:
        for text in [content, f"x{content}y", f"{content}{content}", f" {content}\n"]:
            want = ref.encode(text)
            assert meters["deepseek-v4"].encode(text) == want, text
            assert fallback_meter.encode(text) == want, text


# -- decoding ---------------------------------------------------------------------------------


@settings(deadline=None, max_examples=100)
@given(data=st.data())
def test_decode_of_any_ids_matches_reference(meters, references, vocab_name, data):
    ref = references[vocab_name]
    picks = data.draw(st.lists(st.integers(0, len(ref.ids) - 1), max_size=12), label="picks")
    ids = [ref.ids[i] for i in picks]
    meter = meters[vocab_name]
    if ref.decode_bytes is not None:
        want = ref.decode_bytes(ids)
        assert meter.decode_bytes(ids) == want
        assert meter.decode(ids) == want.decode("utf-8", errors="replace")
    else:
        assert ref.decode is not None
        assert meter.decode(ids) == ref.decode(ids)


def test_fallback_decode_matches_reference(fallback_meter, references, corpus):
    ref = references["deepseek-v4"]
    assert ref.decode is not None
    step = len(ref.ids) // 37
    samples = [list(ref.ids[i : i + 40 * step : step]) for i in range(0, len(ref.ids), 7 * step)]
    samples += [ref.encode(corpus["mixed.txt"]), [0, 1, *ref.encode("<｜User｜>hi")]]
    for ids in samples:
        assert fallback_meter.decode(ids) == ref.decode(ids), ids


def test_decode_of_special_ids(meters):
    for name, meter in meters.items():
        spec = vocabs.VOCABS[name]
        for text, token_id in spec.special_tokens.items():
            assert meter.decode_bytes([token_id]) == text.encode("utf-8")
    ds = Tokenizer.from_file(str(vocabs.locate(vocabs.VOCABS["deepseek-v4"])))
    bos = ds.token_to_id("<｜begin▁of▁sentence｜>")
    assert meters["deepseek-v4"].decode([bos]) == "<｜begin▁of▁sentence｜>"


def test_decode_of_a_partial_character_is_replaced(meters, references):
    ids = meters["cl100k_base"].encode("😀")
    assert len(ids) > 1
    first = references["cl100k_base"].decode_bytes
    assert first is not None
    assert meters["cl100k_base"].decode_bytes(ids[:1]) == first(ids[:1])
    assert meters["cl100k_base"].decode(ids[:1]) == first(ids[:1]).decode("utf-8", "replace")
    assert "\ufffd" in meters["cl100k_base"].decode(ids[:1])


def _unknown_ids(ref_ids: tuple[int, ...]) -> list[int]:
    top = ref_ids[-1]
    defined = set(ref_ids)
    gaps = [i for i in range(top) if i not in defined][:3]
    return [*gaps, top + 1, top + 1000, 10**9, 2**32 - 1]


def test_decode_of_unknown_id_raises_value_error(meters, fallback_meter, references, vocab_name):
    meter_list = [meters[vocab_name]]
    if vocab_name == "deepseek-v4":
        meter_list.append(fallback_meter)
    good = meters[vocab_name].encode("hello")
    for meter in meter_list:
        for bad in _unknown_ids(references[vocab_name].ids):
            with pytest.raises(ValueError, match=str(bad)):
                meter.decode([bad])
            with pytest.raises(ValueError):
                meter.decode_bytes([*good, bad])


@pytest.mark.parametrize("bad", [-1, 2**32, 2**64])
def test_decode_of_out_of_range_id_raises_value_error(meters, bad):
    # Not a token id of any vocabulary, so the documented ValueError, like any unknown id.
    for meter in meters.values():
        with pytest.raises(ValueError):
            meter.decode([bad])


def test_decode_accepts_any_sequence_of_ints(meters):
    meter = meters["cl100k_base"]
    ids = meter.encode("tuple and range")
    assert meter.decode(tuple(ids)) == "tuple and range"
    assert meter.decode([]) == ""
    assert meter.decode_bytes([]) == b""


# -- batches ----------------------------------------------------------------------------------


def test_count_batch_equals_counts(meters, fallback_meter, corpus, vocab_name):
    meter = meters[vocab_name]
    batch = ["", *corpus.values(), "", "x", "", " "]
    want = [meter.count(t) for t in batch]
    assert meter.count_batch(batch) == want
    assert meter.count_batch(iter(batch)) == want
    assert meter.count_batch(tuple(batch)) == want
    assert meter.count_batch([]) == []
    if vocab_name == "deepseek-v4":
        assert fallback_meter.count_batch(batch) == want


def test_count_batch_big_batch(meters, references, corpus, vocab_name):
    meter, ref = meters[vocab_name], references[vocab_name]
    lines = [line for text in corpus.values() for line in text.splitlines()]
    batch = [lines[i % len(lines)] + f" #{i}" for i in range(5_000)] + [""] * 10
    want = [len(ref.encode(t)) for t in batch]
    assert meter.count_batch(batch) == want


@pytest.mark.parametrize("bad", ["abc", b"abc", None, 5, ["a", None], ["a", b"b"], [1]])
def test_count_batch_rejects_non_str(meters, bad):
    with pytest.raises(TypeError):
        meters["cl100k_base"].count_batch(bad)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, b"x", bytearray(b"x"), 5, 1.5, ["a"], object()])
def test_non_str_text_raises_type_error(meters, fallback_meter, bad):
    for meter in [*meters.values(), fallback_meter]:
        with pytest.raises(TypeError):
            meter.count(bad)
        with pytest.raises(TypeError):
            meter.encode(bad)


def test_str_subclass_is_accepted(meters):
    class Text(str):
        pass

    meter = meters["cl100k_base"]
    assert meter.count(Text("hello world")) == meter.count("hello world")


def test_lone_surrogate_is_rejected_not_miscounted(meters):
    # A str that is not valid Unicode cannot be counted; the error must not be silent.
    with pytest.raises((UnicodeEncodeError, ValueError, TypeError)):
        meters["cl100k_base"].count("a\ud800b")


# -- the GIL is released ----------------------------------------------------------------------


def _progress_while(work: Any) -> tuple[int, float]:
    """Runs ``work`` in a thread and counts how often this thread ran Python code strictly
    between the worker's timestamps taken just before and just after ``work``.

    A timestamp taken here, in Python, needs the GIL. If ``work`` held the GIL from start to
    end, no timestamp here could fall inside its interval, however the scheduler behaves; so
    any tick inside proves the GIL was released, and the test cannot be flaky in that
    direction. Returns (ticks inside the interval, interval length).
    """
    span: list[float] = []
    ticks: list[float] = []
    started = threading.Event()

    def worker() -> None:
        started.set()
        t0 = time.perf_counter()
        work()
        t1 = time.perf_counter()
        span.extend([t0, t1])

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    t0, t1 = span
    return sum(t0 < t < t1 for t in ticks), t1 - t0


def _assert_releases_gil(work: Any) -> None:
    # Make the call long enough that a released GIL certainly lets this thread in.
    inside, duration = _progress_while(work)
    assert duration > 0.05, "the workload is too small to observe"
    assert inside >= 3, f"no progress in other threads during a {duration:.3f}s call"


@pytest.fixture(scope="module")
def big_texts(corpus) -> list[str]:
    text = "\n".join(corpus.values())
    return [text] * 48


def test_count_batch_releases_the_gil(meters, big_texts):
    meter = meters["cl100k_base"]
    _assert_releases_gil(lambda: meter.count_batch(big_texts))


def test_count_of_a_large_text_releases_the_gil(meters, big_texts):
    meter = meters["qwen"]
    text = "".join(big_texts[:24])
    # The meter is fast: grow the text until one count takes long enough to observe.
    while True:
        t0 = time.perf_counter()
        meter.count(text)
        if time.perf_counter() - t0 > 0.1 or len(text) > 64_000_000:
            break
        text *= 2
    _assert_releases_gil(lambda: meter.count(text))


def test_fallback_count_batch_releases_the_gil(fallback_meter, big_texts):
    _assert_releases_gil(lambda: fallback_meter.count_batch(big_texts[:8]))


# -- thread safety ----------------------------------------------------------------------------


def test_one_meter_shared_by_many_threads(meters, corpus):
    texts_ = list(corpus.values())
    meter = meters["deepseek-v4"]
    want = [meter.count(t) for t in texts_]
    messages = [{"role": "user", "content": t} for t in texts_]
    want_messages = meter.count_messages(messages)

    def hammer(seed: int) -> bool:
        order = texts_[seed % len(texts_) :] + texts_[: seed % len(texts_)]
        expected = want[seed % len(texts_) :] + want[: seed % len(texts_)]
        ok = [meter.count(t) for t in order] == expected
        ok &= meter.count_batch(order) == expected
        ok &= meter.count_messages(messages) == want_messages
        return ok

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(hammer, range(32)))


# -- vocabularies from any file ---------------------------------------------------------------

# A pattern no hand-written scanner knows, so the regex engine cuts the pieces.
CUSTOM_PATTERN = r"""'(?:s|t|ll)|\p{L}+|\p{N}{1,2}|[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


PATTERNS = {
    "custom": CUSTOM_PATTERN,
    "gpt2": GPT2_PATTERN,
    "cl100k": vocabs.CL100K_PATTERN,
    "qwen": vocabs.QWEN_PATTERN,
}


@pytest.fixture(scope="module")
def small_tiktoken(tmp_path_factory) -> dict[str, Any]:
    """The first 5,000 ranks of cl100k_base (every single byte among them) written to a new
    file, loaded with several patterns, each beside a tiktoken Encoding of the same ranks."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(vocabs.locate(vocabs.VOCABS["cl100k_base"])))
    small = {b: r for b, r in ranks.items() if r < 5_000}
    assert all(bytes([b]) in small for b in range(256))
    path = tmp_path_factory.mktemp("vocab") / "small.tiktoken"
    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in small.items()))
    specials = {"<|end|>": 5_000}
    return {
        "path": str(path),
        "pairs": {
            label: (
                Meter.from_tiktoken(path, pattern, specials),
                tiktoken.Encoding(
                    label, pat_str=pattern, mergeable_ranks=small, special_tokens=specials
                ),
            )
            for label, pattern in PATTERNS.items()
        },
    }


@pytest.mark.parametrize("label", list(PATTERNS))
@settings(deadline=None, max_examples=60)
@given(text=texts)
def test_from_tiktoken_any_file_and_pattern(small_tiktoken, label, text):
    meter, ref = small_tiktoken["pairs"][label]
    want = ref.encode_ordinary(text)
    assert meter.encode(text) == want
    assert meter.count(text) == len(want)


def test_from_tiktoken_on_the_corpus(small_tiktoken, corpus):
    for meter, ref in small_tiktoken["pairs"].values():
        for label, text in corpus.items():
            assert meter.encode(text) == ref.encode_ordinary(text), label


def test_from_tiktoken_specials_decode_but_never_match(small_tiktoken):
    path = small_tiktoken["path"]
    meter = Meter.from_tiktoken(path, CUSTOM_PATTERN, {"<|end|>": 5_000})
    assert meter.decode([5_000]) == "<|end|>"
    assert 5_000 not in meter.encode("<|end|>")
    assert meter.count("<|end|>") > 1
    assert meter.vocab_size == 5_001


@pytest.fixture(scope="module")
def trained_tokenizers(tmp_path_factory, corpus) -> dict[str, str]:
    """Small tokenizer.json files trained on the corpus: a byte-level BPE (tokenhub's own BPE
    serves it) with a special and a plain added token, and a WordPiece (the fallback)."""
    out = tmp_path_factory.mktemp("tokjson")
    lines = [line for text in corpus.values() for line in text.splitlines() if line]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=600,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|sp|>"],
            show_progress=False,
        ),
    )
    bpe.add_tokens([AddedToken("<plain>", normalized=False)])
    bpe.save(str(out / "bpe.json"))

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(
        lines,
        trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False),
    )
    wp.save(str(out / "wordpiece.json"))
    return {"bpe": str(out / "bpe.json"), "wordpiece": str(out / "wordpiece.json")}


def hf_plain(path: str) -> Tokenizer:
    """The reference for a tokenizer.json: special-token text is plain text."""
    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    return tok


@pytest.fixture(scope="module")
def trained(trained_tokenizers) -> dict[str, tuple[Meter, Tokenizer]]:
    return {
        kind: (Meter.from_tokenizer_json(path), hf_plain(path))
        for kind, path in trained_tokenizers.items()
    }


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_from_tokenizer_json_any_file(trained, corpus, kind):
    meter, ref = trained[kind]
    if kind == "bpe":
        assert meter.fallback_reason is None
    else:
        assert meter.fallback_reason
    for text in [*corpus.values(), "a <|sp|> b <plain> c", "<plain><plain>"]:
        want = ref.encode(text, add_special_tokens=False).ids
        assert meter.encode(text) == want, text[:40]
        assert meter.count(text) == len(want)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
@settings(deadline=None, max_examples=100)
@given(text=texts)
def test_trained_tokenizers_match_reference_on_generated_text(trained, kind, text):
    meter, ref = trained[kind]
    want = ref.encode(text, add_special_tokens=False).ids
    assert meter.encode(text) == want
    assert meter.count(text) == len(want)
