"""Held-out evaluation during training: the same tasks every time, greedy and sampled.

Owns `HeldOut`: it asks the environment once for a fixed set of tasks that training never
draws (`heldout_tasks(n, knobs)`, at a fixed difficulty: toy's held-out split, BFCL's
held-out half; an environment without one gets `n` tasks made with a fixed seed, which for
the simulated environment is a fixed generated set), then at each evaluation plays every
task once greedily (temperature 0) and `heldout_samples` times at the rollout temperature,
through the same episode runner as training. Returns `eval/*` metrics: the mean reward of
each mode, the mean of every score part, and the shares of episodes that ended `ok`, had a
malformed call, or were truncated.

Called by the training loop every `eval.every_steps` steps (and before the first and after
the last). It trains nothing and leaves the curriculum alone; the reward it reports is the
reward at a fixed difficulty, beside the curriculum's moving one.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Any

import anyio
import msgspec

from trustee.config import AspectRanges, EvalConfig
from trustee.curriculum import knobs_at
from trustee.envs.base import Environment
from trustee.rollout.episode import EpisodeRunner
from trustee.types import Task, Trajectory

log = logging.getLogger("trustee.heldout")

HELDOUT_SEED = 0x4E1D


class HeldOut:
    """`runner` is the training run's episode runner; greedy and sampled runners are
    copies of it with the temperature changed. `progress`: a tqdm bar over each evaluation's
    episodes (with an ETA), cleared when it ends."""

    def __init__(
        self,
        env: Environment,
        runner: EpisodeRunner,
        cfg: EvalConfig,
        aspects: AspectRanges,
        *,
        max_inflight: int = 64,
        progress: bool = False,
    ):
        self.env, self.cfg, self.aspects = env, cfg, aspects
        self.runner = runner
        self.max_inflight = max_inflight
        self.progress = progress
        self._tasks: list[Task] | None = None
        self.last: list[tuple[str, Trajectory]] = []
        """The last evaluation's episodes with their mode (the run log writes them)."""

    async def tasks(self) -> list[Task]:
        if self._tasks is None:
            knobs = knobs_at(self.aspects, self.cfg.heldout_difficulty)
            n = self.cfg.heldout_tasks
            make = getattr(self.env, "heldout_tasks", None)
            if make is not None:
                self._tasks = list(await make(n, knobs))
            else:
                rng = random.Random(HELDOUT_SEED)
                log.info(
                    "environment %r has no held-out split; evaluating on %d tasks made with a fixed seed",
                    getattr(self.env, "name", "?"),
                    n,
                )
                self._tasks = [
                    await self.env.make_task(knobs, random.Random(rng.getrandbits(64))) for _ in range(n)
                ]
        return self._tasks

    def _runner(self, temperature: float) -> EpisodeRunner:
        r = self.runner
        cfg = msgspec.structs.replace(r.cfg, temperature=temperature)
        return EpisodeRunner(
            r.policy,
            r.tokenizer,
            cfg=cfg,
            max_model_len=r.max_model_len,
            template=r.template,
            enable_thinking=r.enable_thinking,
        )

    async def run(self, step: int) -> dict[str, float]:
        """Play the held-out set; returns the `eval/*` metrics."""
        from tqdm import tqdm

        tasks = await self.tasks()
        plays: list[tuple[str, Task, EpisodeRunner, str]] = []
        greedy = self._runner(0.0)
        sampled = self._runner(self.runner.cfg.temperature)
        for i, t in enumerate(tasks):
            plays.append(("greedy", t, greedy, f"eval{step}/t{i}/g"))
            for k in range(self.cfg.heldout_samples):
                plays.append(("sampled", t, sampled, f"eval{step}/t{i}/s{k}"))
        results: list[tuple[str, Trajectory] | None] = [None] * len(plays)
        limiter = anyio.CapacityLimiter(self.max_inflight)
        bar = tqdm(
            total=len(plays),
            desc=f"held-out eval (step {step})",
            unit="episode",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )

        async def play(j: int) -> None:
            mode, task, runner, eid = plays[j]
            async with limiter:
                group = self.env.new_group(task) if hasattr(self.env, "new_group") else None
                results[j] = (mode, await runner.run(self.env, task, eid, group=group))
            bar.update(1)

        try:
            async with anyio.create_task_group() as tg:
                for j in range(len(plays)):
                    tg.start_soon(play, j)
        finally:
            bar.close()
        self.last = [r for r in results if r is not None]
        return summarize(self.last)


def summarize(results: list[tuple[str, Any]]) -> dict[str, float]:
    """Per mode: eval/reward_<mode>, eval/<mode>/<part> means, the shares of episodes that
    ended ok (eval/<mode>_ok), had a malformed call (_malformed) or were truncated
    (_truncated), and eval/<mode>_episodes."""
    out: dict[str, float] = {}
    by_mode: dict[str, list[Any]] = defaultdict(list)
    for mode, traj in results:
        by_mode[mode].append(traj)
    for mode, trajs in by_mode.items():
        scored = [t for t in trajs if t.status in ("ok", "truncated")]
        out[f"eval/reward_{mode}"] = sum(t.reward for t in scored) / len(scored) if scored else float("nan")
        out[f"eval/{mode}_ok"] = sum(t.status == "ok" for t in trajs) / len(trajs)
        out[f"eval/{mode}_malformed"] = sum(t.counters.malformed_calls > 0 for t in trajs) / len(trajs)
        out[f"eval/{mode}_truncated"] = sum(t.status == "truncated" for t in trajs) / len(trajs)
        parts: dict[str, list[float]] = defaultdict(list)
        for t in scored:
            for k, v in t.parts.items():
                parts[k].append(float(v))
        for k, vs in parts.items():
            out[f"eval/{mode}/{k}"] = sum(vs) / len(vs)
        out[f"eval/{mode}_episodes"] = float(len(trajs))
    return out
