"""The training loop end to end on CPU: steps run, weights reach the engine, a killed run
resumes from its last checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tiny_model_dir, out, steps, *extra):
    args = [
        "configs/cpu-tiny.toml",
        "--out",
        str(out),
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.tiny=''",
        "--set",
        f"grpo.steps={steps}",
        "--set",
        "grpo.tasks_per_step=2",
        "--set",
        "grpo.group_size=2",
        "--set",
        "grpo.filter_zero_variance=false",
        "--set",
        "rollout.max_turns=2",
        "--set",
        "rollout.max_tokens_per_turn=24",
        "--set",
        "checkpoint.every_steps=1",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "eval.every_steps=0",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "trustee.run", *args], capture_output=True, text=True, cwd=ROOT
    )


def _steps(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_loop_trains_syncs_weights_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = _run(tiny_model_dir, out, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _steps(out)
    assert [x["step"] for x in recs] == [0, 1]
    # Every step trained (zero-variance groups kept) and pushed an adapter: version 1, then 2.
    assert [x["policy_version"] for x in recs] == [1.0, 2.0]
    assert all(x["groups_trained"] == 2.0 and x["status/error"] == 0.0 for x in recs)
    assert sum(1 for _ in (out / "trajectories.jsonl").open()) == 8
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").exists()

    # Asking for 3 steps in the same directory continues at step 2 with the restored adapter.
    r = _run(tiny_model_dir, out, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _steps(out)
    assert [x["step"] for x in recs] == [0, 1, 2]
    # The restored adapter was pushed with its version restored (2) before step 2 trained (3).
    assert recs[-1]["policy_version"] == 3.0
    # The learner's step counter was restored too: this is its third optimiser step.
    assert recs[-1]["learn/step"] == 3

    # The final adapter is exported where `trustee.eval --run-dir` picks it up, and loads.
    import anyio

    from trustee.engines.hf import HFEngine
    from trustee.eval.__main__ import trained_adapter

    update = trained_adapter(out)
    assert update is not None and update.config["r"] == 8

    async def load():
        engine = HFEngine.from_pretrained(tiny_model_dir)
        await engine.update_weights(update)
        assert engine.version == 1
        await engine.close()

    anyio.run(load, backend="asyncio")


def test_overlap_mode_trains_while_episodes_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = _run(tiny_model_dir, out, 3, "--set", "placement.mode=overlap", "--set", "rollout.max_staleness=1")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _steps(out)
    assert [x["step"] for x in recs] == [0, 1, 2]
    assert [x["policy_version"] for x in recs] == [1.0, 2.0, 3.0]
    # Every trained token lags the version it was consumed at by at most max_staleness.
    for line in (out / "trajectories.jsonl").read_text().splitlines():
        rec = json.loads(line)
        sampled = [
            v for v, m in zip(rec["trajectory"]["versions"], rec["trajectory"]["loss_mask"], strict=True) if m
        ]
        assert sampled and rec["step"] - min(sampled) <= 1
    assert all("sched/dropped_stale" in x for x in recs)


def test_simulated_environment_runs_through_the_loop(tmp_path, tiny_model_dir):
    # The TRUSTEE path: the tiny random model plays task generator, user, tools and judge.
    out = tmp_path / "run"
    r = _run(
        tiny_model_dir,
        out,
        1,
        *("--set", "environment.kind=simulated", "--set", "environment.reward=judge"),
        *("--set", "simulator.max_user_turns=1", "--set", "curriculum.kind=fixed"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    [rec] = _steps(out)
    # A task the random simulator could not make is dropped and counted, never crashes the step.
    assert rec["episodes"] + 2 * rec["tasks_failed"] == 4.0 and rec["episodes"] >= 2
    assert rec["status/error"] == 0.0
    # Every episode either ended normally or was set aside as a simulator failure (never scored).
    assert rec["status/ok"] + rec["status/truncated"] + rec["status/sim_error"] == rec["episodes"]
    for line in (out / "trajectories.jsonl").read_text().splitlines():
        t = json.loads(line)["trajectory"]
        if t["status"] in ("ok", "truncated"):
            assert t["reward"] in (-1.0, 0.0, 1.0)
