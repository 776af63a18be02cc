"""What makes the simulated environment usable with a small simulator (configs/cpu-trustee.toml):

- simulator.grounded_tasks: a generated task whose reference-call values the user was never told
  is rejected and regenerated at generation time (no tool is run), and counted per step;
- simulator.few_shot with a catalog: each task picks a focus tool, its one reference call is held
  to that tool, and the worked scenarios are tasks of that tool over the task's own draw;
- simulator.tool_few_shot: worked tool-role turns (toy calls with the real tools' results) sit
  once before every episode's task block, where the tool role reads them.

The simulator is an engine double each time (FakeJsonEngine: random schema-valid JSON; or
`ScriptedEngine` below, which answers from a list), named as such; the real SmolLM2 figures are
bench/sim_tasks.py's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import anyio
import pytest

from trustee.config import EnvironmentConfig, SimulatorConfig
from trustee.envs.simulated import build_simulated_env
from trustee.envs.toy import execute
from trustee.sim.fakes import FakeJsonEngine
from trustee.sim.taskgen import ungrounded_values
from trustee.types import Knobs, ToolCall

ROOT = Path(__file__).resolve().parents[1]
CATALOG = str(ROOT / "configs/catalogs/toy-tools.jsonl")


class ScriptedEngine(FakeJsonEngine):
    """Engine double: answers each request with the next of the given texts."""

    def __init__(self, tokenizer, answers: list[str]):
        super().__init__(tokenizer)
        self.answers = list(answers)

    async def generate(self, prompt, params, *, key=None):
        self.prompts.append(list(prompt))
        ids = list(self.tokenizer.encode(self.answers.pop(0), add_special_tokens=False)) + [self.eos_id]
        from trustee.engines.base import Completion

        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


def _scenario(query: str, a: int, b: int) -> str:
    return json.dumps(
        {
            "expected_calls": [{"name": "add", "arguments": {"a": a, "b": b}}],
            "persona": "a student",
            "goal": "a sum",
            "hidden_info": [],
            "first_query": query,
            "system_prompt": "",
            "subgoals": ["the sum"],
            "required_interactions": [],
            "forbidden": [],
        }
    )


def test_ungrounded_values_name_what_the_user_was_not_told():
    calls = [ToolCall(name="add", arguments={"a": 9, "b": 7}), ToolCall(name="kv_set", arguments={"key": "pet"})]
    assert ungrounded_values(calls, "What is 9 plus 7? Save it under the key 'pet'.") == []
    missing = ungrounded_values(calls, "What is 9 plus 17? Save it under the key 'petal'.")
    assert missing == [
        "add.b = 7 is not in the opening message or hidden information",
        "kv_set.key = 'pet' is not in the opening message or hidden information",
    ]
    # numbers as numbers (4.0 is written 4), booleans are exempt, a value inside a decimal is not the value
    assert ungrounded_values([ToolCall(name="f", arguments={"x": 4.0, "y": True})], "take 4") == []
    assert ungrounded_values([ToolCall(name="f", arguments={"x": 5})], "take 2.5") != []


def test_grounded_tasks_are_regenerated_and_counted(tiny_tokenizer):
    answers = [_scenario("What is 2 plus 3?", 9, 7), _scenario("What is 9 plus 7?", 9, 7)]

    def build(grounded: bool):
        sim = SimulatorConfig(tool_catalog=CATALOG, grounded_tasks=grounded)
        engine = ScriptedEngine(tiny_tokenizer, answers)
        return build_simulated_env(sim, EnvironmentConfig(reward="judge"), engine, tiny_tokenizer), engine

    env, engine = build(True)
    task = anyio.run(env.make_task, Knobs(difficulty=1.0, n_tools=5, n_expected_calls=1), random.Random(0))
    assert task.first_query == "What is 9 plus 7?" and len(engine.prompts) == 2
    m = env.step_metrics()
    assert (m["sim/tasks_rejected"], m["sim/tasks_ungrounded"]) == (1.0, 1.0)
    assert env.step_metrics()["sim/tasks_rejected"] == 0.0  # per step, not cumulative

    env, engine = build(False)  # off: the first scenario is taken as written
    task = anyio.run(env.make_task, Knobs(difficulty=1.0, n_tools=5, n_expected_calls=1), random.Random(0))
    assert task.first_query == "What is 2 plus 3?" and env.step_metrics()["sim/tasks_rejected"] == 0.0


def test_worked_scenarios_are_of_the_focus_tool_over_the_tasks_own_draw(tiny_tokenizer):
    """The one reference call is held to the focus tool (the grammar's schema names it alone),
    and every worked scenario calls that same tool with the same tools block as the request."""
    seen = set()
    for seed in range(6):
        sim = SimulatorConfig(tool_catalog=CATALOG, few_shot=2)
        engine = FakeJsonEngine(tiny_tokenizer, seed=seed)
        env = build_simulated_env(sim, EnvironmentConfig(reward="judge"), engine, tiny_tokenizer)
        task = anyio.run(env.make_task, Knobs(difficulty=1.0, n_tools=4, n_expected_calls=1), random.Random(seed))
        name = task.expected_calls[0].name
        seen.add(name)
        text = tiny_tokenizer.decode(engine.prompts[0])
        turns = text.split("<|im_start|>")
        answers = [  # the tiny model's template writes an empty think block first
            t.split("</think>")[-1].replace("<|im_end|>", "").strip() for t in turns if t.startswith("assistant")
        ]
        worked = [json.loads(a) for a in answers if a]
        assert len(worked) == 2 and all(w["expected_calls"][0]["name"] == name for w in worked)
        requests = [t for t in turns if t.startswith("user")]
        assert len(requests) == 3 and len({r.split("Now write the task")[0] for r in requests}) == 1
    assert len(seen) >= 2  # the focus varies with the task


def test_worked_tool_calls_hold_real_results_before_every_task_block(tiny_tokenizer):
    sim = SimulatorConfig(tool_catalog=CATALOG, tool_few_shot=5, judge_mode="scripted")
    engine = FakeJsonEngine(tiny_tokenizer)
    env = build_simulated_env(sim, EnvironmentConfig(reward="judge"), engine, tiny_tokenizer)
    knobs = Knobs(difficulty=1.0, n_tools=5, n_expected_calls=1)
    task = anyio.run(env.make_task, knobs, random.Random(0))
    state = anyio.run(env.start, task, "e0")
    log = state.data["sim"].log
    worked, block = log.messages[1:11], log.messages[11]
    assert block.content.startswith("TASK") and worked[0].content.startswith("Worked examples of the TOOL part")
    store: dict[str, str] = {}
    for request, answer in zip(worked[::2], worked[1::2], strict=True):
        call = json.loads(request.content.split("AGENT CALLS: ")[1].split("\n")[0])
        real = execute(ToolCall(name=call["name"], arguments=call["arguments"]), store)
        fields = {f["key"]: f["value"] for f in json.loads(answer.content)["fields"]}
        assert {k: str(v) for k, v in fields.items()} == {k: str(v) for k, v in real.items()}
    assert {json.loads(r.content.split("AGENT CALLS: ")[1].split("\n")[0])["name"] for r in worked[::2]} == {
        "add",
        "multiply",
        "convert_units",
        "kv_set",
        "kv_get",
    }
    n = len(engine.prompts)
    call = ToolCall(name="add", arguments={"a": 2, "b": 3})
    anyio.run(state.data["sim"].tools.run_turn, log, [call])
    assert "Worked examples of the TOOL part" in tiny_tokenizer.decode(engine.prompts[n])  # the tool role reads them

    plain = build_simulated_env(
        SimulatorConfig(tool_catalog=CATALOG), EnvironmentConfig(reward="judge"), engine, tiny_tokenizer
    )
    assert len(anyio.run(plain.start, task, "e1").data["sim"].log.messages) == 2  # 0: none


@pytest.mark.parametrize("field", ["few_shot", "tool_few_shot"])
def test_cpu_trustee_uses_the_checks(field):
    from trustee.config import load_config

    cfg = load_config(str(ROOT / "configs/cpu-trustee.toml"), [])
    assert getattr(cfg.simulator, field) > 0 and cfg.simulator.grounded_tasks
