"""Simulator roles: prompt building (KV-cache layout), typed decoding with retries, task
validation, tool-argument validation, the consistency memo, judge arithmetic.

Engines here are test doubles: `ScriptedTextEngine` returns fixed texts; `FakeJsonEngine`
returns random schema-valid JSON. The real path (tiny random model, constrained decoding)
is in test_sim_hf.py."""

from __future__ import annotations

import json
import random

import anyio
import msgspec
import pytest

from trustee.chat.parse import canonical_json
from trustee.engines.base import Completion, Sampling
from trustee.sim.budget import text_pattern, worst_case_tokens
from trustee.sim.client import STRING_CAP, SimClient, SimError, bounded_schema, decode_json, schema_of
from trustee.sim.fakes import FakeJsonEngine, random_json
from trustee.sim.judge import (
    Judge,
    RubricVerdict,
    TrusteeVerdict,
    combine,
    majority_rubric,
    rubric_reward,
    rubric_schema,
    trustee_reward,
)
from trustee.sim.log import SimLog
from trustee.sim.taskgen import (
    STATE_CHANGING,
    CatalogEntry,
    ScenarioDraft,
    TaskGenerator,
    ToolCatalog,
    ToolDraft,
    scenario_schema,
    task_problems,
)
from trustee.sim.tools import ConsistencyMemo, ToolReply, ToolSimulator, injected_failure
from trustee.sim.user import UserReply, UserSimulator
from trustee.types import Knobs, Message, Rubric, Task, ToolCall, ToolSpec


class ScriptedTextEngine:
    """Engine double: returns the given texts in order (then repeats the last); records
    prompts and sampling params. `delay` makes each call take that long (concurrency)."""

    version = 0

    def __init__(self, tokenizer, texts, delay: float = 0.0):
        self.tok, self.texts, self.delay = tokenizer, list(texts), delay
        self.prompts: list[list[int]] = []
        self.params: list[Sampling] = []

    async def generate(self, prompt, params, *, key=None):
        self.prompts.append(list(prompt))
        self.params.append(params)
        if self.delay:
            await anyio.sleep(self.delay)
        text = self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.convert_tokens_to_ids("<|im_end|>")]
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


WEATHER = ToolSpec(
    name="get_weather",
    description="Weather of a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
        "additionalProperties": False,
    },
)


def _task(**kw) -> Task:
    base = dict(
        id="t1",
        env="simulated",
        tools=[WEATHER],
        first_query="How is the weather?",
        domain="weather",
        persona="a hiker",
        goal="know tomorrow's weather in Oslo",
        hidden_info="- the city is Oslo",
        expected_calls=[ToolCall(name="get_weather", arguments={"city": "Oslo"})],
        rubric=Rubric(subgoals=["weather given"], required_interactions=["ask the city"], forbidden=["book"]),
        knobs={"judge_strictness": 3.0},
    )
    base.update(kw)
    return Task(**base)


def run(fn, *args):
    return anyio.run(fn, *args)


# ------------------------------------------------------------------ client


def test_bounded_schema_bounds_everything_free():
    s = bounded_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "array", "items": {"type": "number"}},
                "c": {"type": "string", "enum": ["x", "y"]},
                "d": {"type": "object", "properties": {}},
            },
        }
    )
    p = s["properties"]
    assert s["additionalProperties"] is False
    assert p["a"]["pattern"] == text_pattern(STRING_CAP) and "pattern" not in p["c"]
    items = p["b"]["items"]
    assert p["b"]["maxItems"] > 0 and items["type"] == "integer"  # a float's digits are unbounded
    assert items["maximum"] > 0 > items["minimum"]
    assert p["d"]["additionalProperties"] is False
    assert worst_case_tokens(s) < float("inf") and worst_case_tokens({"type": "string"}) == float("inf")


def test_decode_is_lenient_on_control_chars_and_rejects_nan():
    assert decode_json('{"message": "a\x07b", "status": "continue"}', UserReply).message == "a\x07b"
    with pytest.raises(ValueError):
        decode_json('{"fields": [{"key": "x", "value": NaN}]}', ToolReply)
    with pytest.raises(msgspec.ValidationError):
        decode_json('{"message": "hi", "status": "maybe"}', UserReply)


def test_ask_sends_struct_schema_and_rendered_prompt(tiny_tokenizer):
    eng = ScriptedTextEngine(tiny_tokenizer, ['{"message": "hi", "status": "continue"}'])
    client = SimClient(eng, tiny_tokenizer, temperature=0.3, max_tokens=400)
    msgs = [Message(role="system", content="rules"), Message(role="user", content="hello")]
    value, retries = run(lambda: client.ask("user", msgs, UserReply, key="g"))
    assert value == UserReply(message="hi", status="continue") and retries == 0
    assert eng.prompts[0] == client.fmt.prompt_ids(msgs)
    p = eng.params[0]
    bounded = bounded_schema(schema_of(UserReply))
    assert p.json_schema == bounded and p.temperature == 0.3
    assert p.max_tokens == worst_case_tokens(bounded) <= 400  # the longest output: never cut
    assert p.json_schema["properties"]["message"]["pattern"] == text_pattern(300)
    # a budget under the longest output is refused before anything is sent
    small = SimClient(eng, tiny_tokenizer, max_tokens=77)
    with pytest.raises(SimError, match="longest output its schema allows"):
        run(lambda: small.ask("user", msgs, UserReply))
    assert len(eng.prompts) == 1 and small.stats.refused == 1
    tight = SimClient(eng, tiny_tokenizer, max_tokens=400, max_model_len=200)
    with pytest.raises(SimError, match="model.max_model_len"):
        run(lambda: tight.ask("user", msgs, UserReply))


def test_ask_retries_then_raises_sim_error(tiny_tokenizer):
    ok = '{"message": "hi", "status": "goal_met"}'
    eng = ScriptedTextEngine(tiny_tokenizer, ['{"message": ', "not json", ok])
    client = SimClient(eng, tiny_tokenizer, max_decode_retries=2)
    value, retries = run(lambda: client.ask("user", [Message(role="user", content="x")], UserReply))
    assert value.status == "goal_met" and retries == 2 and client.stats.retries == 2
    bad = SimClient(ScriptedTextEngine(tiny_tokenizer, ["nope"]), tiny_tokenizer, max_decode_retries=1)
    with pytest.raises(SimError, match="'user' failed 2 time"):
        run(lambda: bad.ask("user", [Message(role="user", content="x")], UserReply))
    assert bad.stats.failures == 1


# ------------------------------------------------------------------ task generator


def test_task_generator_builds_a_valid_task(tiny_tokenizer):
    gen = TaskGenerator(SimClient(FakeJsonEngine(tiny_tokenizer, seed=3), tiny_tokenizer))
    for n in (1, 4, 10):
        task = run(
            gen.generate,
            Knobs(n_tools=n, n_expected_calls=3, n_turns=2, prompt_specificity=0.0),
            random.Random(n),
        )
        assert len(task.tools) == n and len({t.name for t in task.tools}) == n
        assert 1 <= len(task.expected_calls) <= 3
        assert task_problems(task.tools, task.expected_calls) == []
        assert task.system_prompt == "You are a helpful assistant."  # specificity 0 -> generic
        assert task.knobs["n_tools"] == n and task.domain in gen.domains
        assert set(task.payload[STATE_CHANGING]) <= {t.name for t in task.tools}


def test_scenario_prompt_extends_the_tool_prompt(tiny_tokenizer):
    eng = FakeJsonEngine(tiny_tokenizer, seed=0)
    gen = TaskGenerator(SimClient(eng, tiny_tokenizer))
    run(gen.generate, Knobs(n_tools=2), random.Random(0))
    first_tool, second_tool, scenario = eng.prompts  # one tool per request, then the scenario
    assert second_tool[: len(first_tool)] == first_tool and scenario[: len(second_tool)] == second_tool


def test_task_generator_rejects_and_regenerates(tiny_tokenizer):
    tool = {"name": "get_x", "description": "d", "changes_state": False, "params": []}
    x = json.dumps(tool)
    y = json.dumps({**tool, "name": "set_y", "changes_state": True})
    scen = random_json(scenario_schema([ToolSpec(name="get_x")], 1), random.Random(0))
    scen["expected_calls"] = [{"name": "get_x", "arguments": {}}]
    # the second tool first repeats the first one's name: rejected, asked again
    eng = ScriptedTextEngine(tiny_tokenizer, [x, x, y, json.dumps(scen)])
    gen = TaskGenerator(SimClient(eng, tiny_tokenizer, max_decode_retries=1))
    task = run(gen.generate, Knobs(n_tools=2), random.Random(0))
    assert [t.name for t in task.tools] == ["get_x", "set_y"] and len(eng.prompts) == 4
    assert task.payload[STATE_CHANGING] == ["set_y"]
    # an expected call that violates its tool's schema makes the whole task regenerate
    scen["expected_calls"] = [{"name": "get_x", "arguments": {"extra": 1}}]
    eng = ScriptedTextEngine(tiny_tokenizer, [x, y, json.dumps(scen)] * 2)
    gen = TaskGenerator(SimClient(eng, tiny_tokenizer), max_regenerations=1)
    with pytest.raises(SimError, match="task"):
        run(gen.generate, Knobs(n_tools=2), random.Random(0))
    assert gen.rejected == 2 and len(eng.prompts) == 6


def test_scenario_schema_restricts_calls_to_the_tools():
    s = scenario_schema([WEATHER], 2)["properties"]["expected_calls"]
    assert s["maxItems"] == 2 and s["minItems"] == 1
    (variant,) = s["items"]["anyOf"]
    assert variant["properties"]["name"] == {"const": "get_weather"}
    assert variant["properties"]["arguments"]["required"] == ["city"]
    assert task_problems([WEATHER], [ToolCall(name="get_weather", arguments={"days": 2})])  # city missing


def test_catalog_prefers_one_category(tmp_path, tiny_tokenizer):
    lines = [CatalogEntry(name=f"{c}_{i}", category=c) for c in ("maps", "bank") for i in range(3)]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(msgspec.json.encode(e).decode() for e in lines))
    cat = ToolCatalog.from_jsonl(path)
    category, tools = cat.sample(2, random.Random(0))
    assert len(tools) == 2 and all(t.name.startswith(category) for t in tools)
    category, tools = cat.sample(5, random.Random(0))
    assert sum(t.name.startswith(category) for t in tools) == 3 and len(tools) == 5
    eng = FakeJsonEngine(tiny_tokenizer, seed=1)
    gen = TaskGenerator(SimClient(eng, tiny_tokenizer), catalog=cat)
    task = run(gen.generate, Knobs(n_tools=3), random.Random(1))
    assert len(eng.prompts) == 1 and {t.name for t in task.tools} <= {e.name for e in lines}
    path.write_text('{"description": "no name"}')
    with pytest.raises(ValueError, match="tools.jsonl:1"):
        ToolCatalog.from_jsonl(path)


# ------------------------------------------------------------------ user simulator


def test_user_prompt_layout_and_redaction(tiny_tokenizer):
    texts = [
        '{"message": "use get_weather please", "status": "continue"}',
        '{"message": "Oslo", "status": "goal_met"}',
    ]
    eng = ScriptedTextEngine(tiny_tokenizer, texts)
    client = SimClient(eng, tiny_tokenizer)
    task = _task()
    u1, log1 = UserSimulator(client, task, key=task.id), SimLog(task)
    r1, _ = run(u1.reply, log1, "Which city?")
    r2, _ = run(u1.reply, log1, "Thanks, checking Oslo.")
    assert r1.message == "use that please" and u1.leaks == 1 and r2.status == "goal_met"
    p1, p2 = eng.prompts
    assert p2[: len(p1)] == p1  # append-only log
    # the answer joins the log as the model wrote it (its cached tokens are reused)
    assert log1.messages[3] == Message(role="assistant", content=texts[0])
    log2 = SimLog(task)
    assert log2.messages[:2] == log1.messages[:2]  # same rules + task block for the whole group
    assert "the city is Oslo" in log1.messages[1].content and "AGENT: Which city?" in log1.messages[2].content


# ------------------------------------------------------------------ tool simulator


def test_schema_errors_are_deterministic_and_cost_no_call(tiny_tokenizer):
    eng = ScriptedTextEngine(tiny_tokenizer, ['{"fields": [{"key": "temp", "value": 3}]}'])
    sim = ToolSimulator(SimClient(eng, tiny_tokenizer), _task(), ConsistencyMemo(), key="t1")
    log = SimLog(_task())
    (out,) = run(sim.run_turn, log, [ToolCall(name="get_weather", arguments={"days": "two"})])
    assert json.loads(out.content)["error"].startswith("invalid arguments for 'get_weather'")
    (again,) = run(sim.run_turn, log, [ToolCall(name="get_weather", arguments={"days": "two"})])
    assert again == out and eng.prompts == [] and sim.schema_errors == 2
    assert "REJECTED" in log.messages[-1].content and sim.state == []


def test_memo_shares_results_across_the_group(tiny_tokenizer):
    eng = ScriptedTextEngine(
        tiny_tokenizer,
        ['{"fields": [{"key": "temp", "value": 3}]}', '{"fields": [{"key": "temp", "value": 9}]}'],
    )
    client = SimClient(eng, tiny_tokenizer)
    memo = ConsistencyMemo()
    task = _task(payload={STATE_CHANGING: []})  # get_weather only reads
    a, log_a = ToolSimulator(client, task, memo, key="t1"), SimLog(task)
    b, log_b = ToolSimulator(client, task, memo, key="t1"), SimLog(task)
    call = ToolCall(name="get_weather", arguments={"city": "Oslo", "days": 1})
    same = ToolCall(name="get_weather", arguments={"days": 1, "city": "Oslo"})  # key order differs
    (ra,) = run(a.run_turn, log_a, [call])
    (rb,) = run(b.run_turn, log_b, [same])
    assert ra.content == rb.content == canonical_json({"temp": 3})
    assert len(eng.prompts) == 1 and memo.hits == 1 and memo.computed == 1
    (rc,) = run(b.run_turn, log_b, [ToolCall(name="get_weather", arguments={"city": "Bergen"})])
    assert rc.content == canonical_json({"temp": 9}) and len(memo) == 2
    assert "AGENT CALLS: " in log_b.messages[-2].content
    assert log_b.messages[-1].content == '{"fields": [{"key": "temp", "value": 9}]}'  # as written
    assert log_a.messages[-1] == log_b.messages[3]  # a memo hit joins the log in the same form


def test_memo_concurrent_askers_share_one_call(tiny_tokenizer):
    eng = ScriptedTextEngine(tiny_tokenizer, ['{"fields": [{"key": "ok", "value": true}]}'], delay=0.05)
    client = SimClient(eng, tiny_tokenizer)
    memo = ConsistencyMemo()
    sims = [ToolSimulator(client, _task(), memo, key="t1") for _ in range(4)]
    call = ToolCall(name="get_weather", arguments={"city": "Oslo"})
    out: list[str] = []

    async def main():
        async with anyio.create_task_group() as tg:
            for s in sims:
                tg.start_soon(lambda s=s: _collect(s, call, out))

    run(main)
    assert len(eng.prompts) == 1 and len(set(out)) == 1 and memo.hits == 3


async def _collect(sim, call, out):
    (m,) = await sim.run_turn(SimLog(sim.task), [call])
    out.append(m.content)


def test_one_turn_runs_calls_concurrently_in_order(tiny_tokenizer):
    eng = ScriptedTextEngine(
        tiny_tokenizer,
        ['{"fields": [{"key": "n", "value": 1}]}', '{"fields": [{"key": "n", "value": 2}]}'],
        delay=0.05,
    )
    sim = ToolSimulator(SimClient(eng, tiny_tokenizer), _task(), ConsistencyMemo(), key="t1")
    log = SimLog(_task())
    calls = [ToolCall(name="get_weather", arguments={"city": c}) for c in ("A", "B")]
    out = run(sim.run_turn, log, calls)
    assert [m.name for m in out] == ["get_weather", "get_weather"] and len(eng.prompts) == 2
    # both saw the same log (the turn's start); they differ only in the new call
    a, b = eng.prompts
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    head = sim.client.fmt.encode(sim.client.fmt.render_text(log.messages[:2], generation_prompt=False))
    assert shared >= len(head) and a != b
    assert len(log.messages) == 2 + 2 * 2


def test_error_injection_is_deterministic_per_call():
    keys = [f"k{i}" for i in range(2000)]
    fails = [injected_failure("task", k, 0.25) for k in keys]
    assert fails == [injected_failure("task", k, 0.25) for k in keys]
    assert 400 < sum(fails) < 600
    assert not any(injected_failure("task", k, 0.0) for k in keys)


# ------------------------------------------------------------------ judge


def _tv(intent="yes", **checks):
    d = dict(correct_tools=True, no_hallucination=True, no_redundancy=True, efficient=True)
    d.update(checks)
    return TrusteeVerdict(analysis="", intent=intent, **d)


def test_trustee_reward_tiers():
    assert trustee_reward(_tv("no"), 1) == -1.0
    assert trustee_reward(_tv("partly"), 1) == 0.0
    assert trustee_reward(_tv("yes", correct_tools=False), 1) == 1.0  # tier 1: intent only
    assert trustee_reward(_tv("yes", correct_tools=False), 2) == 0.0
    assert trustee_reward(_tv("yes", no_redundancy=False), 3) == 1.0
    assert trustee_reward(_tv("yes", no_redundancy=False), 4) == 0.0
    assert trustee_reward(_tv("yes", efficient=False), 4) == 1.0
    assert trustee_reward(_tv("yes", efficient=False), 5) == 0.0
    assert trustee_reward(_tv("no", efficient=False), 5) == -1.0


def test_rubric_reward_arithmetic():
    v = RubricVerdict(
        analysis="", forbidden_violated=[False], subgoals_met=[True, False], interactions_made=[True]
    )
    assert rubric_reward(v)[0] == pytest.approx((0.5 + 1.0) / 2)
    v2 = RubricVerdict(
        analysis="", forbidden_violated=[False, True], subgoals_met=[True], interactions_made=[True]
    )
    assert rubric_reward(v2)[0] == 0.0
    v3 = RubricVerdict(
        analysis="", forbidden_violated=[], subgoals_met=[True, True, False, False], interactions_made=[]
    )
    assert rubric_reward(v3) == (0.5, {"gate": 1.0, "subgoals": 0.5})


def test_vote_combination():
    assert combine([1.0, 1.0, -1.0], "majority") == 1.0
    assert combine([1.0, -1.0], "majority") == -1.0  # tie -> lower
    assert combine([1.0, 0.0, 0.0, 1.0, -1.0], "majority") == 0.0
    assert combine([1.0, 0.0, -1.0, 1.0], "mean") == pytest.approx(0.25)
    votes = [
        RubricVerdict(
            analysis="", forbidden_violated=[True], subgoals_met=[True, False], interactions_made=[True]
        ),
        RubricVerdict(
            analysis="", forbidden_violated=[False], subgoals_met=[True, True], interactions_made=[False]
        ),
    ]
    m = majority_rubric(votes)
    assert (
        m.forbidden_violated == [True] and m.subgoals_met == [True, False] and m.interactions_made == [False]
    )


def test_judge_scores_with_votes_and_fixed_rubric_lengths(tiny_tokenizer):
    yes = msgspec.json.encode(_tv("yes")).decode()
    no = msgspec.json.encode(_tv("no")).decode()
    eng = ScriptedTextEngine(tiny_tokenizer, [yes, no, yes])
    judge = Judge(
        SimClient(eng, tiny_tokenizer), mode="trustee", votes=3, vote_rule="majority", temperature=0.1
    )
    msgs = [Message(role="user", content="hi"), Message(role="assistant", content="done")]
    log = SimLog.replay(_task(), msgs)
    score, retries = run(lambda: judge.score(_task(), log, "the user said the goal was met", key="t1"))
    assert score.reward == 1.0 and retries == 0 and len(eng.prompts) == 3
    assert {p.temperature for p in eng.params} == {0.1}
    assert "Active criteria: intent, correct_tools, no_hallucination" in tiny_tokenizer.decode(eng.prompts[0])

    task = _task()
    schema = rubric_schema(task)
    assert (
        schema["properties"]["subgoals_met"]["minItems"]
        == schema["properties"]["subgoals_met"]["maxItems"]
        == 1
    )
    wrong = '{"analysis": "", "forbidden_violated": [], "subgoals_met": [true], "interactions_made": [true]}'
    right = '{"analysis": "", "forbidden_violated": [false], "subgoals_met": [true], "interactions_made": [false]}'
    eng = ScriptedTextEngine(tiny_tokenizer, [wrong, right])
    judge = Judge(SimClient(eng, tiny_tokenizer), mode="rubric")
    score, retries = run(lambda: judge.score(task, log, "ended", key="t1"))
    assert score.reward == 0.5 and retries == 1 and score.parts["gate"] == 1.0


def test_schemas_of_all_role_outputs_are_bounded():
    """Every string and array in every role's output schema has a bound (a random model
    under the constraint must terminate)."""

    def walk(node, path):
        if isinstance(node, dict):
            t = node.get("type")
            if t == "string" and not ({"maxLength", "enum", "const", "pattern"} & node.keys()):
                raise AssertionError(f"unbounded string at {path}")
            if t == "array" and "maxItems" not in node:
                raise AssertionError(f"unbounded array at {path}")
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    for struct in (ToolDraft, UserReply, ToolReply, TrusteeVerdict, RubricVerdict):
        walk(schema_of(struct), struct.__name__)
        assert worst_case_tokens(bounded_schema(schema_of(struct))) < 1200, struct.__name__
    walk(scenario_schema([WEATHER], 3), "ScenarioDraft")
    with pytest.raises(AssertionError):
        walk(schema_of(ScenarioDraft), "raw")  # the raw draft's free `arguments` dict is why it is tightened


def test_build_from_config_sections(tiny_tokenizer):
    from trustee.config import EnvironmentConfig, SimulatorConfig
    from trustee.envs.simulated import build_simulated_env, judge_mode_for

    sim = SimulatorConfig(judge_votes=3, judge_vote_rule="majority", max_user_turns=2, max_decode_retries=5)
    env = build_simulated_env(
        sim, EnvironmentConfig(reward="judge"), FakeJsonEngine(tiny_tokenizer), tiny_tokenizer
    )
    assert env.judge.mode == "trustee" and env.judge.votes == 3 and env.judge.vote_rule == "majority"
    assert (
        env.max_user_turns == 2
        and env.client.max_decode_retries == 5
        and env.taskgen.max_tokens == sim.task_max_tokens
    )
    with pytest.raises(
        ValueError, match=r"simulator.max_tokens = 300: the tool role's longest output is \d+"
    ):
        build_simulated_env(
            SimulatorConfig(max_tokens=300),
            EnvironmentConfig(),
            FakeJsonEngine(tiny_tokenizer),
            tiny_tokenizer,
        )
    with pytest.raises(ValueError, match="set model.max_model_len >= "):
        build_simulated_env(
            SimulatorConfig(),
            EnvironmentConfig(),
            FakeJsonEngine(tiny_tokenizer),
            tiny_tokenizer,
            max_model_len=1024,
        )
    assert judge_mode_for(sim, EnvironmentConfig(reward="rubric")) == "rubric"
    with pytest.raises(ValueError, match="environment.reward = 'progress'"):
        judge_mode_for(sim, EnvironmentConfig(reward="progress"))


def test_group_episodes_share_the_judge_task_block(tiny_tokenizer):
    eng = ScriptedTextEngine(tiny_tokenizer, [msgspec.json.encode(_tv("yes")).decode()])
    judge = Judge(SimClient(eng, tiny_tokenizer))
    task = _task()
    for text in ("first episode", "second episode, longer"):
        msgs = [Message(role="user", content="hi"), Message(role="assistant", content=text)]
        run(lambda msgs=msgs: judge.score(task, SimLog.replay(task, msgs), "ended", key="t1"))
    a, b = eng.prompts
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    head = judge.client.fmt.encode(
        judge.client.fmt.render_text(SimLog(task).messages, generation_prompt=False)
    )
    assert shared >= len(head)  # run-wide rules + the group's task block are one shared prefix
    # what only the judge knows comes after the transcript, never in the shared part
    assert "Reference tool calls" not in tiny_tokenizer.decode(a[:shared])
    assert '"city":"Oslo"' in tiny_tokenizer.decode(a[shared:]).replace(" ", "")
