"""TurnRenderer gives ChatFormat's ids without running the template per turn; the episode
runner builds the parser, format and renderer once per tool set."""

from __future__ import annotations

import re

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


PIECES = ["user", "assistant", "\n", " ", "  ", '{"result": 42}', "ünï ✓", "数字", "a", "\n\n", "x y", "}\n"]


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral", "chatml"])
def test_piecewise_encoding_equals_whole_text_encoding(family, tiny_tokenizer):
    # _Segments cuts at added tokens and memoises the pieces; the ids must be the library's
    # own for any mix of text and special tokens, on every family's tokenizer.
    import random

    from chat_tokenizers import chat_tokenizer

    from trustee.rollout.turns import _Segments

    tok = tiny_tokenizer if family == "qwen" else chat_tokenizer(family)
    backend = tok.backend_tokenizer
    seg = _Segments.build(backend, cache=8)
    assert seg is not None
    specials = list(tok.get_added_vocab())
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(PIECES + specials) for _ in range(rng.randint(0, 12)))
        assert seg.encode(text) == backend.encode(text, add_special_tokens=False).ids, text
    assert len(seg._memo) == 8  # bounded


def test_no_piecewise_encoding_where_the_start_of_a_text_is_special():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from trustee.rollout.turns import _Segments

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "▁a": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    t.add_special_tokens(["<s>"])
    assert _Segments.build(t, cache=8) is None  # a piece after "<s>" would get a "▁" it lacks


def test_repeated_scaffolding_is_looked_up_not_encoded(fmt):
    r = TurnRenderer(fmt)
    assert r._segments is not None  # the tiny byte-level BPE tokenizer qualifies
    for i in range(20):
        r.continuation_ids([Message(role="tool", content=f'{{"result": {i}}}', name="add")])
    hits = set(r._segments._memo)
    assert "assistant\n" in hits and "\n" in hits  # scaffolding pieces stay memoised
    new = [Message(role="tool", content='{"result": "fresh"}', name="add")]
    assert r.continuation_ids(new) == fmt.continuation_ids(new)


def test_tool_list_changed_in_place_is_not_mistaken_for_the_last_one(tiny_tokenizer):
    runner = EpisodeRunner(policy=None, tokenizer=tiny_tokenizer, template=project_template())
    tools = list(TOOLSET)
    a = runner.for_tools(tools)
    assert runner.for_tools(tools) is a
    tools[1] = TOOLS["multiply"]  # same list object, other specs
    b = runner.for_tools(tools)
    assert b is not a and set(b[1].tools) == {"add", "multiply"}
    tools.append(TOOLS["kv_get"])
    assert set(runner.for_tools(tools)[1].tools) == {"add", "multiply", "kv_get"}


@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral", "chatml"])
def test_byte_table_decode_equals_the_tokenizers(family, tiny_tokenizer):
    # Any ids, including ones that split a UTF-8 character, added tokens and ids the
    # tokenizer does not know: the table's text is the library's own decode.
    import random

    from chat_tokenizers import chat_tokenizer

    from trustee.rollout.turns import _ByteDecoder

    tok = tiny_tokenizer if family == "qwen" else chat_tokenizer(family)
    backend = tok.backend_tokenizer
    table = _ByteDecoder.build(backend)
    assert table is not None  # byte-level BPE with a ByteLevel decoder
    n = backend.get_vocab_size()
    rng = random.Random(0)
    texts = ["ünïcödé ✓ 数字 🙂", '<tool_call>\n{"name": "add"}\n</tool_call><|im_end|>']
    for _ in range(500):
        ids = [rng.randrange(n + 3) for _ in range(rng.randint(0, 30))]
        assert table.decode(ids) == backend.decode(ids, skip_special_tokens=False), ids
    for t in texts:
        ids = backend.encode(t, add_special_tokens=False).ids
        for cut in range(len(ids) + 1):  # every prefix, so partial characters too
            assert table.decode(ids[:cut]) == backend.decode(ids[:cut], skip_special_tokens=False)


def test_no_byte_table_for_other_decoders():
    from tokenizers import Tokenizer, decoders, models

    from trustee.rollout.turns import _ByteDecoder

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "▁a": 1}, unk_token="[UNK]"))
    t.decoder = decoders.Metaspace()
    assert _ByteDecoder.build(t) is None


def test_renderer_decodes_through_the_table_after_checking_it(fmt, tiny_tokenizer):
    r = TurnRenderer(fmt)
    assert r._bytes is not None
    ids = tiny_tokenizer.encode("The answer is 42 ✓<|im_end|>", add_special_tokens=False)
    for _ in range(r.verify_encodes + 2):
        assert r.decode(ids) == tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert r._decode_checked == r.verify_encodes  # compared with the tokenizer, then trusted


# chatml (SmolLM2) is left out: its ByteLevel pre-tokenizer splits with its own regex, so
# the words shortcut does not apply and the library encodes (test_no_words_shortcut_...).
@pytest.mark.parametrize("family", ["qwen", "llama3", "mistral"])
def test_words_encode_like_the_library_on_plain_ascii(family, tiny_tokenizer):
    # _Words pre-tokenizes in Python and looks words up; on any plain-ASCII piece (pieces
    # never hold added tokens: _Segments cuts there first) the ids are the library's own.
    import random

    from chat_tokenizers import chat_tokenizer

    from trustee.rollout.turns import _Words

    tok = tiny_tokenizer if family == "qwen" else chat_tokenizer(family)
    backend = tok.backend_tokenizer
    words = _Words.build(backend, cache=64)
    assert words is not None  # Split + ByteLevel pre-tokenizer, BPE model
    assert isinstance(words._split, re.Pattern)  # \p{L} / \p{N} as ASCII ranges, for `re`
    specials = list(tok.get_added_vocab())
    alphabet = [chr(c) for c in range(32, 127)] + [
        "\n",
        "\t",
        "\r",
        "\r\n",
        "  ",
        "'s",
        "'LL",
        "123",
        '{"a": ',
    ]
    rng = random.Random(0)
    seen = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if any(s in text for s in specials):
            continue
        seen += 1
        assert words.encode(text) == backend.encode(text, add_special_tokens=False).ids, text
    assert seen > 2000
    assert len(words._memo) <= 64  # bounded
    assert words.encode("ünï") is None and words.encode("a\x00b") is None  # the library encodes those


def test_ascii_pattern_keeps_the_unicode_pattern_s_matches_on_ascii():
    import random

    import regex

    from trustee.rollout.turns import _ascii_pattern

    qwen = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    # a "]" first in a class is a literal; \p{N}{1,3} as Llama 3 writes it
    other = r"[]\p{L}]+|[^]\p{N}]|\p{N}{1,3}"
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\r", "'s", "'LL"]
    for source in (qwen, other):
        fast, ref = re.compile(_ascii_pattern(source)), regex.compile(source)
        for _ in range(2000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            assert fast.findall(text) == ref.findall(text), (source, text)
    assert _ascii_pattern(r"\p{Lu}+|\p{N}") is None  # another property: the `regex` module splits
    assert _ascii_pattern(r"\P{L}") is None


def test_no_words_shortcut_for_other_pre_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from trustee.rollout.turns import _Words

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    assert _Words.build(t) is None
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert _Words.build(t) is None


def test_no_words_shortcut_with_added_tokens_matched_after_normalisation(tiny_tokenizer):
    from tokenizers import AddedToken, Tokenizer

    from trustee.rollout.turns import _Words

    t = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    assert _Words.build(t) is not None
    t.add_tokens([AddedToken("plain word", normalized=True)])
    assert _Words.build(t) is None
