"""Tool-call parsing: every error kind is a typed value; every valid call round-trips."""

from __future__ import annotations

import json

import pytest
from chat_tokenizers import chat_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from trustee.chat.formats import FAMILIES, project_template
from trustee.chat.parse import ToolCallParser, canonical_json, error_observation
from trustee.chat.render import ChatFormat
from trustee.types import Message, ToolCall, ToolSpec

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


# ----------------------------------------------------------------------------- other families


def llama_call(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj)


def mistral_calls(objs) -> str:
    return "[TOOL_CALLS]" + (objs if isinstance(objs, str) else json.dumps(objs))


def test_llama3_calls_after_prose_with_parameters_key():
    p = ToolCallParser(TOOLS, format="llama3")
    text = (
        "Let me check.\n"
        + llama_call({"name": "get_weather", "parameters": {"city": "Paris"}})
        + "; "
        + llama_call({"name": "ping", "parameters": {}})
        + "\n<|eot_id|>"
    )
    t = p.parse(text)
    assert t.errors == [] and t.blocks == 2 and t.message.content == "Let me check."
    assert t.calls == [ToolCall(name="get_weather", arguments={"city": "Paris"}), ToolCall(name="ping")]
    # <|python_tag|> and a pretty-printed object are accepted too.
    t = p.parse('<|python_tag|>{\n  "name": "ping",\n  "parameters": {}\n}<|eom_id|>')
    assert t.calls == [ToolCall(name="ping")] and t.message.content == ""


def test_llama3_plain_answer_and_broken_json():
    p = ToolCallParser(TOOLS, format="llama3")
    t = p.parse("It is sunny in Paris.<|eot_id|>")
    assert t.calls == [] and t.errors == [] and t.blocks == 0 and t.message.content == "It is sunny in Paris."
    t = p.parse('{"name": "ping", "parameters": {}}\n{"name": "ping", "param')
    assert len(t.calls) == 1 and [e.kind for e in t.errors] == ["invalid_json"] and t.errors[0].index == 1


def test_mistral_calls_list_and_single_object():
    p = ToolCallParser(TOOLS, format="mistral")
    t = p.parse(
        "Checking."
        + mistral_calls(
            [
                {"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}},
                {"name": "ping", "arguments": {}},
            ]
        )
        + "</s>"
    )
    assert t.errors == [] and t.blocks == 2 and t.message.content == "Checking."
    assert t.calls[0] == ToolCall(name="get_weather", arguments={"city": "Oslo", "days": 1})
    t = p.parse(mistral_calls({"name": "ping", "arguments": {}}))
    assert t.calls == [ToolCall(name="ping")]
    t = p.parse("No tools needed.</s>")
    assert t.calls == [] and t.blocks == 0 and t.message.content == "No tools needed."


ERROR_CASES = [
    ("invalid_json_args", "invalid_json", "not valid JSON"),
    ("not_object", "not_an_object", "JSON object"),
    ("no_name", "missing_name", "name"),
    ("unknown", "unknown_tool", "tool 'teleport' not found; known: ['get_weather', 'ping']"),
    ("schema", "schema", "'city' is a required property"),
]


def _bad(case: str, key: str):
    return {
        "invalid_json_args": {"name": "ping", key: "{bad"},
        "not_object": {"name": "ping", key: [1]},
        "no_name": {key: {}},
        "unknown": {"name": "teleport", key: {}},
        "schema": {"name": "get_weather", key: {}},
    }[case]


@pytest.mark.parametrize("fmt", ["llama3", "mistral"])
@pytest.mark.parametrize("case, kind, needle", ERROR_CASES)
def test_each_error_kind_in_other_formats(fmt, case, kind, needle):
    p = ToolCallParser(TOOLS, format=fmt)
    if fmt == "llama3":
        text = llama_call(_bad(case, "parameters"))
    else:
        text = mistral_calls([_bad(case, "arguments")])
    t = p.parse(text)
    assert t.calls == [] and t.blocks == 1
    [err] = t.errors
    assert err.kind == kind and needle in err.message


def test_mistral_broken_json_after_marker_is_one_error():
    t = ToolCallParser(TOOLS, format="mistral").parse('[TOOL_CALLS][{"name": "ping", "argu')
    assert t.calls == [] and [e.kind for e in t.errors] == ["invalid_json"] and t.blocks == 1


def test_unknown_format_names_the_setting():
    with pytest.raises(ValueError, match="model.chat_format"):
        ToolCallParser(TOOLS, format="gemma")


@settings(max_examples=60, deadline=None)
@given(
    args=st.lists(
        st.dictionaries(st.text(min_size=1, max_size=8), json_value, max_size=3), min_size=1, max_size=3
    ),
    content=st.text(alphabet="abc xyz.,!?", max_size=20).map(str.strip),
    fmt=st.sampled_from(["qwen", "llama3", "mistral", "chatml"]),
)
def test_rendered_calls_parse_back_in_every_format(args, content, fmt):
    # What trustee's template writes for an assistant turn is what the parser reads back.
    tok = _qwen_tok() if fmt == "qwen" else chat_tokenizer(fmt)
    f = ChatFormat(tok, [], template=project_template(fmt), family=fmt)
    calls = [ToolCall(name="free", arguments=a) for a in args]
    history = [Message(role="user", content="q")]
    turn = Message(role="assistant", content=content, tool_calls=calls)
    full = f.render_text(history + [turn], generation_prompt=False)
    body = full[len(f.render_text(history, generation_prompt=True)) :]
    body = body[: body.rindex(FAMILIES[fmt].end_of_turn) + len(FAMILIES[fmt].end_of_turn)]
    free = ToolCallParser([ToolSpec(name="free", parameters={"type": "object"})], format=fmt)
    t = free.parse(body)
    assert t.errors == [] and t.calls == calls and t.message.content == content


_QWEN: list = []


def _qwen_tok():
    """The tiny Qwen tokenizer, trained once per process (no model needed)."""
    if not _QWEN:
        from trustee.models.tiny import build_tokenizer

        _QWEN.append(build_tokenizer(0, 512))
    return _QWEN[0]
