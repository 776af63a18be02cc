"""Faults during a run, in process: a non-finite loss/gradient, a dead engine, a full disk at
checkpoint time. Each test shows the run's reaction (skip and count, stop with the reason and
a checkpoint of the last good state, warn and keep the previous checkpoint) and that the same
command continues afterwards."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import anyio
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_model_dir, steps, *extra):
    from trustee.config import load_config

    sets = [
        f"model.path={tiny_model_dir}",
        "model.tiny=''",
        f"grpo.steps={steps}",
        "grpo.tasks_per_step=2",
        "grpo.group_size=2",
        "grpo.filter_zero_variance=false",
        "rollout.max_turns=2",
        "rollout.max_tokens_per_turn=16",
        "checkpoint.every_steps=1",
        "logging.progress_bar=false",
        *extra,
    ]
    return load_config(ROOT / "configs/cpu-tiny.toml", sets)


def _train(cfg, out):
    from trustee.config import resolve
    from trustee.train import train

    return anyio.run(train, cfg, resolve(cfg, out), backend="asyncio")


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_gradients_skip_the_step_and_a_streak_stops_the_run(tmp_path, tiny_model_dir, monkeypatch):
    from trustee.checkpoint import load_checkpoint
    from trustee.interrupt import EXIT_FAULT, NONFINITE_STREAK, RunStopped
    from trustee.learn.learner import Learner

    real = Learner.accumulate
    calls = {"n": 0}

    def poisoned(self, samples):  # test double: the real accumulate, then NaN gradients from step 1 on
        out = real(self, samples)
        calls["n"] += 1
        if calls["n"] > 1:
            for p in self.policy.trainable_parameters():
                p.grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(Learner, "accumulate", poisoned)
    out = tmp_path / "run"
    with pytest.raises(RunStopped) as ei:
        _train(_cfg(tiny_model_dir, 8), out)
    assert ei.value.status == EXIT_FAULT
    assert f"{NONFINITE_STREAK} steps in a row had a non-finite loss or gradient" in ei.value.message
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(1 + NONFINITE_STREAK))
    assert [r["learn/skipped_nonfinite"] for r in recs] == [0] + [1] * NONFINITE_STREAK
    # Skipped steps did not move the optimiser: its step count stays at 1.
    assert [r["learn/step"] for r in recs] == [1] * (1 + NONFINITE_STREAK)
    # The last checkpoint holds finite weights, equal to those after step 0 (nothing applied since).
    last, meta = load_checkpoint(out / "checkpoints" / f"step-{NONFINITE_STREAK:06d}")
    assert meta["learner_steps"] == 1
    assert all(torch.isfinite(t).all() for t in last["trainable"].values())
    assert all(math.isfinite(r["learn/grad_norm"] or 0.0) for r in recs[:1])


def test_dead_engine_checkpoints_last_good_step_and_the_same_command_resumes(tmp_path, tiny_model_dir, monkeypatch):
    from trustee.engines.hf import HFEngine
    from trustee.interrupt import EXIT_FAULT, RunStopped

    real = HFEngine._step
    state = {"n": 0, "dead": False}

    def dies(self, b):  # test double: the engine's decode fails for good after step 0
        state["n"] += 1
        if state["dead"]:
            raise RuntimeError("engine process gone (simulated)")
        return real(self, b)

    monkeypatch.setattr(HFEngine, "_step", dies)
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, 3, "checkpoint.every_steps=0")

    from trustee import train as train_mod

    real_step = train_mod._Run.step

    async def step_then_die(self, step, *a, **kw):
        rec = await real_step(self, step, *a, **kw)
        state["dead"] = True  # the engine dies while step 1 is being collected
        return rec

    monkeypatch.setattr(train_mod._Run, "step", step_then_die)
    with pytest.raises(RunStopped) as ei:
        _train(cfg, out)
    assert ei.value.status == EXIT_FAULT
    assert "FatalEngineError" in ei.value.message and "run the same command to resume" in ei.value.message
    # every_steps = 0: no scheduled checkpoint before the end, so this one is the fault's.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000"]
    assert [r["step"] for r in _metrics(out)] == [0]
    monkeypatch.setattr(HFEngine, "_step", real)
    monkeypatch.setattr(train_mod._Run, "step", real_step)
    _train(cfg, out)
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2]


def test_full_disk_at_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import trustee.checkpoint as ck
    from trustee.checkpoint import latest_checkpoint, load_checkpoint

    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # test double: step 1's checkpoint hits ENOSPC half way
        if "step-000001" in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, 2)
    _train(cfg, out)  # the run goes on past a failed checkpoint
    printed = capsys.readouterr().out
    assert "checkpoint of step 1 failed" in printed and "step-000000 is intact" in printed
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000"]  # no partial left
    state, meta = load_checkpoint(latest_checkpoint(out))
    assert meta["step"] == 0 and all(torch.isfinite(t).all() for t in state["trainable"].values())
