"""One learner rank: an FSDP2-sharded policy, its optimiser, and a command loop on a pipe.

Owns what runs *inside* each learner process started by `learn/distributed.py`:
`RankSpec` (everything a rank needs to build itself), `shard_policy` (FSDP2 per decoder
layer, mixed precision on GPU), `RankWorker` (the handlers: step, gradients, exports, DCP
save/load) and `rank_main` (the process entry point). Does not decide which samples a
rank gets (the parent balances them) or talk to engines (the parent turns exports into
engine updates).

Sharding (torch 2.13 `torch.distributed.fsdp.fully_shard`):
- each decoder layer is its own FSDP group (all-gather before its forward, reduce-scatter
  after its backward);
- the model body (embeddings, final norm) *and the lm_head* form the root group. The head is
  attached to the body as a submodule only while `fully_shard(body)` runs, so its weight
  joins the root group without FSDP hooks of its own. This matters because
  `learn/logprobs.py` calls the head once per chunk of loss tokens: a head with its own
  hooks would all-gather and reduce-scatter once per chunk, and ranks holding different
  token counts would issue different numbers of collectives (a hang). The root group is not
  resharded after forward (FSDP2's default for the root), so the head's chunks use the
  gathered weight, and its gradient is reduce-scattered once, in the root's post-backward
  callback. Tied embeddings (the tiny models, small Qwen3s) are one parameter in that group.
- gradients are *summed* over ranks (`set_gradient_divide_factor(1.0)` with sum-only comms) and every rank uses
  the step's global normaliser (`LossNorm` over all ranks' sequences, computed by the
  parent), so the summed gradient is the single-process gradient for every loss type.
- every rank runs the same number of micro-batches (the most any rank needs); a rank with
  fewer runs "idle" passes, a forward and backward of one token with zero loss weight, so
  the collectives pair up. The shared-prefix check (`Learner.plan`, 'auto') pairs its
  forwards the same way.

On GPU: bf16 compute parameters, fp32 gradient reduction (`MixedPrecisionPolicy`), fp32
sharded master weights for full fine-tuning (each layer is upcast on the CPU just before it
is sharded), activation checkpointing from `learn/policy.py` (transformers' non-reentrant
checkpointing; FSDP2's pre-forward hook skips the recompute, `_fsdp_state.py`), AdamW state
on the local shards only. On CPU (gloo): the model's dtype, no mixed precision.
"""

from __future__ import annotations

import ctypes
import datetime
import io
import json
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn.grpo import LossNorm, TokenLossParts
from trustee.learn.packing import Sample, build_packed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PG_TIMEOUT = datetime.timedelta(minutes=30)


class RankSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What every rank needs to build its shard of the learner (sent pickled at spawn).

    device 'cuda': rank r uses GPU `gpus[r]` and NCCL; 'cpu': gloo, `threads` torch threads.
    dtype: the compute dtype (bf16 on GPU; float32 on CPU keeps the tests exact).
    seed: torch's seed before the policy is built, the same on every rank, so the LoRA
    initialisation is one model (each rank shards its own copy).
    """

    model_path: str
    learner: LearnerConfig
    grpo: GrpoConfig
    temperature: float
    total_steps: int
    world_size: int
    init_method: str
    device: Literal["cpu", "cuda"] = "cpu"
    gpus: list[int] = msgspec.field(default_factory=list)
    dtype: str = "float32"
    pad_id: int = 0
    threads: int = 1
    seed: int = 0


class RankStep(msgspec.Struct, kw_only=True):
    """One rank's share of a step (summed / maxed by the parent into StepMetrics). `loss`:
    this rank's share averaged over the step's updates; `grad_norm`: the global pre-clip norm
    averaged over them; `skipped`: updates skipped as non-finite (the same on every rank)."""

    loss: float
    parts: TokenLossParts
    micro_batches: int
    idle_passes: int
    input_tokens: int
    grad_norm: float
    lr: float
    peak_mem_bytes: int
    shared_tokens: int = 0
    shared_prefix_fallback: int = 0
    updates: int = 1
    skipped: int = 0
    step_count: int = 0
    grads_held: int = 0
    """Parameters still holding a gradient when the step returned (0: freed)."""
    held_at_start_bytes: int = 0
    """Bytes held when the step began (CUDA: allocated; CPU: resident set)."""
    peak_live_bytes: int = 0
    """Peak bytes held by live allocations during the step: CUDA max_memory_allocated; CPU the
    sampled peak of `hostmem.live_bytes` (0 without glibc). What the memory model's band is
    checked against (peak_mem_bytes on the CPU is the resident set, which also counts library
    code and the allocator's free lists)."""


class RankMemory(msgspec.Struct, frozen=True, kw_only=True):
    """What a rank reports after `release`: its pid, the gradients it still holds (0 after a
    release), the device's free bytes, and its bytes held (CUDA: reserved by the caching
    allocator; CPU: resident set)."""

    rank: int
    pid: int
    grads_held: int
    free_bytes: int
    held_bytes: int


# ----------------------------------------------------------------------------- tensors over a pipe


def pack_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors bytes: a plain byte string crosses the pipe (no shared-memory
    file descriptors, nothing left behind if a process dies). The key order, which
    safetensors does not keep, travels in the header's metadata."""
    from safetensors.torch import save

    order = json.dumps(list(tensors))
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"order": order})


def unpack_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """`pack_tensors` undone, in the packed key order."""
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then a JSON header
    order = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["order"])
    loaded = load(data)
    return {k: loaded[k] for k in order}


# ----------------------------------------------------------------------------- sharding


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (an all-gather: every rank must call it in the same
    order), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_policy(model: nn.Module, mesh, *, mp_policy, master_dtype: torch.dtype | None) -> None:
    """fully_shard every decoder layer, then the body with the lm_head in its group (see the
    module docstring). master_dtype: upcast each group to this dtype on the CPU just before
    it is sharded (fp32 master weights for full fine-tuning on GPU); None keeps dtypes."""
    from torch.distributed.fsdp import fully_shard

    from trustee.learn.logprobs import split_causal_lm

    body, head = split_causal_lm(model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise TypeError(f"{type(body).__name__} has no `layers`; the FSDP learner shards decoder layers")
    for layer in layers:
        if master_dtype is not None:
            layer.to(master_dtype)
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        _sum_gradients(layer)
    body.add_module("_trustee_lm_head", head)  # only so the head's weight joins the root group
    try:
        if master_dtype is not None:
            body.to(master_dtype)  # the rest: embeddings, norm, head (layers are already sharded)
        fully_shard(body, mesh=mesh, mp_policy=mp_policy)
    finally:
        delattr(body, "_trustee_lm_head")
    _sum_gradients(body)


def _held_bytes(device: torch.device) -> int:
    """CUDA: bytes allocated by tensors; CPU: this process's resident set."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reshard(model: nn.Module) -> None:
    """Reshard every FSDP2 group. After a forward under no_grad the root group stays gathered
    (FSDP2 keeps the root unsharded for a backward that never comes); the next forward then
    reuses those gathered parameters and their gradients were found to differ from the
    single-process learner's (tests/test_memory_model.py), so proximal passes end here."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _sum_gradients(module) -> None:
    """Reduce gradients with a plain SUM over ranks: divide factor 1, and no PREMUL_SUM op
    (which gloo lacks; `_fsdp_collectives._get_gradient_divide_factors`)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so no rank outlives a killed run. The signal
    follows the *thread* that started the rank (prctl(2)), so `DistributedLearner` must be
    built on a thread that lives as long as the run (train.py: the event loop's thread)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent's pipe closing (EOFError) still ends the loop


# ----------------------------------------------------------------------------- building a rank


def build_sharded_policy(rank: int, spec: RankSpec, device: torch.device, mesh) -> tuple[Any, list[str], int]:
    """This rank's shard of the policy (and of its KL reference), loaded once: every rank builds
    the architecture on the meta device and shards it; rank 0 alone reads the weight files and
    broadcasts each tensor, every rank keeps its shard (`learn/loading.py`). The dtypes are the
    memory model's (`trustee.memory.learner_dtypes`); the attention implementation is chosen
    for `device` (flash-attention on a GPU where installed). Returns (policy, its state-dict
    names in HF order, for exports: sharding re-registers parameters in another order; bytes
    this rank read from the weight files)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from trustee.learn.loading import (
        SafetensorsReader,
        copy_shards,
        empty_model,
        fill_shards,
        init_lora,
        materialize,
    )
    from trustee.learn.policy import attn_implementation, wrap_policy
    from trustee.memory import learner_dtypes

    mode, dtype = spec.learner.mode, _DTYPES[spec.dtype]
    dtypes = learner_dtypes(mode, spec.dtype, sharded=True, on_gpu=device.type == "cuda")
    compute, master = _DTYPES[dtypes.compute], _DTYPES[dtypes.master]
    mp = (
        MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        if compute != master or device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    attn = attn_implementation(device, compute)
    torch.manual_seed(spec.seed)
    policy = wrap_policy(empty_model(spec.model_path, dtype, attn), spec.learner)
    names = list(policy.model.state_dict(keep_vars=True))
    shard_policy(policy.model, mesh, mp_policy=mp, master_dtype=master if mode == "full" else None)
    materialize(policy.model, device)
    reader = SafetensorsReader(spec.model_path) if rank == 0 else None
    read = fill_shards(policy.model, reader, rank=rank, device=device)
    if mode != "full":
        init_lora(policy.model, spec.seed)
    if spec.grpo.beta > 0 and mode == "full":  # the KL reference: the policy's shards, in its dtype
        ref = empty_model(spec.model_path, _DTYPES[dtypes.reference], attn).eval().requires_grad_(False)
        shard_policy(ref, mesh, mp_policy=mp, master_dtype=None)
        materialize(ref, device)
        copy_shards(ref, policy.model)
        policy.ref_model = ref
    return policy, names, read


# ----------------------------------------------------------------------------- the worker


class RankWorker:
    """The learner shard of one rank. Every handler is collective: all ranks run it with the
    same arguments except `step`'s samples; only rank 0's return value reaches the user."""

    def __init__(self, rank: int, spec: RankSpec, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        from trustee.learn.learner import Learner

        self.rank, self.spec, self.device = rank, spec, device
        if spec.learner.mode == "qlora":
            raise ValueError(
                "learner.mode = 'qlora' cannot be sharded with FSDP2 here; use placement.learner_ranks = 1"
            )
        self.mesh = init_device_mesh(device.type, (spec.world_size,))
        policy, self.names, self.read_bytes = build_sharded_policy(rank, spec, device, self.mesh)
        self.trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
        self.policy = policy
        self.learner = Learner(
            policy,
            spec.grpo,
            spec.learner,
            temperature=spec.temperature,
            total_steps=spec.total_steps,
            pad_id=spec.pad_id,
            max_over_ranks=self._max_over_ranks,
        )
        self.handlers: dict[str, Callable[..., Any]] = {
            "step": self.step,
            "release": self.release,
            "offload": self.offload,
            "reload": self.reload,
            "gradients": self.gradients,
            "export_lora": self.export_lora,
            "export_full": self.export_full,
            "save": self.save,
            "load": self.load,
        }

    @property
    def model(self) -> nn.Module:
        return self.policy.model

    # ------------------------------------------------------------------ steps

    def _max_over_ranks(self, n: int) -> int:
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _idle_pass(self, backward: bool = True) -> None:
        """A forward (and backward) with zero loss weight: issues the same collectives as a real
        micro-batch (or a proximal forward), changes no gradient."""
        from trustee.learn.logprobs import token_logprobs

        pad = self.spec.pad_id
        mb = build_packed(
            [Sample(tokens=[pad, pad], loss_mask=[0, 1], sampler_logprobs=[0.0, 0.0], advantage=0.0)], [0]
        )
        chunk, temp = self.spec.learner.logprob_chunk, self.spec.temperature
        if not backward:
            with torch.no_grad():
                token_logprobs(self.model, mb, temperature=temp, chunk=chunk)
            return
        if self.spec.grpo.beta > 0 or self.spec.grpo.kl_metric:  # as Learner._micro_step
            with torch.no_grad(), self.policy.reference() as ref:
                token_logprobs(ref, mb, temperature=temp, chunk=chunk)
        logp, _ = token_logprobs(self.model, mb, temperature=temp, chunk=chunk)
        (logp.sum() * 0.0).backward()

    def _sum_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _proximal(self, updates: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
        """The learner's log-probs, before any update of this step, of every sample this rank
        trains in some update (by step-wide sample id); forwards paired over ranks."""
        mine: dict[int, Sample] = {}
        for u in updates:
            mine.update(zip(u["ids"], u["samples"], strict=True))
        ids = sorted(mine)
        samples = [mine[i] for i in ids]
        plan = self.learner.plan(samples)  # collective on every rank, as in _accumulate
        n = len(plan)
        most = self._max_over_ranks(n)
        old = self.learner.old_logprobs(samples, mbs=plan) if samples else []
        for _ in range(most - n):
            self._idle_pass(backward=False)
        _reshard(self.model)
        return dict(zip(ids, old, strict=True))

    def _accumulate(
        self, samples: list[Sample], norm: LossNorm, old: list[torch.Tensor] | None = None
    ) -> tuple[float, TokenLossParts, int, int, list]:
        """One update's gradient on this rank, summed over ranks by FSDP; (loss share, parts,
        real micro-batches, idle passes, the micro-batches). old: the samples' proximal log-probs."""
        plan = self.learner.plan(samples)  # collective: the shared-prefix check pairs up
        mine = len(plan)
        most = self._max_over_ranks(mine)
        if samples:
            loss, parts, mbs = self.learner.accumulate(samples, old, norm=norm, mbs=plan)
        else:
            self.learner.optimizer.zero_grad(set_to_none=True)
            loss, parts, mbs = 0.0, TokenLossParts(), []
        assert len(mbs) == mine, f"micro-batch plan changed: {len(mbs)} != {mine}"
        for _ in range(most - mine):
            self._idle_pass()
        return loss, parts, mine, most - mine, mbs

    def step(self, updates: list[dict[str, Any]], proximal: bool) -> RankStep:
        """`_step`, with the live host bytes' peak sampled around it on the CPU
        (`hostmem.LivePeak`; on CUDA `_step` reads the allocator's peak)."""
        if self.device.type != "cpu":
            return self._step(updates, proximal)
        from trustee.learn.hostmem import LivePeak

        with LivePeak() as meter:
            out = self._step(updates, proximal)
        out.peak_live_bytes = meter.peak or 0
        return out

    def _step(self, updates: list[dict[str, Any]], proximal: bool) -> RankStep:
        """The step's optimiser updates (`learner.update_plan`, computed by the parent; this
        rank's samples of each, with the update's global normaliser). proximal: several
        updates, so each trains against the log-probs taken before the first. An update whose
        loss (summed over ranks) or global gradient norm is not finite is skipped on every
        rank; the gradients are freed at the end, as in `Learner`."""
        from trustee.learn.learner import finite_update, peak_memory, reset_peak_memory

        self.learner.reload()  # an offloaded rank trains only after its state is back
        held = _held_bytes(self.device)
        reset_peak_memory(self.device)
        fallbacks = self.learner.shared_prefix_fallbacks
        old = self._proximal(updates) if proximal else {}
        params = self.policy.trainable_parameters()
        cfg, opt = self.spec.learner, self.learner.optimizer
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        lr = self.learner.scheduler.get_last_lr()[0]
        loss_sum, norms, parts, skipped, counts = 0.0, [], TokenLossParts(), 0, [0, 0, 0, 0]
        for u in updates:
            part_old = [old[i] for i in u["ids"]] if proximal else None
            loss, p, n_mb, idle, mbs = self._accumulate(u["samples"], u["norm"], part_old)
            n_in = sum(mb.n_input_tokens for mb in mbs)
            n_shared = sum(mb.shared_tokens for mb in mbs)
            grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            if finite_update(self._sum_over_ranks(loss), grad_norm):
                opt.step()
            else:
                opt.zero_grad(set_to_none=True)
                skipped += 1
            loss_sum, counts = (
                loss_sum + loss,
                [a + b for a, b in zip(counts, (n_mb, idle, n_in, n_shared), strict=True)],
            )
            norms.append(grad_norm)
            parts.merge(p)
        if skipped < len(updates):
            self.learner.scheduler.step()
            self.learner.step_count += 1
        opt.zero_grad(set_to_none=True)  # gradients do not outlive the step
        self._reshard_all()  # nor do gathered groups (FSDP2 keeps a root gathered after forward)
        return RankStep(
            grads_held=sum(p.grad is not None for p in self.model.parameters()),
            loss=loss_sum / len(updates),
            parts=parts,
            micro_batches=counts[0],
            idle_passes=counts[1],
            input_tokens=counts[2],
            grad_norm=sum(norms) / len(norms),
            lr=lr,
            peak_mem_bytes=peak_memory(self.device),
            peak_live_bytes=peak_memory(self.device) if self.device.type == "cuda" else 0,
            shared_tokens=counts[3],
            shared_prefix_fallback=int(self.learner.shared_prefix_fallbacks > fallbacks),
            updates=len(updates),
            skipped=skipped,
            step_count=self.learner.step_count,
            held_at_start_bytes=held,
        )

    def _reshard_all(self) -> None:
        _reshard(self.model)
        if self.policy.ref_model is not None:
            _reshard(self.policy.ref_model)

    def release(self) -> RankMemory:
        """Free the gradients, reference cycles and (CUDA) the allocator's cached blocks, so an
        engine waking on this rank's GPU can map them (`learner.release_memory`)."""
        from trustee.learn.learner import release_memory

        self._reshard_all()
        free = release_memory(self.learner.optimizer, self.device)
        held = (
            int(torch.cuda.memory_reserved(self.device))
            if self.device.type == "cuda"
            else _held_bytes(self.device)
        )
        grads = sum(p.grad is not None for p in self.model.parameters())
        return RankMemory(rank=self.rank, pid=os.getpid(), grads_held=grads, free_bytes=free, held_bytes=held)

    def offload(self) -> tuple[int, str]:
        """`Learner.offload` on this rank's shards, then `release` (CUDA: the moved bytes go back
        to the driver); (bytes moved, `learn/offload.digest` of them before the move)."""
        from trustee.learn.offload import digest, offload_targets

        before = digest(offload_targets(self.learner.optimizer, self.policy.ref_model))
        moved = self.learner.offload()
        self.release()
        return moved, before

    def reload(self) -> str:
        """`Learner.reload`; the digest of the reloaded tensors (equal to `offload`'s: bit-exact)."""
        from trustee.learn.offload import digest, offload_targets

        self.learner.reload()
        return digest(offload_targets(self.learner.optimizer, self.policy.ref_model))

    def gradients(self, samples: list[Sample], norm: LossNorm, ids: list[int]) -> tuple[float, bytes | None]:
        """Accumulate one update over all the samples without stepping; (this rank's loss
        share, rank 0: the full gradients of the trainable parameters as packed tensors).
        For tests and the GPU check. ids: the samples' step-wide ids (unused here)."""
        loss, *_ = self._accumulate(samples, norm)
        params = dict(self.model.named_parameters())
        grads = {name: _full(params[name].grad).to("cpu") for name in self.trainable}
        return loss, pack_tensors(grads) if self.rank == 0 else None

    # ------------------------------------------------------------------ exports

    @torch.no_grad()
    def export_lora(self) -> tuple[bytes, dict[str, Any]] | None:
        """Rank 0: (PEFT-named adapter tensors, packed; the LoraConfig as plain JSON types)."""
        from peft import get_peft_model_state_dict

        from trustee.learn.export import lora_config_dict

        state = get_peft_model_state_dict(self.model)
        full = {k: _full(v).to("cpu") for k, v in state.items()}  # same key order on every rank
        return (pack_tensors(full), lora_config_dict(self.model)) if self.rank == 0 else None

    @torch.no_grad()
    def export_full(
        self, chunk_bytes: int, dtype: str | None, conn, transport: str = "bytes", bucket_bytes: int = 0
    ) -> int:
        """Every weight (HF names, tied weights once) to the parent. 'bytes': rank 0 streams
        chunks of about chunk_bytes through its pipe, each sent only after the parent took the
        last one, so at most one chunk beyond the shards exists on any device. 'shared': every
        rank shares buckets of whole layers on its own device and sends only their handles
        (`learn/transport.share_full`). Returns the buckets shared (0 for 'bytes')."""
        if hasattr(self.model, "peft_config"):
            raise TypeError("export_full is for learner.mode = 'full'; a LoRA learner exports its adapter")
        out_dtype = _DTYPES[dtype] if dtype else None
        if transport == "shared":
            from trustee.learn.transport import share_full

            kw = {"rank": self.rank, "device": self.device, "dtype": out_dtype, "conn": conn}
            return share_full(self.model, self.names, bucket_bytes=bucket_bytes, full=_full, **kw)
        if transport != "bytes":
            raise ValueError(f"weight transport {transport!r}: use 'bytes' or 'shared'")
        seen: set[int] = set()
        chunk: dict[str, torch.Tensor] = {}
        size, streaming = 0, True

        def flush() -> None:
            nonlocal chunk, size, streaming
            if self.rank == 0 and streaming and chunk:
                conn.send(("chunk", pack_tensors(chunk)))
                streaming = conn.recv() == "next"  # 'stop': the parent gave up on this export
            chunk, size = {}, 0

        state = self.model.state_dict(keep_vars=True)
        for name in self.names:
            t = state[name]
            if id(t) in seen:  # tied weights: engines re-tie on load
                continue
            seen.add(id(t))
            w = _full(t).detach()
            if self.rank == 0:
                w = w.to("cpu", out_dtype) if out_dtype is not None else w.to("cpu")
                chunk[name] = w
                size += w.numel() * w.element_size()
            del w
            if size >= chunk_bytes:
                flush()
        flush()
        return 0

    # ------------------------------------------------------------------ DCP checkpoints

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        frozen_out = self.policy.mode != "full"
        opts = StateDictOptions(ignore_frozen_params=frozen_out)
        self.learner.optimizer.zero_grad(set_to_none=True)  # see load_dcp_into
        model_sd, optim_sd = get_state_dict(self.model, self.learner.optimizer, options=opts)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, path: str) -> dict[str, Any] | None:
        """Sharded checkpoint of the trainable weights and AdamW state into directory `path`
        (DCP: each rank writes its shards, rank 0 the metadata). Rank 0 returns the schedule."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=path)
        if self.rank == 0:
            return {"scheduler": self.learner.scheduler.state_dict(), "step_count": self.learner.step_count}
        return None

    def load(self, path: str, schedule: dict[str, Any]) -> None:
        """Load a DCP checkpoint written by any number of ranks (DCP reshards on read)."""
        load_dcp_into(self.model, self.learner.optimizer, path, full=self.policy.mode == "full")
        self.learner.scheduler.load_state_dict(schedule["scheduler"])
        self.learner.step_count = int(schedule["step_count"])


# What a DCP checkpoint's `.metadata` pickle may name: DCP's own metadata records, the path and
# size types inside them, torch dtypes. Anything else is refused (never imported or called).
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # every record class of that module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = module in _DCP_GLOBALS and (_DCP_GLOBALS[module] is None or name in _DCP_GLOBALS[module])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed or name.startswith("__"):
            raise pickle.UnpicklingError(
                f"DCP metadata names {module}.{name}, which a learner checkpoint never holds; "
                "it is refused rather than imported (resume only from a run directory you made)"
            )
        return super().find_class(module, name)


def plain_metadata_reader(path: str) -> Any:
    """A DCP `FileSystemReader` whose `.metadata` (a pickle, in torch's format) is read by an
    unpickler that builds only DCP's metadata records: a checkpoint from elsewhere cannot run
    code on resume. The shards themselves are raw tensor bytes (and `weights_only` loads)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _PlainUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def load_dcp_into(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, *, full: bool) -> None:
    """Read a learner DCP checkpoint into `model` / `optimizer`, sharded or not: works in an FSDP
    rank and in a single process without a process group (`dcp.load` then reads locally).
    full: the checkpoint holds every weight (full fine-tuning), else only trainable ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(ignore_frozen_params=not full, strict=full)
    # get_state_dict builds the optimiser template by a zero-lr step on a fresh optimiser, but
    # skips that when any .grad is set, leaving no state to load into (torch 2.13
    # `state_dict._init_optim_state`): a resumed AdamW would restart its bias correction.
    optimizer.zero_grad(set_to_none=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    reader = plain_metadata_reader(path)
    reader.read_metadata()  # refused here with the reason (dcp.load would hide it behind a fallback)
    dcp.load(state, storage_reader=reader)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts
    )


# ----------------------------------------------------------------------------- the process


class RankReady(msgspec.Struct, frozen=True, kw_only=True):
    """A rank's first message: its pid and build time, the bytes it read from the weight
    files, and host memory around the build (resident set before it, after the imports; peak
    resident set during it: what the one-reader loading keeps below one model copy; live
    allocated bytes before it, `hostmem.live_bytes`, the base of `RankStep.peak_live_bytes`
    on the CPU, 0 without glibc)."""

    pid: int
    load_s: float
    read_bytes: int
    host_rss_before: int
    host_build_peak: int
    host_live_before: int = 0


def _warm_imports(model_path: str) -> None:
    """Import what building a rank needs, so the resident set measured before the build holds
    the libraries and not the model."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import trustee.learn.learner  # noqa: F401

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_path))]


def _built(rank: int, spec: RankSpec, device: torch.device) -> tuple[RankWorker, RankReady]:
    import psutil

    from trustee.learn.hostmem import live_bytes
    from trustee.learn.learner import peak_memory, reset_peak_memory

    t0 = time.perf_counter()
    _warm_imports(spec.model_path)
    host = torch.device("cpu")
    live = live_bytes() or 0
    before = int(psutil.Process().memory_info().rss)
    reset_peak_memory(host)
    worker = RankWorker(rank, spec, device)
    ready = RankReady(
        pid=os.getpid(),
        load_s=time.perf_counter() - t0,
        read_bytes=worker.read_bytes,
        host_rss_before=before,
        host_build_peak=peak_memory(host),
        host_live_before=live,
    )
    return worker, ready


def rank_main(rank: int, spec: RankSpec, conn) -> None:
    """Entry point of a learner process: join the process group, build the shard, then serve
    (command, kwargs) messages until 'close' or the parent's end of the pipe closes. Replies:
    ('ok', payload), ('chunk', bytes) or ('bucket', handle payload) while exporting, ('error',
    traceback) then exit."""
    _die_with_parent()
    torch.set_num_threads(spec.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank is noise; tqdm's lock would also leak at os._exit
    if spec.device == "cuda":
        device = torch.device("cuda", spec.gpus[rank])
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    try:
        dist.init_process_group(
            backend, init_method=spec.init_method, rank=rank, world_size=spec.world_size, timeout=PG_TIMEOUT
        )
        worker, ready = _built(rank, spec, device)
        conn.send(("ok", ready))
        while True:
            try:
                cmd, kwargs = conn.recv()
            except EOFError:
                break  # the parent is gone
            if cmd == "close":
                conn.send(("ok", None))
                break
            handler = worker.handlers[cmd]
            if cmd == "export_full":
                kwargs = {**kwargs, "conn": conn}
            conn.send(("ok", handler(**kwargs)))
    except Exception:  # noqa: BLE001 - the traceback goes to the parent, which raises it
        buf = io.StringIO()
        traceback.print_exc(file=buf)
        try:
            conn.send(("error", f"rank {rank}: {buf.getvalue()}"))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown (seconds of module finalisers on a loaded machine)
