"""The simulated (TRUSTEE) environment through the training loop on CPU: every step's record
in metrics.jsonl carries the simulator's figures (sim/*) and the curriculum's per-aspect
figures; no simulator output is cut; every task is made. Tiny random models on the HF engine;
the judge is the scripted one (named as such: the random simulator cannot judge)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, out: Path, sets: list[str]) -> list[dict]:
    """`python -m trustee.run CONFIG --out OUT --set ...`; its metrics.jsonl records."""
    args = [config, "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run([sys.executable, "-m", "trustee.run", *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # about 6 minutes on 2 busy cores; test_train.py runs one simulated step by default
def test_metrics_carry_sim_and_curriculum_figures_every_step(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    sets = [
        f"model.path={tiny_model_dir}",
        "model.tiny=''",
        "grpo.steps=2",
        "grpo.tasks_per_step=2",
        "grpo.group_size=2",
        "grpo.filter_zero_variance=false",
        "rollout.max_turns=2",
        "rollout.max_tokens_per_turn=24",
        "checkpoint.every_steps=0",
        "logging.progress_bar=false",
        "environment.kind=simulated",
        "environment.reward=judge",
        "simulator.judge_mode=scripted",
        "simulator.max_user_turns=1",
    ]
    recs = _run("configs/cpu-tiny.toml", out, sets)
    assert [x["step"] for x in recs] == [0, 1]
    for rec in recs:
        assert rec["tasks_failed"] == 0.0 and rec["episodes"] == 4.0
        assert rec["sim/cut"] == 0.0 and rec["sim/refused"] == 0.0
        assert rec["sim/requests"] >= rec["sim/requests/task"] >= 4.0  # >= 1 tool + 1 scenario per task
        assert rec["sim/prompt_tokens"] > 0 and 0.0 <= rec["sim/prefix_share_est"] <= 1.0
        assert rec["sim/latency_p95_s"] >= rec["sim/latency_p50_s"] > 0.0
        assert "sim/retries/task" in rec
        assert "curriculum/soft_share" in rec and "curriculum/difficulty" in rec
        assert any(k.startswith("curriculum/success/n_tools=") for k in rec)
    for line in (out / "trajectories.jsonl").read_text().splitlines():
        t = json.loads(line)["trajectory"]
        assert t["status"] in ("ok", "truncated") and t["reward"] in (-1.0, 0.0, 1.0)


@pytest.mark.slow  # builds and warms the tiny simulator once (about 12 minutes on one core), then 3 steps
def test_cpu_sim_config_makes_toy_tasks_and_trains_groups_with_reward_variance(tmp_path):
    cache = Path(os.environ.get("TRUSTEE_TEST_CACHE", ROOT / ".cache"))  # built once, reused after
    out = tmp_path / "run"
    sets = [
        f"model.path={cache / 'models' / 'tiny-toy-sft'}",
        f"simulator.model_path={cache / 'models' / 'tiny-sim-sft'}",
        "grpo.steps=3",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        "logging.progress_bar=false",
    ]
    recs = _run("configs/cpu-sim.toml", out, sets)
    assert all(rec["tasks_failed"] == 0.0 and rec["sim/cut"] == 0.0 for rec in recs)
    assert sum(rec["groups_trained"] for rec in recs) >= 1  # some group's episodes scored differently
    queries = []
    for line in (out / "trajectories.jsonl").read_text().splitlines():
        messages = json.loads(line)["trajectory"]["messages"]
        queries.append(next(m["content"] for m in messages if m["role"] == "user"))
    toy = ("What is", "Convert", "Save the value", "stored under")
    # the warmed simulator writes toy questions (a random one writes runs of digits)
    assert sum(any(q.startswith(t) or t in q for t in toy) for q in queries) >= len(queries) // 2, queries[:8]
