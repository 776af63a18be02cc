"""The parser's fast schema check never accepts what jsonschema rejects, and agrees with it
on the keywords it implements; schemas with other keywords are left to jsonschema."""

from __future__ import annotations

import json

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from trustee.chat.fastcheck import compile_check
from trustee.chat.parse import ToolCallParser
from trustee.envs.toy import TOOLS
from trustee.types import ToolCall, ToolSpec

TYPES = ["object", "array", "string", "integer", "number", "boolean", "null"]
NAMES = ["a", "b", "c"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.sampled_from([0.0, 1.0, -2.0, 2.5, float("nan")])
    | st.sampled_from(["", "x", "abc", "hello"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES + ["z"]), inner, max_size=3)
    ),
    max_leaves=8,
)


def schemas(enum_values: st.SearchStrategy) -> st.SearchStrategy:
    leaf = st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(TYPES)
            | st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True),
            "enum": st.lists(enum_values, min_size=1, max_size=3),
            "minimum": st.integers(-3, 3),
            "exclusiveMaximum": st.sampled_from([0, 2, 2.5]),
            "minLength": st.integers(0, 3),
            "maxLength": st.integers(0, 3),
            "description": st.just("annotation"),
            "format": st.just("email"),
        },
    )

    def nest(inner: st.SearchStrategy) -> st.SearchStrategy:
        return st.fixed_dictionaries(
            {},
            optional={
                "type": st.sampled_from(["object", "array"]),
                "properties": st.dictionaries(st.sampled_from(NAMES), inner, max_size=3),
                "required": st.lists(st.sampled_from(NAMES), max_size=3, unique=True),
                "additionalProperties": st.booleans() | inner,
                "items": inner | st.booleans(),
                "minItems": st.integers(0, 2),
                "maxItems": st.integers(0, 2),
            },
        )

    return st.recursive(leaf, nest, max_leaves=6)


def is_valid(schema, x) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(x)


@settings(max_examples=400, deadline=None)
@given(
    schemas(json_values.filter(lambda v: not isinstance(v, list | dict))), st.lists(json_values, max_size=6)
)
def test_certainly_valid_implies_valid(schema, instances):
    check = compile_check(schema)
    assert check is not None, f"schema of implemented keywords only came back unsupported: {schema}"
    for x in instances:
        if check(x):
            assert is_valid(schema, x), (schema, x)


@settings(max_examples=400, deadline=None)
@given(schemas(st.sampled_from(["x", "abc", "hello"])), st.lists(json_values, max_size=6))
def test_agrees_with_jsonschema_on_json_values(schema, instances):
    # With string enums nothing is equal across types, so the two must agree exactly.
    check = compile_check(schema)
    for x in instances:
        assert check(x) == is_valid(schema, x), (schema, x)


def test_other_keywords_are_left_to_jsonschema():
    for schema in (
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {}}},
        {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        {"type": "string", "pattern": "^a"},
        {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"},
        {"type": "dict"},
        {"type": "array", "prefixItems": [{"type": "string"}]},
        {"enum": [[1, 2]]},
        False,
    ):
        assert compile_check(schema) is None, schema
    assert compile_check({"type": "integer", "x-unknown": 1, "description": "d"}) is not None
    assert compile_check(True)({"any": "thing"})


def test_parser_messages_unchanged_for_invalid_calls():
    # The fast check only lets valid calls skip jsonschema; invalid ones get its message.
    p = ToolCallParser(list(TOOLS.values()))
    assert p.validate(ToolCall(name="add", arguments={"a": 1, "b": 2.5})) is None
    err = p.validate(ToolCall(name="add", arguments={"a": 1}))
    assert err.kind == "schema" and "'b' is a required property" in err.message
    err = p.validate(ToolCall(name="add", arguments={"a": True, "b": 2}))
    assert err.kind == "schema" and "at a" in err.message
    err = p.validate(
        ToolCall(name="convert_units", arguments={"value": 1, "from_unit": "m", "to_unit": "parsec"})
    )
    assert err.kind == "schema" and "to_unit" in err.message
    strict = ToolSpec(
        name="f",
        parameters={
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "additionalProperties": False,
        },
    )
    p = ToolCallParser([strict])
    assert p.validate(ToolCall(name="f", arguments={"n": 2.0})) is None  # Draft 6+: 2.0 is an integer
    err = p.validate(ToolCall(name="f", arguments=json.loads('{"n": 1, "m": 2}')))
    assert err.kind == "schema" and "Additional properties" in err.message
