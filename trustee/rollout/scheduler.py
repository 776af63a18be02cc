"""Continuous rollout scheduling for placements where engines and learner run at once.

Owns `GroupScheduler`: it keeps up to `max_inflight_groups` GRPO groups running (each a task
from the curriculum and its G episodes), hands finished groups to the learner through a
bounded stream (backpressure: when the learner falls behind, finished groups wait, their
slots stay taken, and no new group starts), and drops groups that grew too stale by the time
they are consumed (`max_staleness`: the oldest sampled token's policy version may lag the
engine's current version by at most that much; the learner's IS correction handles the lag
that remains). Used by the training loop for placement 'overlap' and 'split'; placement
'sync' collects each step's groups in one go instead (`train.collect`).

It does not train or push weights: the loop does, while the scheduler's episodes go on.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trustee.curriculum import Curriculum
from trustee.engines.base import FatalEngineError
from trustee.envs.base import Environment, Knobs
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.types import Group

log = logging.getLogger("trustee.rollout")


def oldest_version(group: Group) -> int | None:
    """The smallest policy version of any sampled token in the group (None: nothing sampled)."""
    # versions[i] is -1 exactly where loss_mask[i] is 0 (Trajectory invariant), so the sampled
    # tokens' versions are the set of versions less -1 (set building runs in C: this is per group);
    # no token of the opening prompt is sampled, so the set starts after it.
    vs = set().union(*(t.versions[t.prompt_len :] for t in group.trajectories))
    vs.discard(-1)
    return min(vs) if vs else None


@dataclass
class ScheduledGroup:
    group: Group
    knobs: Knobs
    started_version: int


@dataclass
class GroupScheduler:
    """Producer of finished groups; `start(tg)` launches it, `take(n)` consumes.

    `version` returns the policy engine's current version (read when a group starts and
    when it is consumed).
    """

    env: Environment
    runner: EpisodeRunner
    curriculum: Curriculum
    group_size: int
    max_inflight_groups: int
    max_staleness: int
    version: Callable[[], int]
    rng: random.Random
    buffer: int = 0
    inflight: int = 0
    peak_inflight: int = 0
    started: int = 0
    dropped_stale: int = 0
    _send: MemoryObjectSendStream | None = None
    _recv: MemoryObjectReceiveStream | None = None
    _slots: anyio.Semaphore | None = None
    task_errors: int = 0
    max_task_errors: int = 20
    _failing: int = 0

    def start(self, tg: TaskGroup) -> None:
        if self.max_inflight_groups < 1:
            raise ValueError(f"max_inflight_groups = {self.max_inflight_groups}: need at least 1")
        self._send, self._recv = anyio.create_memory_object_stream[ScheduledGroup](
            max_buffer_size=self.buffer or math.inf
        )
        self._slots = anyio.Semaphore(self.max_inflight_groups, fast_acquire=True)
        tg.start_soon(self._produce, tg)

    async def _produce(self, tg: TaskGroup) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            knobs = self.curriculum.sample(self.rng)
            seed = self.rng.getrandbits(64)
            gid = f"g{self.started}"
            self.started += 1
            tg.start_soon(self._one, knobs, seed, gid)

    async def _one(self, knobs: Knobs, seed: int, gid: str) -> None:
        assert self._slots is not None and self._send is not None
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            v0 = self.version()
            try:
                task = await self.env.make_task(knobs, random.Random(seed))
            except FatalEngineError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed task is dropped; only a streak stops the run
                self.task_errors += 1
                self._failing += 1
                log.warning("task %s could not be made: %s: %s", gid, type(e).__name__, e)
                if self._failing >= self.max_task_errors:
                    raise RuntimeError(
                        f"{self._failing} tasks in a row could not be made; last error: {e}"
                    ) from e
                return
            self._failing = 0
            trajs = await run_group(self.env, task, self.group_size, self.runner, group_id=gid)
            # Blocks while the buffer is full: the slot stays taken, so no new group starts.
            await self._send.send(ScheduledGroup(Group(task_id=task.id, trajectories=trajs), knobs, v0))
        finally:
            self.inflight -= 1
            self._slots.release()

    async def take(self, n: int) -> list[ScheduledGroup]:
        """The next `n` groups fresh enough to train on (stale ones are dropped and counted)."""
        assert self._recv is not None, "call start() first"
        out: list[ScheduledGroup] = []
        while len(out) < n:
            item = await self._recv.receive()
            oldest = oldest_version(item.group)
            if oldest is not None and self.version() - oldest > self.max_staleness:
                self.dropped_stale += 1
                continue
            out.append(item)
        return out
