"""TurnRenderer gives ChatFormat's ids without running the template per turn; the episode
runner builds the parser, format and renderer once per tool set."""

from __future__ import annotations

import pytest

from trustee.chat.render import ChatFormat, project_template
from trustee.envs.toy import TOOLS
from trustee.rollout.episode import EpisodeRunner
from trustee.rollout.turns import TurnRenderer
from trustee.types import Message

TOOLSET = [TOOLS["add"], TOOLS["kv_get"]]

CONTENTS = [
    '{"result": 42}',
    "",
    "  leading and trailing spaces  ",
    "multi\nline\n\nwith <tool_response> inside",
    "ünïcödé ✓ 数字",
    '{"error": "tool \'x\' not found"}',
]


@pytest.fixture(params=[None, "trustee"])
def fmt(request, tiny_tokenizer):
    template = project_template() if request.param else None
    return ChatFormat(tiny_tokenizer, TOOLSET, template=template)


def test_continuations_equal_template(fmt):
    r = TurnRenderer(fmt)
    for c in CONTENTS:
        for new in (
            [Message(role="tool", content=c, name="add")],
            [
                Message(role="tool", content=c, name="add"),
                Message(role="tool", content=c[::-1], name="kv_get"),
            ],
            [Message(role="user", content=c)],
        ):
            for gen in (True, False):
                assert r.continuation_ids(new, generation_prompt=gen) == fmt.continuation_ids(
                    new, generation_prompt=gen
                )
    # after the verified uses, the template no longer runs for known shapes
    before = r.template_renders
    r.continuation_ids([Message(role="tool", content="fresh", name="add")])
    assert r.template_renders == before


def test_prompts_equal_template_and_are_memoised(fmt):
    r = TurnRenderer(fmt)
    for c in CONTENTS:
        msgs = [Message(role="system", content=f"sys {c}"), Message(role="user", content=c)]
        assert r.prompt_ids(msgs) == fmt.prompt_ids(msgs)
        assert r.prompt_ids(msgs) == fmt.prompt_ids(msgs)  # memo hit returns a copy, same ids
    ids = r.prompt_ids(msgs)
    ids.append(-7)  # callers may extend what they get
    assert r.prompt_ids(msgs) == fmt.prompt_ids(msgs)


def test_assistant_messages_take_the_template_path(fmt):
    r = TurnRenderer(fmt)
    msgs = [
        Message(role="user", content="hi"),
        Message(role="assistant", content="ok", reasoning="think"),
        Message(role="user", content="again"),
    ]
    n = r.template_renders
    assert r.prompt_ids(msgs) == fmt.prompt_ids(msgs)
    assert r.template_renders == n + 1


def test_non_verbatim_template_falls_back(tiny_tokenizer):
    # A template that transforms contents (upper-cases them) cannot be filled in by substitution.
    template = (
        "{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
    )
    fmt = ChatFormat(tiny_tokenizer, [], template=template)
    r = TurnRenderer(fmt)
    for c in ("abc", "def"):
        msgs = [Message(role="user", content=c)]
        assert r.prompt_ids(msgs) == fmt.prompt_ids(msgs)


def test_decode_equals_tokenizer(fmt, tiny_tokenizer):
    r = TurnRenderer(fmt)
    ids = tiny_tokenizer.encode(
        '<tool_call>\n{"name": "add"}\n</tool_call><|im_end|>', add_special_tokens=False
    )
    assert r.decode(ids) == tiny_tokenizer.decode(ids, skip_special_tokens=False)


def test_parser_built_once_per_tool_set(tiny_tokenizer, monkeypatch):
    import trustee.rollout.episode as ep

    built = []
    real = ep.ToolCallParser

    def counting(tools, **kwargs):  # test double: counts constructions, then builds the real parser
        built.append(len(tools))
        return real(tools, **kwargs)

    monkeypatch.setattr(ep, "ToolCallParser", counting)
    runner = EpisodeRunner(
        policy=None, tokenizer=tiny_tokenizer, template=project_template(), tool_set_cache=2
    )
    a = runner.for_tools(TOOLSET)
    assert runner.for_tools(list(TOOLSET)) is a  # equal tool sets share one entry
    runner.for_tools([TOOLS["add"]])
    assert len(built) == 2
    runner.for_tools([TOOLS["multiply"]])  # evicts the least recently used (TOOLSET)
    runner.for_tools(TOOLSET)
    assert len(built) == 4
