"""Bring your own environment: the registry, kind 'python' factories, the tasks-file
environment (Python tools, reward functions, difficulty gating, typed file errors), the
config rules, and the example in examples/arithmetic training two steps end to end."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import anyio
import pytest
from run_harness import train_two_steps

from trustee.config import ConfigError, load_config
from trustee.envs import BUILDERS, build_environment, check_environment, needs_simulator
from trustee.envs.base import AgentAction, Knobs, Score
from trustee.envs.python import FactoryError, load_object
from trustee.envs.tasks_file import EpisodeView, TasksFileEnv, TasksFileError, load_tasks
from trustee.types import Message, ToolCall, ToolCallError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "arithmetic"
ADD = {
    "name": "add",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _run(coro_fn, *args):
    return anyio.run(coro_fn, *args, backend="asyncio")


def test_registry_lists_every_config_kind():
    from typing import get_args

    import msgspec

    from trustee.config import EnvironmentConfig

    [kind] = [f for f in msgspec.structs.fields(EnvironmentConfig) if f.name == "kind"]
    assert set(BUILDERS) == set(get_args(kind.type))


def test_load_tasks_errors_name_line_and_fix(tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"prompt": "hi", "tools": [ADD]}, {"prompt": "x"}])
    with pytest.raises(TasksFileError, match=r"t.jsonl:2: .*tools"):
        load_tasks(f)
    f = _write(
        tmp_path / "d.jsonl",
        [{"id": "a", "prompt": "p", "tools": []}, {"id": "a", "prompt": "q", "tools": []}],
    )
    with pytest.raises(TasksFileError, match="appears twice"):
        load_tasks(f)
    f = _write(tmp_path / "s.jsonl", [{"prompt": "p", "tools": [{"name": "x", "parameters": {"type": 5}}]}])
    with pytest.raises(TasksFileError, match="invalid tool schemas"):
        load_tasks(f)
    with pytest.raises(TasksFileError, match="not found"):
        load_tasks(tmp_path / "missing.jsonl")
    # OpenAI-wrapped schemas are accepted; the answer reaches the judge's goal text.
    f = _write(
        tmp_path / "ok.jsonl",
        [{"prompt": "1+1?", "tools": [{"type": "function", "function": ADD}], "answer": 2}],
    )
    [t] = load_tasks(f)
    assert t.tools[0].name == "add" and t.payload["answer"] == 2 and "Expected answer: 2" in t.goal


def test_python_tools_reward_function_and_errors_as_observations(tmp_path):
    tasks = load_tasks(
        _write(tmp_path / "t.jsonl", [{"id": "t1", "prompt": "1+2?", "tools": [ADD], "answer": 3}])
    )

    def add(a, b):
        if a < 0:
            raise ValueError("negative")
        return {"result": a + b}

    seen: list[EpisodeView] = []

    def reward(ep: EpisodeView) -> Score:
        seen.append(ep)
        return Score(reward=1.0 if "3" in ep.final else 0.0, parts={"calls": float(len(ep.calls))})

    env = TasksFileEnv(tasks, tools={"add": add}, reward=reward)

    async def play():
        task = await env.make_task(Knobs(), random.Random(0))
        st = await env.start(task, "e0", env.new_group(task))
        assert [m.role for m in st.messages] == ["user"]
        bad = ToolCallError(kind="invalid_json", message="bad json", raw="{")
        out = await env.step(
            st,
            AgentAction(
                message=Message(role="assistant"),
                calls=[
                    ToolCall(name="add", arguments={"a": 1, "b": 2}),
                    ToolCall(name="add", arguments={"a": -1, "b": 0}),
                ],
                errors=[bad],
            ),
        )
        assert [json.loads(m.content) for m in out] == [
            {"result": 3},
            {"error": "ValueError: negative"},
            {"error": "bad json"},
        ]
        assert not st.done
        assert await env.step(st, AgentAction(message=Message(role="assistant", content="It is 3."))) == []
        assert st.done
        return await env.score(st)

    score = _run(play)
    assert score.reward == 1.0 and score.parts == {"calls": 2.0, "function": 1.0}
    assert seen[0].answer == 3 and seen[0].call_errors == 1 and len(seen[0].results) == 2


def test_reward_out_of_range_is_an_error_naming_the_function(tmp_path):
    tasks = load_tasks(_write(tmp_path / "t.jsonl", [{"prompt": "p", "tools": [ADD]}]))

    def too_big(ep):
        return 7.0

    env = TasksFileEnv(tasks, tools={"add": lambda a, b: a + b}, reward=too_big)

    async def play():
        st = await env.start(tasks[0], "e")
        await env.step(st, AgentAction(message=Message(role="assistant", content="done")))
        await env.score(st)

    with pytest.raises(ValueError, match=r"too_big returned 7.0; return a float in \[-1, 1\]"):
        _run(play)


def test_missing_tool_function_and_missing_reward_are_refused(tmp_path):
    tasks = load_tasks(_write(tmp_path / "t.jsonl", [{"id": "t", "prompt": "p", "tools": [ADD]}]))
    with pytest.raises(ValueError, match=r"task 't' uses tools \['add'\] that have no Python function"):
        TasksFileEnv(tasks, tools={}, reward=lambda ep: 0.0)
    with pytest.raises(ValueError, match="reward"):
        TasksFileEnv(tasks, tools={"add": lambda a, b: 0})


def test_difficulty_gates_which_tasks_are_drawn():
    tasks = load_tasks(EXAMPLE / "tasks.jsonl")
    env = TasksFileEnv(
        tasks, tools={"add": lambda a, b: 0, "multiply": lambda a, b: 0}, reward=lambda ep: 0.0
    )

    async def draw(d: float) -> set[str]:
        rng = random.Random(0)
        return {(await env.make_task(Knobs(difficulty=d), rng)).id.split("-")[0] for _ in range(200)}

    assert _run(draw, 1.0) == {"add", "mul"}
    assert _run(draw, 50.0) == {"add", "mul", "chain"}


def test_load_object_by_module_file_and_entry_point(tmp_path):
    mod = tmp_path / "my_env.py"
    mod.write_text("def make_env(ctx):\n    return 'not an env'\n")
    assert load_object(f"{mod}:make_env", "environment.factory")(None) == "not an env"
    assert load_object("json:dumps", "environment.factory") is json.dumps
    with pytest.raises(FactoryError, match="has no 'nope'"):
        load_object(f"{mod}:nope", "environment.factory")
    with pytest.raises(FactoryError, match="entry point of group 'trustee.environments'"):
        load_object("no_such_env", "environment.factory")
    with pytest.raises(FactoryError, match="cannot import"):
        load_object("no_such_pkg.env:make", "environment.factory")


def _cfg(tmp_path, body: str):
    f = tmp_path / "c.toml"
    f.write_text(textwrap.dedent(body))
    return load_config(f)


def test_python_factory_must_return_an_environment(tmp_path):
    mod = tmp_path / "bad_env.py"
    mod.write_text(
        "class E:\n    name = 'e'\n    def make_task(self, k, r): ...\n\ndef make_env(ctx):\n    return E()\n"
    )
    cfg = _cfg(tmp_path, f'[environment]\nkind = "python"\nreward = "custom"\nfactory = "{mod}:make_env"\n')
    assert check_environment(cfg.environment) == []
    with pytest.raises(FactoryError, match=r"lacks start, step, score, make_task \(must be 'async def'\) of"):
        build_environment(cfg)


def test_config_rules_name_field_value_and_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, '[environment]\nkind = "python"\n')
    text = str(e.value)
    assert "environment.factory" in text and "environment.reward = 'judge'" in text and "'custom'" in text
    with pytest.raises(ConfigError, match=r"environment.options = .*only used with kind 'python'"):
        _cfg(tmp_path, '[environment]\nkind = "toy"\nreward = "exact"\n[environment.options]\nx = 1\n')
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, '[environment]\nkind = "tasks_file"\nreward = "function"\n')
    text = str(e.value)
    assert "environment.tasks_file.path" in text and "tools_module" in text and "reward_fn" in text
    cfg = _cfg(
        tmp_path,
        '[environment]\nkind = "tasks_file"\nreward = "function+judge"\n'
        '[environment.tasks_file]\npath = "x.jsonl"\ntools = "simulated"\nreward_fn = "m:f"\n',
    )
    assert needs_simulator(cfg.environment)
    assert "not found" in check_environment(cfg.environment)[0]


def test_example_configs_pass_the_start_up_checks():
    for name in ("config.toml", "tasks_file.toml"):
        cfg = load_config(EXAMPLE / name)
        assert check_environment(cfg.environment) == [], name
        assert not needs_simulator(cfg.environment)


def test_tasks_file_kind_builds_from_the_config_alone():
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the example's paths are relative to the repository root
    try:
        env = build_environment(load_config(EXAMPLE / "tasks_file.toml"))
    finally:
        os.chdir(cwd)
    assert isinstance(env, TasksFileEnv) and set(env.tools) == {"add", "multiply"}
    assert env.reward.__name__ == "reward" and env.judge is None


def test_example_trains_two_steps_through_kind_python(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recs, trajs = train_two_steps("examples/arithmetic/config.toml", out, tiny_model_dir)
    assert [x["step"] for x in recs] == [0, 1]
    assert [x["policy_version"] for x in recs] == [1.0, 2.0]
    assert all(x["groups_trained"] == 2.0 and x["status/error"] == 0.0 for x in recs)
    assert len(trajs) == 8
    # Every task came from the example's file; every reward is one the example's function gives.
    ids = {json.loads(line)["id"] for line in (EXAMPLE / "tasks.jsonl").read_text().splitlines()}
    assert {t["task_id"] for t in trajs} <= ids
    assert all(t["reward"] in (0.0, 0.25, 0.5, 1.0) and t["parts"]["function"] == t["reward"] for t in trajs)
    assert (out / "adapter" / "adapter_config.json").exists()
    base = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute()


def test_docs_contract_example_runs_and_meets_the_contract():
    # The from-scratch environment in docs/environments.md, executed as written.
    text = (ROOT / "docs" / "environments.md").read_text()
    code = next(b for b in text.split("```python")[1:] if "class EchoEnv" in b).split("```")[0]
    ns: dict = {}
    exec(compile(code, "docs/environments.md", "exec"), ns)
    from trustee.envs.python import missing_methods

    env = ns["make_env"](None)
    assert missing_methods(env) == []

    async def play():
        task = await env.make_task(Knobs(), random.Random(1))
        st = await env.start(task, "e")
        call = ToolCall(name="echo", arguments={"text": task.payload["word"]})
        [res] = await env.step(st, AgentAction(message=Message(role="assistant"), calls=[call]))
        assert json.loads(res.content) == {"echo": task.payload["word"]}
        await env.step(
            st, AgentAction(message=Message(role="assistant", content=f"It said {task.payload['word']}."))
        )
        return st.done, await env.score(st)

    done, score = _run(play)
    assert done and score.reward == 1.0


def test_simulated_tools_and_function_plus_judge_on_a_tiny_model(tmp_path, tiny_model_dir):
    # The real path: the tiny random model (HF engine, constrained JSON decoding) plays the
    # tool and the judge; the reward mixes the user's function and the judge 50/50.
    from transformers import AutoTokenizer

    from trustee.engines.hf import HFEngine
    from trustee.sim.client import SimClient
    from trustee.sim.judge import Judge

    tasks = load_tasks(
        _write(
            tmp_path / "t.jsonl",
            [
                {
                    "id": "w",
                    "prompt": "Weather in Oslo?",
                    "tools": [
                        {
                            "name": "weather",
                            "parameters": {
                                "type": "object",
                                "properties": {"city": {"type": "string"}},
                                "required": ["city"],
                            },
                        }
                    ],
                    "hidden_info": "Oslo is 3 C and raining.",
                    "answer": "3 C",
                }
            ],
        )
    )

    async def play():
        engine = HFEngine.from_pretrained(tiny_model_dir, max_model_len=4096)
        client = SimClient(
            engine, AutoTokenizer.from_pretrained(tiny_model_dir), max_tokens=384, max_decode_retries=2
        )
        env = TasksFileEnv(
            tasks,
            simulator=client,
            judge=Judge(client),
            reward=lambda ep: 1.0 if ep.calls else -1.0,
            judge_weight=0.5,
        )
        try:
            task = await env.make_task(Knobs(), random.Random(0))
            group = env.new_group(task)
            st = await env.start(task, "e0", group)
            call = ToolCall(name="weather", arguments={"city": "Oslo"})
            out = await env.step(st, AgentAction(message=Message(role="assistant"), calls=[call]))
            if st.sim_error:  # the random model failed its decode budget: counted, not an exception
                return st, None, group, out
            await env.step(st, AgentAction(message=Message(role="assistant", content="It is 3 C.")))
            return st, await env.score(st), group, out
        finally:
            await engine.close()

    st, score, group, out = _run(play)
    print(f"simulated tools: sim_error={st.sim_error!r} score={score}")
    if score is None:
        assert st.done and "tool" in st.sim_error
        return
    [res] = out
    assert res.role == "tool" and res.name == "weather" and isinstance(json.loads(res.content), dict)
    assert len(group.memo) == 1  # the group's consistency memo holds the call's answer
    if st.sim_error:  # the judge failed its budget: the episode is set aside, never scored
        assert score.reward == 0.0
        return
    assert score.parts["function"] == 1.0 and score.parts["judge"] in (-1.0, 0.0, 1.0)
    assert score.reward == pytest.approx(0.5 * 1.0 + 0.5 * score.parts["judge"])


def test_tasks_file_few_shot_examples_are_other_tasks_calls_with_offered_tools(tmp_path):
    rows = [
        {
            "id": f"t{i}",
            "prompt": f"What is {i} plus {i + 1}?",
            "tools": [ADD],
            "expected_calls": [{"name": "add", "arguments": {"a": i, "b": i + 1}}],
        }
        for i in range(5)
    ]
    rows.append(
        {
            "id": "other",
            "prompt": "Ping.",
            "tools": [{**ADD, "name": "ping"}],
            "expected_calls": [{"name": "ping", "arguments": {"a": 1, "b": 2}}],
        }
    )
    rows.append({"id": "nocalls", "prompt": "Say hi.", "tools": [ADD]})
    tasks = load_tasks(_write(tmp_path / "t.jsonl", rows))
    env = TasksFileEnv(
        tasks, tools={"add": lambda a, b: a + b, "ping": lambda a, b: 0}, reward=lambda v: 0.0, few_shot=2
    )
    by_id = {t.id: t for t in tasks}
    for task in [by_id["t0"], by_id["t3"], by_id["nocalls"]]:
        shots = env.examples(task)
        assert [m.role for m in shots] == ["user", "assistant"] * 2
        assert task.first_query not in [m.content for m in shots]  # never the task itself
        assert all(c.name == "add" for m in shots for c in m.tool_calls)  # only tools the task offers
        assert env.examples(task) == shots
        state = anyio.run(env.start, task, "e")
        assert state.messages[:-1] == shots and state.messages[-1].content == task.first_query
    assert TasksFileEnv(tasks, tools={"add": 0, "ping": 0}, reward=lambda v: 0.0).examples(by_id["t0"]) == []
