"""Placement: which role lives on which devices, and what happens around each learning phase.

Owns
- which engines a run builds and where (the memory each holds per phase is the memory
  model's, `trustee/memory.py`, which `--dry-run` prints and the start-up check reads);
- building each role: the engines (`build_engines`, one at a time, before the learner
  allocates) and the learner (`build_learner`, the one place a multi-rank learner plugs in);
- the per-step choreography (`Placement.before_learn` / `after_learn`): sleep what must sleep,
  export the update, free the learner's cached memory, wake, push the weights (which resets the
  engine's prefix cache), each phase timed (`time/sleep_s`, `time/wake_s`, `time/sync_s`);
- whether a mode's rollouts go on while the learner trains (`Placement.continuous`; the two
  loops themselves live in `train.py`).

Modes (one object each, chosen once from `placement.mode`; `MODES` is the registry):
- colocate: engines and learner share devices; both engines sleep while the learner trains
  (simulator level 1: its weights come back unchanged; policy level 1 for an adapter update,
  level 2 for a full update, whose weights are replaced anyway), then wake and take the update;
- sync: the learner is on devices of its own; it trains between rollouts, engines stay awake;
- overlap: everything resident together; rollouts continue while the learner trains;
- split: like overlap, but the learner is on GPUs no engine uses, and the weight push of step k
  runs while step k+1 collects (the learner waits for it only before its next update).

Does not own the structural config rules (`trustee.config.rules`: engine_gpus, colocate_placement, ...), the scoring/logging
body of a step (`train._Run.step`), or engine internals (`engines/`). Called by `trustee.train`
(setup, step, loop) and `trustee.run` (dry-run plan, start-up memory check).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import anyio

from trustee.config import Config, EngineConfig, Resolved
from trustee.engines.base import EngineError, FatalEngineError
from trustee.engines.policy_base import PolicyBase
from trustee.memory import (
    GIB,
    engine_budgets,
    engine_roles,
    policy_sleep_level,
    rank_memory,
    simulator_on_policy_base,
)

log = logging.getLogger("trustee.placement")

# ============================================================================= building roles


def build_engine(ecfg: EngineConfig, model_path: str, cfg: Config, res: Resolved, *, role: str) -> Any:
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


def build_learner(cfg: Config, res: Resolved, tokenizer: Any) -> Any:
    """The learner for this placement: today one rank in-process (`Learner` over `load_policy`) on
    the first learner GPU or the CPU. A multi-rank (FSDP2) learner with the same interface
    (`step_async(groups)`, `.model`, `.policy.mode`, `.optimizer`, `.scheduler`, `.step_count`)
    plugs in here."""
    if cfg.placement.learner_ranks > 1:  # FSDP2 ranks in processes of their own (learn/distributed.py)
        from trustee.learn.distributed import build_distributed_learner

        return build_distributed_learner(cfg, res, pad_id=tokenizer.pad_token_id or 0)
    import torch

    from trustee.learn.learner import Learner
    from trustee.learn.policy import load_policy

    device = torch.device(f"cuda:{cfg.placement.learner_gpus[0]}" if res.device == "cuda" else "cpu")
    policy = load_policy(
        res.policy_model,  # absolute, so the exported adapter's base_model_name_or_path works from any directory
        cfg.learner,
        device=device,
        dtype=getattr(torch, res.dtype),
        need_reference=cfg.grpo.beta > 0 and cfg.learner.mode == "full",
        adapter=cfg.model.adapter,
    )
    return Learner(
        policy,
        cfg.grpo,
        cfg.learner,
        temperature=cfg.rollout.temperature,
        total_steps=cfg.grpo.steps,
        pad_id=tokenizer.pad_token_id or 0,
    )


def weight_update(learner: Any, run_dir: Path | None = None, needs_path: bool = False) -> Any:
    """The learner's current weights as an engine update: the adapter's tensors (an engine that
    loads adapters from disk, vLLM, writes its own temporary PEFT directory; RUN/adapter is
    written only at checkpoints and the end, by trustee/resume.py) or the full weights,
    streamed in chunks. `run_dir` / `needs_path` are accepted for older callers and unused."""
    from trustee.learn.distributed import DistributedLearner
    from trustee.learn.export import export_full, export_lora

    if isinstance(learner, DistributedLearner):  # streamed from the ranks' shards
        return learner.export_full() if learner.mode == "full" else learner.export_lora(tensors=True)
    if learner.policy.mode in ("lora", "qlora"):
        return export_lora(learner.model, path=None, tensors=True)
    return export_full(learner.model)


def export_final(learner: Any, tokenizer: Any, run_dir: Path) -> Path:
    """Write the trained policy where `trustee.eval --run-dir` and vLLM can load it: the LoRA
    adapter as a PEFT directory (RUN/adapter) or the full model (RUN/model)."""
    from trustee.learn.export import export_lora

    if learner.policy.mode in ("lora", "qlora"):
        out = run_dir / "adapter"
        export_lora(learner.model, path=out, tensors=False)
    else:
        out = run_dir / "model"
        learner.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


# ============================================================================= device memory


class DeviceMemory(Protocol):
    """The learner's memory as the choreography sees it. `on_device`: the figures are a GPU's
    (a wake or an update that cannot fit is refused); False for host RAM (logged only: the
    CPU engines keep their memory while asleep)."""

    on_device: bool

    def release(self) -> None:
        """Free what the learner holds beyond its weights and optimiser state, in every process
        that holds it (before an engine wakes into that memory)."""

    def free_bytes(self) -> int:
        """Free bytes on the learner's device(s) after the last release (the smallest over ranks)."""

    def offload(self) -> None:
        """Move the learner's AdamW state and KL reference to host memory (learner.offload)."""

    def reload(self) -> None:
        """Undo `offload`."""


class HostMemory:
    """Before the learner exists: this process's host RAM."""

    on_device = False

    def release(self) -> None:
        gc.collect()

    def free_bytes(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)

    def offload(self) -> None:
        pass  # no learner yet

    def reload(self) -> None:
        pass


class LearnerMemory:
    """The learner's own memory: `release` runs in each process that holds it (every FSDP2 rank
    through `DistributedLearner.release`, or this process for the single-process `Learner`),
    so a caching allocator in another process is emptied too; this process touches no GPU."""

    def __init__(self, learner: Any, on_device: bool = False):
        self.learner, self.on_device = learner, on_device
        self._free = 0

    def release(self) -> None:
        out = self.learner.release()
        self._free = min(r.free_bytes for r in out) if isinstance(out, list) else int(out)

    def offload(self) -> None:
        self.learner.offload()

    def reload(self) -> None:
        self.learner.reload()

    def free_bytes(self) -> int:
        return self._free


LEARNER_GPUS = "the learner's GPU (the fullest of its ranks)"


class MemoryRefused(FatalEngineError):
    """The next phase cannot fit in the measured free memory (raised before it starts, so the
    run stops at the last checkpointed step with the figures instead of an out-of-memory)."""


def gpu_free_gib(gpus: list[int]) -> dict[str, float]:
    """Free GiB of each listed GPU (ids relative to CUDA_VISIBLE_DEVICES) from `nvidia-smi`, so
    this process opens no CUDA context; {} where there is no nvidia-smi or no GPU listed."""
    import os
    import shutil
    import subprocess

    if not gpus or shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [[x.strip() for x in line.split(",")] for line in out.strip().splitlines() if line.count(",") == 2]
    by_key = {k: float(free) / 1024 for idx, uuid, free in rows for k in (idx, uuid)}
    mask = [m.strip() for m in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if m.strip()]
    found = {}
    for g in gpus:
        key = mask[g] if g < len(mask) else str(g)
        if key in by_key:
            found[f"GPU {g}"] = by_key[key]
    return found


def check_free(what: str, free: dict[str, float], need_gib: float) -> None:
    """Log the measured free memory (device label -> GiB); refuse (MemoryRefused, with the
    numbers) where `need_gib` does not fit with the memory model's headroom."""
    from trustee.memory import HEADROOM

    for where, gib in sorted(free.items()):
        log.info("after %s: %s has %.2f GiB free; the next phase needs %.2f GiB", what, where, gib, need_gib)
        if gib < need_gib * (1 + HEADROOM):
            raise MemoryRefused(
                f"after {what}, {where} has {gib:.2f} GiB free but the next phase needs {need_gib:.2f} GiB "
                f"(+{HEADROOM:.0%} headroom; the memory model's figures, --dry-run prints them); lower the "
                "engines' gpu_memory_utilization or learner.micro_batch_tokens"
            )


# ============================================================================= the modes


class Placement:
    """The placement of one run: its engines, its learner's device, and the mode's choreography.

    Subclasses differ only in `sleep_levels` (who sleeps at which level while learning),
    `continuous` (whether rollouts go on while the learner trains) and `after_learn`'s push
    timing; `train.py` calls the same methods whatever the mode."""

    continuous = False

    def __init__(self, cfg: Config, res: Resolved, engines: dict[str, Any], memory: DeviceMemory):
        self.cfg, self.res = cfg, res
        self.run_dir = Path(res.run_dir)
        self.engines = engines
        self.memory = memory
        self.levels = self.sleep_levels(cfg, list(engines))
        self.base_view = PolicyBase(engines["policy"]) if simulator_on_policy_base(cfg) else None
        """The simulator on the policy engine's base (simulator.engine = 'policy-base'): not one
        of `engines`, as the policy role sleeps, wakes, updates and closes the shared engine."""
        self.budgets = engine_budgets(cfg, res)
        self.needs_path = cfg.engines.policy.backend == "vllm"
        self._times: dict[str, float] = {}
        self._last_stats: dict[str, Any] = {}
        self._asleep: set[str] = set()
        self._tg: Any = None  # the continuous loop's task group while it runs (split's pushes)

    # ------------------------------------------------------------------ construction

    @classmethod
    async def start(cls, cfg: Config, res: Resolved) -> Placement:
        """Build the mode's placement: engines started one at a time (vLLM's start-up check
        wants its memory fraction free at that moment, so never two at once, and before the
        learner allocates). An engine that fails to start closes the ones already up."""
        engines: dict[str, Any] = {}
        try:
            for role in engine_roles(cfg):
                path = cfg.model.path if role == "policy" else res.simulator_model
                t0 = time.perf_counter()
                engines[role] = build_engine(getattr(cfg.engines, role), path, cfg, res, role=role)
                log.info("%s engine up in %.1fs", role, time.perf_counter() - t0)
                log.info("after the %s engine: free GiB per GPU %s", role, gpu_free_gib(_gpus_of(cfg)))
            rank = rank_memory(cfg, res)  # the learner is built next, into what the engines left
            if rank is not None:
                check_free(
                    "building the engines", gpu_free_gib(list(cfg.placement.learner_gpus)), rank.resident_gib
                )
        except BaseException:
            for e in engines.values():
                await e.close()
            raise
        return MODES[cfg.placement.mode](cfg, res, engines, HostMemory())

    @staticmethod
    def sleep_levels(cfg: Config, roles: list[str]) -> dict[str, int]:
        return {r: 0 for r in roles}

    def build_learner(self, tokenizer: Any) -> Any:
        """The learner on this placement's learner devices (after the engines are up); from
        here on the choreography releases memory through it."""
        learner = build_learner(self.cfg, self.res, tokenizer)
        self.memory = LearnerMemory(learner, on_device=bool(self.cfg.placement.learner_gpus))
        log.info("after the learner: free GiB per GPU %s", gpu_free_gib(_gpus_of(self.cfg)))
        return learner

    def export_final(self, learner: Any, tokenizer: Any) -> Path:
        return export_final(learner, tokenizer, self.run_dir)

    @property
    def policy(self) -> Any:
        return self.engines["policy"]

    @property
    def simulator(self) -> Any | None:
        return self.engines.get("simulator") or self.base_view

    # ------------------------------------------------------------------ the choreography

    async def before_learn(self) -> None:
        """Put to sleep what must sleep for the learner (in role order), timed."""
        t0 = time.perf_counter()
        for role, level in self.levels.items():
            if level:
                s = time.perf_counter()
                await self.engines[role].sleep(level)
                self._asleep.add(role)
                self._times[f"time/sleep_{role}_s"] = time.perf_counter() - s
        self._times["time/sleep_s"] = time.perf_counter() - t0
        if self.cfg.learner.offload and self._asleep:
            self.memory.reload()  # the AdamW state and reference come back into the freed memory
        rank = rank_memory(self.cfg, self.res)
        if self.memory.on_device and rank is not None:  # the update's working set must fit now
            self.memory.release()
            working = rank.peak_gib - rank.resident_gib
            self._times["memory/free_before_learn_gib"] = self.memory.free_bytes() / GIB
            check_free("the engines slept", {LEARNER_GPUS: self.memory.free_bytes() / GIB}, working)

    @property
    def wake_pending(self) -> bool:
        """Engines are asleep, so `after_learn` will wake them."""
        return bool(self._asleep)

    async def after_learn(self, learner: Any) -> None:
        """Export the update, free the learner's cached memory, wake every sleeping engine (all of
        them, back to back: none generates while another still sleeps on its device), then push
        the update to the policy engine (which resets its prefix cache)."""
        update = weight_update(learner, self.run_dir, self.needs_path)
        await self.wake()
        await self.push(update)

    async def wake(self) -> None:
        """Release the learner's memory in every process that holds it, check the engines' wake
        budget fits what is free (refused with the figures, on a GPU), then wake every sleeping
        engine; a wake that fails stops the run as a fatal engine error (so the last good step's
        checkpoint is written and the run resumes from it)."""
        t0 = time.perf_counter()
        if self._asleep:
            if self.cfg.learner.offload:
                self.memory.offload()  # learn/offload.py: the policy's weights stay for the push
            self.memory.release()
            free = self.memory.free_bytes() / GIB
            need = sum(self.budgets.get(r, 0.0) for r in self._asleep)
            self._times["memory/free_at_wake_gib"] = free
            self._times["memory/wake_budget_gib"] = need
            log.info(
                "waking %s: %.2f GiB free for them, their budget %.2f GiB", sorted(self._asleep), free, need
            )
            if self.memory.on_device:
                check_free(
                    f"the learner released its memory, waking {sorted(self._asleep)}",
                    {LEARNER_GPUS: free},
                    need,
                )
        for role in reversed(list(self.levels)):
            if role in self._asleep:
                s = time.perf_counter()
                try:
                    await self.engines[role].wake()
                except EngineError:
                    raise
                except Exception as e:
                    raise FatalEngineError(f"the {role} engine failed to wake: {e}") from e
                self._asleep.discard(role)
                self._times[f"time/wake_{role}_s"] = time.perf_counter() - s
        self._times["time/wake_s"] = time.perf_counter() - t0

    async def push(self, update: Any) -> None:
        t0 = time.perf_counter()
        await self.policy.update_weights(update)
        self._times["time/sync_s"] = time.perf_counter() - t0

    def weight_update(self, learner: Any) -> Any:
        """The learner's weights as this placement's engines take them."""
        return weight_update(learner)

    @contextlib.asynccontextmanager
    async def running(self, tg: Any):
        """The continuous loop's task group, for pushes that run in the background (split);
        on the way out, any push still running is finished."""
        self._tg = tg
        try:
            yield self
            await self.flush()
        finally:
            self._tg = None

    async def push_learner(self, learner: Any) -> None:
        """Send the learner's current weights to the policy engine (after a resume)."""
        await self.push(weight_update(learner, self.run_dir, self.needs_path))

    async def flush(self) -> None:
        """Finish any weight push still running (split mode)."""

    def step_metrics(self) -> dict[str, float]:
        """This step's phase times and, per engine, the step's counters from its own stats
        (prefix-cache hit rate from the engine's counters, generated tokens, batch size)."""
        out = {k: float(v) for k, v in self._times.items()}
        self._times = {}
        counted = {**self.engines, **({"simulator": self.base_view} if self.base_view else {})}
        for role, engine in counted.items():
            st = engine.stats()
            prev = self._last_stats.get(role)
            self._last_stats[role] = st
            dq = st.prefix_queries - (prev.prefix_queries if prev else 0)
            dh = st.prefix_hits - (prev.prefix_hits if prev else 0)
            out[f"engine/{role}/prefix_hit_rate"] = dh / dq if dq else 0.0
            out[f"engine/{role}/prefix_queries"] = float(dq)
            out[f"engine/{role}/requests"] = float(st.requests - (prev.requests if prev else 0))
            out[f"engine/{role}/generated_tokens"] = float(
                st.generated_tokens - (prev.generated_tokens if prev else 0)
            )
            out[f"engine/{role}/failed"] = float(st.failed - (prev.failed if prev else 0))
            out[f"engine/{role}/mean_batch"] = st.mean_batch
            out[f"engine/{role}/version"] = float(getattr(engine, "version", 0))
            out[f"engine/{role}/sleeps"] = float(st.sleeps)  # cumulative, counted by the engine itself
            out[f"engine/{role}/wakes"] = float(st.wakes)
        st = self.policy.stats()
        out["engine/generated_tokens"] = float(st.generated_tokens)
        out["engine/mean_batch"] = st.mean_batch
        return out

    async def close(self) -> None:
        await self.flush()
        for e in self.engines.values():
            await e.close()


class Colocate(Placement):
    """Engines and learner on the same devices: both engines sleep while the learner trains."""

    @staticmethod
    def sleep_levels(cfg: Config, roles: list[str]) -> dict[str, int]:
        """Every local engine sleeps (a remote openai server holds none of our memory)."""
        return {
            r: (policy_sleep_level(cfg) if r == "policy" else 1)
            for r in roles
            if getattr(cfg.engines, r).backend != "openai"
        }


class Sync(Placement):
    """The learner on devices of its own; it trains between rollouts while the engines stay awake."""


class Overlap(Placement):
    """Everything resident together; rollouts continue while the learner trains."""

    continuous = True


class Split(Overlap):
    """The learner on GPUs no engine uses: step k's weight push runs while step k+1 collects; the
    learner waits for it only before its next update (so at most one push is in flight)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pushed: anyio.Event | None = None

    async def before_learn(self) -> None:
        t0 = time.perf_counter()
        await self.flush()
        self._times["time/sync_wait_s"] = time.perf_counter() - t0
        await super().before_learn()

    async def push(self, update: Any) -> None:
        if self._tg is None:  # outside the loop (resume): push in place
            return await super().push(update)
        done = self._pushed = anyio.Event()

        async def run() -> None:
            try:
                await Placement.push(self, update)
            finally:
                done.set()

        self._tg.start_soon(run)

    async def flush(self) -> None:
        if self._pushed is not None:
            await self._pushed.wait()
            self._pushed = None


MODES: dict[str, type[Placement]] = {"colocate": Colocate, "sync": Sync, "overlap": Overlap, "split": Split}


def _gpus_of(cfg: Config) -> list[int]:
    pl = cfg.placement
    return sorted(set(pl.policy_gpus) | set(pl.simulator_gpus) | set(pl.learner_gpus))
