"""GroupScheduler: bounded in-flight groups, backpressure, staleness filter, task failures."""

from __future__ import annotations

import random

import anyio

from trustee.config import CurriculumConfig, RolloutConfig
from trustee.curriculum import Curriculum
from trustee.engines.base import Completion, EngineStats, Sampling
from trustee.envs.toy import ToyEnv
from trustee.rollout.episode import EpisodeRunner
from trustee.rollout.scheduler import GroupScheduler, oldest_version


class FakeAnsweringPolicy:
    """Test double: answers every turn with a fixed text after a short pause, tagged with its
    current `version` (bumped by the test to play the learner)."""

    def __init__(self, tokenizer):
        self.ids = tokenizer.encode("The answer is 7.<|im_end|>", add_special_tokens=False)
        self.version = 0
        self.calls = 0

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        self.calls += 1
        await anyio.sleep(0.01)
        return Completion(
            token_ids=list(self.ids),
            logprobs=[-1.0] * len(self.ids),
            finish_reason="stop",
            policy_version=self.version,
        )

    async def sleep(self, level: int = 1) -> None: ...
    async def wake(self) -> None: ...
    async def update_weights(self, update) -> None: ...
    async def close(self) -> None: ...
    def stats(self) -> EngineStats:
        return EngineStats()


class FailingToyEnv(ToyEnv):
    """Test double: every other task cannot be made."""

    def __init__(self):
        super().__init__()
        self.n = 0

    async def make_task(self, knobs, rng):
        self.n += 1
        if self.n % 2 == 0:
            raise ValueError("simulated task-generation failure")
        return await super().make_task(knobs, rng)


def _scheduler(tokenizer, env=None, **kw):
    policy = FakeAnsweringPolicy(tokenizer)
    runner = EpisodeRunner(
        policy=policy, tokenizer=tokenizer, cfg=RolloutConfig(max_turns=2), max_model_len=4096
    )
    sched = GroupScheduler(
        env=env or ToyEnv(),
        runner=runner,
        curriculum=Curriculum(CurriculumConfig()),
        group_size=2,
        version=lambda: policy.version,
        rng=random.Random(0),
        **kw,
    )
    return sched, policy


def test_backpressure_bounds_started_groups(tiny_tokenizer):
    async def main():
        sched, _ = _scheduler(tiny_tokenizer, max_inflight_groups=2, max_staleness=1, buffer=1)
        async with anyio.create_task_group() as tg:
            sched.start(tg)
            await anyio.sleep(1.0)  # nobody consumes
            # 2 slots held by finished groups blocked on the full buffer, plus the 1 buffered.
            assert sched.started == 3 and sched.peak_inflight <= 2
            got = await sched.take(2)
            assert len(got) == 2 and all(len(x.group.trajectories) == 2 for x in got)
            tg.cancel_scope.cancel()

    anyio.run(main, backend="asyncio")


def test_stale_groups_are_dropped_and_counted(tiny_tokenizer):
    async def main():
        sched, policy = _scheduler(tiny_tokenizer, max_inflight_groups=2, max_staleness=1, buffer=2)
        async with anyio.create_task_group() as tg:
            sched.start(tg)
            await anyio.sleep(1.0)  # groups sampled at version 0 wait in the buffer and slots
            policy.version = 2  # two learner steps later
            got = await sched.take(2)
            assert sched.dropped_stale >= 2
            assert all(policy.version - oldest_version(x.group) <= 1 for x in got)
            tg.cancel_scope.cancel()

    anyio.run(main, backend="asyncio")


def test_tasks_that_cannot_be_made_are_counted_not_fatal(tiny_tokenizer):
    async def main():
        sched, _ = _scheduler(
            tiny_tokenizer, env=FailingToyEnv(), max_inflight_groups=2, max_staleness=1, buffer=2
        )
        async with anyio.create_task_group() as tg:
            sched.start(tg)
            got = await sched.take(3)
            assert len(got) == 3 and sched.task_errors >= 2
            tg.cancel_scope.cancel()

    anyio.run(main, backend="asyncio")
