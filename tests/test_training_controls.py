"""The GRPO/DAPO training controls: several updates per batch (the clip binds), the proximal
log-probs, dynamic sampling, truncated-episode handling, curriculum thresholds from the
reward range, held-out evaluation and the closing summary."""

from __future__ import annotations

import copy
import json
import random
import re

import anyio
import msgspec
import pytest
import torch
from test_learn_policy import fixed_groups

from trustee.config import ConfigError, CurriculumConfig, EvalConfig, GrpoConfig, LearnerConfig, load_config
from trustee.curriculum import Curriculum
from trustee.learn.advantages import compute_advantages, drop_truncated, overlong_penalty, shape_overlong
from trustee.learn.learner import Learner
from trustee.learn.policy import wrap_policy
from trustee.types import Counters, Group, Trajectory


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _learner(base_model, **grpo) -> Learner:
    lcfg = LearnerConfig(mode="full", lr=5e-2, gradient_checkpointing=False, max_grad_norm=0.0)
    policy = wrap_policy(copy.deepcopy(base_model), lcfg)
    return Learner(policy, GrpoConfig(beta=0.0, **grpo), lcfg, total_steps=10)


# ----------------------------------------------------------------------------- updates per batch


def test_one_update_per_batch_cannot_clip(base_model):
    learner = _learner(base_model)
    before = torch.cat([p.detach().flatten().clone() for p in learner.policy.trainable_parameters()])
    m = learner.step(fixed_groups())
    after = torch.cat([p.detach().flatten() for p in learner.policy.trainable_parameters()])
    assert m.optimizer_steps == 1
    assert m.clip_frac == 0.0
    assert m.ratio_min == pytest.approx(1.0) and m.ratio_max == pytest.approx(1.0)
    assert m.update_norm > 0.0 and m.param_norm > 0.0
    assert m.update_norm == pytest.approx(float((after - before).double().norm()), rel=1e-6)
    assert m.param_norm == pytest.approx(float(after.double().norm()), rel=1e-6)


def test_several_updates_per_batch_make_the_clip_bind(base_model):
    learner = _learner(base_model, updates_per_batch=4, mini_batches=2, clip_low=0.05, clip_high=0.05)
    m = learner.step(fixed_groups())
    assert m.optimizer_steps == 8
    # After the first update the policy has moved away from the proximal log-probs: the
    # ratio leaves [1 - 0.05, 1 + 0.05] and the clip zeroes some tokens' gradient.
    assert m.clip_frac > 0.0, m
    assert m.ratio_max > 1.05 or m.ratio_min < 0.95


def test_old_logprobs_are_the_learners_own_before_the_update(base_model):
    learner = _learner(base_model, updates_per_batch=2)
    groups = fixed_groups()
    from trustee.learn.learner import samples_from_groups

    samples = samples_from_groups(groups)
    old = learner.old_logprobs(samples)
    assert [len(o) for o in old] == [s.n_loss for s in samples]
    # With a single update, the first micro-step's ratio is exactly 1: old == logp.
    again = learner.old_logprobs(samples)
    for a, b in zip(old, again, strict=True):
        assert torch.equal(a, b)


def test_update_plan_covers_every_sample_once_per_pass(base_model):
    learner = _learner(base_model, updates_per_batch=3, mini_batches=4)
    plan = learner.update_plan(10)
    assert len(plan) == 12
    for p in range(3):
        assert sorted(i for part in plan[4 * p : 4 * p + 4] for i in part) == list(range(10))


def test_clip_values_out_of_range_are_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[grpo]\nclip_low = 0.0\nclip_high = 20.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = str(e.value)
    assert "grpo.clip_low" in text and "grpo.clip_high" in text


# ----------------------------------------------------------------------------- truncation


def _traj(reward: float, status: str = "ok", n_loss: int = 4, task: str = "t") -> Trajectory:
    mask = [0, 0] + [1] * n_loss
    return Trajectory(
        episode_id=f"e{random.random()}",
        task_id=task,
        tokens=list(range(len(mask))),
        loss_mask=mask,
        logprobs=[-1.0 if m else 0.0 for m in mask],
        versions=[0 if m else -1 for m in mask],
        prompt_len=2,
        reward=reward,
        status=status,
        counters=Counters(),
    )


def test_overlong_penalty_ramp():
    kw = dict(budget=100, buffer=20, penalty=1.0)
    assert overlong_penalty(80, False, **kw) == 0.0
    assert overlong_penalty(90, False, **kw) == pytest.approx(0.5)
    assert overlong_penalty(100, False, **kw) == pytest.approx(1.0)
    assert overlong_penalty(10, True, **kw) == 1.0


def test_overlong_modes():
    g = Group(task_id="t", trajectories=[_traj(1.0), _traj(1.0, "truncated"), _traj(0.0)])
    same, n = shape_overlong([g], "train", budget=100, buffer=20, penalty=1.0)
    assert n == 1 and same[0].rewards == [1.0, 1.0, 0.0]
    pen, _ = shape_overlong([g], "penalty", budget=100, buffer=20, penalty=0.5)
    assert pen[0].rewards == [1.0, 0.5, 0.0]
    adv = compute_advantages([g])
    masked, dropped = drop_truncated(adv.groups)
    assert dropped == 1
    assert [t.status for t in masked[0].trajectories] == ["ok", "ok"]
    # The truncated episode stayed in the baseline: the advantages are those of the full group.
    assert masked[0].advantages == [adv.groups[0].advantages[0], adv.groups[0].advantages[2]]


# ----------------------------------------------------------------------------- curriculum


def test_curriculum_thresholds_follow_the_reward_range():
    c = Curriculum(CurriculumConfig(start_difficulty=10.0), reward_range=(0.0, 1.0))
    assert (c.low, c.high) == (0.5, 0.75)
    c.update([0.2] * 4)
    assert c.difficulty == 7.0  # a [0, 1] reward that stays low now lowers D
    t = Curriculum(CurriculumConfig(start_difficulty=10.0), reward_range=(-1.0, 1.0))
    assert (t.low, t.high) == (0.0, 0.5)  # TRUSTEE's defaults on its judge


def test_curriculum_pair_that_cannot_fire_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[environment]\nkind = "toy"\nreward = "graded"\n[curriculum]\nlow = 0.0\nhigh = 0.5\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "curriculum.low" in str(e.value) and "never fall" in str(e.value)


# ----------------------------------------------------------------------------- dynamic sampling


class _ScriptedToy:
    """Test double around the real toy environment: scores episodes by a scripted list of
    rewards per task, so some groups have no variance."""

    def __init__(self, rewards_by_task: list[list[float]]):
        from trustee.envs.toy import ToyEnv

        self.env = ToyEnv()
        self.name = "scripted-toy"
        self.reward_range = (0.0, 1.0)
        self.script = list(rewards_by_task)
        self.made = 0

    async def make_task(self, knobs, rng):
        task = await self.env.make_task(knobs, rng)
        task = msgspec.structs.replace(task, payload={**task.payload, "script": self.made})
        self.made += 1
        return task

    async def start(self, task, episode_id, group=None):
        st = await self.env.start(task, episode_id, group)
        st.data["i"] = int(episode_id.rsplit("/", 1)[1])
        return st

    async def step(self, state, action):
        state.done = True
        return []

    async def score(self, state):
        from trustee.envs.base import Score

        rs = self.script[state.task.payload["script"] % len(self.script)]
        return Score(reward=rs[state.data["i"] % len(rs)])


def test_dynamic_sampling_replaces_zero_variance_groups(tiny_model_dir, tiny_tokenizer):
    from trustee.config import Config, RolloutConfig
    from trustee.engines.hf import HFEngine
    from trustee.rollout.episode import EpisodeRunner
    from trustee.train import collect, has_variance

    # Tasks alternate: flat (no variance), flat, useful.
    env = _ScriptedToy([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cfg = msgspec.convert(
        {
            "grpo": {
                "tasks_per_step": 3,
                "group_size": 2,
                "dynamic_sampling": True,
                "max_resample_rounds": 4,
            },
            "rollout": {"max_turns": 1, "max_tokens_per_turn": 2},
        },
        Config,
    )

    async def go():
        engine = HFEngine.from_pretrained(tiny_model_dir, max_model_len=2048)
        runner = EpisodeRunner(engine, tiny_tokenizer, cfg=RolloutConfig(max_turns=1, max_tokens_per_turn=2))
        metrics: dict[str, float] = {}
        try:
            groups, knobs = await collect(
                env, runner, Curriculum(CurriculumConfig()), cfg, random.Random(0), 0, metrics
            )
        finally:
            await engine.close()
        return groups, knobs, metrics

    groups, knobs, metrics = anyio.run(go)
    assert len(groups) == len(knobs)
    assert sum(has_variance(g) for g in groups) >= 3
    assert metrics["dynamic/rounds"] >= 1
    assert metrics["dynamic/groups_played"] == len(groups) > 3


# ----------------------------------------------------------------------------- held-out eval


def test_toy_heldout_split_is_fixed_and_never_trained_on():
    from trustee.envs.base import Knobs
    from trustee.envs.toy import ToyEnv, is_heldout

    env = ToyEnv()
    a = anyio.run(env.heldout_tasks, 16, Knobs())
    b = anyio.run(env.heldout_tasks, 16, Knobs())
    assert [t.first_query for t in a] == [t.first_query for t in b]
    assert all(is_heldout(t.first_query) for t in a)
    rng = random.Random(1)
    train = [env.task(Knobs(), rng) for _ in range(300)]
    assert not any(is_heldout(t.first_query) for t in train)


def test_heldout_eval_greedy_and_sampled(tiny_model_dir, tiny_tokenizer, capsys):
    from trustee.config import AspectRanges, RolloutConfig
    from trustee.engines.hf import HFEngine
    from trustee.envs.toy import ToyEnv
    from trustee.rollout.episode import EpisodeRunner
    from trustee.rollout.heldout import HeldOut

    async def go():
        engine = HFEngine.from_pretrained(tiny_model_dir, max_model_len=2048)
        runner = EpisodeRunner(engine, tiny_tokenizer, cfg=RolloutConfig(max_turns=1, max_tokens_per_turn=4))
        cfg = EvalConfig(heldout_tasks=3, heldout_samples=2, heldout_difficulty=40.0)
        h = HeldOut(ToyEnv(reward="graded"), runner, cfg, AspectRanges(), progress=True)
        assert {t.knobs["difficulty"] for t in await h.tasks()} == {40.0}
        try:
            return await h.run(0)
        finally:
            await engine.close()

    m = anyio.run(go)
    # a progress bar over the 9 episodes, with its ETA (elapsed<remaining) once one has ended
    assert re.search(r"held-out eval \(step 0\):.*[1-9]/9 \[\d\d:\d\d<\d\d:\d\d", capsys.readouterr().err)
    assert m["eval/greedy_episodes"] == 3 and m["eval/sampled_episodes"] == 6
    assert 0.0 <= m["eval/reward_greedy"] <= 1.0
    assert "eval/greedy/exact" in m
    assert all(
        0.0 <= m[f"eval/{mode}_{share}"] <= 1.0
        for mode in ("greedy", "sampled")
        for share in ("malformed", "truncated")
    )


def test_kl_metric_measures_the_drift_from_the_start(tiny_model_dir):
    from trustee.learn.policy import load_policy

    lcfg = LearnerConfig(mode="lora", lr=5e-2, lora_rank=4, gradient_checkpointing=False)
    policy = load_policy(str(tiny_model_dir), lcfg, device=torch.device("cpu"), dtype=torch.float32)
    learner = Learner(policy, GrpoConfig(beta=0.0, kl_metric=True), lcfg, total_steps=3)
    first = learner.step(fixed_groups())  # LoRA B starts at 0: the policy is the base
    second = learner.step(fixed_groups())
    assert first.kl == pytest.approx(0.0, abs=1e-7)
    assert second.kl > 0.0


def test_eval_during_training_logs_heldout_metrics(tmp_path, tiny_model_dir):
    from trustee.config import resolve
    from trustee.train import train

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "environment.kind=toy",
            "environment.reward=graded",
            "grpo.steps=2",
            "grpo.tasks_per_step=2",
            "grpo.group_size=2",
            "grpo.beta=0",
            "rollout.max_turns=1",
            "rollout.max_tokens_per_turn=8",
            "eval.every_steps=1",
            "eval.heldout_tasks=2",
            "eval.heldout_samples=1",
            "learner.lr=1e-3",
            "learner.gradient_checkpointing=false",
            "logging.progress_bar=false",
        ],
    )
    last = anyio.run(train, cfg, resolve(cfg, tmp_path / "run"))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval/reward_greedy" in r]
    # Before step 0, before step 1, and after the last update (its own record).
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert evals[-1]["final_eval"] == 1.0
    assert all(r["eval/greedy_episodes"] == 2 and r["eval/sampled_episodes"] == 2 for r in evals)
    assert all(0.0 <= r["health/malformed_share"] <= 1.0 for r in recs if not r.get("final_eval"))
    # Every held-out episode is written with its step and mode, and its reward is the one the
    # evaluation's metric averaged.
    played = [json.loads(x) for x in (tmp_path / "run" / "eval_trajectories.jsonl").read_text().splitlines()]
    assert sorted((p["step"], p["mode"]) for p in played) == sorted(
        (s, m) for s in (0, 1, 2) for m in ("greedy", "sampled") for _ in range(2)
    )
    for r in evals:
        mine = [p["trajectory"]["reward"] for p in played if p["step"] == r["step"] and p["mode"] == "greedy"]
        assert sum(mine) / len(mine) == pytest.approx(r["eval/reward_greedy"])
    lines = last["summary"].splitlines()  # trustee.summary's four lines
    assert len(lines) == 4 and lines[0].startswith("reward ") and lines[2].startswith("health ")


def test_bfcl_heldout_tasks_are_the_heldout_half():
    pytest.importorskip("bfcl_eval", reason="BFCL's data (tools/install.sh --dev installs bfcl-eval)")
    from trustee.envs.base import Knobs
    from trustee.envs.bfcl import BfclEnv

    env = BfclEnv(categories=("multi_turn_base",), split="train")
    held = anyio.run(env.heldout_tasks, 5, Knobs(difficulty=3.0))
    train_ids = {inst.id for inst in env.pool("all", "progress")}
    assert len(held) == 5
    assert not {t.id for t in held} & train_ids
    assert all(t.payload["hints"] is False and t.knobs["difficulty"] == 3.0 for t in held)
