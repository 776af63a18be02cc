"""The longest output a constrained simulator request can produce, so no role's JSON is cut.

Owns `worst_case_bytes` / `worst_case_tokens` (a bound for a JSON schema under the
engines' grammar: xgrammar's JSON without free whitespace, separators ", " and ": ", see
`engines/grammar.py`) and
`text_pattern` (the string constraint the roles use: printable ASCII without `"` or `\\`, so
a string of n characters is exactly n bytes and needs no escapes).

The bound in tokens is the bound in UTF-8 bytes plus one (the end-of-sequence token): every
token a byte-level BPE vocabulary (Qwen, Llama 3) can emit under the grammar decodes to at
least one byte. A schema the bound cannot cover (a string without a length, a free number,
an array without maxItems, an object open to extra keys) has no bound (`math.inf`).
Callers: `client.py` (per request: the request's `max_tokens` and the context check) and
`envs/simulated.py` (the start-up check of every role against its configured budget). It
does not change schemas; `client.bounded_schema` does.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

TEXT_CLASS = r"[ !#-\[\]-~]"
"""Printable ASCII except the double quote and the backslash (one byte each, no escapes)."""


SEP = 2
"""Bytes of a separator: the grammar writes ", " and ": " (one space, never more)."""


TEXT_CHUNK = 128
"""Longest single repetition in a text pattern: xgrammar 0.2.8's compiler fails a check
(`per_rule_fsm_hashes`) on `[...]{0,160}` and longer, so longer text is a sequence of
repetitions of at most this many characters."""


def text_pattern(max_chars: int, min_chars: int = 0) -> str:
    """A JSON-schema `pattern` for text of min..max printable ASCII characters."""
    if min_chars > min(max_chars, TEXT_CHUNK):
        raise ValueError(
            f"text_pattern: min_chars = {min_chars} over the first chunk; keep it <= {TEXT_CHUNK}"
        )
    parts, left, lo = [], max_chars, min_chars
    while True:
        n = min(left, TEXT_CHUNK)
        parts.append(f"{TEXT_CLASS}{{{lo},{n}}}")
        left, lo = left - n, 0
        if left <= 0:
            break
    return "^" + "".join(parts) + "$"


def _json_len(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def worst_case_tokens(schema: dict[str, Any]) -> int | float:
    """Most tokens a constrained output of `schema` can take (bytes + the end token)."""
    return worst_case_bytes(schema) + 1


def worst_case_bytes(schema: Any) -> int | float:
    """Most UTF-8 bytes of compact JSON valid for `schema` (math.inf when unbounded)."""
    if not isinstance(schema, dict) or not schema:
        return math.inf
    if "const" in schema:
        return _json_len(schema["const"])
    if "enum" in schema:
        return max(_json_len(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return max(worst_case_bytes(s) for s in schema[key])
    types = schema.get("type")
    if isinstance(types, list):
        return max(worst_case_bytes({**schema, "type": t}) for t in types)
    if types == "object":
        return _object(schema)
    if types == "array":
        return _array(schema)
    if types == "string":
        return _string(schema)
    if types == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is None or hi is None:
            return math.inf
        return max(len(str(int(lo))), len(str(int(hi))))
    if types == "boolean":
        return 5
    if types == "null":
        return 4
    return math.inf  # "number" (fraction digits are unbounded) and anything unknown


def _object(schema: dict[str, Any]) -> int | float:
    if schema.get("additionalProperties", True) is not False:
        return math.inf
    props = schema.get("properties", {})
    # '{' + '}' + each member '"key": value' + ', ' between members (xgrammar's separators
    # without free whitespace are ": " and ", ")
    members = [_json_len(k) + SEP + worst_case_bytes(v) for k, v in props.items()]
    return 2 + sum(members) + SEP * max(0, len(members) - 1)


def _array(schema: dict[str, Any]) -> int | float:
    n = schema.get("maxItems")
    if n is None:
        return math.inf
    if n == 0:
        return 2
    return 2 + n * worst_case_bytes(schema.get("items", {})) + SEP * (n - 1)


def _string(schema: dict[str, Any]) -> int | float:
    pattern = schema.get("pattern")
    if pattern is not None:
        return 2 + _pattern_bytes(pattern)
    n = schema.get("maxLength")
    if n is None:
        return math.inf
    # a free character is at most a 6-byte escape (\uXXXX); raw UTF-8 is at most 4 bytes
    return 2 + 6 * int(n)


_ATOM = re.compile(r"\[(?:\\.|[^\]\\])*\]|\\.|[^\[\]\\(){}*+?|^$.]")
_QUANT = re.compile(r"\{(\d+)(?:,(\d*))?\}|[*+?]")


def _pattern_bytes(pattern: str) -> int | float:
    """Most bytes of a JSON string body matching `pattern`, for the patterns the roles use:
    a sequence of ASCII character classes or literals, each optionally quantified by
    {m}, {m,n} or ?. Anything else (alternation, groups, *, +, '.') is unbounded here."""
    body = pattern.removeprefix("^").removesuffix("$")
    total, i = 0, 0
    while i < len(body):
        m = _ATOM.match(body, i)
        if m is None:
            return math.inf
        atom, i = m.group(0), m.end()
        if not _ascii_no_escape(atom):
            return math.inf
        q = _QUANT.match(body, i)
        count = 1
        if q is not None:
            i = q.end()
            if q.group(0) in ("*", "+"):
                return math.inf
            if q.group(0) == "?":
                count = 1
            elif q.group(2) is None:
                count = int(q.group(1))
            elif q.group(2) == "":
                return math.inf
            else:
                count = int(q.group(2))
        total += count
    return total


def _ascii_no_escape(atom: str) -> bool:
    """True when every character the atom matches is one byte in a JSON string (printable
    ASCII other than `"` and `\\`): the role patterns' classes and identifier classes."""
    if atom == TEXT_CLASS:
        return True
    if atom.startswith("["):
        inner = atom[1:-1]
        return not inner.startswith("^") and "\\" not in inner and '"' not in inner and inner.isascii()
    return atom.isascii() and atom not in ('"', "\\") and atom.isprintable()
