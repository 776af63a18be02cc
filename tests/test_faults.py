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
        "eval.every_steps=0",
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

    def poisoned(
        self, samples, *args, **kwargs
    ):  # test double: the real accumulate, then NaN gradients from step 1 on
        out = real(self, samples, *args, **kwargs)
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


def test_dead_engine_checkpoints_last_good_step_and_the_same_command_resumes(
    tmp_path, tiny_model_dir, monkeypatch
):
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


@pytest.mark.parametrize(("before_wake", "offload"), [("auto", False), ("never", True)])
def test_a_failed_wake_costs_no_trained_step_and_resume_continues_after_it(
    before_wake, offload, tmp_path, tiny_model_dir, monkeypatch
):
    """Colocated LoRA run: the policy engine sleeps while the learner trains; its wake after
    step 1's update raises. 'auto' has checkpointed step 1 before that wake (it is on disk when
    the wake runs); 'never' gets it written on the way out, here with learner.offload, so the
    AdamW state is on the host when the wake fails and comes back for the checkpoint. Either
    way the checkpoint is step 1's trained state (not step 0's boundary holding step 1's
    weights), and the same command continues at step 2, training no step twice."""
    from trustee.checkpoint import latest_checkpoint, load_checkpoint
    from trustee.engines.hf import HFEngine
    from trustee.interrupt import EXIT_FAULT, RunStopped
    from trustee.learn.learner import Learner

    real_wake, real_step = HFEngine.wake, Learner.step
    seen = {"wakes": 0, "steps": 0, "on_disk": None, "trained": None}

    async def wake_fails_at_step_1(self):  # test double: the real wake, except the second one raises
        seen["wakes"] += 1
        if seen["wakes"] == 2:
            seen["on_disk"] = (out / "checkpoints" / "step-000001").is_dir()
            raise RuntimeError("CUDA out of memory while mapping the KV cache (simulated)")
        return await real_wake(self)

    def counted_step(self, groups):  # the real step; its trainable weights kept for comparison
        m = real_step(self, groups)
        seen["steps"] += 1
        seen["trained"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return m

    monkeypatch.setattr(HFEngine, "wake", wake_fails_at_step_1)
    monkeypatch.setattr(Learner, "step", counted_step)
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        3,
        "placement.mode=colocate",
        "checkpoint.every_steps=0",
        f"checkpoint.before_wake={before_wake}",
        f"learner.offload={str(offload).lower()}",
    )
    with pytest.raises(RunStopped) as ei:
        _train(cfg, out)
    assert ei.value.status == EXIT_FAULT and "failed to wake" in ei.value.message
    assert seen["steps"] == 2 and seen["on_disk"] is (before_wake == "auto")
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-000001"
    state, meta = load_checkpoint(ckpt)
    assert meta["learner_steps"] == 2 and meta["policy_version"] == 2  # as if step 1's push had landed
    assert state["trainable"].keys() == seen["trained"].keys()
    assert all(torch.equal(state["trainable"][n], t) for n, t in seen["trained"].items())
    moments = [v for st in state["optimizer"]["state"].values() for v in st.values() if v.dim() > 0]
    # AdamW's moments as saved: full-sized and readable (an offloaded, emptied storage is not).
    assert moments and all(
        v.untyped_storage().nbytes() == v.numel() * 4 and torch.isfinite(v).all() for v in moments
    )
    assert [r["step"] for r in _metrics(out)] == [0, 1]  # step 1 trained: its record is kept
    monkeypatch.setattr(HFEngine, "wake", real_wake)
    _train(cfg, out)
    assert seen["steps"] == 3  # the resumed run trained step 2 only
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


class FakeGarbageSimulator:
    """Test double: the simulator engine of `trustee.sim.fakes.FakeJsonEngine` (schema-valid
    random JSON), except that a random 30% of its answers are undecodable garbage."""

    def __init__(self, tokenizer, rate=0.3, seed=0):
        import random

        from trustee.sim.fakes import FakeJsonEngine

        self.inner = FakeJsonEngine(tokenizer, seed=seed)
        self.rng = random.Random(seed + 1)
        self.rate = rate
        self.requests = 0
        self.garbage = 0
        self.version = 0

    async def generate(self, prompt, params, *, key=None):
        from trustee.engines.base import Completion

        self.requests += 1
        if self.rng.random() < self.rate:
            self.garbage += 1
            tok = self.inner.tokenizer
            ids = tok.encode('{"oops": [garbage', add_special_tokens=False) + [self.inner.eos_id]
            return Completion(
                token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0
            )
        return await self.inner.generate(prompt, params, key=key)

    async def sleep(self, level=1): ...
    async def wake(self): ...
    async def update_weights(self, update):
        raise NotImplementedError

    def stats(self):
        return self.inner.stats()

    async def close(self): ...


class FakeMalformedPolicy:
    """Test double for the policy engine: half its turns are a malformed tool call (invalid
    JSON inside <tool_call>), the rest a plain reply; counts the malformed ones."""

    def __init__(self, tokenizer, seed=0):
        import random

        self.bad = tokenizer.encode(
            '<tool_call>\n{"name": "x", "arguments": {bad}\n</tool_call><|im_end|>', add_special_tokens=False
        )
        self.ok = tokenizer.encode("Here is what I found.<|im_end|>", add_special_tokens=False)
        self.rng = random.Random(seed)
        self.malformed = 0
        self.version = 0

    async def generate(self, prompt, params, *, key=None):
        from trustee.engines.base import Completion

        bad = self.rng.random() < 0.5
        self.malformed += bad
        ids = list(self.bad if bad else self.ok)[: params.max_tokens]
        return Completion(
            token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop", policy_version=self.version
        )

    async def sleep(self, level=1): ...
    async def wake(self): ...

    async def update_weights(self, update):
        self.version += 1

    def stats(self):
        from trustee.engines.base import EngineStats

        return EngineStats()

    async def close(self): ...


def test_garbage_simulator_and_malformed_tool_calls_every_step_completes_every_fault_counted(
    tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch
):
    from trustee import train as train_mod

    fakes = {}

    def fake_engine(ecfg, model_path, cfg, res, *, role):
        fakes[role] = (
            FakeMalformedPolicy(tiny_tokenizer) if role == "policy" else FakeGarbageSimulator(tiny_tokenizer)
        )
        return fakes[role]

    envs = []
    real_env = train_mod.build_environment

    def keep_env(*a, **kw):
        envs.append(real_env(*a, **kw))
        return envs[-1]

    from trustee import placement as placement_mod

    monkeypatch.setattr(placement_mod, "build_engine", fake_engine)  # the placement builds the engines
    monkeypatch.setattr(train_mod, "build_environment", keep_env)
    steps = 3
    cfg = _cfg(
        tiny_model_dir,
        steps,
        "environment.kind=simulated",
        "environment.reward=judge",
        "curriculum.kind=fixed",
        "simulator.max_user_turns=1",
        "rollout.max_turns=3",
    )
    out = tmp_path / "run"
    _train(cfg, out)
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(steps))  # every step completed
    assert all(r["status/error"] == 0.0 for r in recs)  # no episode crashed
    sim, policy, stats = fakes["simulator"], fakes["policy"], envs[0].client.stats
    assert sim.garbage >= 5 and policy.malformed >= 3  # the faults really happened
    # Every simulator answer reached the client, and every garbage answer was counted: as a
    # decode retry, or (the last of a failed ask) as a failure. Retries of valid but rejected
    # answers count too, hence >=.
    assert stats.calls == sim.requests
    assert stats.retries + stats.failures >= sim.garbage
    assert recs[-1]["sim/retries_total"] == stats.retries and recs[-1]["sim/failures_total"] == stats.failures
    # Every malformed tool call the policy emitted is a counted format error of its episode.
    assert sum(r["format_errors"] for r in recs) == policy.malformed


@pytest.mark.parametrize("mode", ["abandon", "finish"])
def test_on_interrupt_abandon_drops_the_step_finish_completes_it(mode, tmp_path, tiny_model_dir, monkeypatch):
    """SIGINT arrives while step 1's episodes run: 'abandon' cancels them and checkpoints
    step 0; 'finish' completes step 1 and checkpoints it. Either way RunStopped(130)."""
    import os
    import signal

    from trustee.engines.hf import HFEngine
    from trustee.interrupt import RunStopped

    real = HFEngine.generate
    calls = {"n": 0}

    async def generate(self, prompt, params, *, key=None):  # the real generate; SIGINT once in step 1
        calls["n"] += 1
        if key and key.startswith("s1") and not calls.get("sent"):
            calls["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return await real(self, prompt, params, key=key)

    monkeypatch.setattr(HFEngine, "generate", generate)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    with pytest.raises(RunStopped) as ei:
        _train(_cfg(tiny_model_dir, 4, "checkpoint.every_steps=0", f"checkpoint.on_interrupt={mode}"), out)
    assert ei.value.status == 128 + signal.SIGINT
    done = 1 if mode == "abandon" else 2
    assert [r["step"] for r in _metrics(out)] == list(range(done))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{done - 1:06d}"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
