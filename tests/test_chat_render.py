"""TITO invariants: incremental ids == apply_chat_template ids; masks cover exactly the
policy-sampled spans (DESIGN §5.1, §5.2). The property tests run for every chat family
(Qwen3/Hermes on the tiny model's tokenizer; Llama 3 and Mistral on tiny offline tokenizers
from `tests/chat_tokenizers.py`)."""

from __future__ import annotations

import string

import pytest
from chat_tokenizers import chat_tokenizer, tiny_chat_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustee.chat.formats import FAMILIES, TemplateError, chat_spec, detect_family
from trustee.chat.render import ChatFormat, Conversation, check_prefix_preserving, project_template
from trustee.types import Message, ToolCall, ToolSpec

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(params=FAMILY_NAMES)
def family_tokenizer(request, tiny_tokenizer):
    """(family name, a tokenizer of that family whose chat template is trustee's)."""
    name = request.param
    return name, tiny_tokenizer if name == "qwen" else chat_tokenizer(name)


TOOLS = [
    ToolSpec(
        name="get_weather",
        description="Current weather for a city.",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    ),
    ToolSpec(
        name="convert",
        description="Convert a quantity between units.",
        parameters={
            "type": "object",
            "properties": {"value": {"type": "number"}, "unit": {"type": "string", "enum": ["km", "mi"]}},
        },
    ),
]

# Text as a policy or environment would write it: words, digits, punctuation, inner newlines and
# non-ASCII; no leading/trailing whitespace (see `sampled_body` for why that boundary matters).
_ALPHABET = string.ascii_letters + string.digits + " .,:;!?'\"{}[]()-_/\n" + "éü中"
text = st.text(alphabet=_ALPHABET, min_size=1, max_size=40).map(str.strip).filter(bool)
json_scalar = st.one_of(st.integers(-1000, 1000), st.booleans(), text, st.none())
arguments = st.dictionaries(st.sampled_from(["city", "value", "unit", "q", "n"]), json_scalar, max_size=3)
tool_call = st.builds(
    ToolCall, name=st.sampled_from(["get_weather", "convert", "unknown_tool"]), arguments=arguments
)


@st.composite
def assistant_turn(draw, thinking: bool):
    calls = draw(st.lists(tool_call, max_size=3))
    content = draw(st.one_of(st.just(""), text)) if calls else draw(text)
    reasoning = draw(st.one_of(st.just(""), text)) if thinking else ""
    return Message(role="assistant", content=content, reasoning=reasoning, tool_calls=calls)


@st.composite
def conversation(draw):
    """A random episode: optional system prompt, first user turn, then rounds of an assistant
    turn followed by tool results (one per call, parallel calls grouped) and/or a user turn."""
    thinking = draw(st.booleans())
    msgs = []
    if draw(st.booleans()):
        msgs.append(Message(role="system", content=draw(text)))
    msgs.append(Message(role="user", content=draw(text)))
    rounds = []
    for _ in range(draw(st.integers(1, 4))):
        a = draw(assistant_turn(thinking))
        env = [Message(role="tool", content=draw(text), name=c.name) for c in a.tool_calls]
        if not env or draw(st.booleans()):
            env.append(Message(role="user", content=draw(text)))
        rounds.append((a, env))
    use_tools = draw(st.booleans())
    return thinking, msgs, rounds, use_tools


def sampled_body(fmt: ChatFormat, history: list[Message], turn: Message) -> list[int]:
    """The ids a policy would sample for `turn`: the template's text for that assistant turn
    after the generation prompt, up to and including the end-of-turn token (<|im_end|>,
    <|eot_id|>, </s>), tokenized on its own; what follows it is template scaffolding."""
    full = fmt.render_text(history + [turn], generation_prompt=False)
    prompt = fmt.render_text(history, generation_prompt=True)
    assert full.startswith(prompt)
    body = full[len(prompt) :]
    eos = FAMILIES[fmt.family].end_of_turn
    assert eos in body
    return fmt.encode(body[: body.rindex(eos) + len(eos)])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conversation())
def test_incremental_ids_equal_apply_chat_template(family_tokenizer, case):
    name, tiny_tokenizer = family_tokenizer
    thinking, opening, rounds, use_tools = case
    thinking = thinking and FAMILIES[name].thinking
    if not FAMILIES[name].thinking:  # the format has no reasoning block to carry it
        rounds = [
            (Message(role="assistant", content=a.content, tool_calls=a.tool_calls), e) for a, e in rounds
        ]
    tools = TOOLS if use_tools else []
    fmt = ChatFormat(tiny_tokenizer, tools, enable_thinking=thinking)
    assert fmt.family == name
    conv = Conversation.start(fmt, opening)
    history = list(opening)
    sampled_spans = []
    for version, (turn, env) in enumerate(rounds):
        ids = sampled_body(fmt, history, turn)
        start = len(conv)
        conv.append_sampled(ids, [-0.5] * len(ids), version)
        sampled_spans.append((start, len(conv), version))
        conv.add_assistant(turn)
        history.append(turn)
        conv.append_env(env)
        history.extend(env)

    reference = tiny_tokenizer.apply_chat_template(
        [m.to_template() for m in history],
        tools=[t.to_openai() for t in tools] or None,
        add_generation_prompt=True,
        enable_thinking=thinking,
        tokenize=True,
        return_dict=False,
    )
    assert conv.ids == list(reference)
    expected_mask = [0] * len(conv)
    for a, b, version in sampled_spans:
        for i in range(a, b):
            expected_mask[i] = 1
            assert conv.versions[i] == version and conv.logprobs[i] == -0.5
    assert conv.mask == expected_mask
    assert all(
        conv.versions[i] == -1 and conv.logprobs[i] == 0.0 for i in range(len(conv)) if not conv.mask[i]
    )
    # Every sampled span ends with the end-of-turn token; what follows it is scaffolding.
    for _, b, _ in sampled_spans:
        assert conv.ids[b - 1] == fmt.eos_id and conv.mask[b] == 0


def test_truncated_sample_gets_unmasked_end_token(family_tokenizer):
    _, tiny_tokenizer = family_tokenizer
    fmt = ChatFormat(tiny_tokenizer, TOOLS)
    conv = Conversation.start(fmt, [Message(role="user", content="hi")])
    partial = fmt.encode("I was cut off")
    conv.append_sampled(partial, [-1.0] * len(partial), 3)
    assert conv.ids[-1] == fmt.eos_id and conv.mask[-1] == 0
    assert conv.mask[-1 - len(partial) : -1] == [1] * len(partial)


def test_project_template_is_prefix_preserving(family_tokenizer):
    name, tok = family_tokenizer
    assert check_prefix_preserving(tok, project_template(name)) == []


def test_family_is_detected_from_the_tokenizer_and_the_spec_picks_its_template(family_tokenizer):
    name, tok = family_tokenizer
    assert detect_family(tok) == name
    spec = chat_spec(tok, chat_format="auto", chat_template="trustee")
    assert spec.family == name and spec.template == project_template(name)
    assert chat_spec(tok, chat_template="model").template is None
    assert ChatFormat(tok, []).eos_id == tok.convert_tokens_to_ids(FAMILIES[name].end_of_turn)


def test_unknown_tokenizer_family_names_the_setting(tiny_tokenizer):
    with pytest.raises(TemplateError, match="model.chat_format"):
        detect_family(_WithoutMarkers())
    with pytest.raises(TemplateError, match="unknown"):
        chat_spec(tiny_tokenizer, chat_format="gemma")


class _WithoutMarkers:
    """A tokenizer stand-in (test double) that knows no family's marker tokens."""

    name_or_path = "no-markers"
    unk_token_id = None

    def convert_tokens_to_ids(self, token):
        return None


def test_thinking_is_refused_for_a_format_without_reasoning():
    with pytest.raises(TemplateError, match="enable_thinking"):
        ChatFormat(tiny_chat_tokenizer("llama3"), [], enable_thinking=True)


def test_mistral_shipped_layout_is_reported_not_prefix_preserving():
    # Mistral's own templates put [AVAILABLE_TOOLS] before the *last* user turn, so a second
    # user turn moves the tool list: the check must catch it.
    moved = (
        "{{- '<s>' -}}{%- for message in messages -%}"
        "{%- if message.role == 'user' -%}"
        "{%- if tools and loop.last -%}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}"
        "{{- '[INST]' + message.content + '[/INST]' -}}"
        "{%- elif message.role == 'assistant' -%}{{- message.content + '</s>' -}}"
        "{%- elif message.role == 'tool' -%}{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' -}}"
        "{%- endif -%}{%- endfor -%}"
    )
    problems = check_prefix_preserving(tiny_chat_tokenizer("mistral"), moved)
    assert problems and "changes the text" in problems[0]


def test_qwen3_style_template_that_drops_reasoning_is_reported(tiny_tokenizer):
    # Qwen3's shipped template drops <think> content of earlier turns; this stand-in does the same.
    dropping = project_template().replace(
        "(message.reasoning_content | default('', true))",
        "((message.reasoning_content | default('', true)) if loop.last else '')",
    )
    problems = check_prefix_preserving(tiny_tokenizer, dropping)
    assert problems and "changes the text" in problems[0]


def test_generation_prompt_with_thinking_off_contains_empty_think(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer, [], enable_thinking=False)
    text = fmt.render_text([Message(role="user", content="x")], generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    fmt_on = ChatFormat(tiny_tokenizer, [], enable_thinking=True)
    assert fmt_on.render_text([Message(role="user", content="x")], generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("thinking", [False, True])
def test_parallel_tool_results_share_one_user_turn(tiny_tokenizer, thinking):
    fmt = ChatFormat(tiny_tokenizer, TOOLS, enable_thinking=thinking)
    text = fmt.continuation_text(
        [
            Message(role="tool", content="a", name="get_weather"),
            Message(role="tool", content="b", name="get_weather"),
        ]
    )
    assert text.startswith("\n<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n")
    assert text.count("<|im_start|>user") == 1


def test_chat_spec_refuses_thinking_where_the_format_has_none(tiny_tokenizer):
    with pytest.raises(TemplateError, match="model.enable_thinking = true"):
        chat_spec(tiny_chat_tokenizer("mistral"), enable_thinking=True)
    assert chat_spec(tiny_tokenizer, enable_thinking=True).family == "qwen"


def test_smollm2_tokenizer_is_plain_chatml_with_calls_as_text_and_no_think_block():
    from chat_tokenizers import smollm2_tokenizer

    tok = smollm2_tokenizer()
    assert detect_family(tok) == "chatml" and len(tok) == 49152
    fmt = ChatFormat(tok, TOOLS, template=project_template("chatml"))
    text = fmt.render_text(
        [Message(role="system", content="s"), Message(role="user", content="x")], generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in text
    assert (
        '{"name": "get_weather", "description"' in text
    )  # the function alone: shorter than the OpenAI wrapper
    # "<tool_call>" is not a token of SmolLM2: the policy writes it as text, several tokens.
    assert len(fmt.encode("<tool_call>")) > 1
