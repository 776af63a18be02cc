"""A fast "certainly valid" check for the JSON Schemas tool parameters usually have.

Owns `compile_check(schema)`: a plain-Python predicate for a schema built only from the
common keywords (`type`, `properties`, `required`, `additionalProperties`, `items`, `enum`,
`minimum`/`maximum` and their exclusive forms, `minLength`/`maxLength`,
`minItems`/`maxItems`, plus annotations), or None when the schema uses anything else
(`$ref`, `anyOf`, `pattern`, `$schema`, ...). The predicate answers True only where
`jsonschema`'s Draft 2020-12 validator finds no error; False means "not certainly valid",
and the caller then runs `jsonschema` itself, whose error message is the one the policy
sees. So a valid call skips `jsonschema` (about 20-100 us per call) and an invalid one
gets exactly the message it got before. `tests/test_chat_fastcheck.py` compares the two on
generated instances.

Called by `chat/parse.py` (`ToolCallParser`), once per tool when a parser is built. It does
not report errors or check schemas (`jsonschema`'s `check_schema` does, before this runs).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from jsonschema import Draft202012Validator

Check = Callable[[Any], bool]

# `format` asserts nothing unless the validator is given a format checker (the parser's are not).
_IGNORED = frozenset({"format"})
_ASSERTING = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
    }
)
# Every keyword the Draft 2020-12 validator acts on; any of them outside _ASSERTING makes the
# schema unsupported. Keys outside this set are ignored by jsonschema, and so here.
_KNOWN = frozenset(Draft202012Validator.VALIDATORS)


def _is_number(x: Any) -> bool:
    """A JSON number (int or float, not bool): the only numbers compared here."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_object(x: Any) -> bool:
    return isinstance(x, dict)


def _is_array(x: Any) -> bool:
    return isinstance(x, list)


def _is_string(x: Any) -> bool:
    return isinstance(x, str)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _is_null(x: Any) -> bool:
    return x is None


def _is_integer(x: Any) -> bool:
    # Draft 6+: a float with no fractional part is an integer; bools are not.
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


def _not_number_or_compared(x: Any) -> bool | None:
    """Number keywords apply to numbers only: None when `x` is a JSON number (compare it);
    True when it is no number at all (the keyword does not apply); False for other numeric
    types (Decimal, complex, ...), left to jsonschema."""
    if _is_number(x):
        return None
    return isinstance(x, bool) or not isinstance(x, numbers.Number)


# Same type checks as jsonschema's Draft 2020-12 type checker (isinstance-based).
_TYPES: dict[str, Check] = {
    "object": _is_object,
    "array": _is_array,
    "string": _is_string,
    "boolean": _is_bool,
    "null": _is_null,
    "integer": _is_integer,
    "number": lambda x: (
        type(x) is int or type(x) is float or (not isinstance(x, bool) and isinstance(x, numbers.Number))
    ),
}


def _enum_check(values: Any) -> Check | None:
    if not isinstance(values, list) or not all(
        v is None or type(v) in (str, int, float, bool) for v in values
    ):
        return None
    allowed = [(type(v), v) for v in values]
    # Same exact type and equal implies jsonschema's `equal` (which compares bools only with
    # bools and 1 with 1.0); a value equal only across types is left to jsonschema.
    return lambda x: any(type(x) is t and x == v for t, v in allowed)


def compile_check(schema: Any) -> Check | None:
    """A predicate that is True only for instances `schema` certainly accepts, or None when
    the schema uses a keyword this module does not implement."""
    if schema is True:
        return lambda x: True
    if not isinstance(schema, dict):
        return None  # False (rejects everything) or not a schema: jsonschema decides
    if "$schema" in schema:  # another draft has other rules (e.g. boolean exclusiveMinimum)
        return None
    checks: list[Check] = []
    for key, value in schema.items():
        if key not in _KNOWN or key in _IGNORED:
            continue  # jsonschema ignores unknown keywords and annotations
        if key not in _ASSERTING:
            return None
        made = _keyword(key, value, schema)
        if made is None:
            return None
        checks.append(made)
    if not checks:
        return lambda x: True
    if len(checks) == 1:
        return checks[0]

    def every(x: Any) -> bool:
        for c in checks:
            if not c(x):
                return False
        return True

    return every


def _type(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n in _TYPES for n in names):
        return None
    types = [_TYPES[n] for n in names]
    if len(types) == 1:
        return types[0]
    return lambda x: any(t(x) for t in types)


def _enum(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    return _enum_check(value)


def _properties(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    if not isinstance(value, dict):
        return None
    subs = {name: compile_check(sub) for name, sub in value.items()}
    if any(c is None for c in subs.values()):
        return None
    items = list(subs.items())

    def properties(x: Any) -> bool:
        if not isinstance(x, dict):
            return True
        for k, c in items:
            if k in x and not c(x[k]):
                return False
        return True

    return properties


def _required(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    if not isinstance(value, list):
        return None
    names = list(value)

    def required(x: Any) -> bool:
        if not isinstance(x, dict):
            return True
        for k in names:
            if k not in x:
                return False
        return True

    return required


def _additional(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    if "patternProperties" in schema:
        return None
    known = frozenset(schema.get("properties", {}))
    if value is False:
        return lambda x: not isinstance(x, dict) or all(k in known for k in x)
    sub = compile_check(value)
    if sub is None:
        return None
    return lambda x: not isinstance(x, dict) or all(sub(v) for k, v in x.items() if k not in known)


def _items(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    if "prefixItems" in schema:
        return None
    if value is False:
        return lambda x: not isinstance(x, list) or not x
    sub = compile_check(value)
    if sub is None:
        return None
    return lambda x: not isinstance(x, list) or all(sub(v) for v in x)


def _bound(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    if not _is_number(value):
        return None
    b = value
    # jsonschema's own failing comparisons, negated (so NaN passes as it does there)
    cmp: Check = {
        "minimum": lambda x: not x < b,
        "maximum": lambda x: not x > b,
        "exclusiveMinimum": lambda x: not x <= b,
        "exclusiveMaximum": lambda x: not x >= b,
    }[key]

    def bounded(x: Any) -> bool:
        skip = _not_number_or_compared(x)
        return cmp(x) if skip is None else skip

    return bounded


def _length(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    if type(value) is not int:
        return None
    n = value
    kind = _is_string if key.endswith("Length") else _is_array
    if key.startswith("min"):
        return lambda x: not kind(x) or len(x) >= n
    return lambda x: not kind(x) or len(x) <= n


# One builder per asserting keyword: (keyword, its value, the whole schema) -> a predicate, or
# None when this value is outside what the fast check handles.
_BUILDERS: dict[str, Callable[[str, Any, dict[str, Any]], Check | None]] = {
    "type": _type,
    "enum": _enum,
    "properties": _properties,
    "required": _required,
    "additionalProperties": _additional,
    "items": _items,
    "minimum": _bound,
    "maximum": _bound,
    "exclusiveMinimum": _bound,
    "exclusiveMaximum": _bound,
    "minLength": _length,
    "maxLength": _length,
    "minItems": _length,
    "maxItems": _length,
}


def _keyword(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    build = _BUILDERS.get(key)
    return build(key, value, schema) if build is not None else None
