"""The training loop, top to bottom: set up, then per step collect, score, update, sync, log.

Owns `train(cfg, run_dir)` and the small builders it composes (engines, learner; the
environment comes from `trustee.envs.build_environment`). One asyncio loop: episodes of all
the step's groups run concurrently against the policy engine (which batches them); the learner's step runs in a worker thread; the new
adapter or weights go to the policy engine, bumping its version. Placement 'sync' is what
runs here: the policy engine sleeps while the learner trains when the two share a device.

Resume: with `checkpoint.resume = 'auto'`, a run directory that holds a complete checkpoint
continues from it exactly (what a checkpoint holds and how it is restored: trustee/resume.py),
after pushing the restored weights to the policy engine. Signals and fatal faults stop the
loop at a step boundary with a checkpoint (trustee/interrupt.py). Called by `trustee.run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import torch

from trustee import resume
from trustee.config import REWARD_RANGES, Config, Resolved
from trustee.curriculum import Curriculum
from trustee.engines.base import Engine, FatalEngineError
from trustee.envs import build_environment  # a module attribute: tests replace it
from trustee.envs.base import Environment, Knobs
from trustee.gcpolicy import QuietCollector
from trustee.interrupt import StopGuard
from trustee.learn.advantages import ZERO_VAR_TOL, compute_advantages, drop_truncated, shape_overlong
from trustee.learn.learner import Learner
from trustee.metrics import RunLog, env_counters
from trustee.placement import Placement
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.rollout.heldout import HeldOut
from trustee.summary import HEALTH_SHARES, hack_signs, read_jsonl, read_run, summarize
from trustee.types import Group

log = logging.getLogger("trustee.train")

__all__ = ["build_environment", "collect", "train"]

TASK_ATTEMPTS = 3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- builders


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
    groups, knobs = await _collect_round(
        env, runner, curriculum, cfg, rng, step, metrics, g.tasks_per_step, 0
    )
    rounds = 0
    while g.dynamic_sampling and rounds < g.max_resample_rounds:
        useful = sum(has_variance(x) for x in groups)
        if useful >= g.tasks_per_step:
            break
        rounds += 1
        # Play enough new groups to fill the deficit at the useful rate seen so far.
        rate = max(useful / len(groups), 1.0 / g.tasks_per_step)
        n = min(g.tasks_per_step, math.ceil((g.tasks_per_step - useful) / rate))
        more, more_knobs = await _collect_round(env, runner, curriculum, cfg, rng, step, metrics, n, rounds)
        groups += more
        knobs += more_knobs
    metrics["dynamic/rounds"] = float(rounds)
    metrics["dynamic/groups_played"] = float(len(groups))
    return groups, knobs


def has_variance(group: Group) -> bool:
    """The group's trainable episodes do not all have the same reward (it can teach)."""
    rs = [t.reward for t in group.trajectories if t.trainable]
    return len(rs) >= 2 and max(rs) - min(rs) > ZERO_VAR_TOL


async def _collect_round(
    env: Environment,
    runner: EpisodeRunner,
    curriculum: Curriculum,
    cfg: Config,
    rng: random.Random,
    step: int,
    metrics: dict[str, float],
    n_tasks: int,
    round_: int,
) -> tuple[list[Group], list[Knobs]]:
    """One round of `collect`: make `n_tasks` tasks and play their groups."""
    g = cfg.grpo
    knobs = [curriculum.sample(rng) for _ in range(n_tasks)]
    tasks: list[Any] = [None] * len(knobs)
    failures: list[str] = []

    async def make(i: int, seed: int) -> None:
        try:
            tasks[i] = await env.make_task(knobs[i], random.Random(seed))
        except FatalEngineError:
            raise
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
    metrics["tasks_failed"] = metrics.get("tasks_failed", 0.0) + dropped
    metrics["task_attempts_failed"] = metrics.get("task_attempts_failed", 0.0) + len(failures)
    made = [i for i, t in enumerate(tasks) if t is not None]
    tasks, knobs = [tasks[i] for i in made], [knobs[i] for i in made]
    groups: list[Group | None] = [None] * len(tasks)
    limiter = anyio.CapacityLimiter(max(1, cfg.rollout.max_inflight_episodes // g.group_size))

    async def play(i: int) -> None:
        async with limiter:
            gid = f"s{step}t{i}" if not round_ else f"s{step}r{round_}t{i}"
            trajs = await run_group(env, tasks[i], g.group_size, runner, group_id=gid)
        groups[i] = Group(task_id=tasks[i].id, trajectories=trajs)

    async with anyio.create_task_group() as tg:
        for i in range(len(tasks)):
            tg.start_soon(play, i)
    return [x for x in groups if x is not None], knobs


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    """The step's rollout figures, `health/*` (the signs of a gamed reward) included."""
    trajs = [t for grp in groups for t in grp.trajectories]
    statuses = Counter(t.status for t in trajs)
    scored = [t.reward for t in trajs if t.status in ("ok", "truncated")]
    n = max(1, len(trajs))
    c = [t.counters for t in trajs]
    out = {
        "episodes": float(len(trajs)),
        "reward_mean": sum(scored) / len(scored) if scored else float("nan"),
        "tool_calls_mean": sum(x.tool_calls for x in c) / n,
        "format_errors": float(sum(x.format_errors for x in c)),
        "schema_errors": float(sum(x.schema_errors for x in c)),
        "sim_retries": float(sum(x.sim_retries for x in c)),
        "tokens_mean": sum(len(t.tokens) for t in trajs) / n,
        "sampled_tokens": float(sum(sum(t.loss_mask) for t in trajs)),
        "health/malformed_share": sum(x.malformed_calls > 0 for x in c) / n,
        "health/truncated_share": statuses.get("truncated", 0) / n,
        "health/format_errors_per_episode": sum(x.format_errors for x in c) / n,
        "health/turns_mean": sum(x.turns for x in c) / n,
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


def reward_range(env: Environment, cfg: Config) -> tuple[float, float]:
    """The environment's reward bounds (its `reward_range`, else the built-in table by
    environment.reward, else the Score contract's [-1, 1])."""
    r = getattr(env, "reward_range", None) or REWARD_RANGES.get(cfg.environment.reward, (-1.0, 1.0))
    return float(r[0]), float(r[1])


def closing_summary(run_dir: Path) -> str:
    """What `trustee.run` prints at the end: `trustee.summary`'s four lines."""
    try:
        return "\n".join(summarize(read_run(run_dir)))
    except FileNotFoundError as e:
        return f"no summary: {e}"


# ----------------------------------------------------------------------------- the loop


class _Run:
    """Everything one training run holds; built by `setup`, torn down by `close`."""

    def __init__(self, cfg: Config, res: Resolved):
        self.cfg, self.res = cfg, res
        self.run_dir = Path(res.run_dir)
        self.trained_step: int | None = None
        """The last step whose update the learner has made (the trained state is its, even when
        the step did not finish: interrupt.StopGuard checkpoints it on a fault)."""
        self.push_pending = False
        """Between a step's update and its push (resume.save_state records the version after it)."""

    async def setup(self) -> None:
        from transformers import AutoTokenizer

        from trustee.chat.formats import chat_spec
        from trustee.envs import needs_simulator

        cfg, res = self.cfg, self.res
        resume.seed_everything(cfg.seed)
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        spec = chat_spec(
            tokenizer,
            chat_format=cfg.model.chat_format,
            chat_template=cfg.model.chat_template,
            enable_thinking=cfg.model.enable_thinking,
        )
        self.placement = placement = await Placement.start(cfg, res)
        self.policy_engine: Engine = placement.policy
        self.sim_engine: Engine | None = placement.simulator
        sim_tokenizer, sim_template = tokenizer, spec.template
        if needs_simulator(cfg.environment):
            # trustee.run has checked the directory holds a tokenizer (no silent fallback to the policy's).
            sim_tokenizer = AutoTokenizer.from_pretrained(res.simulator_model)
            sim_template = chat_spec(sim_tokenizer, chat_template=cfg.model.chat_template).template
        self.env = build_environment(cfg, self.sim_engine, sim_tokenizer, sim_template)
        self.env_stack = contextlib.AsyncExitStack()
        if hasattr(self.env, "__aenter__"):  # an environment with resources (MCP servers) for the run
            await self.env_stack.enter_async_context(self.env)
        self.runner = EpisodeRunner(
            policy=self.policy_engine,
            tokenizer=tokenizer,
            cfg=cfg.rollout,
            max_model_len=cfg.model.max_model_len,
            template=spec.template,
            enable_thinking=cfg.model.enable_thinking,
            chat_format=spec.family,
        )
        self.curriculum = Curriculum(cfg.curriculum, reward_range=reward_range(self.env, cfg))
        self.heldout = (
            HeldOut(
                self.env,
                self.runner,
                cfg.eval,
                cfg.curriculum.aspects,
                max_inflight=cfg.rollout.max_inflight_episodes,
                progress=cfg.logging.progress_bar,
            )
            if cfg.eval.every_steps
            else None
        )
        self.untrained_steps = 0
        self.health: list[dict[str, float]] = []  # per step: reward and health shares (warn_health)
        self.warned: set[str] = set()
        self.last_eval: dict[str, float] = {}  # a stage may advance on an eval metric between evaluations
        self.learner: Learner = placement.build_learner(tokenizer)
        self.rng = random.Random(cfg.seed)
        self.start, meta = await resume.continue_run(self, lambda: placement.weight_update(self.learner))
        self.log = RunLog(
            self.run_dir,
            cfg.logging,
            total_steps=cfg.grpo.steps,
            run_name=cfg.name,
            config=cfg,
            elapsed_s=meta.get("elapsed_s", 0.0),
            done_steps=self.start,
        )
        if self.start:  # a resumed run judges its health against its own first steps
            self.health = [
                {k: r[k] for k in ("step", "reward_mean", *(k for k, _ in HEALTH_SHARES)) if k in r}
                for r in read_jsonl(self.run_dir / "metrics.jsonl")
                if not r.get("final_eval") and r.get("step", self.start) < self.start
            ]

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
        record.update(env_counters(self.env))
        if self.heldout is not None and step % cfg.eval.every_steps == 0:
            self.last_eval = await self.evaluate(step)  # the policy before this step's update
            record.update(self.last_eval)
        self.log.trajectories(step, [t for g in groups for t in g.trajectories])
        self._update_curriculum(record, groups, knobs)
        train_groups = self._train_groups(step, groups, record)
        t1 = time.perf_counter()
        record["time/rollout_s"] = t_roll
        every = cfg.checkpoint.every_steps
        due = bool(every and (step + 1) % every == 0) or step + 1 == cfg.grpo.steps
        if train_groups:
            await self.placement.before_learn()  # what shares the learner's memory sleeps
            metrics = await self.learner.step_async(train_groups)
            record.update(
                {
                    f"learn/{k}": v
                    for k, v in msgspec.to_builtins(metrics).items()
                    if isinstance(v, int | float)
                }
            )
            self.trained_step, self.push_pending = step, True
            await self._after_learn(step, record, t1, due)
        record["time/learn_s"] = time.perf_counter() - t1
        record["policy_version"] = float(self.policy_engine.version)
        record.update(self.placement.step_metrics())  # phase times, per-engine counters
        self.log.step(step, record)
        self.warn_health(step, record)
        if due and self.saved_step != step:  # not when the step was saved before its wake
            self.saved_step = resume.checkpoint_or_warn(self, step)
        return record

    async def _after_learn(self, step: int, record: dict[str, Any], t1: float, due: bool) -> None:
        """Export, wake, push (placement.after_learn). When engines are about to wake and
        `checkpoint.before_wake` says so, the step is checkpointed first: a wake that takes the
        run down then costs no trained step. A checkpoint due this step (`due`) is written there
        too, while the learner's state is still where it trains (learner.offload moves it out
        for the wake). A wake or push that raises logs the step's record (it trained) before
        the fault stops the run."""
        if self.placement.wake_pending and (due or resume.saves_before_waking(self.cfg)):
            self.saved_step = resume.checkpoint_or_warn(self, step)
        try:
            await self.placement.after_learn(self.learner)  # export, wake, push the update
        except FatalEngineError:
            self.log.step(step, record | {"time/learn_s": time.perf_counter() - t1})
            raise
        self.push_pending = False

    def _update_curriculum(self, record: dict[str, Any], groups: list[Group], knobs: list[Knobs]) -> None:
        """The curriculum's metrics for the knobs the tasks were drawn at, then its update on the
        step's trainable rewards (a step where every episode hit a simulator error leaves it alone)."""
        scored = [
            (k, [t.reward for t in g.trajectories if t.trainable]) for k, g in zip(knobs, groups, strict=True)
        ]
        scored = [(k, rs) for k, rs in scored if rs]
        record.update(self.curriculum.aspect_metrics(knobs))  # before update: D the tasks were drawn at
        if hasattr(self.env, "step_metrics"):  # the simulated environment's sim/* figures
            record.update(self.env.step_metrics())
        if scored:
            record.update(
                self.curriculum.update(
                    [sum(rs) / len(rs) for _, rs in scored],
                    [k for k, _ in scored],
                    {**self.last_eval, "reward_mean": record["reward_mean"]},
                )
            )
            record.update(self.curriculum.metrics())  # per-aspect success, this step included

    def _train_groups(self, step: int, groups: list[Group], record: dict[str, Any]) -> list[Group]:
        """The groups this step trains on: overlong shaping, group-relative advantages, zero-variance
        filtering, dynamic sampling's cap; counted in `record` (a step with none is warned about)."""
        g = self.cfg.grpo
        shaped, _ = shape_overlong(
            trainable_groups(groups),
            g.overlong,
            budget=self.cfg.rollout.max_turns * self.cfg.rollout.max_tokens_per_turn,
            buffer=g.overlong_buffer,
            penalty=g.overlong_penalty,
        )
        adv = compute_advantages(
            shaped,
            scale=g.scale_rewards,
            filter_zero_variance=g.filter_zero_variance,
            keep_malformed=g.turn_credit == "malformed",
        )
        train_groups = adv.groups[: g.tasks_per_step] if g.dynamic_sampling else adv.groups
        if g.overlong == "mask":
            train_groups, masked = drop_truncated(train_groups)
            record["overlong_masked"] = float(masked)
        record["groups_filtered"] = float(adv.filtered)
        record["groups_malformed_only"] = float(adv.malformed_only)
        record["groups_trained"] = float(len(train_groups))
        advs = [a for grp in train_groups for a in grp.advantages]
        record["adv/abs_mean"] = sum(abs(a) for a in advs) / len(advs) if advs else 0.0
        record["adv/max"] = max(advs, default=0.0)
        record["adv/min"] = min(advs, default=0.0)
        if not train_groups:
            self.untrained_steps += 1
            log.warning(
                "step %d trained nothing: %d of %d groups had no reward variance (every episode scored the same)%s",
                step,
                adv.filtered,
                len(groups),
                "" if g.dynamic_sampling else "; grpo.dynamic_sampling = true replaces such groups",
            )
        record["untrained_steps"] = float(self.untrained_steps)
        return train_groups

    def warn_health(self, step: int, record: dict[str, Any]) -> None:
        """Warn (once per share) when the share of malformed or truncated episodes has at
        least doubled against the first steps while the reward rose (`trustee.summary.hack_signs`):
        the policy may be gaming the reward."""
        keys = ("reward_mean", *(k for k, _ in HEALTH_SHARES))
        self.health.append({"step": step, **{k: record[k] for k in keys if k in record}})
        for sign in hack_signs(self.health):
            if sign.key in self.warned:
                continue
            self.warned.add(sign.key)
            log.warning(
                "step %d: the training reward rose while %s (first steps -> last steps): the policy "
                "may be gaming the reward; read its episodes: python tools/view_trajectory.py %s --step %d",
                step,
                sign.text(),
                self.run_dir,
                step,
            )

    async def evaluate(self, step: int) -> dict[str, float]:
        """The held-out evaluation (`rollout/heldout.py`), timed."""
        t0 = time.perf_counter()
        out = await self.heldout.run(step)
        out["time/eval_s"] = time.perf_counter() - t0
        return out

    async def final_eval(self) -> None:
        """After the last update: one more held-out evaluation, logged as its own record
        (step = grpo.steps, `final_eval` = 1) so the curve ends at the trained policy."""
        if self.heldout is None:
            return
        record = await self.evaluate(self.cfg.grpo.steps)
        record["final_eval"] = 1.0
        record["policy_version"] = float(self.policy_engine.version)
        self.log.step(self.cfg.grpo.steps, record)

    def export_final(self) -> Path:
        """Write the trained policy where `trustee.eval --run-dir` and vLLM can load it: the
        LoRA adapter as a PEFT directory (RUN/adapter) or the full model (RUN/model), atomically,
        tagged with the step (RUN/<kind>/trustee_step.json)."""
        return resume.export_final(self)

    async def close(self) -> None:
        close_learner = getattr(getattr(self, "learner", None), "close", None)
        if close_learner is not None:  # the FSDP2 learner ends its rank processes
            close_learner()
        if hasattr(self, "log"):
            self.log.close()
        if hasattr(self, "env_stack"):
            await self.env_stack.aclose()
        if hasattr(self, "placement"):
            await self.placement.close()


async def train(cfg: Config, res: Resolved) -> dict[str, Any]:
    """Run `cfg.grpo.steps` GRPO steps (or the rest of them, when resuming). Returns the last
    step's metrics.

    Placement 'sync' collects each step's groups, then trains while no episode runs.
    'overlap' and 'split' keep episodes running while the learner trains (GroupScheduler),
    with staleness bounded by rollout.max_staleness.
    """
    run = _Run(cfg, res)
    last: dict[str, Any] = {}
    guard = StopGuard(run)
    collector = QuietCollector()
    try:
        await run.setup()
        collector.start()  # after set-up: what lives for the whole run is never scanned again
        guard.install()
        guard.mark(run.start - 1)
        try:
            if not run.placement.continuous:
                for step in range(run.start, cfg.grpo.steps):
                    if guard.stopping:
                        break
                    t0 = time.perf_counter()
                    extra: dict[str, float] = {}
                    with guard.collecting() as scope:
                        groups, knobs = await collect(
                            run.env, run.runner, run.curriculum, cfg, run.rng, step, extra
                        )
                    if scope.cancelled_caught:
                        break
                    last = await guard.run_step(
                        run.step, step, groups, knobs, time.perf_counter() - t0, extra
                    )
            else:
                last = await _train_continuous(run, guard)
            if run.start < cfg.grpo.steps and not guard.stopping:
                await run.final_eval()
        except* FatalEngineError as eg:
            guard.on_fault(eg.exceptions[0])
        guard.finish()
        run.export_final()
        last = dict(last)
        last["summary"] = closing_summary(Path(res.run_dir))
    finally:
        collector.stop()
        guard.uninstall()
        await run.close()
    return last


async def _train_continuous(run: _Run, guard: StopGuard) -> dict[str, Any]:
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
    async with anyio.create_task_group() as tg, run.placement.running(tg):
        sched.start(tg)
        for step in range(run.start, g.steps):
            if guard.stopping:
                break
            t0 = time.perf_counter()
            rounds = 0
            with guard.collecting() as scope:
                items = await sched.take(g.tasks_per_step)
                # Dynamic sampling: take more finished groups until enough can teach.
                while g.dynamic_sampling and rounds < g.max_resample_rounds:
                    useful = sum(has_variance(i.group) for i in items)
                    if useful >= g.tasks_per_step:
                        break
                    rounds += 1
                    items += await sched.take(g.tasks_per_step - useful)
            if scope.cancelled_caught:
                break
            stats = {
                "dynamic/rounds": float(rounds),
                "dynamic/groups_played": float(len(items)),
                "sched/dropped_stale": float(sched.dropped_stale),
                "sched/peak_inflight_groups": float(sched.peak_inflight),
                "sched/task_errors": float(sched.task_errors),
                "sched/lag_mean": sum(run.policy_engine.version - i.started_version for i in items)
                / len(items),
            }
            groups, knobs = [i.group for i in items], [i.knobs for i in items]
            last = await guard.run_step(run.step, step, groups, knobs, time.perf_counter() - t0, stats)
        tg.cancel_scope.cancel()
    return last
