"""The memory model: what every process holds on every device in each phase of a run.

Owns the one table of model shapes (`ModelShape`, `KNOWN_SHAPES`, `model_shape`), the dtype
policy the learner really uses (`learner_dtypes`: `learn/fsdp_rank.py` and `learn/policy.py`
ask it which dtypes to build, so the plan and the learner cannot disagree), the learner's
bytes per rank (`learner_items`: resident between updates, working set during one), the
engines' bytes per sleep level (`engine_items`), the per-device, per-phase plan
(`memory_plan`), its check (`check_memory`: every GPU phase leaves `HEADROOM` of the card
free) and its text (`format_memory_plan`, printed by `--dry-run`).

Who asks: `trustee.run` (dry-run plan and start-up check), `trustee.placement` (the wake
budget, the free-memory checks after each build), `learn/distributed.py` (the rank's band
in the tests), `tools/gpu_check.py` (the learner's measured peak against the plan).
Does not measure anything (the callers do) or decide placement (`trustee.placement`).

What the learner holds (one rank of `placement.learner_ranks`, parameters sharded evenly):
- full fine-tuning, FSDP2 on GPU: fp32 master weights, fp32 AdamW moments (both resident
  between updates), fp32 gradient shards (freed after every update by `release`), a bf16
  KL reference shard when grpo.beta > 0; during an update the bf16 root group (embeddings
  and head, kept gathered by FSDP2) with its all-gather buffer (kept until the first layer's
  copy-out) and two gathered decoder layers (or one with its buffer), and the unsharded
  gradients of the root and of one layer before their reduce-scatter (bf16 + fp32);
- full fine-tuning in one process: everything in the run's dtype (weights, grads, moments);
- LoRA: the frozen base in the run's dtype (QLoRA: NF4 linears plus the embeddings, head and
  norms that peft's kbit preparation upcasts to fp32, unless `learn/policy.py` casts them
  back), fp32 adapter, fp32 adapter gradients and moments;
- activations: with gradient checkpointing each layer's input per token plus one layer's
  recomputed intermediates (forward and backward), else every layer's intermediates; the
  log-prob chunk in fp32 (logits, softmax, gradient); the CUDA context of the process;
- the full-weight push to the awake engines (`push_items`, added to the rollout phase, which
  is when the engines hold their KV caches): each rank's one gathered weight in the export
  dtype (the ranks cast their shard before the gather) and, on the shared route
  (`learner.weight_transport`), its bucket and the engine worker's copy of it; on the bytes
  route the worker's copy of a chunk.
The figures are estimates stated as such; `tests/test_memory_model.py` measures a two-rank
learner on the CPU against them, and `tools/gpu_check.sh` does on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from trustee.config import Config, EngineConfig, Problem, Resolved, weight_transport

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "nf4": 0.5}
OFFLOADED = ("learner AdamW moments", "learner KL reference")
"""The learner items `learner.offload` moves to the host during rollout (learn/offload.py)."""
HEADROOM = 0.05
"""Share of each GPU that every phase of the plan leaves free (allocator fragmentation, NCCL)."""

# Per process on a GPU: the CUDA context (with cuBLAS workspaces) and, for a vLLM engine not in
# eager mode, its CUDA graphs; both stay resident while the engine sleeps (apis.md 1.9). Stated
# estimates; `placement` logs the measured free memory after each build.
CONTEXT_GIB = 0.75
BUCKET_BYTES = 512 * 2**20
"""A shared-route bucket's byte budget per rank (`learn/transport.py` DEFAULT_BUCKET_BYTES is
this): whole decoder layers up to this, or one unit alone when it is larger."""
CHUNK_BYTES = 256 * 2**20
"""A bytes-route chunk (`learn/export.py` DEFAULT_CHUNK_BYTES is this)."""
GRAPHS_GIB = 0.75
ENGINE_WORKSPACE_GIB = 1.0  # sampler / activation workspace of an engine with a fixed KV size


# ============================================================================= model shapes


class ModelShape(msgspec.Struct, frozen=True, kw_only=True):
    """The sizes of a decoder-only transformer (transformers config.json keys)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0
    tie_word_embeddings: bool = False

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(hidden, q width, kv width, intermediate)."""
        hd = self.head_dim or self.hidden_size // self.num_attention_heads
        return (
            self.hidden_size,
            self.num_attention_heads * hd,
            self.num_key_value_heads * hd,
            self.intermediate_size,
        )

    @property
    def linear_params(self) -> int:
        """Parameters of one layer's linear projections (what LoRA wraps, what NF4 quantises)."""
        h, q, kv, i = self.dims
        return 2 * h * q + 2 * h * kv + 3 * h * i

    @property
    def layer_params(self) -> int:
        return self.linear_params + 2 * self.hidden_size  # + the two RMSNorm weights

    @property
    def embed_params(self) -> int:
        """Embeddings and (untied) head: FSDP2's root group with the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.embed_params + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        return 2 * self.num_hidden_layers * self.dims[2] * dtype_bytes

    def lora_params(self, rank: int, targets: list[str]) -> int:
        h, q, kv, i = self.dims
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        per_layer = sum(rank * (a + b) for t, (a, b) in shapes.items() if t in targets)
        return self.num_hidden_layers * per_layer


# Published config.json values of the models the shipped GPU configs name, so that a dry run on
# a machine without the weights still budgets them.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen3-8B": ModelShape(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=151936,
        head_dim=128,
    ),
    "Qwen3-4B": ModelShape(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=151936,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "Qwen3-1.7B": ModelShape(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=151936,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-7B-Instruct": ModelShape(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
}


def model_shape(path: str | Path) -> ModelShape | None:
    """The shape from `path`/config.json (a multimodal config's text_config), else from
    KNOWN_SHAPES by directory name, else None."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.exists():
        raw = json.loads(cfg_file.read_text())
        raw = raw.get("text_config", raw)
        keys = set(ModelShape.__struct_fields__)
        fields = {k: v for k, v in raw.items() if k in keys and v is not None}
        fields.setdefault("num_key_value_heads", raw["num_attention_heads"])
        return msgspec.convert(fields, ModelShape)
    return KNOWN_SHAPES.get(Path(path).name)


# ============================================================================= the learner's dtypes


class LearnerDtypes(msgspec.Struct, frozen=True, kw_only=True):
    """The dtypes one learner rank holds. `master`: the trainable weights the optimiser
    updates; `compute`: what the forward runs in (FSDP2 gathers parameters in this dtype);
    `grads` / `moments`: of the trainable weights; `frozen`: a LoRA base ('nf4' for QLoRA's
    linears); `reference`: the full fine-tuning KL copy."""

    master: str
    compute: str
    grads: str
    moments: str
    frozen: str
    reference: str


def learner_dtypes(mode: str, dtype: str, *, sharded: bool, on_gpu: bool) -> LearnerDtypes:
    """The dtype policy of the learner (`learn/fsdp_rank.py` builds from this).

    dtype: the run's dtype (Resolved.dtype). sharded: the FSDP2 learner (placement.learner_ranks
    > 1). Full fine-tuning sharded on a GPU keeps fp32 master weights, gradients and AdamW
    moments and computes in `dtype` (mixed precision); in one process it trains in `dtype`.
    LoRA adapters are fp32 (peft upcasts them), so are their gradients and moments."""
    if mode == "full":
        master = "float32" if sharded and on_gpu else dtype
        return LearnerDtypes(
            master=master, compute=dtype, grads=master, moments=master, frozen=dtype, reference=dtype
        )
    frozen = "nf4" if mode == "qlora" else dtype
    return LearnerDtypes(
        master="float32", compute=dtype, grads="float32", moments="float32", frozen=frozen, reference=dtype
    )


# ============================================================================= plan records


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


class LearnerMemory(msgspec.Struct, frozen=True, kw_only=True):
    """One rank's bytes: `resident` stays between updates (rollout), `working` is added during
    an update; `context` is the process's CUDA context (0 on the CPU)."""

    resident: list[Item]
    working: list[Item]
    context: list[Item]

    @property
    def resident_gib(self) -> float:
        return sum(i.gib for i in self.resident + self.context)

    @property
    def peak_gib(self) -> float:
        return self.resident_gib + sum(i.gib for i in self.working)


# ============================================================================= the learner


def learner_ranks(cfg: Config) -> int:
    """Learner ranks (placement.learner_ranks; on GPUs one per listed learner GPU)."""
    return max(cfg.placement.learner_ranks, len(cfg.placement.learner_gpus), 1)


def _qlora_frozen_bytes(shape: ModelShape, dtypes: LearnerDtypes, upcast: bool) -> float:
    """NF4 linears (~3% of quantisation constants) plus everything else, in fp32 when peft's
    kbit preparation upcast it, else in the compute dtype."""
    linear = shape.num_hidden_layers * shape.linear_params
    rest = shape.params - linear
    return linear * 0.5 * 1.03 + rest * (4 if upcast else DTYPE_BYTES[dtypes.compute])


def _weight_items(
    cfg: Config, shape: ModelShape, dtypes: LearnerDtypes, ranks: int, qlora_upcast: bool
) -> tuple[list[Item], float]:
    """(resident weight and optimiser items of one rank, its gradient bytes)."""
    lc, p, b = cfg.learner, shape.params, DTYPE_BYTES
    if lc.mode == "full":
        out = [
            Item(f"learner master weights ({dtypes.master}) / {ranks}", p * b[dtypes.master] / ranks / GIB),
            Item(
                f"learner AdamW moments ({dtypes.moments}) / {ranks}", 2 * p * b[dtypes.moments] / ranks / GIB
            ),
        ]
        if cfg.grpo.beta > 0:
            out.append(
                Item(
                    f"learner KL reference ({dtypes.reference}) / {ranks}",
                    p * b[dtypes.reference] / ranks / GIB,
                )
            )
        return out, p * b[dtypes.grads] / ranks / GIB
    a = shape.lora_params(lc.lora_rank, lc.lora_targets)
    if lc.mode == "qlora":
        base = _qlora_frozen_bytes(shape, dtypes, qlora_upcast)
        what = "learner base (NF4 linears" + (", rest upcast to float32)" if qlora_upcast else ")")
    else:
        base, what = p * b[dtypes.frozen], f"learner base ({dtypes.frozen})"
    out = [
        Item(f"{what} / {ranks}", base / ranks / GIB),
        Item(f"learner adapter + AdamW moments (float32) / {ranks}", 3 * a * 4 / ranks / GIB),
    ]
    return out, a * b[dtypes.grads] / ranks / GIB


def _activation_gib(cfg: Config, shape: ModelShape, dtypes: LearnerDtypes) -> float:
    t, cb = cfg.learner.micro_batch_tokens, DTYPE_BYTES[dtypes.compute]
    h, _, _, i = shape.dims
    layer = t * (8 * h + 4 * i) * cb  # one layer's saved intermediates
    if cfg.learner.gradient_checkpointing:  # layer inputs + one layer recomputed (forward and backward)
        return (shape.num_hidden_layers * t * h * cb + 2 * layer) / GIB
    return shape.num_hidden_layers * layer / GIB


def learner_items(
    cfg: Config, shape: ModelShape, dtype: str, *, on_gpu: bool, qlora_upcast: bool = False
) -> LearnerMemory:
    """One learner rank's memory (see the module docstring for what is counted and how)."""
    ranks = learner_ranks(cfg)
    sharded = cfg.placement.learner_ranks > 1
    dtypes = learner_dtypes(cfg.learner.mode, dtype, sharded=sharded, on_gpu=on_gpu)
    resident, grads = _weight_items(cfg, shape, dtypes, ranks, qlora_upcast)
    cb = DTYPE_BYTES[dtypes.compute]
    lc = cfg.learner
    working = [
        Item(f"learner gradients ({dtypes.grads}) / {ranks}", grads),
        Item(f"learner activations ({lc.micro_batch_tokens} tokens)", _activation_gib(cfg, shape, dtypes)),
        Item(
            f"learner log-prob chunk ({lc.logprob_chunk} x vocab, float32 x 3)",
            3 * lc.logprob_chunk * shape.vocab_size * 4 / GIB,
        ),
    ]
    if sharded:
        # FSDP2's forward keeps each group's all-gather buffer until the next group's copy-out
        # (torch 2.13 `FSDPParamGroup.wait_for_unshard`, implicit prefetch): at the first layer
        # the root is held twice (its parameters and its buffer) beside a layer and its buffer.
        gathered = 2 * (shape.embed_params + shape.layer_params) * cb
        working.append(
            Item("learner gathered root group, its all-gather buffer and 2 layers (FSDP2)", gathered / GIB)
        )
        if lc.mode == "full":  # unsharded grads before their reduce-scatter: compute + fp32 copies
            unsharded = (shape.embed_params + shape.layer_params) * (cb + 4)
            working.append(Item("learner unsharded grads before reduce-scatter", unsharded / GIB))
    context = [Item("learner CUDA context", CONTEXT_GIB)] if on_gpu else []
    return LearnerMemory(resident=resident, working=working, context=context)


def push_items(shape: ModelShape, export_dtype: str, transport: str) -> list[Item]:
    """What a learner GPU holds beside the awake engines while a full update is pushed, at
    its peak: one gathered weight (the largest: the embedding, or a layer's largest linear) in
    the export dtype; on the shared route the bucket being filled (its budget, or one unit
    alone when larger: a whole layer, or the embedding) and the engine worker's copy of it;
    on the bytes route the worker's copy of a chunk."""
    b = DTYPE_BYTES[export_dtype]
    h, q, kv, i = shape.dims
    weight = max(shape.vocab_size * h, h * i, h * q) * b
    items = [Item(f"weight push: one gathered weight ({export_dtype})", weight / GIB)]
    if transport == "shared":
        bucket = max(BUCKET_BYTES, shape.vocab_size * h * b, shape.layer_params * b)
        items += [
            Item("weight push: its bucket", bucket / GIB),
            Item("weight push: the engine worker's copy of the bucket", bucket / GIB),
        ]
    else:
        items.append(Item("weight push: the engine worker's copy of a chunk", max(CHUNK_BYTES, weight) / GIB))
    return items


def rank_memory(cfg: Config, res: Resolved) -> LearnerMemory | None:
    """One rank of this run's learner, or None when the policy's shape is unknown."""
    shape = model_shape(cfg.model.path)
    if shape is None:
        return None
    return learner_items(cfg, shape, res.dtype, on_gpu=res.device == "cuda")


# ============================================================================= engines


def policy_sleep_level(cfg: Config) -> int:
    """Level 1 keeps the base weights for an adapter update; level 2 drops weights a full update replaces."""
    return 2 if cfg.learner.mode == "full" else 1


def engine_roles(cfg: Config) -> list[str]:
    """The engines this run builds: the policy, plus the simulator when the environment uses
    one (`envs.needs_simulator`) on an engine of its own (simulator.engine = 'own'; with
    'policy-base' the policy engine serves it, its weights and KV cache budgeted once)."""
    from trustee.envs import needs_simulator

    own = needs_simulator(cfg.environment) and cfg.simulator.engine == "own"
    return ["policy", "simulator"] if own else ["policy"]


def simulator_on_policy_base(cfg: Config) -> bool:
    """The environment's simulator plays on the policy engine's base (no engine of its own)."""
    from trustee.envs import needs_simulator

    return needs_simulator(cfg.environment) and cfg.simulator.engine == "policy-base"


def engine_items(
    role: str,
    e: EngineConfig,
    shape: ModelShape | None,
    dtype: str,
    gpu_gib: float,
    on_gpu: bool,
    cfg: Config,
) -> tuple[list[Item], float]:
    """(items while awake, GiB it keeps on the device while asleep) for one engine replica."""
    db = DTYPE_BYTES[dtype]
    weights = shape.params * db / GIB / e.tensor_parallel_size if shape else 0.0
    if e.backend == "vllm" and on_gpu:
        residual = CONTEXT_GIB + (0.0 if e.enforce_eager else GRAPHS_GIB)
        if e.kv_cache_gib > 0:
            kv = Item(f"{role} KV cache", e.kv_cache_gib)
            residual_item = Item(
                f"{role} runtime (context, graphs, workspace)", residual + ENGINE_WORKSPACE_GIB
            )
        else:
            budget = e.gpu_memory_utilization * gpu_gib
            kv = Item(
                f"{role} KV + activations (fraction {e.gpu_memory_utilization})", max(0.0, budget - weights)
            )
            residual_item = Item(f"{role} runtime (context, graphs)", residual)
        return [Item(f"{role} weights", weights), kv, residual_item], residual
    if e.backend == "vllm":
        if e.kv_cache_gib > 0:
            kv, what = e.kv_cache_gib, f"{role} KV cache"
        else:
            import psutil

            kv = e.gpu_memory_utilization * psutil.virtual_memory().total / GIB - weights
            what = f"{role} KV cache (fraction {e.gpu_memory_utilization} of host RAM)"
        return [Item(f"{role} weights", weights), Item(what, max(0.0, kv))], 0.0
    # HF: the weights; its KV cache has no cap and grows with the batch, up to this bound.
    kv = shape.kv_bytes_per_token(db) * e.max_num_seqs * cfg.model.max_model_len / GIB if shape else 0.0
    return [
        Item(f"{role} weights", weights),
        Item(f"{role} KV bound (max_num_seqs x max_model_len)", kv),
    ], 0.0


def engine_budgets(cfg: Config, res: Resolved) -> dict[str, float]:
    """Per engine, the GiB its wake needs on one of its devices (weights + KV), for the wake check."""
    out: dict[str, float] = {}
    for role in engine_roles(cfg):
        e: EngineConfig = getattr(cfg.engines, role)
        if e.backend == "openai":
            continue
        on_gpu = bool(cfg.placement.policy_gpus if role == "policy" else cfg.placement.simulator_gpus)
        shape = model_shape(cfg.model.path if role == "policy" else res.simulator_model)
        items, residual = engine_items(role, e, shape, res.dtype, cfg.placement.gpu_memory_gib, on_gpu, cfg)
        out[role] = sum(i.gib for i in items) - residual
    return out


# ============================================================================= the plan


def _place_engines(cfg: Config, res: Resolved, cap: float, dev: Any, notes: list[str]) -> None:
    """Every engine replica's items into the devices' phases (`dev(name, capacity)` makes one)."""
    pl = cfg.placement
    gpus = {"policy": pl.policy_gpus, "simulator": pl.simulator_gpus}
    for role in engine_roles(cfg):
        e: EngineConfig = getattr(cfg.engines, role)
        if e.backend == "openai":
            continue
        path = cfg.model.path if role == "policy" else res.simulator_model
        shape = model_shape(path)
        if shape is None:
            notes.append(
                f"{role} model {path} not found and not in KNOWN_SHAPES: its weights are not budgeted"
            )
        level = policy_sleep_level(cfg) if role == "policy" else 1
        for place in [f"GPU {g}" for g in gpus[role]] or ["host"]:
            on_gpu = place != "host"
            d = dev(place, cap if on_gpu else None)
            items, residual = engine_items(role, e, shape, res.dtype, cap, on_gpu, cfg)
            d.rollout += items
            if pl.mode != "colocate":  # only in 'colocate' do the engines sleep while the learner trains
                d.learning += items
            elif not on_gpu:  # asleep on the host it keeps its memory (the CPU build's sleep frees nothing)
                d.learning += [Item(f"{i.what} (asleep, kept)", i.gib) for i in items]
            else:
                d.learning.append(Item(f"{role} asleep (level {level})", residual))
                if level == 1:
                    dev("host", None).learning.append(
                        Item(f"{role} weights offloaded by sleep level 1", items[0].gib)
                    )


def memory_plan(cfg: Config, res: Resolved, *, gpu_gib: float | None = None) -> MemoryPlan:
    """Per device and phase, what is resident (GiB), from the config and the models' shapes.
    `gpu_gib`: the capacity to check against (default: placement.gpu_memory_gib)."""
    pl = cfg.placement
    cap = gpu_gib if gpu_gib is not None else pl.gpu_memory_gib
    notes: list[str] = []
    devices: dict[str, DevicePlan] = {}

    def dev(name: str, capacity: float | None) -> DevicePlan:
        return devices.setdefault(name, DevicePlan(device=name, capacity_gib=capacity))

    host = dev("host", None)
    _place_engines(cfg, res, cap, dev, notes)
    if simulator_on_policy_base(cfg):
        notes.append(
            "simulator.engine = 'policy-base': the simulator plays on the policy engine with its adapter off, "
            "so one engine and one copy of the engine weights serve both roles (their requests share its KV cache)"
        )
    rank = rank_memory(cfg, res)
    if rank is not None:
        places = [f"GPU {g}" for g in pl.learner_gpus] or ["host"]
        moved = [i for i in rank.resident if cfg.learner.offload and i.what.startswith(OFFLOADED)]
        kept = [i for i in rank.resident if i not in moved]
        push = []
        shape = model_shape(cfg.model.path)
        if cfg.learner.mode == "full" and shape is not None and res.device == "cuda":
            push = push_items(shape, res.dtype, weight_transport(cfg))
        for place in places:
            d = dev(place, cap if place != "host" else None)
            d.rollout += (kept if place != "host" else rank.resident) + rank.context
            if place != "host":
                d.rollout += push
            d.learning += rank.resident + rank.context + rank.working
            if place != "host":  # learner.offload: on the host while the engines are awake
                host.rollout += [Item(f"{i.what} (offloaded)", i.gib) for i in moved]
        if places == ["host"] and learner_ranks(cfg) > 1:  # gloo ranks: each holds its own share
            for phase in ("rollout", "learning"):
                items = getattr(host, phase)
                learner = [i for i in items if i.what.startswith("learner")]
                items += learner * (learner_ranks(cfg) - 1)
    ordered = sorted(
        (d for d in devices.values() if d.device != "host"), key=lambda d: int(d.device.split()[1])
    )
    if host.rollout or host.learning:
        ordered.append(host)
    return MemoryPlan(devices=ordered, notes=notes)


def check_memory(plan: MemoryPlan, headroom: float = HEADROOM) -> list[Problem]:
    """A problem for every GPU phase that leaves less than `headroom` of its capacity free."""
    out = []
    for d in plan.devices:
        if d.capacity_gib is None:
            continue
        limit = (1 - headroom) * d.capacity_gib
        for phase, items in (("rollout", d.rollout), ("learning", d.learning)):
            total = sum(i.gib for i in items)
            if total > limit:
                top = ", ".join(f"{i.what} {i.gib:.1f}" for i in sorted(items, key=lambda i: -i.gib)[:4])
                out.append(
                    Problem(
                        "placement",
                        d.device,
                        f"during {phase} {d.device} would hold {total:.1f} GiB > {limit:.1f} "
                        f"({1 - headroom:.0%} of placement.gpu_memory_gib = {d.capacity_gib}) ({top}); lower the "
                        "engines' gpu_memory_utilization, use mode 'colocate' so the engines sleep while the "
                        "learner trains, spread the learner over more placement.learner_gpus, or use "
                        "learner.mode = 'lora'",
                    )
                )
    return out


def format_memory_plan(plan: MemoryPlan) -> list[str]:
    """The plan as text: devices with the same contents share a line; repeated items are counted."""
    lines = [
        "  memory     per device and phase, GiB (the memory model, trustee/memory.py; free = what is left):"
    ]
    groups: dict[Any, list[str]] = {}
    for d in plan.devices:
        groups.setdefault(msgspec.json.encode([d.capacity_gib, d.rollout, d.learning]), []).append(d.device)
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
            parts = " + ".join(f"{w} {g:.2f}" + (f" x {n}" if n > 1 else "") for (w, g), n in counted.items())
            total = sum(i.gib for i in items)
            free = f" ({1 - total / d.capacity_gib:.0%} free)" if d.capacity_gib else ""
            lines.append(f"    {label:<16} {phase:<8} {total:7.2f} {cap}{free}: {parts or 'nothing'}")
    lines += [f"    note: {n}" for n in plan.notes]
    return lines
