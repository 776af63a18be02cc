"""Placement: which role lives on which devices, and what happens around each learning phase.

Owns
- the plan: the devices of each role (policy engine, simulator engine, learner ranks) and a
  memory budget per device and phase (rollout / learning) computed from the config and the
  model's sizes (`memory_plan`, `check_memory`, `format_memory_plan`; printed by `--dry-run`);
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
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec

from trustee.config import Config, EngineConfig, Problem, Resolved

log = logging.getLogger("trustee.placement")

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ============================================================================= model sizes


class ModelDims(msgspec.Struct, frozen=True, kw_only=True):
    """The sizes of a decoder-only transformer that the memory plan needs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * h * q + 2 * h * kv + 3 * h * self.intermediate + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def lora_params(self, rank: int, targets: list[str]) -> int:
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return self.layers * sum(rank * (a + b) for t, (a, b) in shapes.items() if t in targets)


# Published config.json figures of the models the shipped GPU configs name, so that a dry run on
# a machine without the weights can still budget them.
KNOWN_MODELS: dict[str, ModelDims] = {
    "Qwen3-8B": ModelDims(
        hidden=4096,
        layers=36,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=12288,
        vocab=151936,
        tied=False,
    ),
    "Qwen3-4B": ModelDims(
        hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936, tied=True
    ),
    "Qwen2.5-7B-Instruct": ModelDims(
        hidden=3584,
        layers=28,
        heads=28,
        kv_heads=4,
        head_dim=128,
        intermediate=18944,
        vocab=152064,
        tied=False,
    ),
}


def model_dims(path: str) -> ModelDims | None:
    """Sizes from `path`/config.json, else from KNOWN_MODELS by directory name, else None."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        return ModelDims(
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"],
            vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", False)),
        )
    return KNOWN_MODELS.get(Path(path).name)


# ============================================================================= the memory plan


class Item(msgspec.Struct, frozen=True):
    """One resident thing on a device in a phase, in GiB."""

    what: str
    gib: float


class DevicePlan(msgspec.Struct, kw_only=True):
    """What one device holds during rollout and during learning. `capacity_gib` is None for
    the host (reported, not checked)."""

    device: str
    capacity_gib: float | None
    rollout: list[Item] = msgspec.field(default_factory=list)
    learning: list[Item] = msgspec.field(default_factory=list)


class MemoryPlan(msgspec.Struct, kw_only=True):
    devices: list[DevicePlan]
    notes: list[str]


# Per engine process on a GPU: the CUDA context, NCCL buffers and (unless eager) CUDA graphs stay
# resident even while it sleeps (apis.md 1.9: "sleep does not free everything").
CONTEXT_GIB = 0.75
GRAPHS_GIB = 0.75


def learner_ranks(cfg: Config) -> int:
    """Learner ranks (placement.learner_ranks; on GPUs one per listed learner GPU)."""
    return max(cfg.placement.learner_ranks, len(cfg.placement.learner_gpus), 1)


def policy_sleep_level(cfg: Config) -> int:
    """Level 1 keeps the base weights for an adapter update; level 2 drops weights a full update replaces."""
    return 2 if cfg.learner.mode == "full" else 1


def _engine_items(
    role: str,
    e: EngineConfig,
    dims: ModelDims | None,
    dtype_bytes: int,
    gpu_gib: float,
    on_gpu: bool,
    cfg: Config,
) -> tuple[list[Item], float, str]:
    """(items while awake, GiB left while asleep, what the figure is) for one engine on one device."""
    weights = dims.params * dtype_bytes / GIB / e.tensor_parallel_size if dims else 0.0
    residual = (
        (CONTEXT_GIB + (0.0 if e.enforce_eager else GRAPHS_GIB)) if on_gpu and e.backend == "vllm" else 0.0
    )
    if e.backend == "vllm" and on_gpu:
        if e.kv_cache_gib > 0:
            items = [
                Item(f"{role} weights", weights),
                Item(f"{role} KV cache", e.kv_cache_gib),
                Item(f"{role} runtime", residual + 1.0),
            ]
        else:
            budget = e.gpu_memory_utilization * gpu_gib
            items = [
                Item(f"{role} weights", weights),
                Item(
                    f"{role} KV cache + activations (fraction {e.gpu_memory_utilization})",
                    max(0.0, budget - weights),
                ),
                Item(f"{role} runtime", residual),
            ]
        return items, residual, "vllm"
    if e.backend == "vllm":
        if e.kv_cache_gib > 0:
            kv, what = e.kv_cache_gib, f"{role} KV cache"
        else:
            import psutil

            kv = e.gpu_memory_utilization * psutil.virtual_memory().total / GIB - weights
            what = f"{role} KV cache (fraction {e.gpu_memory_utilization} of host RAM)"
        return [Item(f"{role} weights", weights), Item(what, max(0.0, kv))], 0.0, "vllm"
    # HF: the weights; its KV cache has no cap and grows with the batch, up to this bound.
    kv = (
        dims.kv_bytes_per_token(dtype_bytes) * e.max_num_seqs * cfg.model.max_model_len / GIB if dims else 0.0
    )
    return (
        [Item(f"{role} weights", weights), Item(f"{role} KV bound (max_num_seqs x max_model_len)", kv)],
        0.0,
        "hf",
    )


def _learner_items(cfg: Config, dims: ModelDims, dtype_bytes: int) -> tuple[list[Item], list[Item]]:
    """(resident between updates, working set during an update) per learner rank.

    Assumptions, stated: parameters in the run's dtype, sharded evenly over the ranks (FSDP2);
    AdamW keeps its two moments in the parameter dtype (torch.optim.AdamW); LoRA adapters are
    float32 (peft upcasts them); QLoRA's base is 4-bit NF4 with ~3% quantisation constants,
    embeddings and norms in the run's dtype; gradients are freed between updates
    (zero_grad(set_to_none=True)); activations: with gradient checkpointing, each layer's input
    plus one layer's intermediates per micro-batch, else every layer's intermediates; the
    log-prob chunk (rows x vocab) in float32, three live copies."""
    lc, r = cfg.learner, learner_ranks(cfg)
    p = dims.params
    gib = 1 / GIB
    res: list[Item] = []
    if lc.mode == "full":
        res.append(Item("learner weights", p * dtype_bytes / r * gib))
        res.append(Item("learner AdamW moments", 2 * p * dtype_bytes / r * gib))
        if cfg.grpo.beta > 0:
            res.append(Item("learner KL reference", p * dtype_bytes / r * gib))
        grads = p * dtype_bytes / r * gib
        gathered = 2 * dims.layer_params * dtype_bytes * gib if r > 1 else 0.0
    else:
        if lc.mode == "qlora":
            linear = dims.layers * (dims.layer_params - 2 * dims.hidden)
            base = (linear * 0.5 * 1.03 + (p - linear) * dtype_bytes) / r
        else:
            base = p * dtype_bytes / r
        a = dims.lora_params(lc.lora_rank, lc.lora_targets)
        res.append(Item(f"learner base ({lc.mode})", base * gib))
        res.append(Item("learner adapter + AdamW moments", 3 * a * 4 / r * gib))
        grads = a * 4 / r * gib
        gathered = 0.0
    t, h, i = lc.micro_batch_tokens, dims.hidden, dims.intermediate
    layer_act = t * (8 * h + 4 * i) * dtype_bytes
    act = (
        (dims.layers * t * h * dtype_bytes + layer_act)
        if lc.gradient_checkpointing
        else dims.layers * layer_act
    )
    work = res + [
        Item("learner gradients", grads),
        Item("learner activations", act * gib),
        Item("learner log-prob chunk", 3 * lc.logprob_chunk * dims.vocab * 4 * gib),
    ]
    if gathered:
        work.append(Item("learner gathered layers (FSDP2)", gathered))
    return res, work


def memory_plan(cfg: Config, res: Resolved, *, gpu_gib: float | None = None) -> MemoryPlan:
    """Per device and phase, what is resident (GiB), from the config and the models' sizes.
    `gpu_gib`: the capacity to check against (default: placement.gpu_memory_gib)."""
    pl = cfg.placement
    cap = gpu_gib if gpu_gib is not None else pl.gpu_memory_gib
    db = _DTYPE_BYTES[res.dtype]
    dims = {"policy": model_dims(cfg.model.path), "simulator": model_dims(res.simulator_model)}
    notes: list[str] = []
    for role, d in dims.items():
        if d is None and role in engine_roles(cfg):
            path = cfg.model.path if role == "policy" else res.simulator_model
            notes.append(
                f"{role} model {path} not found and not in KNOWN_MODELS: its weights are not budgeted"
            )
    roles = engine_roles(cfg)
    gpus = {"policy": pl.policy_gpus, "simulator": pl.simulator_gpus}
    learner = list(pl.learner_gpus)
    colocate = pl.mode == "colocate"
    devices: dict[str, DevicePlan] = {}

    def dev(name: str, capacity: float | None) -> DevicePlan:
        return devices.setdefault(name, DevicePlan(device=name, capacity_gib=capacity))

    host = dev("host", None)
    for role in roles:
        e: EngineConfig = getattr(cfg.engines, role)
        if e.backend == "openai":
            continue
        level = policy_sleep_level(cfg) if role == "policy" else 1
        places = [f"GPU {g}" for g in gpus[role]] or ["host"]
        for place in places:
            on_gpu = place != "host"
            d = dev(place, cap if on_gpu else None)
            items, residual, _ = _engine_items(role, e, dims[role], db, cap, on_gpu, cfg)
            d.rollout += items
            if not colocate:  # in 'colocate' every engine sleeps while the learner trains
                d.learning += items
                continue
            if not on_gpu:  # asleep on the host it keeps its memory (the CPU build's sleep frees nothing)
                d.learning += [Item(f"{i.what} (asleep, kept)", i.gib) for i in items]
                continue
            d.learning.append(Item(f"{role} asleep (level {level})", residual))
            if level == 1 and on_gpu:
                host.learning.append(Item(f"{role} weights offloaded by sleep level 1", items[0].gib))
    if dims["policy"] is not None:
        resident, work = _learner_items(cfg, dims["policy"], db)
        for place in [f"GPU {g}" for g in learner] or ["host"]:
            d = dev(place, cap if place != "host" else None)
            d.rollout += resident
            d.learning += work
    ordered = sorted(
        (d for d in devices.values() if d.device != "host"), key=lambda d: int(d.device.split()[1])
    )
    if host.rollout or host.learning:
        ordered.append(host)
    return MemoryPlan(devices=ordered, notes=notes)


def check_memory(plan: MemoryPlan) -> list[Problem]:
    """A problem for every GPU phase that does not fit its capacity."""
    out = []
    for d in plan.devices:
        if d.capacity_gib is None:
            continue
        for phase, items in (("rollout", d.rollout), ("learning", d.learning)):
            total = sum(i.gib for i in items)
            if total > d.capacity_gib:
                top = ", ".join(f"{i.what} {i.gib:.1f}" for i in sorted(items, key=lambda i: -i.gib)[:4])
                out.append(
                    Problem(
                        "placement",
                        d.device,
                        f"during {phase} {d.device} would hold {total:.1f} GiB > placement.gpu_memory_gib = "
                        f"{d.capacity_gib} ({top}); lower the engines' gpu_memory_utilization, use mode "
                        "'colocate' so the engines sleep while the learner trains, spread the learner over "
                        "more placement.learner_gpus, or use learner.mode = 'lora'",
                    )
                )
    return out


def format_memory_plan(plan: MemoryPlan) -> list[str]:
    """The plan as text: devices with the same contents share a line; repeated items are counted."""
    lines = [
        "  memory     per device and phase, GiB (estimated from the config and the model's config.json):"
    ]
    groups: dict[Any, list[str]] = {}
    for d in plan.devices:
        key = msgspec.json.encode([d.capacity_gib, d.rollout, d.learning])
        groups.setdefault(key, []).append(d.device)
    for d in plan.devices:
        names = groups.get(msgspec.json.encode([d.capacity_gib, d.rollout, d.learning]))
        if not names or names[0] != d.device:
            continue
        label = names[0] if len(names) == 1 else f"GPUs {','.join(n.split()[1] for n in names)}"
        cap = f"of {d.capacity_gib:g}" if d.capacity_gib is not None else "(host RAM)"
        for phase, items in (("rollout", d.rollout), ("learning", d.learning)):
            if not items:
                continue
            counted: dict[tuple[str, float], int] = {}
            for i in items:
                if i.gib > 0.005:
                    counted[(i.what, i.gib)] = counted.get((i.what, i.gib), 0) + 1
            parts = " + ".join(
                f"{what} {gib:.2f}" + (f" x {n}" if n > 1 else "") for (what, gib), n in counted.items()
            )
            total = sum(i.gib for i in items)
            lines.append(f"    {label:<16} {phase:<8} {total:7.2f} {cap}: {parts or 'nothing'}")
    lines += [f"    note: {n}" for n in plan.notes]
    return lines


# ============================================================================= building roles


def engine_roles(cfg: Config) -> list[str]:
    """The engines this run builds: the policy, plus the simulator when the environment uses
    one (`envs.needs_simulator`: the simulated environment, a judged or simulated-tools tasks
    file, a python environment with uses_simulator)."""
    from trustee.envs import needs_simulator

    return ["policy", "simulator"] if needs_simulator(cfg.environment) else ["policy"]


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
        cfg.model.path,
        cfg.learner,
        device=device,
        dtype=getattr(torch, res.dtype),
        need_reference=cfg.grpo.beta > 0 and cfg.learner.mode == "full",
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
    """The learner's device as the choreography sees it."""

    def release(self) -> None:
        """Return cached, unused memory to the device (before an engine wakes into it)."""

    def free_bytes(self) -> int: ...


class CudaMemory:
    def __init__(self, index: int):
        self.index = index

    def release(self) -> None:
        import torch

        gc.collect()  # tensors kept alive only by reference cycles (autograd graphs) go first
        torch.cuda.empty_cache()  # vLLM's wake maps physical pages the caching allocator may still hold

    def free_bytes(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(self.index)[0])


class HostMemory:
    def release(self) -> None:
        gc.collect()

    def free_bytes(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)


def learner_memory(cfg: Config) -> DeviceMemory:
    return CudaMemory(cfg.placement.learner_gpus[0]) if cfg.placement.learner_gpus else HostMemory()


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
        self.budgets = _engine_budgets(cfg, res)
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
        except BaseException:
            for e in engines.values():
                await e.close()
            raise
        return MODES[cfg.placement.mode](cfg, res, engines, learner_memory(cfg))

    @staticmethod
    def sleep_levels(cfg: Config, roles: list[str]) -> dict[str, int]:
        return {r: 0 for r in roles}

    def build_learner(self, tokenizer: Any) -> Any:
        """The learner on this placement's learner devices (after the engines are up)."""
        return build_learner(self.cfg, self.res, tokenizer)

    def export_final(self, learner: Any, tokenizer: Any) -> Path:
        return export_final(learner, tokenizer, self.run_dir)

    @property
    def policy(self) -> Any:
        return self.engines["policy"]

    @property
    def simulator(self) -> Any | None:
        return self.engines.get("simulator")

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

    async def after_learn(self, learner: Any) -> None:
        """Export the update, free the learner's cached memory, wake every sleeping engine (all of
        them, back to back: none generates while another still sleeps on its device), then push
        the update to the policy engine (which resets its prefix cache)."""
        update = weight_update(learner, self.run_dir, self.needs_path)
        await self.wake()
        await self.push(update)

    async def wake(self) -> None:
        t0 = time.perf_counter()
        if self._asleep:
            self.memory.release()
            free = self.memory.free_bytes() / GIB
            need = sum(self.budgets.get(r, 0.0) for r in self._asleep)
            self._times["memory/free_at_wake_gib"] = free
            self._times["memory/wake_budget_gib"] = need
            (log.warning if free < need else log.info)(
                "waking %s: %.2f GiB free on the learner's device, engines' budget %.2f GiB",
                sorted(self._asleep),
                free,
                need,
            )
        for role in reversed(list(self.levels)):
            if role in self._asleep:
                s = time.perf_counter()
                await self.engines[role].wake()
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
        for role, engine in self.engines.items():
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


def _engine_budgets(cfg: Config, res: Resolved) -> dict[str, float]:
    """Per engine, the GiB its wake needs on one of its devices (weights + KV), for the wake log."""
    out: dict[str, float] = {}
    db = _DTYPE_BYTES[res.dtype]
    for role in engine_roles(cfg):
        e: EngineConfig = getattr(cfg.engines, role)
        if e.backend == "openai":
            continue
        on_gpu = bool(cfg.placement.policy_gpus if role == "policy" else cfg.placement.simulator_gpus)
        dims = model_dims(cfg.model.path if role == "policy" else res.simulator_model)
        items, _, _ = _engine_items(role, e, dims, db, cfg.placement.gpu_memory_gib, on_gpu, cfg)
        out[role] = sum(i.gib for i in items)
    return out
