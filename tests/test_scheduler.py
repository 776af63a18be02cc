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


class FakeSlowEngine(FakeAnsweringPolicy):
    """Test double: FakeAnsweringPolicy whose requests wait until `gate` opens (a stalled
    engine), counting requests in flight."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.gate = anyio.Event()
        self.active = 0
        self.peak = 0

    async def generate(self, prompt, params, *, key=None):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.gate.wait()
            return await super().generate(prompt, params, key=key)
        finally:
            self.active -= 1


class FakeEpisodeRunner:
    """Test double for EpisodeRunner: one engine call per episode and a 2,000-token trajectory
    (the memory an episode holds), without chat rendering, so 512 episodes fit a CPU test."""

    def __init__(self, engine):
        self.engine = engine

    async def run(self, env, task, episode_id, *, group=None):
        from trustee.types import Trajectory

        comp = await self.engine.generate([1, 2, 3], Sampling(max_tokens=8), key=episode_id)
        n = 2000
        return Trajectory(
            episode_id=episode_id,
            task_id=task.id,
            tokens=[7] * n,
            loss_mask=[0] * (n - 1) + [1],
            logprobs=[0.0] * (n - 1) + [-1.0],
            versions=[-1] * (n - 1) + [comp.policy_version],
            prompt_len=n - 1,
            reward=1.0,
        )


def test_512_episodes_in_flight_memory_bounded_backpressure_and_clean_shutdown(tiny_tokenizer):
    """64 groups x 8 episodes in flight against a deliberately slow consumer (the learner):
    traced memory stops growing, no more groups start than slots + buffer allow, and
    cancelling the scheduler leaves no task and no request running."""
    import asyncio
    import tracemalloc

    group_size, groups_inflight, buffer = 8, 64, 4

    async def main():
        policy = FakeSlowEngine(tiny_tokenizer)
        sched = GroupScheduler(
            env=ToyEnv(),
            runner=FakeEpisodeRunner(policy),
            curriculum=Curriculum(CurriculumConfig()),
            group_size=group_size,
            max_inflight_groups=groups_inflight,
            max_staleness=10**6,
            version=lambda: policy.version,
            rng=random.Random(0),
            buffer=buffer,
        )
        before = set(asyncio.all_tasks())
        peaks = []
        consumed = 0
        tracemalloc.start()
        async with anyio.create_task_group() as tg:
            sched.start(tg)
            with anyio.fail_after(120):
                while policy.active < group_size * groups_inflight:
                    await anyio.sleep(0.05)
            # The engine is stalled with 512 episodes in flight: no group beyond the slots started.
            await anyio.sleep(0.2)
            assert sched.started == groups_inflight and policy.active == 512
            policy.gate.set()
            for _ in range(8):
                await anyio.sleep(0.3)  # the slow learner
                got = await sched.take(8)
                consumed += len(got)
                policy.version += 1
                # Backpressure: started groups never exceed consumed + slots + buffer.
                assert sched.started <= consumed + groups_inflight + buffer
                peaks.append(tracemalloc.get_traced_memory()[0])
            assert policy.peak == group_size * groups_inflight
            tg.cancel_scope.cancel()
        tracemalloc.stop()
        # Memory: later rounds hold no more than the first ones (+25% slack): nothing accumulates.
        assert max(peaks[4:]) <= 1.25 * max(peaks[:4]), peaks
        # Shutdown: nothing in flight, no task of the scheduler or its episodes left.
        assert sched.inflight == 0 and policy.active == 0
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
        assert left == []

    anyio.run(main, backend="asyncio")
