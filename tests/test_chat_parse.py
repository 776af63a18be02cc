"""Tool-call parsing: every error kind is a typed value; every valid call round-trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustee.chat.parse import ToolCallParser, canonical_json, error_observation
from trustee.types import ToolCall, ToolSpec

TOOLS = [
    ToolSpec(
        name="get_weather",
        parameters={
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(name="ping", parameters={"type": "object", "properties": {}}),
]
P = ToolCallParser(TOOLS)


def block(obj) -> str:
    return f"<tool_call>\n{obj if isinstance(obj, str) else json.dumps(obj)}\n</tool_call>"


def test_valid_calls_with_content_and_reasoning():
    text = (
        "<think>\nneed weather\n</think>\n\nChecking."
        + "\n"
        + block({"name": "get_weather", "arguments": {"city": "Paris", "days": 2}})
        + "\n"
        + block({"name": "ping", "arguments": {}})
        + "<|im_end|>"
    )
    t = P.parse(text)
    assert t.errors == [] and t.blocks == 2
    assert t.calls == [
        ToolCall(name="get_weather", arguments={"city": "Paris", "days": 2}),
        ToolCall(name="ping"),
    ]
    assert t.message.content == "Checking." and t.message.reasoning == "need weather"
    assert t.message.tool_calls == t.calls


def test_plain_answer_has_no_calls():
    t = P.parse("It is sunny.<|im_end|>")
    assert t.calls == [] and t.errors == [] and t.blocks == 0 and t.message.content == "It is sunny."


@pytest.mark.parametrize(
    "raw, kind, needle",
    [
        ('{"name": "ping", "arguments": {', "invalid_json", "not valid JSON"),
        ("[1, 2]", "not_an_object", "JSON object"),
        ('{"arguments": {}}', "missing_name", "name"),
        ('{"name": "ping", "arguments": [1]}', "not_an_object", "arguments"),
        ('{"name": "ping", "arguments": "{bad"}', "invalid_json", "arguments"),
        (
            '{"name": "teleport", "arguments": {}}',
            "unknown_tool",
            "tool 'teleport' not found; known: ['get_weather', 'ping']",
        ),
        ('{"name": "get_weather", "arguments": {}}', "schema", "'city' is a required property"),
        ('{"name": "get_weather", "arguments": {"city": "x", "days": 0}}', "schema", "days"),
        ('{"name": "get_weather", "arguments": {"city": 5}}', "schema", "city"),
        ('{"name": "get_weather", "arguments": {"city": "x", "extra": 1}}', "schema", "extra"),
    ],
)
def test_each_error_kind(raw, kind, needle):
    t = P.parse(block(raw))
    assert t.calls == [] and t.blocks == 1
    [err] = t.errors
    assert err.kind == kind and needle in err.message
    obs = error_observation(err)
    assert obs.role == "tool" and json.loads(obs.content) == {"error": err.message}


def test_unclosed_block_is_an_error_not_a_drop():
    t = P.parse(block({"name": "ping", "arguments": {}}) + '\n<tool_call>\n{"name": "ping"')
    assert len(t.calls) == 1 and t.blocks == 2
    assert [e.kind for e in t.errors] == ["unclosed"]


def test_arguments_as_json_string_are_accepted():
    t = P.parse(block('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'))
    assert t.calls == [ToolCall(name="get_weather", arguments={"city": "Oslo"})]


def test_errors_and_calls_keep_their_order_and_count():
    text = block("nope") + block({"name": "ping", "arguments": {}}) + block({"name": "x", "arguments": {}})
    t = P.parse(text)
    assert (
        [e.kind for e in t.errors] == ["invalid_json", "unknown_tool"] and len(t.calls) == 1 and t.blocks == 3
    )


def test_duplicate_tool_names_rejected():
    with pytest.raises(ValueError, match="not unique"):
        ToolCallParser([ToolSpec(name="a"), ToolSpec(name="a")])


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    args=st.dictionaries(st.text(min_size=1, max_size=8), json_value, max_size=4),
    content=st.text(max_size=20),
)
def test_round_trip_of_valid_calls(args, content):
    free = ToolCallParser([ToolSpec(name="free", parameters={"type": "object"})])
    call = ToolCall(name="free", arguments=args)
    text = content.replace("<", "") + "\n" + block({"name": "free", "arguments": args}) + "<|im_end|>"
    t = free.parse(text)
    assert t.errors == [] and t.calls == [call]
    assert canonical_json(t.calls[0].arguments) == canonical_json(args)
