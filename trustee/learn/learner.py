"""The learner: one GRPO optimiser step per batch of groups.

Owns `Learner` (policy + AdamW + schedule; `step` / `step_async`) and `StepMetrics`. A step:
turn the groups into `Sample`s, compute the loss normaliser from the whole step's batch,
pack the samples into micro-batches by token budget (a group's shared prompt once, when
`learner.share_prefix` allows), and for each micro-batch compute
reference log-probs (if beta > 0), the policy's log-probs (chunked, `learn/logprobs.py`),
the per-token GRPO loss (`learn/grpo.py`) and backward; then clip gradients, step the
optimiser and the schedule, and report metrics.

Several updates per batch (`grpo.updates_per_batch` passes x `grpo.mini_batches` parts):
the learner first computes its own log-probs of every loss token once, without gradient
("old", the proximal policy at the time the batch is trained); each optimiser update then
trains on a shuffled part of the batch against those, so the PPO ratio exp(logp - old) moves
away from 1 and the clip (`clip_low` / `clip_high`) is a real trust region. With a single
update the old log-probs are `logp.detach()` of the same forward pass (no extra pass): the
ratio is 1 in value, its gradient is the policy gradient, and the clip cannot bind.

This is the decoupled objective (AReaL): the trust region is taken against the proximal
policy (the learner at training time), and the importance weight exp(old - sampler)
(TIS/MIS, `grpo.is_*`) corrects the rest of the gap between the sampler and the learner
(staleness in 'overlap' placement, kernels, quantisation). Both ratios are reported:
`ratio_*` (learner / proximal, what the clip acts on) and `is_ratio_*` (proximal / sampler).

Shared prefixes (`learn/packing.py`, `learn/attention.py`) change the layout only: every loss,
log-prob, ratio, KL term and metric stays per original episode. With `share_prefix = 'auto'`
the first micro-batch of each new shape (`_shape`: the attention kernel, dtype, the most
branches of a unit and the longest prefix's power of two) is also run without sharing, with
no gradient, and the two log-probs compared (as Unsloth checks its shared path at run time);
past the tolerance the learner warns, reports `shared_prefix_fallback`, and packs whole from
then on. Under FSDP the check is collective: every rank runs as many check passes as the
busiest, and one rank's mismatch turns sharing off on all.

Does not compute advantages (`learn/advantages.py`, called by the controller) or export
weights (`learn/export.py`). Step code takes the device from the model and calls no
`.cuda()`, so FSDP2 ranks can reuse it; `step_async` runs a step in a worker thread so the
asyncio loop (rollouts) keeps going.
"""

from __future__ import annotations

import logging
import math
import random
import re
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import torch

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn.attention import resolve_kernel
from trustee.learn.grpo import (
    LossNorm,
    TokenLossParts,
    aggregate,
    grpo_token_loss,
    k3_kl,
    loss_norm,
    token_weights,
)
from trustee.learn.logprobs import model_device, token_logprobs
from trustee.learn.packing import (
    MicroBatch,
    Sample,
    build_packed,
    build_padded,
    build_shared,
    check_sample,
    plan_bins,
    plan_shared,
)
from trustee.learn.policy import Policy
from trustee.types import Group

log = logging.getLogger("trustee.learn")

SHARE_CHECK_TOL = {torch.float32: (1e-3, 1e-4), torch.float64: (1e-6, 1e-7)}
"""(max, mean) absolute log-prob difference the run-time check accepts between the shared and
the unshared layout, by compute dtype. float32 layouts agree to about 1e-6 on the tiny models
(tests/test_learn_shared.py); other dtypes (bf16, fp16) get HALF_TOL, a guess not yet measured
on a GPU."""
HALF_TOL = (0.25, 0.02)


class StepMetrics(msgspec.Struct, kw_only=True):
    """What one optimiser step did. Ratios are over loss tokens unless named otherwise.

    `is_*` describe the raw importance ratio exp(learner - sampler) before truncation, in
    units of grpo.is_level (tokens or sequences); `is_masked_frac` / `is_truncated_frac` are
    shares of those units. `tokens` counts real input tokens (no padding), `input_tokens`
    what the model saw; `peak_mem_bytes` is CUDA max_memory_allocated during the step, or
    the peak RSS during the step on CPU (Linux VmHWM, reset at the step's start);
    `oversize` counts sequences longer than the token budget (each ran alone).
    `ratio_min` / `ratio_max`: the PPO ratio learner / proximal over the loss tokens (1 with a
    single update); `optimizer_steps` = updates_per_batch x mini_batches; `grad_norm` is
    the mean pre-clip norm over them; `update_norm` the L2 norm of the change of the
    trainable weights over the whole step and `param_norm` their norm after it (so their
    ratio says how far a step moved); `kl` the mean k3 KL to the reference when beta > 0 or
    grpo.kl_metric is on, else 0.
    """

    step: int
    loss: float
    clip_frac: float
    ratio_min: float = 1.0
    ratio_max: float = 1.0
    optimizer_steps: int = 1
    kl: float
    entropy: float
    is_ratio_min: float
    is_ratio_mean: float
    is_ratio_max: float
    is_masked_frac: float
    is_truncated_frac: float
    grad_norm: float
    update_norm: float = 0.0
    param_norm: float = 0.0
    lr: float
    seqs: int
    loss_tokens: int
    tokens: int
    input_tokens: int
    micro_batches: int
    oversize: int
    wall_s: float
    tokens_per_s: float
    peak_mem_bytes: int
    skipped_nonfinite: int = 0
    """1 when the loss or gradient norm was not finite and the optimiser step was skipped."""
    shared_prefix_frac: float = 0.0
    """Share of the step's tokens the model did not compute because a group's common prompt was
    fed once (shared-prefix packing): shared / (shared + input_tokens)."""
    shared_prefix_fallback: int = 0
    """1 when the run-time check found the shared layout wrong in this step (the learner then
    packs episodes whole for the rest of the run)."""


def samples_from_groups(groups: list[Group], malformed_advantage: float | None = None) -> list[Sample]:
    """One Sample per trajectory; every group must already carry its advantages. With
    `malformed_advantage` set (`grpo.turn_credit = 'malformed'`), the tokens of each malformed
    turn (`Trajectory.malformed_turns`) get min(episode advantage, malformed_advantage)."""
    out: list[Sample] = []
    for g in groups:
        if len(g.advantages) != len(g.trajectories):
            raise ValueError(
                f"group {g.task_id!r}: {len(g.advantages)} advantages for {len(g.trajectories)} trajectories; "
                "compute them with trustee.learn.advantages.compute_advantages before Learner.step"
            )
        for t, a in zip(g.trajectories, g.advantages, strict=True):
            spans: tuple[tuple[int, int, float], ...] = ()
            if malformed_advantage is not None and t.malformed_turns:
                low = min(a, malformed_advantage)
                spans = tuple((start, end, low) for start, end in t.malformed_turns)
            out.append(
                Sample(tokens=t.tokens, loss_mask=t.loss_mask, sampler_logprobs=t.logprobs, advantage=a, spans=spans)
            )
    return out


def turn_credit(grpo: GrpoConfig) -> float | None:
    """The `malformed_advantage` argument of `samples_from_groups` for a run's [grpo]."""
    return grpo.malformed_advantage if grpo.turn_credit == "malformed" else None


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    """Multiplier of cfg.lr at a step: linear warm-up, then constant or cosine to min_lr_ratio."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def update_plan(n: int, step_count: int, updates_per_batch: int, mini_batches: int) -> list[list[int]]:
    """Sample indices of each optimiser update of a step over `n` samples, the one plan both
    learners follow (the FSDP2 parent computes it and splits each update over the ranks): for
    each of `updates_per_batch` passes, a shuffle (seeded by the step count, so resume replays
    it) split into `mini_batches` near-equal parts; empty parts are skipped."""
    rng = random.Random(step_count)
    plan = []
    for _ in range(updates_per_batch):
        order = list(range(n))
        if updates_per_batch * mini_batches > 1:
            rng.shuffle(order)
        k = min(mini_batches, n)
        plan += [order[j * n // k : (j + 1) * n // k] for j in range(k)]
    return [p for p in plan if p]


def finite_update(loss: float, grad_norm: float) -> bool:
    """Whether an optimiser update may apply: a non-finite loss or gradient norm would poison
    the weights and Adam's moments, so that update is skipped (both learners; the FSDP2 ranks
    decide on the loss summed over ranks and the global norm, so they agree)."""
    return math.isfinite(loss) and math.isfinite(grad_norm)


def release_memory(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Free what this process holds beyond its weights and optimiser state: the gradients,
    objects kept alive by reference cycles, and (CUDA) the caching allocator's unused blocks,
    so another process (an engine waking) can map them. Returns the device's free bytes."""
    import gc

    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _padded_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Arrival-order bins whose padded size (count x longest) fits the budget (padded layout)."""
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if bins and (len(bins[-1]) + 1) * max(n, max(lengths[j] for j in bins[-1])) <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
    return bins


def _norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm of all `tensors` together, accumulated in float64 (a few foreach kernels and one
    device sync, not a sync per tensor)."""
    if not tensors:
        return 0.0
    parts = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return float(torch.linalg.vector_norm(torch.stack(parts)))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or Linux's VmHWM (peak RSS) on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM; Linux only
    except OSError:
        pass  # peak_memory then reports the process's lifetime peak


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max_memory_allocated, or peak RSS since reset_peak_memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        m = None
    kib = int(m.group(1)) if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


class Learner:
    """Owns the policy's optimiser and schedule; one `step` = one optimiser update.

    temperature: the sampler's temperature (rollout.temperature), applied to the logits.
    total_steps: the schedule's horizon (grpo.steps). layout: 'packed' (default; shares
    prefixes as cfg.share_prefix says) or 'padded' (one row per sequence with an attention
    mask, never shared; for benchmarks and tests).
    Data parallelism (FSDP2 ranks): `world_size` and `sum_over_ranks` (an all-reduce of an
    int) give dapo its global token count; every other normaliser is per rank;
    `max_over_ranks` (an all-reduce MAX) keeps the shared-prefix check collective.
    """

    def __init__(
        self,
        policy: Policy,
        grpo: GrpoConfig,
        cfg: LearnerConfig,
        *,
        temperature: float = 1.0,
        total_steps: int | None = None,
        layout: str = "packed",
        pad_id: int = 0,
        world_size: int = 1,
        sum_over_ranks: Callable[[int], int] | None = None,
        max_over_ranks: Callable[[int], int] | None = None,
    ):
        if layout not in ("packed", "padded"):
            raise ValueError(f"layout = {layout!r}: choose 'packed' or 'padded'")
        if grpo.beta > 0 and policy.mode == "full" and policy.ref_model is None:
            raise ValueError(
                "grpo.beta > 0 with learner.mode = 'full' needs a reference copy: build the policy with need_reference=True"
            )
        self.policy, self.grpo, self.cfg = policy, grpo, cfg
        self.temperature, self.layout, self.pad_id = temperature, layout, pad_id
        self.world_size, self.sum_over_ranks, self.max_over_ranks = world_size, sum_over_ranks, max_over_ranks
        self.share_prefix = cfg.share_prefix if layout == "packed" else "off"
        self.shared_prefix_fallbacks = 0
        self._verified: set[tuple] = set()  # shapes the run-time check passed
        self._fell_back = 0  # in the current step
        params = policy.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        horizon = total_steps if total_steps is not None else grpo.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, horizon))
        self.step_count = 0
        self._lock = threading.Lock()
        self._offloaded: Any = None  # a learn/offload.HostCopy while the state is on the host

    @property
    def model(self) -> torch.nn.Module:
        return self.policy.model

    # ------------------------------------------------------------------ batching

    def norm_for(self, samples: list[Sample]) -> LossNorm:
        counts = [s.n_loss for s in samples]
        total = sum(counts) if self.sum_over_ranks is None else self.sum_over_ranks(sum(counts))
        return loss_norm(
            self.grpo.loss_type,
            counts,
            max_len=self.grpo.dr_grpo_length,
            global_tokens=total,
            world_size=self.world_size,
        )

    def micro_batches(self, samples: list[Sample]) -> list[MicroBatch]:
        """The step's layout, unchecked (`plan` adds the run-time check)."""
        lengths = [len(s.tokens) for s in samples]
        budget = self.cfg.micro_batch_tokens
        if self.layout == "padded":
            return [
                build_padded([samples[i] for i in b], b, pad_id=self.pad_id)
                for b in _padded_bins(lengths, budget)
            ]
        if self.share_prefix != "off":
            return [build_shared(samples, units) for units in plan_shared(samples, budget)]
        return [build_packed([samples[i] for i in b], b) for b in plan_bins(lengths, budget)]

    def plan(self, samples: list[Sample]) -> list[MicroBatch]:
        """`micro_batches`, after the run-time check of any new shared shape ('auto'). Collective
        under FSDP: every rank calls it, with or without samples."""
        mbs = self.micro_batches(samples) if samples else []
        if self.share_prefix != "auto":
            return mbs
        todo: dict[tuple, MicroBatch] = {}
        for mb in mbs:
            key = self._shape(mb)
            if key is not None and key not in self._verified:
                todo.setdefault(key, mb)
        n = len(todo)
        most = n if self.max_over_ranks is None else self.max_over_ranks(n)
        if most == 0:
            return mbs
        bad: tuple[tuple, float, float] | None = None
        checks = list(todo.items())
        for i in range(most):
            if i >= n:
                self._compare(None)  # the same forwards on a token pair: FSDP's collectives pair up
                continue
            key, mb = checks[i]
            worst, mean = self._compare((samples, mb))
            tol_max, tol_mean = SHARE_CHECK_TOL.get(key[1], HALF_TOL)
            if bad is None and (not worst <= tol_max or not mean <= tol_mean):
                bad = (key, worst, mean)
        failed = int(bad is not None)
        if self.max_over_ranks is not None:
            failed = self.max_over_ranks(failed)
        if not failed:
            self._verified.update(todo)
            return mbs
        why = (
            f"shape {bad[0]}: log-probs differ by {bad[1]:.3g} at most, {bad[2]:.3g} on average"
            if bad is not None
            else "another rank found a mismatch"
        )
        log.warning(
            "learner: the shared-prefix layout disagrees with the unshared one (%s); packing every "
            "episode whole from now on (learner.share_prefix = 'off' makes this the default)",
            why,
        )
        self.share_prefix = "off"
        self.shared_prefix_fallbacks += 1
        self._fell_back = 1
        return self.micro_batches(samples) if samples else []

    def _shape(self, mb: MicroBatch) -> tuple | None:
        """What the run-time check keys on: (kernel, dtype, most branches of a unit, bit length of
        the longest prefix); None for a micro-batch that shares nothing."""
        layout = mb.layout
        if layout is None:
            return None
        p = next(self.model.parameters())
        kernel = resolve_kernel(layout.kernel, p.device, p.dtype)
        most = max(len(b) for _, _, b in layout.units)
        longest = max(pre for _, pre, b in layout.units if b)
        return (kernel, p.dtype, most, longest.bit_length())

    @torch.no_grad()
    def _compare(self, job: tuple[list[Sample], MicroBatch] | None) -> tuple[float, float]:
        """(max, mean) |log-prob difference| between a shared micro-batch and the same samples
        packed whole, computed in eval mode (no dropout); None: the same two forwards on a
        token pair, for a rank with nothing to check."""
        if job is None:
            pair = Sample(
                tokens=[self.pad_id] * 2, loss_mask=[0, 1], sampler_logprobs=[0.0, 0.0], advantage=0.0
            )
            shared = whole = build_packed([pair], [0])
        else:
            samples, shared = job
            whole = build_packed([samples[i] for i in shared.sample_ids], shared.sample_ids)
        was = self.model.training
        self.model.eval()
        try:
            a, _ = token_logprobs(
                self.model, shared, temperature=self.temperature, chunk=self.cfg.logprob_chunk
            )
            b, _ = token_logprobs(
                self.model, whole, temperature=self.temperature, chunk=self.cfg.logprob_chunk
            )
        finally:
            self.model.train(was)
        d = (a.float() - b.float()).abs()
        return float(d.max()), float(d.mean())

    # ------------------------------------------------------------------ one micro-batch

    def _micro_step(
        self, mb: MicroBatch, norm: LossNorm, old_logp: torch.Tensor | None = None
    ) -> tuple[float, TokenLossParts]:
        """Forward + backward of one micro-batch; returns its share of the step loss.
        old_logp: [N] the proximal log-probs of mb's loss tokens (None: this forward's own,
        detached, i.e. a single update per batch)."""
        g = self.grpo
        ref_logp = None
        if g.beta > 0 or g.kl_metric:
            with torch.no_grad(), self.policy.reference() as ref:
                ref_logp, _ = token_logprobs(
                    ref, mb, temperature=self.temperature, chunk=self.cfg.logprob_chunk
                )
        logp, entropy = token_logprobs(
            self.model, mb, temperature=self.temperature, chunk=self.cfg.logprob_chunk
        )
        dev = logp.device
        old = logp.detach() if old_logp is None else old_logp.to(dev)
        tok_loss, parts = grpo_token_loss(
            logp,
            old,
            mb.sampler_logp.to(dev),
            mb.adv.to(dev),
            mb.seq.to(dev),
            mb.n_seqs,
            clip_low=g.clip_low,
            clip_high=g.clip_high,
            beta=g.beta,
            ref_logp=ref_logp,
            is_level=g.is_level,
            is_mode=g.is_mode,
            is_min=g.is_min,
            is_max=g.is_max,
        )
        loss = aggregate(tok_loss, token_weights(norm, mb.seq_tokens.to(dev)))
        loss.backward()
        parts.entropy_sum = float(entropy.sum())
        if g.beta == 0 and ref_logp is not None:  # kl_metric: measured, not trained on
            parts.kl_sum = float(k3_kl(logp.detach(), ref_logp).sum())
        with torch.no_grad():
            ratio = torch.exp(logp.detach() - old)  # [N]
            parts.ratio_min = float(ratio.min())
            parts.ratio_max = float(ratio.max())
        return float(loss.detach()), parts

    @torch.no_grad()
    def old_logprobs(self, samples: list[Sample], mbs: list[MicroBatch] | None = None) -> list[torch.Tensor]:
        """The learner's log-probs of each sample's loss tokens before any update of this
        step (the proximal policy), one [n_loss] tensor per sample, on the model's device.
        mbs: `plan(samples)` when the caller made it (FSDP ranks: `plan` is collective)."""
        out: list[torch.Tensor | None] = [None] * len(samples)
        for mb in self.plan(samples) if mbs is None else mbs:
            logp, _ = token_logprobs(
                self.model, mb, temperature=self.temperature, chunk=self.cfg.logprob_chunk
            )
            counts = [samples[i].n_loss for i in mb.sample_ids]
            for i, part in zip(mb.sample_ids, torch.split(logp, counts), strict=True):
                out[i] = part
        return out  # type: ignore[return-value]

    def release(self) -> int:
        """`release_memory` for this learner (placement calls it before an engine wakes)."""
        with self._lock:
            return release_memory(self.optimizer, model_device(self.model))

    def offload(self) -> int:
        """Move the AdamW state and the KL reference to host memory (`learn/offload.py`; placement
        calls it before a wake with learner.offload); returns the bytes moved. `reload`, a
        checkpoint or the next step brings them back."""
        from trustee.learn.offload import HostCopy, offload_targets

        with self._lock:
            if self._offloaded is None:
                self._offloaded = HostCopy(offload_targets(self.optimizer, self.policy.ref_model))
            return self._offloaded.nbytes

    def reload(self) -> None:
        """Undo `offload` (a no-op when nothing is offloaded)."""
        with self._lock:
            self._reload()

    def _reload(self) -> None:
        if self._offloaded is not None:
            self._offloaded.restore()
            self._offloaded = None

    # ------------------------------------------------------------------ one step

    def accumulate(
        self,
        samples: list[Sample],
        old: list[torch.Tensor] | None = None,
        norm: LossNorm | None = None,
        mbs: list[MicroBatch] | None = None,
    ) -> tuple[float, TokenLossParts, list[MicroBatch]]:
        """Zero the grads and accumulate the gradient of `samples` (one optimiser update's
        worth); no optimiser step. old: per-sample proximal log-probs (`old_logprobs`), or
        None for a single update per batch; norm: the step normaliser when the caller computed
        it over all ranks (FSDP learner); mbs: `plan(samples)` when the caller made it."""
        for i, s in enumerate(samples):
            check_sample(s, i)
        norm = self.norm_for(samples) if norm is None else norm
        mbs = self.plan(samples) if mbs is None else mbs
        self.optimizer.zero_grad(set_to_none=True)
        total, parts = 0.0, TokenLossParts()
        for mb in mbs:
            mb_old = None if old is None else torch.cat([old[i] for i in mb.sample_ids])
            loss, p = self._micro_step(mb, norm, mb_old)
            total += loss
            parts.merge(p)
        return total, parts, mbs

    def update_plan(self, n: int) -> list[list[int]]:
        """This step's optimiser updates over `n` samples (`update_plan`, at this step count)."""
        return update_plan(n, self.step_count, self.grpo.updates_per_batch, self.grpo.mini_batches)

    def step(self, groups: list[Group]) -> StepMetrics:
        """One optimiser step on `groups` (with advantages). Thread-safe: steps never overlap."""
        with self._lock:
            return self._step(samples_from_groups(groups, turn_credit(self.grpo)))

    async def step_async(self, groups: list[Group]) -> StepMetrics:
        """`step` in a worker thread, so the event loop (rollouts) keeps running."""
        return await anyio.to_thread.run_sync(self.step, groups)

    def _step(self, samples: list[Sample]) -> StepMetrics:
        if not samples:
            raise ValueError("Learner.step got no trajectories; skip the step when every group was filtered")
        self._reload()  # an offloaded learner trains only after its state is back
        device = model_device(self.model)
        reset_peak_memory(device)
        self._fell_back = 0
        t0 = time.perf_counter()
        params = self.policy.trainable_parameters()
        before = torch._foreach_mul([p.detach() for p in params], 1.0)  # a copy, one foreach kernel
        plan = self.update_plan(len(samples))
        old = self.old_logprobs(samples) if len(plan) > 1 else None
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        lr = self.scheduler.get_last_lr()[0]
        losses, norms, parts, mbs = [], [], TokenLossParts(), []
        skipped = 0
        for idx in plan:
            part_old = None if old is None else [old[i] for i in idx]
            loss, p, m = self.accumulate([samples[i] for i in idx], part_old)
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if finite_update(loss, norm):
                self.optimizer.step()
            else:
                log.warning(
                    "learner: non-finite loss %s / grad norm %s; optimiser update skipped", loss, norm
                )
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
            norms.append(norm)
            losses.append(loss)
            parts.merge(p)
            mbs += m
        if skipped < len(plan):
            self.scheduler.step()
            self.step_count += 1
        self.optimizer.zero_grad(set_to_none=True)  # gradients do not outlive the step
        with torch.no_grad():
            after = [p.detach() for p in params]
            torch._foreach_sub_(before, after)  # before := before - after, the step's change (sign aside)
            update, pnorm = _norm(before), _norm(after)
        wall = time.perf_counter() - t0
        m = self._metrics(
            samples,
            mbs,
            sum(losses) / len(losses),
            parts,
            sum(norms) / len(norms),
            lr,
            wall,
            device,
            update_norm=update,
            param_norm=pnorm,
            optimizer_steps=len(plan) - skipped,
        )
        m.skipped_nonfinite = int(skipped > 0)
        m.shared_prefix_fallback = self._fell_back
        return m

    def _metrics(
        self,
        samples,
        mbs,
        loss,
        parts: TokenLossParts,
        grad_norm,
        lr,
        wall,
        device,
        *,
        update_norm: float = 0.0,
        param_norm: float = 0.0,
        optimizer_steps: int = 1,
    ) -> StepMetrics:
        n_tok = max(1, parts.tokens)
        isx = parts.is_stats
        units = max(1, isx.count)
        real = sum(len(s.tokens) for s in samples)
        fed = sum(mb.n_input_tokens for mb in mbs)
        shared = sum(mb.shared_tokens for mb in mbs)
        return StepMetrics(
            step=self.step_count,
            loss=loss,
            clip_frac=parts.clipped / n_tok,
            ratio_min=parts.ratio_min if parts.tokens else 1.0,
            ratio_max=parts.ratio_max if parts.tokens else 1.0,
            optimizer_steps=optimizer_steps,
            update_norm=update_norm,
            param_norm=param_norm,
            kl=parts.kl_sum / n_tok,
            entropy=parts.entropy_sum / n_tok,
            is_ratio_min=isx.min if isx.count else 1.0,
            is_ratio_mean=isx.sum / units if isx.count else 1.0,
            is_ratio_max=isx.max if isx.count else 1.0,
            is_masked_frac=isx.masked / units,
            is_truncated_frac=isx.truncated / units,
            grad_norm=grad_norm,
            lr=lr,
            seqs=len(samples),
            loss_tokens=parts.tokens,
            tokens=real,
            input_tokens=fed,
            micro_batches=len(mbs),
            oversize=sum(len(s.tokens) > self.cfg.micro_batch_tokens for s in samples),
            wall_s=wall,
            tokens_per_s=real / wall if wall > 0 else 0.0,
            peak_mem_bytes=peak_memory(device),
            shared_prefix_frac=shared / max(1, shared + fed),
        )


def build_learner(
    path: str,
    grpo: GrpoConfig,
    cfg: LearnerConfig,
    *,
    temperature: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Learner:
    """Load the policy at `path` for cfg.mode (with a KL reference when grpo.beta > 0) and
    wrap it in a Learner. temperature: rollout.temperature; device/dtype: from `Resolved`."""
    from trustee.learn.policy import load_policy

    policy = load_policy(path, cfg, device=device, dtype=dtype, need_reference=grpo.beta > 0)
    return Learner(policy, grpo, cfg, temperature=temperature, total_steps=grpo.steps)
