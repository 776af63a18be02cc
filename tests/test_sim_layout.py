"""The simulated environment's KV-cache layout, state-aware memo, output budgets, scripted
judge and per-step metrics.

Engines here are test doubles, named as such: `StatefulToolEngine` answers tool requests by
reading the world's state out of the prompt (as a model would); `FakeJsonEngine` returns
random schema-valid JSON. The real path (tiny random model, constrained decoding) is in
test_sim_hf.py and the training-loop test."""

from __future__ import annotations

import json
import random
import re

import anyio
import msgspec
import pytest

from trustee.chat.parse import canonical_json
from trustee.config import CurriculumConfig, RolloutConfig
from trustee.curriculum import Curriculum
from trustee.engines.base import Completion
from trustee.envs.simulated import SimulatedEnv
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.sim import tools as tools_mod
from trustee.sim.budget import text_pattern, worst_case_bytes, worst_case_tokens
from trustee.sim.client import SimClient, bounded_schema, schema_of
from trustee.sim.fakes import FakeJsonEngine
from trustee.sim.judge import ScriptedJudge
from trustee.sim.log import SimLog
from trustee.sim.taskgen import STATE_CHANGING
from trustee.sim.tools import ConsistencyMemo, ToolReply, ToolSimulator, call_key
from trustee.sim.user import UserReply
from trustee.types import Knobs, Message, Task, ToolCall, ToolSpec

SET = ToolSpec(
    name="set_value",
    description="Store a value.",
    parameters={
        "type": "object",
        "properties": {"value": {"type": "integer"}},
        "required": ["value"],
        "additionalProperties": False,
    },
)
GET = ToolSpec(
    name="get_value",
    description="Read the stored value.",
    parameters={"type": "object", "properties": {}, "additionalProperties": False},
)


def _stateful_task(**kw) -> Task:
    base = dict(
        id="kv",
        env="simulated",
        tools=[SET, GET],
        first_query="Store 5, then tell me the value.",
        payload={STATE_CHANGING: ["set_value"]},
    )
    base.update(kw)
    return Task(**base)


class StatefulToolEngine:
    """Engine double that plays a key-value store from the prompt alone: `get_value` returns
    the last value a `set_value` call in the prompt stored ("unset" if none)."""

    version = 0

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls = 0

    async def generate(self, prompt, params, *, key=None):
        self.calls += 1
        text = self.tok.decode(prompt)
        request = text.rsplit("AGENT CALLS: ", 1)[1]
        if request.startswith('{"arguments":{},"name":"get_value"}'):
            stored = re.findall(r'AGENT CALLS: \{"arguments":\{"value":(-?\d+)\},"name":"set_value"\}', text)
            value: str | int = int(stored[-1]) if stored else "unset"
            reply = {"fields": [{"key": "value", "value": value}]}
        else:
            reply = {"fields": [{"key": "ok", "value": True}]}
        ids = self.tok.encode(json.dumps(reply), add_special_tokens=False) + [
            self.tok.convert_tokens_to_ids("<|im_end|>")
        ]
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


def _play_get_after_set(tokenizer) -> tuple[str, str, StatefulToolEngine]:
    """Episode A reads first; episode B (same group, same memo) stores 5 and then reads.
    Returns (A's read, B's read, the engine)."""
    eng = StatefulToolEngine(tokenizer)
    client = SimClient(eng, tokenizer)
    task, memo = _stateful_task(), ConsistencyMemo()
    get, put = ToolCall(name="get_value"), ToolCall(name="set_value", arguments={"value": 5})

    async def main():
        a, log_a = ToolSimulator(client, task, memo, key=task.id), SimLog(task)
        b, log_b = ToolSimulator(client, task, memo, key=task.id), SimLog(task)
        (ra,) = await a.run_turn(log_a, [get])
        await b.run_turn(log_b, [put])
        (rb,) = await b.run_turn(log_b, [get])
        return ra.content, rb.content

    ra, rb = anyio.run(main)
    return ra, rb, eng


def test_a_read_after_a_write_is_answered_from_the_episodes_own_state(tiny_tokenizer):
    ra, rb, eng = _play_get_after_set(tiny_tokenizer)
    assert ra == canonical_json({"value": "unset"})
    assert rb == canonical_json({"value": 5})  # B's own write, not A's memoised read
    assert eng.calls == 3


def test_the_call_only_key_gives_the_wrong_answer(tiny_tokenizer, monkeypatch):
    """The same scenario under the old keying (the call alone): B's read is served A's
    memoised answer. This is what the test above guards against."""
    monkeypatch.setattr(tools_mod, "memo_key", lambda call, state: call_key(call))
    ra, rb, eng = _play_get_after_set(tiny_tokenizer)
    assert ra == rb == canonical_json({"value": "unset"}) and eng.calls == 2


def test_same_call_in_same_state_is_shared_and_reads_do_not_change_state(tiny_tokenizer):
    eng = StatefulToolEngine(tiny_tokenizer)
    client = SimClient(eng, tiny_tokenizer)
    task, memo = _stateful_task(), ConsistencyMemo()
    get, put = ToolCall(name="get_value"), ToolCall(name="set_value", arguments={"value": 7})

    async def episode():
        sim, log = ToolSimulator(client, task, memo, key=task.id), SimLog(task)
        await sim.run_turn(log, [get])  # a read: the state stays empty
        await sim.run_turn(log, [put])
        (r,) = await sim.run_turn(log, [get])
        return r.content, sim.state

    for _ in range(3):  # three episodes of the group, the same path
        content, state = anyio.run(episode)
        assert content == canonical_json({"value": 7}) and state == [call_key(put)]
    assert eng.calls == 3 and memo.hits == 6
    # undeclared read/write nature: every tool counts as state-changing (the safe side)
    sim = ToolSimulator(client, _stateful_task(payload={}), ConsistencyMemo(), key="kv")
    assert sim.writers == {"set_value", "get_value"}


# ------------------------------------------------------------------ budgets


def _longest_user_reply() -> str:
    return json.dumps({"message": "a" * 300, "status": "continue"})


def test_worst_case_is_the_grammars_longest_output():
    """The bound is reached exactly by the longest output the grammar accepts, and one more
    character is rejected (so the bound is neither loose nor short)."""
    xgr = pytest.importorskip("xgrammar")
    from trustee.engines.grammar import json_grammar

    schema = bounded_schema(schema_of(UserReply))
    grammar = json_grammar(json.dumps(schema))
    longest = _longest_user_reply()
    assert xgr.testing._is_grammar_accept_string(grammar, longest)
    assert len(longest.encode()) == worst_case_bytes(schema)
    assert not xgr.testing._is_grammar_accept_string(grammar, longest.replace('"a', '"aa'))
    # the text pattern keeps strings to one byte per character: no escapes, no non-ASCII
    for bad in ("caf\u00e9", 'say \\"hi\\"', "a\\u0041"):
        text = '{"message": "' + bad + '", "status": "continue"}'
        assert not xgr.testing._is_grammar_accept_string(grammar, text), bad

    tool = bounded_schema(schema_of(ToolReply))
    field = {"key": "k" * 32, "value": "v" * 60}
    longest_tool = json.dumps({"fields": [field] * 4})
    assert xgr.testing._is_grammar_accept_string(json_grammar(json.dumps(tool)), longest_tool)
    assert len(longest_tool.encode()) == worst_case_bytes(tool)


def test_tokens_never_exceed_bytes(tiny_tokenizer):
    rng = random.Random(0)
    chars = [chr(c) for c in range(32, 127) if chr(c) not in '"\\']
    for _ in range(50):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 300)))
        assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) <= len(text.encode())


def test_unbounded_shapes_have_no_bound():
    inf = float("inf")
    assert worst_case_tokens({"type": "number", "minimum": 0, "maximum": 1}) == inf
    assert worst_case_tokens({"type": "array", "items": {"type": "boolean"}}) == inf
    assert worst_case_tokens({"type": "object", "properties": {}}) == inf
    assert worst_case_tokens({"type": "string", "pattern": "^[a-z]+$"}) == inf
    assert worst_case_bytes({"type": "string", "pattern": text_pattern(10)}) == 12
    assert worst_case_bytes({"type": "string", "maxLength": 10}) == 62  # \uXXXX escapes


# ------------------------------------------------------------------ scripted judge


def test_scripted_judge_tiers():
    task = _stateful_task(
        expected_calls=[ToolCall(name="set_value", arguments={"value": 5})], knobs={"judge_strictness": 4.0}
    )
    judge = ScriptedJudge()
    good = ToolCall(name="set_value", arguments={"value": 5})
    other = ToolCall(name="set_value", arguments={"value": 6})
    assert judge.score_calls(task, [(good, True)]).reward == 1.0
    assert judge.score_calls(task, [(other, True)]).reward == 0.0  # partly: the right tool
    assert judge.score_calls(task, [(ToolCall(name="get_value"), True)]).reward == -1.0
    assert judge.score_calls(task, []).reward == -1.0
    assert judge.score_calls(task, [(good, True), (good, True)]).reward == 0.0  # redundant at tier 4
    # through the log, the same verdict as from the calls
    log = SimLog.replay(
        task,
        [
            Message(role="user", content=task.first_query),
            Message(role="assistant", content="", tool_calls=[good]),
            Message(role="tool", content='{"ok":true}', name="set_value"),
            Message(role="assistant", content="Stored."),
        ],
    )
    score, retries = anyio.run(lambda: judge.score(task, log, "ended", key="kv"))
    assert score.reward == 1.0 and retries == 0


# ------------------------------------------------------------------ the layout, end to end


class ScriptedPolicy:
    """Policy double: the task's expected calls, then a question, then an answer."""

    version = 0

    def __init__(self, tokenizer, task):
        self.tok, self.task = tokenizer, task
        self.turns: dict[str, int] = {}

    async def generate(self, prompt, params, *, key=None):
        i = self.turns[key] = self.turns.get(key, -1) + 1
        calls = "\n".join(
            "<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments}) + "\n</tool_call>"
            for c in self.task.expected_calls
        )
        text = [calls, "Which one do you mean?", "Done, here it is."][min(i, 2)]
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.convert_tokens_to_ids("<|im_end|>")]
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


def _episode_prompts(tiny_tokenizer, group: int):
    seen: list[tuple[str, list[int], list[int]]] = []
    eng = FakeJsonEngine(tiny_tokenizer, seed=4)
    client = SimClient(
        eng, tiny_tokenizer, recorder=lambda r, k, ids, out: seen.append((r, ids, out.token_ids))
    )
    env = SimulatedEnv(client, max_user_turns=2)
    task = anyio.run(env.make_task, Knobs(n_tools=2, n_expected_calls=1), random.Random(1))
    seen.clear()
    runner = EpisodeRunner(
        ScriptedPolicy(tiny_tokenizer, task), tiny_tokenizer, cfg=RolloutConfig(max_turns=4)
    )
    trajs = anyio.run(lambda: run_group(env, task, group, runner))
    return env, seen, trajs


def test_every_prompt_of_an_episode_extends_the_last_prompt_and_answer(tiny_tokenizer):
    """One episode: tool call, user turn(s), judge. Each request's prompt starts with the
    previous request's prompt and the simulator's answer to it (the KV-cache layout)."""
    env, seen, trajs = _episode_prompts(tiny_tokenizer, group=1)
    assert trajs[0].status == "ok" and [r for r, _, _ in seen][0] == "tool" and seen[-1][0] == "judge"
    assert {r for r, _, _ in seen} == {"tool", "user", "judge"}
    for (_, p0, out0), (_, p1, _) in zip(seen, seen[1:], strict=False):
        assert p1[: len(p0) + len(out0)] == p0 + out0


def test_group_prompts_share_the_prefix_and_metrics_are_logged(tiny_tokenizer):
    env, seen, trajs = _episode_prompts(tiny_tokenizer, group=4)
    assert all(t.status == "ok" for t in trajs)
    m = env.step_metrics()
    assert m["sim/requests"] == len(seen) + 3  # + the task generator's 2 tools and scenario
    assert m["sim/cut"] == 0.0 and m["sim/refused"] == 0.0 and m["sim/retries"] == 0.0
    assert m["sim/prompt_tokens"] == sum(len(p) for _, p, _ in seen) + m["sim/prompt_tokens/task"]
    assert m["sim/requests/judge"] == 4.0 and m["sim/retries/user"] == 0.0
    assert 0.0 < m["sim/latency_p50_s"] <= m["sim/latency_p95_s"]
    assert m["sim/prefix_share_est"] > 0.8  # block model of a prefix cache over the whole step
    assert "sim/prefix_hit_rate" not in m  # the fake engine has no prefix cache to measure
    again = env.step_metrics()
    assert again["sim/requests"] == 0.0 and again["sim/latency_p50_s"] == 0.0  # per step, not cumulative


def test_replay_renders_the_events_the_live_log_writes(tiny_tokenizer):
    task = _stateful_task(expected_calls=[ToolCall(name="get_value")])
    get = ToolCall(name="get_value")
    conversation = [
        Message(role="user", content=task.first_query),
        Message(role="assistant", content="Let me look.", tool_calls=[get]),
        Message(role="tool", content='{"value":"unset"}', name="get_value"),
        Message(role="assistant", content="Which value?"),
        Message(role="user", content="Five."),
        Message(role="assistant", content="Done."),
    ]
    log = SimLog.replay(task, conversation)
    texts = [m.content for m in log.messages[2:]]
    assert texts == [
        SimLog.tool_request(get, False, "Let me look."),
        '{"value":"unset"}',
        SimLog.user_request("Which value?"),
        canonical_json({"message": "Five.", "status": "continue"}),
        SimLog.agent_says("Done."),
    ]
    assert log.agent_calls == [(get, True)]


# ------------------------------------------------------------------ curriculum figures


def test_curriculum_aspect_metrics():
    cur = Curriculum(CurriculumConfig(start_difficulty=50.0, eps=1.0))
    rng = random.Random(0)
    knobs = [cur.sample(rng) for _ in range(20)]
    m = cur.aspect_metrics(knobs)
    assert m["curriculum/difficulty"] == 50.0 and 0.9 <= m["curriculum/soft_share"] <= 1.0
    assert cur.aspect_metrics([cur.knobs()] * 4)["curriculum/soft_share"] == 0.0
    cur.update([1.0, -1.0], [cur.knobs(), cur.knobs()])
    m = cur.aspect_metrics([])
    key = f"curriculum/success/n_tools={cur.knobs().n_tools}"
    assert m[key] == 0.5 and m["curriculum/soft_share"] == 0.0


def test_msgspec_roundtrip_of_knobs_and_score_from_types():
    from trustee.envs import base
    from trustee.types import Knobs as K
    from trustee.types import Score

    assert base.Knobs is K and base.Score is Score
    assert msgspec.json.decode(msgspec.json.encode(Score(reward=1.0)), type=Score).reward == 1.0


def test_sim_does_not_import_envs():
    """Shared records live in types.py; the simulator roles sit below the environments."""
    from pathlib import Path

    import trustee.sim

    for path in Path(trustee.sim.__file__).parent.glob("*.py"):
        assert "trustee.envs" not in path.read_text(), path.name


def test_every_role_schema_compiles_for_a_real_tokenizer(tiny_tokenizer):
    """xgrammar builds a grammar for a long text pattern but its compiler (with a tokenizer)
    rejects repetitions over ~128; `text_pattern` chunks them. Compile what the roles send."""
    xgr = pytest.importorskip("xgrammar")
    from trustee.engines.grammar import json_grammar
    from trustee.sim.judge import RubricVerdict, TrusteeVerdict
    from trustee.sim.taskgen import ToolDraft, scenario_schema

    info = xgr.TokenizerInfo.from_huggingface(tiny_tokenizer, vocab_size=len(tiny_tokenizer))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    schemas = [schema_of(t) for t in (UserReply, ToolReply, TrusteeVerdict, RubricVerdict, ToolDraft)]
    schemas.append(scenario_schema([SET, GET], 3))
    for s in schemas:
        compiler.compile_grammar(json_grammar(json.dumps(bounded_schema(s))))
    assert (
        text_pattern(300).count("{") == 3
        and worst_case_bytes({"type": "string", "pattern": text_pattern(300)}) == 302
    )
