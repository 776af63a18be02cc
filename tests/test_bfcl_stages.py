"""Environment Tuning's four stages run through the real episode runner on the tiny model
(CPU, HF engine): the staged curriculum hands each stage's reward / hints / split to the BFCL
environment, episodes finish, and the reward is the stage's (syntax, then progress)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

pytest.importorskip("bfcl_eval", reason="needs bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23 mpmath)")

from trustee.chat.render import project_template
from trustee.config import RolloutConfig, load_config
from trustee.curriculum import Curriculum
from trustee.envs.bfcl import BfclEnv
from trustee.rollout.episode import EpisodeRunner

ROOT = Path(__file__).resolve().parents[1]


def test_envtuning_config_loads_and_names_four_stages():
    cfg = load_config(ROOT / "configs" / "bfcl-envtuning.toml")
    stages = cfg.curriculum.stages
    assert [s.reward for s in stages] == ["syntax", "progress", "progress", "progress"]
    assert [s.hints for s in stages] == [False, True, True, False]
    assert [s.split for s in stages] == ["base", "base", "all", "all"]
    assert cfg.environment.bfcl.train_fraction == 0.5 and cfg.environment.kind == "bfcl"


def test_each_stage_runs_through_the_episode_runner(tiny_model_dir):
    from trustee.engines.hf import HFEngine

    cfg = load_config(ROOT / "configs" / "bfcl-cpu-tiny.toml")
    env = BfclEnv.from_config(cfg.environment.bfcl, cfg.environment.reward)
    cur = Curriculum(cfg.curriculum)
    engine = HFEngine.from_pretrained(tiny_model_dir, max_batch=4, max_model_len=16384)
    from transformers import AutoTokenizer

    runner = EpisodeRunner(
        policy=engine,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        cfg=RolloutConfig(max_turns=1, max_tokens_per_turn=8, temperature=1.0),
        max_model_len=16384,
        template=project_template(),
    )
    rng = random.Random(0)

    async def scenario():
        seen = []
        for _ in cfg.curriculum.stages:
            stage = cur.stage
            task = await env.make_task(cur.sample(rng), rng)
            assert task.payload["reward"] == stage.reward and task.payload["hints"] == stage.hints
            if stage.split == "base":
                assert task.payload["category"] == "base"
            traj = await runner.run(env, task, f"{stage.name}/0")
            assert traj.status in ("ok", "truncated"), traj.error
            assert 0.0 <= traj.reward <= 1.0
            assert traj.reward == traj.parts[stage.reward]
            assert sum(traj.loss_mask) > 0  # the policy sampled tokens
            seen.append(stage.name)
            for _ in range(stage.advance_after_steps or 1):
                cur.update([traj.reward])
        await engine.close()
        return seen

    assert asyncio.run(scenario()) == [s.name for s in cfg.curriculum.stages]
