"""The episode runner: exact token ids, masks, log-probs and versions with a scripted
policy on the toy environment; limits; error isolation; groups sharing state."""

from __future__ import annotations

import json
import random

import anyio
import pytest

from trustee.chat.render import ChatFormat
from trustee.config import RolloutConfig
from trustee.engines.base import Completion
from trustee.envs.base import EpisodeState, Knobs, Score
from trustee.envs.simulated import SimulatedEnv
from trustee.envs.toy import ToyEnv
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.sim.client import SimClient
from trustee.sim.fakes import FakeJsonEngine
from trustee.types import Message, Task, ToolCall


class ScriptedPolicy:
    """Policy double: per episode key, returns the scripted texts in order (the last one
    repeats) as token ids, with log-prob -0.25 - 0.01 * position."""

    version = 7

    def __init__(self, tokenizer, texts):
        self.tok, self.texts = tokenizer, list(texts)
        self.turn: dict[str, int] = {}
        self.prompts: list[list[int]] = []
        self.params = []

    def ids_for(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) + [
            self.tok.convert_tokens_to_ids("<|im_end|>")
        ]

    async def generate(self, prompt, params, *, key=None):
        self.prompts.append(list(prompt))
        self.params.append(params)
        i = self.turn.get(key, 0)
        self.turn[key] = i + 1
        ids = self.ids_for(self.texts[min(i, len(self.texts) - 1)])[: params.max_tokens]
        finish = "stop" if ids[-1] == self.tok.convert_tokens_to_ids("<|im_end|>") else "length"
        return Completion(
            token_ids=ids,
            logprobs=[-0.25 - 0.01 * j for j in range(len(ids))],
            finish_reason=finish,
            policy_version=7,
        )


def call_text(*calls: ToolCall) -> str:
    return "\n".join(
        "<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments}) + "\n</tool_call>"
        for c in calls
    )


def toy_task(kind="add", seed=0, n_tools=2) -> Task:
    return ToyEnv(kinds=(kind,)).task(Knobs(n_tools=n_tools, n_expected_calls=2), random.Random(seed))


def go(fn, *args, **kw):
    return anyio.run(lambda: fn(*args, **kw))


def test_exact_tokens_masks_logprobs_versions(tiny_tokenizer):
    env = ToyEnv(kinds=("add",))
    task = toy_task()
    (call,) = task.expected_calls
    answer = f"The answer is {task.payload['answer']}."
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(call), answer])
    traj = go(EpisodeRunner(policy, tiny_tokenizer).run, env, task, "ep0")
    assert traj.status == "ok" and traj.reward == 1.0

    # Expected ids, computed independently: the whole conversation rendered in one go.
    result = json.dumps({"result": task.payload["answer"]}, separators=(",", ":"))
    messages = [
        Message(role="system", content=task.system_prompt),
        Message(role="user", content=task.first_query),
        Message(role="assistant", tool_calls=[call]),
        Message(role="tool", content=result, name="add"),
        Message(role="assistant", content=answer),
    ]
    fmt = ChatFormat(tiny_tokenizer, task.tools)
    prompt = fmt.prompt_ids(messages[:2])
    whole = fmt.encode(fmt.render_text(messages, generation_prompt=False))
    s1, s2 = policy.ids_for(call_text(call)), policy.ids_for(answer)
    n = len(traj.tokens)
    assert whole[:n] == traj.tokens and fmt.encode("\n") == whole[n:]  # only the template's trailing newline
    assert traj.prompt_len == len(prompt) and traj.tokens[: len(prompt)] == prompt
    a, b = len(prompt), len(prompt) + len(s1)
    assert traj.tokens[a:b] == s1 and traj.tokens[n - len(s2) :] == s2
    expected_mask = [0] * a + [1] * len(s1) + [0] * (n - b - len(s2)) + [1] * len(s2)
    assert traj.loss_mask == expected_mask
    lp = [-0.25 - 0.01 * j for j in range(len(s1))] + [-0.25 - 0.01 * j for j in range(len(s2))]
    assert [x for x, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m] == pytest.approx(lp)
    assert all(x == 0.0 for x, m in zip(traj.logprobs, traj.loss_mask, strict=True) if not m)
    assert [v for v, m in zip(traj.versions, traj.loss_mask, strict=True) if m] == [7] * (len(s1) + len(s2))
    assert all(v == -1 for v, m in zip(traj.versions, traj.loss_mask, strict=True) if not m)
    # the second prompt is exactly the first turn's ids (nothing re-rendered)
    assert policy.prompts[1] == traj.tokens[: len(policy.prompts[1])] and len(policy.prompts[1]) == n - len(
        s2
    )
    c = traj.counters
    assert (c.turns, c.tool_calls, c.format_errors, c.schema_errors) == (2, 1, 0, 0)
    assert traj.messages[-1].content == answer and traj.knobs["n_tools"] == 2.0
    assert {p.stop_token_ids for p in policy.params} == {(fmt.eos_id,)}


def test_format_and_schema_errors_are_observations(tiny_tokenizer):
    env = ToyEnv(kinds=("add",))
    task = toy_task()
    bad = "<tool_call>\n{not json}\n</tool_call>\n" + call_text(
        ToolCall(name="add", arguments={"a": "x", "b": 1})
    )
    policy = ScriptedPolicy(tiny_tokenizer, [bad, call_text(ToolCall(name="nope")), "I give up."])
    traj = go(EpisodeRunner(policy, tiny_tokenizer).run, env, task, "ep0")
    c = traj.counters
    assert traj.status == "ok" and traj.reward == 0.0
    assert (c.format_errors, c.schema_errors, c.unknown_tools, c.tool_calls, c.turns) == (1, 1, 1, 0, 3)
    tool_msgs = [m for m in traj.messages if m.role == "tool"]
    assert len(tool_msgs) == 3 and all("error" in json.loads(m.content) for m in tool_msgs)
    assert "tool 'nope' not found" in tool_msgs[2].content


def test_calls_over_the_turn_limit_are_not_executed(tiny_tokenizer):
    env = ToyEnv(kinds=("kv_set",))
    task = toy_task("kv_set")
    k, v = task.payload["set"]
    calls = [
        ToolCall(name="kv_set", arguments={"key": "other", "value": "1"}),
        ToolCall(name="kv_set", arguments={"key": k, "value": v}),
    ]
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(*calls), "Saved."])
    cfg = RolloutConfig(max_tool_calls_per_turn=1)
    traj = go(EpisodeRunner(policy, tiny_tokenizer, cfg=cfg).run, env, task, "ep0")
    assert traj.counters.tool_calls == 1 and traj.reward == 0.0  # the second call never ran
    tool_msgs = [m for m in traj.messages if m.role == "tool"]
    assert "not executed: at most 1 tool calls per turn" in tool_msgs[1].content


def test_turn_limit_truncates_and_still_scores(tiny_tokenizer):
    task = toy_task()
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(task.expected_calls[0])])  # never answers
    traj = go(EpisodeRunner(policy, tiny_tokenizer, cfg=RolloutConfig(max_turns=3)).run, ToyEnv(), task, "e")
    assert traj.status == "truncated" and traj.counters.turns == 3 and traj.trainable
    assert traj.parts["finished"] == 0.0 and traj.reward == 0.0


def test_max_model_len_is_never_exceeded(tiny_tokenizer):
    task = toy_task()
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(task.expected_calls[0])])
    prompt_len = len(
        ChatFormat(tiny_tokenizer, task.tools).prompt_ids(
            [
                Message(role="system", content=task.system_prompt),
                Message(role="user", content=task.first_query),
            ]
        )
    )
    for limit in (prompt_len + 5, prompt_len + 60, prompt_len + 120):
        traj = go(EpisodeRunner(policy, tiny_tokenizer, max_model_len=limit).run, ToyEnv(), task, "e")
        assert traj.status == "truncated" and len(traj.tokens) <= limit
        assert policy.params[-1].max_tokens <= limit - prompt_len


class LongResultEnv(ToyEnv):
    """Toy env double whose tool results are very long (exercises the result cap)."""

    async def step(self, state: EpisodeState, action):
        out = await super().step(state, action)
        return [Message(role="tool", content="x " * 500, name=m.name) for m in out]


def test_long_tool_results_are_cut_with_a_marker(tiny_tokenizer):
    task = toy_task()
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(task.expected_calls[0]), "done"])
    cfg = RolloutConfig(max_tool_result_tokens=20)
    traj = go(EpisodeRunner(policy, tiny_tokenizer, cfg=cfg).run, LongResultEnv(), task, "e")
    (tool,) = [m for m in traj.messages if m.role == "tool"]
    assert tool.content.endswith("tokens]") and "[truncated" in tool.content
    assert len(tiny_tokenizer.encode(tool.content.split("\n...")[0])) <= 20
    assert traj.counters.truncated_results == 1


class FlakyEnv(ToyEnv):
    """Toy env double that raises inside step for one episode id."""

    async def step(self, state, action):
        if state.episode_id.endswith("/2"):
            raise KeyError("boom")
        return await super().step(state, action)


def test_one_failing_episode_never_reaches_the_others(tiny_tokenizer, caplog):
    task = toy_task()
    policy = ScriptedPolicy(
        tiny_tokenizer, [call_text(task.expected_calls[0]), f"It is {task.payload['answer']}."]
    )
    trajs = go(run_group, FlakyEnv(), task, 4, EpisodeRunner(policy, tiny_tokenizer))
    assert [t.status for t in trajs] == ["ok", "ok", "error", "ok"]
    assert [t.reward for t in trajs] == [1.0, 1.0, 0.0, 1.0]
    assert "KeyError" in trajs[2].error and not trajs[2].trainable
    assert any(f"{task.id}/2" in r.getMessage() for r in caplog.records)


def test_sim_error_marks_the_episode_and_is_not_scored(tiny_tokenizer):
    sim = FakeJsonEngine(tiny_tokenizer, seed=0)
    env = SimulatedEnv(SimClient(sim, tiny_tokenizer, max_decode_retries=1))
    task = anyio.run(env.make_task, Knobs(n_tools=1), random.Random(0))
    sim.garbage_every = 1  # from now on every simulator answer is undecodable
    policy = ScriptedPolicy(tiny_tokenizer, ["Which city do you mean?"])
    traj = go(EpisodeRunner(policy, tiny_tokenizer).run, env, task, "e")
    assert traj.status == "sim_error" and traj.reward == 0.0 and not traj.trainable
    assert "'user' failed 2 time" in traj.error and traj.counters.sim_retries >= 0
    assert env.sim_errors == 1


def test_group_shares_the_tool_memo(tiny_tokenizer):
    sim = FakeJsonEngine(tiny_tokenizer, seed=1)
    env = SimulatedEnv(SimClient(sim, tiny_tokenizer), max_user_turns=1)
    task = anyio.run(env.make_task, Knobs(n_tools=1), random.Random(1))
    call = task.expected_calls[0]
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(call), "Here you go."])
    before = sim.stats().requests
    tool_asks = env.client.stats.by_role.get("tool", 0)
    trajs = go(run_group, env, task, 4, EpisodeRunner(policy, tiny_tokenizer))
    assert all(t.status == "ok" for t in trajs) and all(t.counters.tool_calls == 1 for t in trajs)
    results = {next(m.content for m in t.messages if m.role == "tool") for t in trajs}
    assert len(results) == 1  # identical call, identical result across the group
    assert env.client.stats.by_role.get("tool", 0) - tool_asks == 1  # one simulator call for the whole group
    assert sim.stats().requests > before
    texts = [tiny_tokenizer.decode(p) for p in sim.prompts]
    assert not any(task.id in t or f"{task.id}/" in t for t in texts)  # no ids in simulator prompts
    assert all(t.reward in (-1.0, 0.0, 1.0) for t in trajs)


def test_environment_stuck_is_an_error(tiny_tokenizer):
    class StuckEnv(ToyEnv):
        async def step(self, state, action):
            return []

    task = toy_task()
    traj = go(
        EpisodeRunner(ScriptedPolicy(tiny_tokenizer, ["hi"]), tiny_tokenizer).run, StuckEnv(), task, "e"
    )
    assert traj.status == "error" and "EnvironmentStuck" in traj.error


def test_group_size_must_be_positive(tiny_tokenizer):
    with pytest.raises(ValueError, match="group_size"):
        go(
            run_group,
            ToyEnv(),
            toy_task(),
            0,
            EpisodeRunner(ScriptedPolicy(tiny_tokenizer, ["x"]), tiny_tokenizer),
        )


def test_score_is_awaited_only_for_scoreable_endings(tiny_tokenizer):
    class CountingEnv(ToyEnv):
        scored = 0

        async def score(self, state):
            CountingEnv.scored += 1
            return Score(reward=1.0)

    task = toy_task()
    go(EpisodeRunner(ScriptedPolicy(tiny_tokenizer, ["x"]), tiny_tokenizer).run, CountingEnv(), task, "e")
    assert CountingEnv.scored == 1


def test_runner_from_config_uses_the_model_section(tiny_tokenizer):
    from trustee.chat.render import project_template
    from trustee.config import ModelConfig

    r = EpisodeRunner.from_config(
        RolloutConfig(max_turns=5),
        ModelConfig(max_model_len=1024, enable_thinking=True),
        None,
        tiny_tokenizer,
    )
    assert r.max_model_len == 1024 and r.enable_thinking and r.cfg.max_turns == 5
    assert r.template == project_template()
    assert (
        EpisodeRunner.from_config(
            RolloutConfig(), ModelConfig(chat_template="model"), None, tiny_tokenizer
        ).template
        is None
    )
