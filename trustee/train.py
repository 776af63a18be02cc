"""The training loop, top to bottom: set up, then per step collect, score, update, sync, log.

Owns `train(cfg, run_dir)` and the small builders it composes (engines, environment,
learner). One asyncio loop: episodes of all the step's groups run concurrently against the
policy engine (which batches them); the learner's step runs in a worker thread; the new
adapter or weights go to the policy engine, bumping its version. Placement 'sync' is what
runs here: the policy engine sleeps while the learner trains when the two share a device.

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
from trustee.config import Config, EngineConfig, Resolved
from trustee.curriculum import Curriculum, CurriculumState
from trustee.engines.base import Engine, FullUpdate, LoraUpdate
from trustee.envs.base import Environment, Knobs
from trustee.learn.advantages import compute_advantages
from trustee.learn.export import export_full, export_lora
from trustee.learn.learner import Learner
from trustee.learn.policy import load_policy
from trustee.metrics import RunLog
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.types import Group

log = logging.getLogger("trustee.train")

TASK_ATTEMPTS = 3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- builders


def build_engine(ecfg: EngineConfig, model_path: str, cfg: Config, res: Resolved, *, role: str) -> Engine:
    """One inference engine for `role` ('policy' or 'simulator') on its placement GPUs."""
    from trustee import engines

    return engines.build_engine(
        ecfg,
        model_path,
        dtype=res.dtype,
        max_model_len=cfg.model.max_model_len,
        seed=cfg.seed,
        gpus=list(cfg.placement.policy_gpus if role == "policy" else cfg.placement.simulator_gpus),
        lora=role == "policy" and cfg.learner.mode != "full",
        lora_rank=cfg.learner.lora_rank,
    )


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
            cfg.simulator,
            cfg.environment,
            sim_engine,
            sim_tokenizer,
            template=template,
            max_expected_calls=int(max(cfg.curriculum.aspects.n_expected_calls)),
            max_model_len=cfg.model.max_model_len,
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


def weight_update(learner: Learner, run_dir: Path, needs_path: bool) -> LoraUpdate | FullUpdate:
    model = learner.model
    if learner.policy.mode in ("lora", "qlora"):
        path = run_dir / "adapter" if needs_path else None
        return export_lora(model, path=path, tensors=not needs_path)
    return export_full(model)


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
        self.policy_engine = build_engine(cfg.engines.policy, cfg.model.path, cfg, res, role="policy")
        self.sim_engine = None
        sim_tokenizer = tokenizer
        if cfg.environment.kind == "simulated":
            self.sim_engine = build_engine(
                cfg.engines.simulator, res.simulator_model, cfg, res, role="simulator"
            )
            if Path(res.simulator_model).exists():
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
        policy = load_policy(
            cfg.model.path,
            cfg.learner,
            device=torch.device(f"cuda:{cfg.placement.learner_gpus[0]}" if res.device == "cuda" else "cpu"),
            dtype=_DTYPES[res.dtype],
            need_reference=cfg.grpo.beta > 0 and cfg.learner.mode == "full",
        )
        self.learner = Learner(
            policy,
            cfg.grpo,
            cfg.learner,
            temperature=cfg.rollout.temperature,
            total_steps=cfg.grpo.steps,
            pad_id=tokenizer.pad_token_id or 0,
        )
        self.rng = random.Random(cfg.seed)
        pl = cfg.placement
        self.shares_device = pl.mode == "sync" and bool(set(pl.policy_gpus) & set(pl.learner_gpus))
        self.needs_path = cfg.engines.policy.backend == "vllm"
        self.start = 0
        if cfg.checkpoint.resume == "auto":
            self.start = _resume(self.run_dir, self.learner, self.curriculum, self.rng)
            if self.start:
                await self.policy_engine.update_weights(
                    weight_update(self.learner, self.run_dir, self.needs_path)
                )
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
        record.update(self.curriculum.aspect_metrics(knobs))  # before update: D the tasks were drawn at
        if hasattr(self.env, "step_metrics"):  # the simulated environment's sim/* figures
            record.update(self.env.step_metrics())
        if scored:  # a step where every episode hit a simulator error leaves the curriculum alone
            record.update(
                self.curriculum.update(
                    [sum(rs) / len(rs) for _, rs in scored],
                    [k for k, _ in scored],
                    {"reward_mean": record["reward_mean"]},
                )
            )
            record.update(self.curriculum.metrics())  # per-aspect success, this step included
        adv = compute_advantages(
            trainable_groups(groups),
            scale=cfg.grpo.scale_rewards,
            filter_zero_variance=cfg.grpo.filter_zero_variance,
        )
        record["groups_filtered"] = float(adv.filtered)
        record["groups_trained"] = float(len(adv.groups))
        t1 = time.perf_counter()
        if adv.groups:
            if self.shares_device:
                await self.policy_engine.sleep(1)
            metrics = await self.learner.step_async(adv.groups)
            update = weight_update(self.learner, self.run_dir, self.needs_path)
            if self.shares_device:
                await self.policy_engine.wake()
            await self.policy_engine.update_weights(update)
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
        st = self.policy_engine.stats()
        record["engine/generated_tokens"] = float(st.generated_tokens)
        record["engine/mean_batch"] = st.mean_batch
        self.log.step(step, record)
        every = cfg.checkpoint.every_steps
        if (every and (step + 1) % every == 0) or step + 1 == cfg.grpo.steps:
            _save(self.run_dir, step, self.learner, self.curriculum, self.rng, cfg.checkpoint.keep)
        return record

    def export_final(self) -> Path:
        """Write the trained policy where `trustee.eval --run-dir` and vLLM can load it: the
        LoRA adapter as a PEFT directory (RUN/adapter) or the full model (RUN/model)."""
        model = self.learner.model
        if self.learner.policy.mode in ("lora", "qlora"):
            out = self.run_dir / "adapter"
            export_lora(model, path=out, tensors=False)
        else:
            out = self.run_dir / "model"
            model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
        return out

    async def close(self) -> None:
        if hasattr(self, "log"):
            self.log.close()
        if hasattr(self, "policy_engine"):
            await self.policy_engine.close()
        if getattr(self, "sim_engine", None) is not None:
            await self.sim_engine.close()


async def train(cfg: Config, res: Resolved) -> dict[str, Any]:
    """Run `cfg.grpo.steps` GRPO steps (or the rest of them, when resuming). Returns the last
    step's metrics.

    Placement 'sync' collects each step's groups, then trains while no episode runs.
    'overlap' and 'split' keep episodes running while the learner trains (GroupScheduler),
    with staleness bounded by rollout.max_staleness.
    """
    run = _Run(cfg, res)
    last: dict[str, Any] = {}
    try:
        await run.setup()
        if cfg.placement.mode == "sync":
            for step in range(run.start, cfg.grpo.steps):
                t0 = time.perf_counter()
                extra: dict[str, float] = {}
                groups, knobs = await collect(run.env, run.runner, run.curriculum, cfg, run.rng, step, extra)
                last = await run.step(step, groups, knobs, time.perf_counter() - t0, extra)
        else:
            last = await _train_continuous(run)
        run.export_final()
    finally:
        await run.close()
    return last


async def _train_continuous(run: _Run) -> dict[str, Any]:
    from trustee.rollout.scheduler import GroupScheduler

    cfg = run.cfg
    g = cfg.grpo
    sched = GroupScheduler(
        env=run.env,
        runner=run.runner,
        curriculum=run.curriculum,
        group_size=g.group_size,
        max_inflight_groups=max(1, cfg.rollout.max_inflight_episodes // g.group_size),
        max_staleness=cfg.rollout.max_staleness,
        version=lambda: run.policy_engine.version,
        rng=run.rng,
        buffer=g.tasks_per_step,
    )
    last: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        sched.start(tg)
        for step in range(run.start, g.steps):
            t0 = time.perf_counter()
            items = await sched.take(g.tasks_per_step)
            stats = {
                "sched/dropped_stale": float(sched.dropped_stale),
                "sched/peak_inflight_groups": float(sched.peak_inflight),
                "sched/task_errors": float(sched.task_errors),
                "sched/lag_mean": sum(run.policy_engine.version - i.started_version for i in items)
                / len(items),
            }
            groups, knobs = [i.group for i in items], [i.knobs for i in items]
            last = await run.step(step, groups, knobs, time.perf_counter() - t0, stats)
        tg.cancel_scope.cancel()
    return last
