"""The training loop, top to bottom: set up, then per step collect, score, update, sync, log.

Owns `train(cfg, run_dir)`, the environment builder, and one step's scoring and logging
(`_Run.step`). One asyncio loop: episodes of all the step's groups run concurrently against the
policy engine (which batches them); the learner's step runs in a worker thread; the new
adapter or weights go to the policy engine, bumping its version. Where each role lives, the
engines and learner it builds, what sleeps and wakes around learning, and whether rollouts go
on while the learner trains are `trustee.placement`'s: this loop calls it the same way in
every placement mode and for LoRA or full updates.

Resume: with `checkpoint.resume = 'auto'`, a run directory that holds a complete checkpoint
continues from it (trainable weights, optimiser, schedule, curriculum, RNG), after pushing
the restored weights to the policy engine. Called by `trustee.run`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import torch

from trustee.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trustee.config import Config, Resolved
from trustee.curriculum import Curriculum, CurriculumState
from trustee.engines.base import Engine
from trustee.envs.base import Environment, Knobs
from trustee.learn.advantages import compute_advantages
from trustee.learn.learner import Learner
from trustee.metrics import RunLog
from trustee.placement import Placement, build_engine
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.types import Group

log = logging.getLogger("trustee.train")

TASK_ATTEMPTS = 3
# build_engine is re-exported: trustee.eval builds the policy engine the way training does.
__all__ = ["build_engine", "build_environment", "collect", "train"]

# ----------------------------------------------------------------------------- builders


def build_environment(
    cfg: Config, sim_engine: Engine | None, sim_tokenizer: Any, template: str | None
) -> Environment:
    kind = cfg.environment.kind
    if kind == "toy":
        from trustee.envs.toy import ToyEnv

        return ToyEnv(reward=cfg.environment.reward)
    if kind == "simulated":
        from trustee.envs.simulated import build_simulated_env

        assert sim_engine is not None
        return build_simulated_env(
            cfg.simulator, cfg.environment, sim_engine, sim_tokenizer, template=template
        )
    if kind == "bfcl":
        from trustee.envs.bfcl import build_bfcl_env

        return build_bfcl_env(cfg.environment, seed=cfg.seed)
    raise ValueError(f"environment.kind = {kind!r} has no builder")


# ----------------------------------------------------------------------------- one step


async def collect(
    env: Environment,
    runner: EpisodeRunner,
    curriculum: Curriculum,
    cfg: Config,
    rng: random.Random,
    step: int,
    metrics: dict[str, float],
) -> tuple[list[Group], list[Knobs]]:
    """Make the step's tasks and run their groups concurrently (bounded by
    rollout.max_inflight_episodes). A task that cannot be made is tried again with a fresh
    seed (up to TASK_ATTEMPTS times), then dropped and counted in `metrics['tasks_failed']`;
    the step fails only if no task at all could be made."""
    g = cfg.grpo
    knobs = [curriculum.sample(rng) for _ in range(g.tasks_per_step)]
    tasks: list[Any] = [None] * len(knobs)
    failures: list[str] = []

    async def make(i: int, seed: int) -> None:
        try:
            tasks[i] = await env.make_task(knobs[i], random.Random(seed))
        except Exception as e:  # noqa: BLE001 - one task that cannot be made is dropped, not fatal
            log.warning("step %d: task %d could not be made: %s: %s", step, i, type(e).__name__, e)
            failures.append(f"{type(e).__name__}: {e}")

    for _ in range(TASK_ATTEMPTS):
        missing = [i for i, t in enumerate(tasks) if t is None]
        if not missing:
            break
        async with anyio.create_task_group() as tg:
            for i in missing:
                tg.start_soon(make, i, rng.getrandbits(64))
    dropped = sum(t is None for t in tasks)
    if dropped == len(knobs):
        raise RuntimeError(
            f"no task of step {step} could be made in {TASK_ATTEMPTS} attempts each; first error: {failures[0]}"
        )
    metrics["tasks_failed"] = float(dropped)
    metrics["task_attempts_failed"] = float(len(failures))
    made = [i for i, t in enumerate(tasks) if t is not None]
    tasks, knobs = [tasks[i] for i in made], [knobs[i] for i in made]
    groups: list[Group | None] = [None] * len(tasks)
    limiter = anyio.CapacityLimiter(max(1, cfg.rollout.max_inflight_episodes // g.group_size))

    async def play(i: int) -> None:
        async with limiter:
            trajs = await run_group(env, tasks[i], g.group_size, runner, group_id=f"s{step}t{i}")
        groups[i] = Group(task_id=tasks[i].id, trajectories=trajs)

    async with anyio.create_task_group() as tg:
        for i in range(len(tasks)):
            tg.start_soon(play, i)
    return [x for x in groups if x is not None], knobs


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    trajs = [t for grp in groups for t in grp.trajectories]
    statuses = Counter(t.status for t in trajs)
    scored = [t.reward for t in trajs if t.status in ("ok", "truncated")]
    n = max(1, len(trajs))
    c = [t.counters for t in trajs]
    out = {
        "episodes": float(len(trajs)),
        "reward_mean": sum(scored) / len(scored) if scored else float("nan"),
        "turns_mean": sum(x.turns for x in c) / n,
        "tool_calls_mean": sum(x.tool_calls for x in c) / n,
        "format_errors": float(sum(x.format_errors for x in c)),
        "schema_errors": float(sum(x.schema_errors for x in c)),
        "sim_retries": float(sum(x.sim_retries for x in c)),
        "tokens_mean": sum(len(t.tokens) for t in trajs) / n,
        "sampled_tokens": float(sum(sum(t.loss_mask) for t in trajs)),
    }
    for s in ("ok", "truncated", "sim_error", "error"):
        out[f"status/{s}"] = float(statuses.get(s, 0))
    return out


def trainable_groups(groups: list[Group]) -> list[Group]:
    """Groups with their sim_error / error episodes removed (those never train); groups left
    with fewer than two episodes cannot be compared and are dropped."""
    out = []
    for g in groups:
        keep = [t for t in g.trajectories if t.trainable]
        if len(keep) >= 2:
            out.append(Group(task_id=g.task_id, trajectories=keep))
    return out


# ----------------------------------------------------------------------------- checkpoints


def _trainable_state(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in learner.model.named_parameters() if p.requires_grad}


def _save(
    run_dir: Path, step: int, learner: Learner, curriculum: Curriculum, rng: random.Random, keep: int
) -> None:
    state = {
        "trainable": _trainable_state(learner),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "rng": rng.getstate(),
    }
    meta = {
        "curriculum": msgspec.to_builtins(curriculum.state()),
        "learner_steps": learner.step_count,
    }
    save_checkpoint(run_dir, step, state, meta, keep=keep)


def _resume(run_dir: Path, learner: Learner, curriculum: Curriculum, rng: random.Random) -> int:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    state, meta = load_checkpoint(ckpt)
    params = dict(learner.model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match this model (unknown parameters, e.g. {missing[:3]})"
        )
    with torch.no_grad():
        for name, t in state["trainable"].items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.step_count = int(meta["learner_steps"])
    curriculum.load_state(msgspec.convert(meta["curriculum"], CurriculumState))
    rng.setstate(state["rng"])
    log.info("resumed from %s", ckpt)
    return int(meta["step"]) + 1


# ----------------------------------------------------------------------------- the loop


class _Run:
    """Everything one training run holds; built by `setup`, torn down by `close`."""

    def __init__(self, cfg: Config, res: Resolved):
        self.cfg, self.res = cfg, res
        self.run_dir = Path(res.run_dir)

    async def setup(self) -> None:
        from transformers import AutoTokenizer

        from trustee.chat.render import project_template

        cfg, res = self.cfg, self.res
        template = project_template() if cfg.model.chat_template == "trustee" else None
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.placement = placement = await Placement.start(cfg, res)
        self.policy_engine: Engine = placement.policy
        self.sim_engine: Engine | None = placement.simulator
        sim_tokenizer = tokenizer
        if self.sim_engine is not None and Path(res.simulator_model).exists():
            sim_tokenizer = AutoTokenizer.from_pretrained(res.simulator_model)
        self.env = build_environment(cfg, self.sim_engine, sim_tokenizer, template)
        self.runner = EpisodeRunner(
            policy=self.policy_engine,
            tokenizer=tokenizer,
            cfg=cfg.rollout,
            max_model_len=cfg.model.max_model_len,
            template=template,
            enable_thinking=cfg.model.enable_thinking,
        )
        self.curriculum = Curriculum(cfg.curriculum)
        self.learner: Learner = placement.build_learner(tokenizer)
        self.rng = random.Random(cfg.seed)
        self.start = 0
        if cfg.checkpoint.resume == "auto":
            self.start = _resume(self.run_dir, self.learner, self.curriculum, self.rng)
            if self.start:
                await placement.push_learner(self.learner)
        self.log = RunLog(
            self.run_dir, cfg.logging, total_steps=cfg.grpo.steps - self.start, run_name=cfg.name, config=cfg
        )

    async def step(
        self,
        step: int,
        groups: list[Group],
        knobs: list[Knobs],
        t_roll: float,
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Score, update the curriculum, train, push weights, log, checkpoint."""
        cfg = self.cfg
        record = rollout_metrics(groups)
        record.update(extra or {})
        self.log.trajectories(step, [t for g in groups for t in g.trajectories])
        scored = [
            (k, [t.reward for t in g.trajectories if t.trainable]) for k, g in zip(knobs, groups, strict=True)
        ]
        scored = [(k, rs) for k, rs in scored if rs]
        if scored:  # a step where every episode hit a simulator error leaves the curriculum alone
            record.update(
                self.curriculum.update(
                    [sum(rs) / len(rs) for _, rs in scored],
                    [k for k, _ in scored],
                    {"reward_mean": record["reward_mean"]},
                )
            )
        adv = compute_advantages(
            trainable_groups(groups),
            scale=cfg.grpo.scale_rewards,
            filter_zero_variance=cfg.grpo.filter_zero_variance,
        )
        record["groups_filtered"] = float(adv.filtered)
        record["groups_trained"] = float(len(adv.groups))
        t1 = time.perf_counter()
        if adv.groups:
            await self.placement.before_learn()  # what shares the learner's memory sleeps
            metrics = await self.learner.step_async(adv.groups)
            await self.placement.after_learn(self.learner)  # export, wake, push the update
            record.update(
                {
                    f"learn/{k}": v
                    for k, v in msgspec.to_builtins(metrics).items()
                    if isinstance(v, int | float)
                }
            )
        record["time/rollout_s"] = t_roll
        record["time/learn_s"] = time.perf_counter() - t1
        record["policy_version"] = float(self.policy_engine.version)
        record.update(self.placement.step_metrics())  # phase times, per-engine counters
        self.log.step(step, record)
        every = cfg.checkpoint.every_steps
        if (every and (step + 1) % every == 0) or step + 1 == cfg.grpo.steps:
            _save(self.run_dir, step, self.learner, self.curriculum, self.rng, cfg.checkpoint.keep)
        return record

    def export_final(self) -> Path:
        """Write the trained policy where `trustee.eval --run-dir` and vLLM can load it."""
        return self.placement.export_final(self.learner, self.tokenizer)

    async def close(self) -> None:
        if hasattr(self, "log"):
            self.log.close()
        if hasattr(self, "placement"):
            await self.placement.close()


async def train(cfg: Config, res: Resolved) -> dict[str, Any]:
    """Run `cfg.grpo.steps` GRPO steps (or the rest of them, when resuming). Returns the last
    step's metrics. The placement drives the steps: collect-then-train, or rollouts that go on
    while the learner trains (trustee.placement)."""
    run = _Run(cfg, res)
    last: dict[str, Any] = {}
    try:
        await run.setup()
        last = await run.placement.drive(run, collect)
        run.export_final()
    finally:
        await run.close()
    return last
