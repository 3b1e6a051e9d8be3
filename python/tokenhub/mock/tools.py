"""Tool calls on the mock upstream: arguments made up from a tool's JSON schema, the same way
for OpenAI's chat (`tool_calls`) and Anthropic's Messages API (`tool_use` blocks).

A test that drives an agent loop through the gateway needs tool calls it can predict: the
arguments are generated from the schema alone (never at random), so the same tool and seed
always get the same call, and the output tokens are computable from what the client saw:
``count(name) + count(arguments JSON text)``, the JSON text being msgspec's encoding of the
arguments, exactly as the mock sends it (as `arguments` in OpenAI's wire, as the concatenated
`input_json_delta` fragments of Anthropic's stream).

The rule, per schema node: ``enum`` -> its first value; ``const`` -> it; ``anyOf``/``oneOf`` ->
the first alternative; ``type`` (the first non-null one of a list; "object" when absent and
``properties`` present, else "string"): object -> each *required* property, in the order listed
in ``required``; array -> one item from ``items``; string -> one word of the reply vocabulary
(picked by a hash of the tool, the property path and the seed); integer -> ``minimum`` if given,
else the hash mod 100; number -> that plus 0.5; boolean -> true; null -> null. Nesting deeper
than 8 levels gives null.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

__all__ = ["MAX_DEPTH", "arguments", "fragments", "generate"]

MAX_DEPTH: Final = 8
_encode = msgspec.json.Encoder().encode


def _hash(key: str, path: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _value(schema: Any, words: Sequence[str], key: str, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        return None
    if not isinstance(schema, Mapping):
        schema = {}
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for alt in ("anyOf", "oneOf"):
        options = schema.get(alt)
        if isinstance(options, list) and options:
            return _value(options[0], words, key, path, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = schema.get("required")
        names = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        return {n: _value(props.get(n, {}), words, key, f"{path}.{n}", depth + 1) for n in names}
    if kind == "array":
        return [_value(schema.get("items", {}), words, key, f"{path}[0]", depth + 1)]
    if kind == "integer":
        low = schema.get("minimum")
        return low if isinstance(low, int) and not isinstance(low, bool) else _hash(key, path) % 100
    if kind == "number":
        return _hash(key, path) % 100 + 0.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return words[_hash(key, path) % len(words)]


def generate(schema: Any, words: Sequence[str], tool: str, seed: int) -> dict[str, Any]:
    """The arguments of a call to `tool` with JSON schema `schema` (see the module's rule);
    always an object. `words` are the reply vocabulary's one-token words."""
    value = _value(schema if schema is not None else {}, words, f"{tool}\0{seed}", "$", 0)
    return value if isinstance(value, dict) else {}


def arguments(value: Mapping[str, Any]) -> str:
    """The JSON text of generated arguments, as the mock sends it (msgspec's encoding)."""
    return _encode(value).decode()


def fragments(text: str, parts: int = 3) -> list[str]:
    """`text` cut into up to `parts` non-empty pieces of about equal length (the streamed
    argument deltas); they concatenate to `text`."""
    if not text:
        return []
    parts = max(1, min(parts, len(text)))
    cuts = [len(text) * k // parts for k in range(parts + 1)]
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]
