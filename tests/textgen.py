"""Hypothesis strategies for texts that stress tokenizers.

Characters are restricted to what Python's ``unicodedata`` (Unicode 14 on 3.11) considers
assigned (category != Cn) and to non-surrogates (Cs): the engines compared here carry newer
Unicode tables than Python and may classify newly assigned characters differently, which is a
disagreement between the references, not a bug in the meter. The alphabet is biased towards the
classes the pre-tokenizer patterns treat specially.
"""

from __future__ import annotations

import itertools
import unicodedata

from hypothesis import strategies as st


def assigned(ch: str) -> bool:
    return unicodedata.category(ch) not in ("Cn", "Cs")


# Whitespace of every kind the patterns distinguish: \r and \n apart from other \s.
WHITESPACE = [" ", " ", " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\u00a0", "\u3000"]
WHITESPACE += ["\u2028", "\u0085", "\u2009"]
# Apostrophes and the letters of contractions ('s 't 're 've 'm 'll 'd), in both cases.
CONTRACTION = ["'", "'", "’", *"stlvermdSTLVERMD", "ſ", "\u212a"]
DIGITS = [*"0123456789", "٣", "१", "１", "½", "²", "Ⅻ", "①"]
PUNCT = [*'!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~', "¡", "¿", "—", "…", "「", "」", "。", "、", "｜", "▁"]
LETTERS = [*"aAxXyzZ", "é", "ß", "Ж", "ж", "λ", "ا", "ש", "क", "ก", "ǅ"]
CJK = [
    "中",
    "文",
    "字",
    "日",
    "本",
    "語",
    "の",
    "か",
    "カ",
    "ー",
    "ｶ",
    "한",
    "국",
    "龥",
    "〇",
    "ㄅ",
]
MARKS = ["\u0301", "\u0300", "\u0308", "\u0327", "\u0316", "\u093f", "\u094d", "\u0e31", "\u20dd"]
# Hangul conjoining jamo compose under NFC (Qwen normalizes, the others do not).
JAMO = ["\u1100", "\u1112", "\u1161", "\u119e", "\u11a8", "\u11ab"]
EMOJI = ["😀", "👍", "\U0001f3fd", "\u200d", "\ufe0f", "🇨", "🇭", "❤", "𝔘", "𓀀", "🀄", "\u20e3"]
OTHER = ["\u200b", "\u200c", "\u200e", "\u00ad", "\ufeff", "\x00", "\x1b", "\x7f"]

# Multi-character fragments: contractions, line endings, special-token text, digit runs.
FRAGMENTS = [
    "'ll",
    "'LL",
    "'s",
    "'re",
    "'ve",
    "don't",
    "I'M",
    "\r\n",
    "\n\n",
    "  ",
    "    ",
    " \n ",
    "123",
    "4567",
    "e\u0301",
    "\u1100\u1161\u11a8",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</tool_call>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁sep｜>",
    "<｜",
    "｜>",
    "User",
    "▁of▁",
    "｜DSML｜",
    "<｜/table>｜",
    "<|EOT|>",
]

_SAMPLED = [
    *WHITESPACE,
    *CONTRACTION,
    *DIGITS,
    *PUNCT,
    *LETTERS,
    *CJK,
    *MARKS,
    *JAMO,
    *EMOJI,
    *OTHER,
]
assert all(assigned(c) for entry in _SAMPLED + FRAGMENTS for c in entry)

any_assigned_char = st.characters(exclude_categories=("Cn", "Cs")).filter(assigned)

interesting_char = st.one_of(
    st.sampled_from(WHITESPACE),
    st.sampled_from(CONTRACTION),
    st.sampled_from(DIGITS + PUNCT),
    st.sampled_from(LETTERS + CJK),
    st.sampled_from(MARKS + JAMO),
    st.sampled_from(EMOJI + OTHER),
    any_assigned_char,
)

# A run of one character (long whitespace, digit and letter runs matter to the patterns).
char_run = st.builds(lambda c, n: c * n, interesting_char, st.integers(2, 40))

piece = st.one_of(
    interesting_char,
    interesting_char,
    interesting_char,
    st.sampled_from(FRAGMENTS),
    char_run,
)

texts = st.lists(piece, max_size=40).map("".join)


def cut(text: str, points: list[int]) -> list[str]:
    """``text`` split at the given character offsets (clamped, sorted, duplicates allowed)."""
    bounds = sorted(min(max(p, 0), len(text)) for p in points)
    edges = [0, *bounds, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


texts_with_cuts = st.tuples(texts, st.lists(st.integers(0, 10_000), max_size=12)).map(
    lambda t: cut(t[0], [p % (len(t[0]) + 1) for p in t[1]])
)
