"""bench/sim2real.py's plumbing, in seconds: the simulated tool replies checked against the real
toy tools, the simulated run's summary, and the real evaluation with both judges on the tiny
random model (its figures mean nothing; that they are computed from the right episodes is what
is checked). The benchmark itself (SmolLM2, about an hour) is `python -m bench.sim2real --quick`;
the whole pipeline on the tiny model is the slow test at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from bench.sim2real import judge_view, real_config, real_eval, same_result, sim_summary, tool_reply_match
from trustee.engines.base import LoraUpdate
from trustee.types import Message, ToolCall

ROOT = Path(__file__).resolve().parents[1]


def _episode(*turns: tuple[list[ToolCall], list[str]]) -> dict:
    """A trajectories.jsonl line as a training run writes it (a double of the run's log)."""
    messages = [Message(role="system", content="s"), Message(role="user", content="q")]
    for calls, replies in turns:
        messages.append(Message(role="assistant", tool_calls=calls))
        messages += [Message(role="tool", content=r) for r in replies]
    import msgspec

    return {
        "step": 0,
        "trajectory": {"messages": msgspec.to_builtins(messages), "counters": {"tool_calls": 1}},
    }


def test_simulated_tool_replies_are_checked_against_the_real_tools_on_a_replayed_store(tmp_path):
    add = ToolCall(name="add", arguments={"a": 2, "b": 3})
    put = ToolCall(name="kv_set", arguments={"key": "k", "value": "v"})
    get = ToolCall(name="kv_get", arguments={"key": "k"})
    conv = ToolCall(name="convert_units", arguments={"value": 1, "from_unit": "km", "to_unit": "m"})
    miss = ToolCall(name="kv_get", arguments={"key": "zz"})
    lines = [
        _episode(
            ([add], ['{"result": "5.0"}']),  # a number written as a string still matches
            ([put], ['{"ok": true}']),
            ([get], ['{"key": "k", "value": "v"}']),  # the store the episode's own calls wrote
            ([conv], ['{"result": 999, "unit": "m"}']),  # wrong value
            ([miss], ['{"key": "zz", "value": "x"}', '{"error": "malformed call"}']),  # real: not found
        ),
        _episode(([miss], ['{"error": "no such key"}'])),  # a fresh store per episode: both errors
    ]
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    share, compared = tool_reply_match(path)
    assert compared == 6  # the error observation after the last call has no call of its own
    assert share == pytest.approx(4 / 6)
    assert not same_result("not json", {"result": 1}) and not same_result(
        '{"result": 1, "x": 2}', {"result": 1}
    )


def test_the_simulated_run_summary_reads_each_steps_groups_and_tool_calls(tmp_path):
    recs = [
        {"step": 0, "reward_mean": -1.0, "groups_trained": 1.0, "groups_filtered": 1.0},
        {
            "step": 1,
            "reward_mean": 0.0,
            "groups_trained": 2.0,
            "groups_filtered": 1.0,
            "groups_malformed_only": 1.0,
        },
        {"step": 2, "reward_mean": 0.5, "groups_trained": 0.0, "groups_filtered": 2.0},
    ]
    path = tmp_path / "trajectories.jsonl"
    eps = [(0, 0), (0, 1), (1, 1), (1, 1)]
    path.write_text(
        "".join(json.dumps({"step": s, "trajectory": {"counters": {"tool_calls": c}}}) + "\n" for s, c in eps)
    )
    out = sim_summary(recs, path)
    assert out["sim_gain"] == pytest.approx(
        0.5 - (-1.0)
    )  # last half minus the first (the middle of 3 in neither)
    assert [r["groups_with_variance"] for r in out["per_step"]] == [1.0, 1.0, 0.0]
    assert not out["every_step_has_variance"]
    assert [r["tool_call_share"] for r in out["per_step"]] == [
        0.5,
        1.0,
        pytest.approx(float("nan"), nan_ok=True),
    ]


def test_the_judges_read_the_episode_from_its_own_opening_message():
    from trustee.types import Task

    task = Task(id="t", env="toy", tools=[], first_query="What is 2 plus 3?")
    msgs = [
        Message(role="system", content="s"),
        Message(role="user", content="What is 4 plus 5?"),  # a worked example
        Message(role="assistant", tool_calls=[ToolCall(name="add", arguments={"a": 4, "b": 5})]),
        Message(role="user", content="What is 2 plus 3?"),
        Message(role="assistant", content="5"),
    ]
    assert judge_view(task, msgs) == msgs[3:]


def test_real_evaluation_and_both_judges_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Control then trained adapter on the same held-out toy tasks, on one engine; both judges
    score every episode of both arms."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(
        tmp_path / "adapter"
    )
    adapter = LoraUpdate(config={}, path=str(tmp_path / "adapter"))
    cfg = real_config(
        str(tiny_model_dir), {"heldout_tasks": 2, "heldout_samples": 1}, ["rollout.max_tokens_per_turn=8"]
    )
    assert cfg.environment.kind == "toy" and cfg.environment.few_shot == 3  # cpu-smollm's prompts
    out = anyio.run(real_eval, cfg, tmp_path / "real", adapter, 512)
    control, trained = out["arms"]["control"], out["arms"]["trained"]
    assert control["policy_version"] == 0 and trained["policy_version"] == 1
    assert control["eval/greedy_episodes"] == trained["eval/sampled_episodes"] == 2.0
    ja = out["judge_agreement"]
    assert ja["episodes"] == 8  # 2 tasks x (greedy + 1 sample) x 2 arms
    assert ja["scripted"]["n"] == 8 and ja["scripted"]["judge_errors"] == 0
    assert ja["model"].get("n", 0) + ja["model"]["judge_errors"] == 8
    assert sum(ja["scripted"]["confusion"].values()) == 8


@pytest.mark.slow  # the whole pipeline through trustee.run on the tiny random model: 40 s to 5 min
def test_sim2real_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    sets = [
        "grpo.steps=2",
        "grpo.tasks_per_step=1",
        "grpo.group_size=2",
        "rollout.max_tokens_per_turn=16",
        "simulator.max_user_turns=1",
        "rollout.max_turns=2",
        # the toy teacher's worked scenarios outgrow 4,096 tokens in the tiny model's tokenizer
        "simulator.few_shot=0",
        # a random model's values are never in its own opening message: every task would be rejected
        "simulator.grounded_tasks=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "bench.sim2real",
        "--quick",
        "--out",
        str(out),
        "--runs",
        str(tmp_path / "runs"),
        "--model-path",
        str(tiny_model_dir),
        "--gen-tasks",
        "2",
    ]
    cmd += [a for s in sets for a in ("--set", s)]
    cmd += [
        "--real-set",
        "eval.heldout_tasks=2",
        "--real-set",
        "eval.heldout_samples=1",
        "--real-set",
        "rollout.max_tokens_per_turn=8",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "sim2real.json").read_text())
    for key in ("real_gain", "sim_gain", "task_valid_share", "tool_reply_match", "judge_agreement", "wall_s"):
        assert key in report
    assert [r["step"] for r in report["sim"]["per_step"]] == [0, 1]
    assert report["real"]["trained"]["policy_version"] == 1
    assert 0.0 <= report["task_valid_share"] <= 1.0 and report["generated_tasks"]["tasks"] == 2
    assert (out / "sim2real.md").exists() and (out / "sim2real.png").exists()
