"""JSON-schema grammars for constrained decoding, shared by the HF and vLLM engines.

Owns `json_grammar` (an xgrammar Grammar) and `json_ebnf` (its EBNF text, which vLLM's
xgrammar backend takes as `StructuredOutputsParams(grammar=...)`), so both engines constrain
to exactly the same language: compact JSON (no free whitespace) whose strings hold no control
characters and no UTF-16 surrogates. Callers: `hf.py`, `vllm.py`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# xgrammar 0.2.8 lets length-bounded JSON strings hold raw control characters (its unbounded
# strings exclude them), and any string hold UTF-16 surrogates (invalid UTF-8); strict JSON
# parsers such as msgspec reject both. Tighten the two character classes.
_LOOSE_CHARS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_STRICT_CHARS = r"[^\0-\x1f\"\\\ud800-\udfff]"


def json_grammar(schema_json: str) -> Any:
    """An xgrammar Grammar for compact JSON (no free whitespace: a model could otherwise emit
    whitespace until max_tokens) of `schema_json`, with control characters kept out of strings."""
    import xgrammar as xgr

    text = str(xgr.Grammar.from_json_schema(schema_json, any_whitespace=False))
    for loose in _LOOSE_CHARS:
        text = text.replace(loose, _STRICT_CHARS)
    return xgr.Grammar.from_ebnf(text)


@functools.lru_cache(maxsize=256)
def _ebnf(schema_json: str) -> str:
    return str(json_grammar(schema_json))


def json_ebnf(schema: dict[str, Any]) -> str:
    """EBNF text of `json_grammar` for `schema` (cached by the schema's JSON text, key order kept)."""
    return _ebnf(json.dumps(schema, separators=(",", ":")))
