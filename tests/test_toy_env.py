"""The toy environment: real tools, exact rewards, knob-driven tasks, SFT conversations."""

from __future__ import annotations

import json
import random

import anyio
import pytest

from trustee.chat.parse import ToolCallParser, canonical_json
from trustee.envs.base import AgentAction, Environment, Knobs
from trustee.envs.toy import FINISH_CREDIT, MAX_SLIPS, TOOLS, ToyEnv, answer_correct, check_tools, execute
from trustee.types import Message, ToolCall, ToolCallError


def test_tools_compute_real_results():
    check_tools()
    assert execute(ToolCall(name="add", arguments={"a": 2, "b": 3.5}), {}) == {"result": 5.5}
    assert execute(ToolCall(name="multiply", arguments={"a": 6, "b": 7}), {}) == {"result": 42}
    r = execute(
        ToolCall(name="convert_units", arguments={"value": 10, "from_unit": "km", "to_unit": "mi"}), {}
    )
    assert r["result"] == pytest.approx(6.2137, abs=1e-4)
    assert "error" in execute(
        ToolCall(name="convert_units", arguments={"value": 1, "from_unit": "kg", "to_unit": "m"}), {}
    )
    store = {"a": "1"}
    assert execute(ToolCall(name="kv_get", arguments={"key": "a"}), store) == {"key": "a", "value": "1"}
    assert "not found" in execute(ToolCall(name="kv_get", arguments={"key": "b"}), store)["error"]
    execute(ToolCall(name="kv_set", arguments={"key": "b", "value": "x"}), store)
    assert store == {"a": "1", "b": "x"}


def test_answer_matching_is_exact():
    assert answer_correct("The answer is 154.", 154)
    assert not answer_correct("The answer is 155.", 154)
    assert answer_correct("about 6.21 miles", 6.2137)
    assert answer_correct("It is Paris.", "paris") and not answer_correct("It is Parisian.", "paris")


def test_answer_matching_refuses_near_zero_and_guess_lists():
    # 4 g is 0.0088 lb: an absolute tolerance would let "0" answer every small conversion
    assert not answer_correct("The answer is 0.0.0.", 0.0088)
    assert answer_correct("The answer is 0.0088.", 0.0088)
    assert not answer_correct("The answer is 1 2 3 4 5.", 3)
    assert not answer_correct("red or blue or cat", "red")
    assert answer_correct("The answer is red.", "red")


def test_knobs_shape_tasks():
    env = ToyEnv()
    assert isinstance(env, Environment)
    rng = random.Random(0)
    easy = [env.task(Knobs(n_tools=1, n_expected_calls=1), rng) for _ in range(50)]
    assert all(len(t.expected_calls) == 1 for t in easy)
    assert all({c.name for c in t.expected_calls} <= {x.name for x in t.tools} for t in easy)
    hard = [env.task(Knobs(n_tools=5, n_expected_calls=2), rng) for _ in range(80)]
    assert any(t.payload["kind"] == "chain" and len(t.expected_calls) == 2 for t in hard)
    assert all(len(t.tools) == 5 for t in hard)
    for t in easy + hard:
        parser = ToolCallParser(t.tools)
        assert all(parser.validate(c) is None for c in t.expected_calls)


@pytest.mark.parametrize("kind", ["add", "chain", "convert", "kv_get", "kv_set"])
def test_reference_conversation_scores_one(kind):
    env = ToyEnv(kinds=(kind,))
    task = env.task(Knobs(n_tools=5, n_expected_calls=2), random.Random(3))
    ref = env.sft_messages(task)

    async def replay():
        state = await env.start(task, "e")
        outs = []
        for m in ref[2:]:
            if m.role == "assistant":
                outs += await env.step(state, AgentAction(message=m, calls=list(m.tool_calls)))
        assert [x.content for x in outs] == [x.content for x in ref if x.role == "tool"]
        return await env.score(state)

    score = anyio.run(replay)
    assert score.reward == 1.0 and score.parts["expected_calls"] == 1.0


def test_wrong_answer_scores_zero():
    env = ToyEnv(kinds=("add",))
    task = env.task(Knobs(), random.Random(1))

    async def play():
        state = await env.start(task, "e")
        await env.step(state, AgentAction(message=Message(role="assistant", content="It is 0.")))
        return await env.score(state)

    s = anyio.run(play)
    assert s.reward == 0.0 and s.parts["expected_calls"] == 0.0


def test_tool_set_is_the_documented_one():
    assert sorted(TOOLS) == ["add", "convert_units", "kv_get", "kv_set", "multiply"]


@pytest.mark.parametrize("kind", ["add", "chain", "convert", "kv_get", "kv_set"])
def test_guessing_demonstrator_skips_the_tools_and_earns_only_the_finish_credit(kind):
    """The warm-up's imperfect half: same closing words, no call, a wrong answer."""
    env = ToyEnv(kinds=(kind,), reward="graded")
    task = env.task(Knobs(n_tools=3, n_expected_calls=2), random.Random(5))
    msgs = env.sft_messages(task, guess=random.Random(0))
    assert [m.role for m in msgs] == ["system", "user", "assistant"] and not msgs[-1].tool_calls
    ref_words = env.sft_messages(task)[-1].content.split()[:2]
    assert msgs[-1].content.split()[:2] == ref_words

    async def play():
        state = await env.start(task, "e")
        await env.step(state, AgentAction(message=msgs[-1]))
        return await env.score(state)

    score = anyio.run(play)
    assert score.reward == FINISH_CREDIT and score.parts["exact"] == 0.0


KINDS = ["add", "chain", "convert", "kv_get", "kv_set"]


def _outcomes(env: ToyEnv, task) -> dict[str, list[AgentAction | None]]:
    """Episodes of each outcome class as the policy's turns (None: the turn limit cut it)."""
    ref = [m for m in env.sft_messages(task)[2:] if m.role == "assistant"]
    first = ref[0].tool_calls[0]
    # Valid but wrong arguments: every number off, the key of a store task unknown.
    args = {
        k: 7777 if not isinstance(v, str) else "zz" if k == "key" else v for k, v in first.arguments.items()
    }
    wrong = ToolCall(name=first.name, arguments=args)
    wrong_final = env.sft_messages(task, guess=random.Random(1))[-1]
    broken = ToolCallError(
        kind="invalid_json", message="bad json", raw='{"name": "add", "arguments": {"a": "b": '
    )

    def call(c: ToolCall) -> AgentAction:
        return AgentAction(message=Message(role="assistant", tool_calls=[c]), calls=[c])

    bad = AgentAction(message=Message(role="assistant", content="<tool_call>{"), errors=[broken])
    clean = [AgentAction(message=m, calls=list(m.tool_calls)) for m in ref]
    return {
        "correct": clean,
        "right tool, finished": [call(wrong), AgentAction(message=wrong_final)],
        "guess": [AgentAction(message=wrong_final)],
        "malformed": [call(wrong), bad, AgentAction(message=wrong_final)],
        "malformed, cut": [call(wrong), bad, bad, None],
        "truncated": [call(wrong), call(wrong), call(wrong), None],
    }


@pytest.mark.parametrize("kind", KINDS)
def test_graded_reward_orders_the_outcomes(kind):
    """correct > right tool, finished > guess > malformed or truncated, for every task kind;
    the episode shape that gamed the old reward (right tool, then broken calls until the turn
    limit) earns nothing, and a correct episode with a broken call earns less than a clean one."""
    env = ToyEnv(kinds=(kind,), reward="graded")
    task = env.task(Knobs(n_tools=5, n_expected_calls=2), random.Random(7))

    async def play(turns: list[AgentAction | None]):
        state = await env.start(task, "e")
        for a in turns:
            if a is None:
                break  # the runner ends the episode as truncated and still scores it
            await env.step(state, a)
        return await env.score(state)

    s = {name: anyio.run(play, turns) for name, turns in _outcomes(env, task).items()}
    r = {name: x.reward for name, x in s.items()}
    assert r["correct"] == 1.0 and s["correct"].parts["well_formed"] == 1.0
    assert r["correct"] > r["right tool, finished"] > r["guess"] > 0.0
    assert r["guess"] > r["malformed"] == r["malformed, cut"] == r["truncated"] == 0.0
    assert s["malformed"].parts["well_formed"] < 1.0 and s["malformed"].parts["tool_names"] > 0.0
    assert s["truncated"].parts["finished"] == 0.0 and s["truncated"].parts["tool_names"] > 0.0
    ref = _outcomes(env, task)["correct"]
    broken = _outcomes(env, task)["malformed"][1]
    assert 0.0 < anyio.run(play, [broken, *ref]).reward < 1.0


def test_few_shot_examples_are_distinct_kinds_of_training_tasks_and_stable():
    from trustee.envs.toy import is_heldout

    env = ToyEnv(few_shot=3)
    knobs = Knobs(difficulty=40, n_tools=5, n_expected_calls=2)
    tasks = anyio.run(env.heldout_tasks, 12, knobs) + [env.task(knobs, random.Random(i)) for i in range(12)]
    for task in tasks:
        shots = env.examples(task)
        queries = [m.content for m in shots if m.role == "user"]
        called = {c.name for m in shots for c in m.tool_calls}
        assert len(queries) == 3 and not any(is_heldout(q) for q in queries)
        assert task.first_query not in queries
        assert len(called) == 3 and called <= {"add", "convert_units", "kv_get", "kv_set"}
        assert [m.role for m in shots] == ["user", "assistant"] * 3  # each example: a query and its call
        assert env.examples(task) == shots  # the same task always gets the same examples
        state = anyio.run(env.start, task, "e")
        assert state.messages[0].role == "system" and state.messages[1:-1] == shots
        assert state.messages[-1] == Message(role="user", content=task.first_query)
    assert ToyEnv().examples(tasks[0]) == [] and len(anyio.run(ToyEnv().start, tasks[0], "e").messages) == 2


def test_few_shot_examples_score_like_reference_conversations_and_bad_counts_are_refused():
    with pytest.raises(ValueError, match="environment.few_shot"):
        ToyEnv(few_shot=4)
    env = ToyEnv(few_shot=2)
    task = env.task(Knobs(difficulty=40, n_tools=4), random.Random(3))
    # the examples do not change what the episode is scored on: the reference still scores 1
    state = anyio.run(env.start, task, "e")
    ref = env.sft_messages(task)[2:]
    for m in ref:
        if m.role == "assistant":
            anyio.run(env.step, state, AgentAction(message=m, calls=list(m.tool_calls)))
    assert anyio.run(env.score, state).reward == 1.0


@pytest.mark.parametrize("kind", ["convert", "kv_get"])
def test_slipped_demonstration_is_refused_then_recovers_and_scores_one(kind):
    """A slipping demonstrator's first calls are well formed, refused by the real tool with an
    error, and distinct; then the reference call and answer follow, and the whole conversation
    still replays to reward 1 (refused calls are not malformed)."""
    env = ToyEnv(kinds=(kind,))
    for seed in range(20):
        task = env.task(Knobs(n_tools=2), random.Random(seed))
        msgs = env.sft_messages(task, slip=random.Random(seed))
        calls = [c for m in msgs if m.role == "assistant" for c in m.tool_calls]
        results = [json.loads(m.content) for m in msgs if m.role == "tool"]
        slips = len(calls) - 1
        assert 1 <= slips <= MAX_SLIPS
        assert all("error" in r for r in results[:slips]) and "error" not in results[-1]
        assert calls[-1] == task.expected_calls[0] and len(
            {canonical_json(c.arguments) for c in calls}
        ) == len(calls)
        parser = ToolCallParser(task.tools)
        assert all(parser.validate(c) is None for c in calls)

        async def replay(task=task, msgs=msgs):
            state = await env.start(task, "e")
            for m in msgs[2:]:
                if m.role == "assistant":
                    await env.step(state, AgentAction(message=m, calls=list(m.tool_calls)))
            return await env.score(state)

        assert anyio.run(replay).reward == 1.0


def test_slips_only_where_a_tool_can_refuse():
    for kind in ("add", "kv_set", "chain"):
        task = ToyEnv(kinds=(kind,)).task(Knobs(n_expected_calls=2), random.Random(0))
        assert ToyEnv().sft_messages(task, slip=random.Random(0)) == ToyEnv().sft_messages(task)
