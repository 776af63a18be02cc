"""The real path: a random-weight tiny simulator and a random-weight tiny policy, both on
the transformers engine (HFEngine, JSON constrained by xgrammar), on CPU. Every simulator
output must decode (no retries, no sim_error) and no episode may crash.

Default suite: 1 task x 4 episodes. `-m slow`: 8 tasks x 8 episodes = 64 episodes."""

from __future__ import annotations

import random

import anyio
import pytest

from trustee.config import CurriculumConfig, RolloutConfig
from trustee.curriculum import Curriculum
from trustee.envs.simulated import SimulatedEnv
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.sim.client import SimClient

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    from trustee.engines.hf import HFEngine

    sim = HFEngine.from_pretrained(tiny_model_dir, max_batch=64, seed=1)
    policy = HFEngine.from_pretrained(tiny_model_dir, max_batch=64, seed=2)
    yield sim, policy
    anyio.run(sim.close)
    anyio.run(policy.close)


def _run(engines, tiny_tokenizer, n_tasks: int, group: int, difficulty: float):
    sim, policy = engines
    client = SimClient(sim, tiny_tokenizer, max_tokens=512, max_decode_retries=2)
    env = SimulatedEnv(client, max_user_turns=2, task_max_tokens=2048, judge_votes=1)
    runner = EpisodeRunner(
        policy, tiny_tokenizer, cfg=RolloutConfig(max_turns=3, max_tokens_per_turn=32), max_model_len=4096
    )
    cur = Curriculum(CurriculumConfig(start_difficulty=difficulty))
    rng = random.Random(0)
    out = []

    async def one_task(i):
        task = await env.make_task(cur.sample(rng), random.Random(i))
        out.extend(await run_group(env, task, group, runner))

    async def main():
        async with anyio.create_task_group() as tg:
            for i in range(n_tasks):
                tg.start_soon(one_task, i)

    anyio.run(main)
    return client, env, out


def _check(client, env, trajs, expected):
    assert len(trajs) == expected
    statuses = [t.status for t in trajs]
    assert all(s in ("ok", "truncated") for s in statuses), [(t.status, t.error) for t in trajs]
    assert client.stats.failures == 0 and env.sim_errors == 0
    # 100% of simulator outputs decoded, first try
    assert client.stats.decoded == client.stats.calls, client.stats.recent_problems
    assert all(t.reward in (-1.0, 0.0, 1.0) for t in trajs)
    for t in trajs:
        t.check()
        assert sum(t.loss_mask) > 0 and t.counters.turns >= 1


def test_simulated_episodes_on_tiny_random_models(engines, tiny_tokenizer):
    client, env, trajs = _run(engines, tiny_tokenizer, n_tasks=1, group=4, difficulty=1.0)
    _check(client, env, trajs, 4)
    assert client.stats.by_role["task"] == 2 and client.stats.by_role["judge"] == 4


# The acceptance run, in the default suite (about a minute on 2 cores).
def test_64_simulated_episodes_on_tiny_random_models(engines, tiny_tokenizer):
    # D = 12: up to 2 tools. A random model fills every string to its bound, so larger tool
    # sets outgrow task_max_tokens (a real model writes far shorter strings).
    client, env, trajs = _run(engines, tiny_tokenizer, n_tasks=8, group=8, difficulty=12.0)
    _check(client, env, trajs, 64)
