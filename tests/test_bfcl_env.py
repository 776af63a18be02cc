"""BFCL environment: data, execution, per-turn checks, rewards, hints.

The fixed sample is every 25th entry of each multi-turn category (8 x 4 = 32 entries, all
eight executable classes among them); the full data runs in the `slow` test and in
`python -m bench.bfcl_oracle`.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("bfcl_eval", reason="needs bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23 mpmath)")

from trustee.envs.base import AgentAction, Knobs
from trustee.envs.bfcl import MISS_TURN_WARNING, BfclEnv, syntax_reward
from trustee.envs.bfcl_data import MULTI_TURN_CATEGORIES, load_multi_turn, select, split_indices, to_tool_spec
from trustee.envs.bfcl_exec import BfclWorld, bfcl_multi_turn_check, oracle_calls, parse_call_string
from trustee.envs.bfcl_scripted import (
    ScriptedBfclPolicy,
    extra_call,
    missing_call,
    oracle_policy,
    play,
    silent_policy,
    wrong_argument,
)
from trustee.types import Message, ToolCall, ToolCallError

SAMPLE = [(c, i) for c in MULTI_TURN_CATEGORIES for i in range(0, 200, 25)]


def sample():
    return [load_multi_turn(c)[i] for c, i in SAMPLE]


def run(coro):
    return asyncio.run(coro)


async def _play_instance(env, inst, policy):
    return await play(env, env.task_for(inst), policy, episode_id=inst.id)


def test_data_shapes():
    for c in MULTI_TURN_CATEGORIES:
        rows = load_multi_turn(c)
        assert len(rows) == 200
        for r in rows:
            assert len(r.turns) == len(r.ground_truth)
            # held-out turns have no user message and their functions are not shown at the start
            for turn, docs in r.held_out.items():
                assert r.turns[turn] == []
                assert not {d["name"] for d in docs} & {d["name"] for d in r.functions}
    assert all(load_multi_turn("miss_func")[i].held_out for i in range(200))


def test_tool_spec_conversion_is_json_schema():
    inst = load_multi_turn("base")[0]
    spec = to_tool_spec(next(d for d in inst.functions if d["name"] == "mv"))
    assert spec.parameters["type"] == "object"
    assert set(spec.parameters["required"]) == {"source", "destination"}
    assert spec.parameters["properties"]["source"]["type"] == "string"
    float_doc = {
        "name": "f",
        "parameters": {
            "type": "dict",
            "properties": {
                "x": {"type": "float"},
                "y": {"type": "any"},
                "t": {"type": "tuple", "items": {"type": "integer"}},
            },
        },
    }
    p = to_tool_spec(float_doc).parameters["properties"]
    assert (
        p["x"] == {"type": "number"}
        and p["y"] == {}
        and p["t"] == {"type": "array", "items": {"type": "integer"}}
    )


def test_split_is_fixed_half_and_disjoint():
    train, held = split_indices(200, seed=0)
    assert len(train) == len(held) == 100 and not train & held
    assert split_indices(200, seed=0) == (train, held)
    assert split_indices(200, seed=1) != (train, held)
    tr = select(["base", "miss_func"], "train", 0)
    ho = select(["base", "miss_func"], "heldout", 0)
    assert len(tr) == len(ho) == 200
    assert not {r.id for r in tr} & {r.id for r in ho}
    # variants of one scenario land on the same side
    assert {r.index for r in tr if r.category == "base"} == {r.index for r in tr if r.category == "miss_func"}


def test_ground_truth_strings_bind_to_keywords():
    name, args, kwargs = parse_call_string("sort('final_report.pdf')")
    assert (name, args, kwargs) == ("sort", ["final_report.pdf"], {})
    world = BfclWorld(load_multi_turn("miss_func")[0])
    assert world.bind(name, args, kwargs) == ToolCall(
        name="sort", arguments={"file_name": "final_report.pdf"}
    )


def test_execution_matches_bfcl_rendering_and_never_evals():
    world = BfclWorld(load_multi_turn("base")[0])
    res = world.execute(ToolCall(name="ls", arguments={}))
    assert not res.error and json.loads(res.text)["current_directory_content"]
    bad = world.execute(ToolCall(name="ls", arguments={"nope": 1}))
    assert bad.error and bad.text.startswith("Error during execution: ") and "nope" in bad.text
    blocked = world.execute(ToolCall(name="exit", arguments={}))
    assert blocked.error and "not allowed" in blocked.text
    # a string argument holding code stays data
    res = world.execute(ToolCall(name="cd", arguments={"folder": "__import__('os').getcwd()"}))
    assert res.error and "__import__" in res.text


@pytest.mark.parametrize("category", MULTI_TURN_CATEGORIES)
def test_oracle_passes_every_turn_on_sample(category):
    env = BfclEnv(split="all")
    for c, i in SAMPLE:
        if c != category:
            continue
        inst = load_multi_turn(c)[i]
        state = run(_play_instance(env, inst, oracle_policy(inst)))
        assert state.done
        assert all(env.verdicts(state)), (inst.id, env.verdicts(state))
        score = run(env.score(state))
        assert score.reward == 1.0 and score.parts["all_turns_passed"] == 1.0
        assert bfcl_multi_turn_check(inst, env.checker_steps(state))["valid"], inst.id


def test_silent_policy_fails_every_turn_with_ground_truth():
    env = BfclEnv(split="all", miss_turn_warning=False)
    for inst in sample():
        state = run(_play_instance(env, inst, silent_policy()))
        v = env.verdicts(state)
        for k, gt in enumerate(inst.ground_truth):
            assert v[k] is (False if gt else None), (inst.id, k)
        assert run(env.score(state)).reward == 0.0
        assert not bfcl_multi_turn_check(inst, env.checker_steps(state))["valid"]


def _agree(env, inst, state):
    """Per turn k with ground truth: the env's 'all scored turns up to k pass' equals BFCL's
    checker verdict on the first k+1 turns."""
    v = env.verdicts(state)
    steps = env.checker_steps(state)
    ok_so_far = True
    firsts = []
    for k, gt in enumerate(inst.ground_truth):
        if gt:
            ok_so_far = ok_so_far and bool(v[k])
        bfcl = bfcl_multi_turn_check(inst, steps, turns=k + 1)["valid"]
        assert ok_so_far == bfcl, (inst.id, k, v, bfcl)
        firsts.append(ok_so_far)
    return v


PERTURB = {
    "wrong_argument": lambda inst, calls, k: wrong_argument(calls, k),
    "missing_call": lambda inst, calls, k: missing_call(calls, k),
    "extra_call": extra_call,
}


@pytest.mark.parametrize("kind", sorted(PERTURB))
def test_perturbed_oracles_fail_their_turn_and_agree_with_bfcl(kind):
    env = BfclEnv(split="all", miss_turn_warning=False)
    tried = failed_at_k = 0
    for inst in sample()[::2]:
        calls = oracle_calls(inst)
        k = next(i for i, gt in enumerate(inst.ground_truth) if gt)
        bad = PERTURB[kind](inst, calls, k)
        if bad is None:
            continue
        tried += 1
        state = run(_play_instance(env, inst, ScriptedBfclPolicy(bad)))
        v = _agree(env, inst, state)
        assert all(x is not False for x in v[:k])  # turns before the perturbation still pass
        failed_at_k += v[k] is False
        if kind == "extra_call":  # state diverges for good: every later scored turn fails
            assert all(x is False for x in v[k:] if x is not None), (inst.id, v)
    assert tried >= 5
    # a wrong argument or a dropped call can be harmless (e.g. an argument the result ignores),
    # so not every perturbation must fail; agreement with BFCL above is the exact check.
    assert failed_at_k >= tried - 2, (failed_at_k, tried)


def test_miss_turn_warning_and_refusal():
    env = BfclEnv(split="all", miss_turn_warning=True)
    inst = load_multi_turn("miss_param")[0]
    k = next(i for i, gt in enumerate(inst.ground_truth) if not gt)
    calls = oracle_calls(inst)
    calls[k] = [ToolCall(name="ls", arguments={})]
    state = run(env.start(env.task_for(inst), "w"))
    policy = ScriptedBfclPolicy(calls)
    seen = []
    while not state.done:
        seen.extend(run(env.step(state, policy.act(state))))
    v = env.verdicts(state)
    assert v[k] is False and all(v[j] for j in range(len(v)) if j != k)
    users = [m.content for m in seen if m.role == "user"]
    assert sum(u.startswith(MISS_TURN_WARNING) for u in users) == 1
    assert any("not executed" in m.content for m in seen if m.role == "tool")


def test_held_out_functions_are_announced_in_the_user_turn():
    env = BfclEnv(split="all")
    inst = load_multi_turn("miss_func")[0]
    turn = next(iter(inst.held_out))
    state = run(env.start(env.task_for(inst), "h"))
    policy = oracle_policy(inst)
    users = []
    while not state.done:
        users += [m.content for m in run(env.step(state, policy.act(state))) if m.role == "user"]
    names = [d["name"] for d in inst.held_out[turn]]
    assert any(all(n in u for n in names) and "updated some more functions" in u for u in users)
    assert not {t.name for t in env.task_for(inst).tools} & set(names)


def test_step_cap_ends_turn_and_force_quit_ends_episode():
    inst = load_multi_turn("base")[0]
    looping = AgentAction(message=Message(role="assistant"), calls=[ToolCall(name="pwd", arguments={})])
    env = BfclEnv(split="all", max_steps_per_turn=3)
    state = run(env.start(env.task_for(inst), "c"))
    outs = [run(env.step(state, looping)) for _ in range(3)]
    assert state.data["bfcl"].turn == 1 and outs[-1][-1].role == "user"
    env2 = BfclEnv(split="all", max_steps_per_turn=3, force_quit_ends_episode=True)
    state = run(env2.start(env2.task_for(inst), "q"))
    for _ in range(3):
        run(env2.step(state, looping))
    assert state.done and not any(env2.verdicts(state))
    res = bfcl_multi_turn_check(inst, env2.checker_steps(state))
    assert res["error_type"] == "multi_turn:force_terminated"


def test_syntax_reward_formula():
    assert syntax_reward(4, 0, 0, 0) == 0.0  # no tool call: I_tool = 0
    assert syntax_reward(4, 1, 2, 1) == pytest.approx(((3 / 4) + (1 / 2)) / 2)
    assert syntax_reward(2, 0, 3, 3) == 1.0
    env = BfclEnv(split="all", reward="syntax")
    inst = load_multi_turn("base")[0]
    state = run(env.start(env.task_for(inst), "s"))
    bad = ToolCallError(kind="invalid_json", message="bad json", raw="{")
    run(env.step(state, AgentAction(message=Message(role="assistant"), errors=[bad])))
    run(
        env.step(
            state, AgentAction(message=Message(role="assistant"), calls=[ToolCall(name="ls", arguments={})])
        )
    )
    s = run(env.score(state))
    assert s.parts["format_error_steps"] == 1 and s.parts["calls"] == 2 and s.parts["ok_calls"] == 1
    assert s.reward == pytest.approx(((1 / 2) + (1 / 2)) / 2)


def test_unknown_and_schema_rejected_calls_still_run_like_bfcl():
    env = BfclEnv(split="all")
    inst = load_multi_turn("miss_func")[0]  # 'sort' is held out at first
    state = run(env.start(env.task_for(inst), "u"))
    raw = json.dumps({"name": "ls", "arguments": {"a": "yes"}})
    err = ToolCallError(kind="schema", message="a must be boolean", raw=raw, name="ls")
    out = run(env.step(state, AgentAction(message=Message(role="assistant"), errors=[err])))
    assert out[0].role == "tool" and "current_directory_content" in out[0].content
    nope = ToolCallError(
        kind="unknown_tool",
        message="tool 'nope' not found",
        raw=json.dumps({"name": "nope", "arguments": {}}),
        name="nope",
    )
    out = run(env.step(state, AgentAction(message=Message(role="assistant"), errors=[nope])))
    assert "not found" in out[0].content


def test_hints_switch_changes_only_the_observation():
    inst = next(r for r in load_multi_turn("base") if "TravelAPI" in r.involved_classes)
    call = ToolCall(
        name="get_flight_cost",
        arguments={
            "travel_from": "LA",
            "travel_to": "SFO",
            "travel_date": "2024-11-15",
            "travel_class": "economy",
        },
    )
    seen = {}
    for hints in (False, True):
        env = BfclEnv(split="all", hints=hints)
        state = run(env.start(env.task_for(inst, hints=hints), "t"))
        out = run(env.step(state, AgentAction(message=Message(role="assistant"), calls=[call])))
        seen[hints] = out[0].content
        assert state.data["bfcl"].results[-1].startswith("Error during execution")  # raw result unchanged
    assert "list_all_airports" in seen[True] and "list_all_airports" not in seen[False]


@pytest.mark.parametrize(
    "classes,call,expect",
    [
        ("GorillaFileSystem", ToolCall(name="cd", arguments={"folder": "a/b"}), "one directory at a time"),
        ("GorillaFileSystem", ToolCall(name="cat", arguments={"file_name": "nope.txt"}), "'ls'"),
        (
            "VehicleControlAPI",
            ToolCall(name="estimate_distance", arguments={"cityA": "Rivermist", "cityB": "Stonebrook"}),
            "get_zipcode_based_on_city",
        ),
        (
            "TravelAPI",
            ToolCall(
                name="compute_exchange_rate",
                arguments={"base_currency": "XXX", "target_currency": "USD", "value": 1.0},
            ),
            "USD, RMB",
        ),
        ("TradingBot", ToolCall(name="get_stock_info", arguments={"symbol": "ZZZZ"}), "get_symbol_by_name"),
        (
            "GorillaFileSystem",
            ToolCall(name="ls", arguments={"colour": True}),
            "takes exactly these parameters",
        ),
    ],
)
def test_hint_table(classes, call, expect):
    from trustee.envs.bfcl_hints import augment

    inst = next(r for r in load_multi_turn("base") if classes in r.involved_classes)
    world = BfclWorld(inst)
    res = world.execute(call)
    text, rule = augment(res, world)
    assert rule is not None and expect in text, (rule, text)


def test_successful_calls_get_no_hint():
    from trustee.envs.bfcl_hints import augment

    world = BfclWorld(load_multi_turn("base")[0])
    res = world.execute(ToolCall(name="ls", arguments={}))
    assert augment(res, world) == (res.text, None)


def test_make_task_follows_stage_knobs():
    import random

    env = BfclEnv(split="train", syntax_instances=10)
    rng = random.Random(0)
    t = run(env.make_task(Knobs(extra={"reward": "syntax", "hints": False, "split": "base"}), rng))
    assert t.payload["reward"] == "syntax" and t.payload["hints"] is False and t.payload["category"] == "base"
    assert len(env.pool("base", "syntax")) == 10
    cats = {run(env.make_task(Knobs(extra={"split": "all"}), rng)).payload["category"] for _ in range(40)}
    assert cats == set(MULTI_TURN_CATEGORIES)
    heldout = {r.id for r in select(list(MULTI_TURN_CATEGORIES), "heldout", 0)}
    assert all(r.id not in heldout for r in env.pool("all", "progress"))


@pytest.mark.slow
def test_oracle_full_data_every_category():
    env = BfclEnv(split="all")
    for c in MULTI_TURN_CATEGORIES:
        for inst in load_multi_turn(c):
            state = run(_play_instance(env, inst, oracle_policy(inst)))
            assert all(env.verdicts(state)), inst.id
            assert bfcl_multi_turn_check(inst, env.checker_steps(state))["valid"], inst.id
            silent = run(_play_instance(env, inst, silent_policy()))
            assert not any(v for v, gt in zip(env.verdicts(silent), inst.ground_truth, strict=True) if gt)


def test_calls_and_rejected_calls_run_in_block_order():
    """A held-out function (unknown to the parser built from the opening tool block) named
    between known calls runs in its place, as BFCL would run it."""
    from trustee.chat.parse import ToolCallParser

    env = BfclEnv(split="all")
    inst = load_multi_turn("miss_func")[2]
    task = env.task_for(inst)
    assert "cp" not in {t.name for t in task.tools}
    text = "".join(
        "<tool_call>\n" + json.dumps({"name": n, "arguments": a}) + "\n</tool_call>"
        for n, a in [
            ("cd", {"folder": "documents"}),
            ("cp", {"source": "ideas.txt", "destination": "copy.txt"}),
            ("ls", {}),
        ]
    )
    parsed = ToolCallParser(task.tools).parse(text)
    assert [c.name for c in parsed.calls] == ["cd", "ls"] and parsed.errors[0].index == 1
    state = run(env.start(task, "o"))
    out = run(env.step(state, AgentAction(message=parsed.message, calls=parsed.calls, errors=parsed.errors)))
    assert [m.name for m in out] == ["cd", "cp", "ls"]
    assert "copied" in out[1].content and "copy.txt" in out[2].content  # cp ran inside documents/, before ls
