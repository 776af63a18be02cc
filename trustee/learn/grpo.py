"""GRPO losses as pure functions on tensors.

Owns the per-token objective (clipped surrogate with asymmetric clip, k3 KL, importance-
sampling correction of the sampler/learner mismatch), the four aggregations and the
normaliser that makes gradient accumulation exact. Knows nothing about models, packing or
optimisers: the learner (`learn/learner.py`) computes log-probs, calls these, and calls
backward.

Layout. Every per-token tensor here is flat over the *loss tokens* of a micro-batch, shape
[N]: one entry per position whose token was sampled by the policy (the log-prob code only
computes those). `seq` [N] says which sequence of the micro-batch each token belongs to
(0..S-1) and `seq_tokens` [N] how many loss tokens that sequence has.

Aggregation, for an optimiser step over a batch of B sequences, loss tokens L_b each,
per-token loss l_bt (on this rank; W ranks, T_g loss tokens across all of them):

    grpo     sum_b (1/B) * (1/L_b) * sum_t l_bt        mean per sequence, then mean
    dr_grpo  sum_b sum_t l_bt / (B * L_max)            L_max a fixed length (grpo.dr_grpo_length)
    bnpo     sum_b sum_t l_bt / (sum_b L_b)            token mean over this rank's step batch
    dapo     sum_b sum_t l_bt / (T_g / W)              token mean over the global step batch

Each is a weighted sum of per-token losses with weights fixed by the *whole step's* batch
(`LossNorm`, computed before the micro-batch loop), so summing the micro-batch losses gives
exactly the one-big-batch loss whatever the packing. On one process bnpo and dapo coincide;
they differ under data parallelism when ranks hold different token counts (dapo weighs
every token in the global batch equally, bnpo every token within its rank). This bnpo is
*not* TRL's, which divides by the tokens of each micro-batch and so makes the gradient
depend on how packing split the batch; we define the "batch" of BNPO as the step batch.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import torch

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
IsLevel = Literal["token", "sequence"]
IsMode = Literal["truncate", "mask", "off"]


class LossNorm(msgspec.Struct, frozen=True, kw_only=True):
    """Normaliser of one optimiser step, from the whole step's batch on this rank.

    `n_seqs` and `n_tokens` count this rank's sequences and loss tokens; `global_tokens`
    counts loss tokens over all `world_size` ranks (all-reduced by the caller; equals
    `n_tokens` on one process); `max_len` is dr_grpo's fixed length.
    """

    loss_type: LossType
    n_seqs: int
    n_tokens: int
    global_tokens: int
    world_size: int = 1
    max_len: int = 1


def loss_norm(
    loss_type: LossType,
    seq_tokens: list[int],
    *,
    max_len: int = 1,
    global_tokens: int | None = None,
    world_size: int = 1,
) -> LossNorm:
    """Build the step normaliser from the loss-token count of every sequence in the step."""
    if loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo"):
        raise ValueError(f"loss_type = {loss_type!r}: choose grpo, dr_grpo, dapo or bnpo (grpo.loss_type)")
    if not seq_tokens or min(seq_tokens) < 1:
        raise ValueError(f"every sequence needs >= 1 loss token; got counts {seq_tokens[:8]}...")
    n = sum(seq_tokens)
    return LossNorm(
        loss_type=loss_type,
        n_seqs=len(seq_tokens),
        n_tokens=n,
        global_tokens=n if global_tokens is None else global_tokens,
        world_size=world_size,
        max_len=max_len,
    )


def token_weights(norm: LossNorm, seq_tokens: torch.Tensor) -> torch.Tensor:
    """Weight of each loss token in the step loss. seq_tokens: [N] -> [N] float."""
    L = seq_tokens.to(torch.float64)  # [N]
    if norm.loss_type == "grpo":
        w = 1.0 / (L * norm.n_seqs)
    elif norm.loss_type == "dr_grpo":
        w = torch.full_like(L, 1.0 / (norm.n_seqs * norm.max_len))
    elif norm.loss_type == "bnpo":
        w = torch.full_like(L, 1.0 / norm.n_tokens)
    else:  # dapo
        w = torch.full_like(L, norm.world_size / norm.global_tokens)
    return w.to(torch.float32)


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, negated to be minimised.

    ratio, adv: [N]. Returns (loss [N], clipped [N] bool). loss = -min(r*A, clip(r)*A) with
    clip(r) = clamp(r, 1 - clip_low, 1 + clip_high). `clipped` marks tokens where the clamped
    term wins strictly, i.e. the gradient is zero: A > 0 and r > 1 + clip_high, or A < 0
    and r < 1 - clip_low.
    """
    unclipped = ratio * adv  # [N]
    clipped_obj = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv  # [N]
    loss = -torch.minimum(unclipped, clipped_obj)
    clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    return loss, clipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1, d = ref - logp. [N]."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


class IsStats(msgspec.Struct, kw_only=True):
    """Importance-ratio statistics over one micro-batch (raw ratios, before truncation).

    Counts are in units of the correction level: tokens for 'token', sequences for
    'sequence'. `masked` = units zeroed by 'mask'; `truncated` = units clamped by 'truncate'.
    """

    min: float = float("inf")
    max: float = float("-inf")
    sum: float = 0.0
    count: int = 0
    masked: int = 0
    truncated: int = 0

    def merge(self, other: IsStats) -> None:
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.sum += other.sum
        self.count += other.count
        self.masked += other.masked
        self.truncated += other.truncated


def is_weights(
    learner_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    seq: torch.Tensor,
    n_seqs: int,
    *,
    level: IsLevel,
    mode: IsMode,
    lo: float,
    hi: float,
) -> tuple[torch.Tensor, IsStats]:
    """Importance weight per token correcting for sampling from the engine, not the learner.

    learner_logp, sampler_logp: [N] (no gradient is taken through either); seq: [N] sequence
    index. rho = exp(learner - sampler) per token ('token'), or exp(sum over the sequence of
    the log-ratio) for every token of the sequence ('sequence': the sequence likelihood
    ratio, as TRL). 'truncate' clamps rho to [lo, hi]; 'mask' sets rho to 0 outside
    [lo, hi] (whole sequences for 'sequence'); 'off' gives weights of 1 but still reports
    the ratios, so the mismatch stays visible.
    """
    diff = (learner_logp - sampler_logp).detach().to(torch.float64)  # [N]
    if level == "sequence":
        per_seq = torch.zeros(n_seqs, dtype=torch.float64, device=diff.device).index_add_(0, seq, diff)  # [S]
        rho_unit = per_seq.exp()  # [S]
    else:
        rho_unit = diff.exp()  # [N]
    outside = (rho_unit < lo) | (rho_unit > hi)
    stats = IsStats(
        min=float(rho_unit.min()),
        max=float(rho_unit.max()),
        sum=float(rho_unit.sum()),
        count=int(rho_unit.numel()),
    )
    if mode == "off":
        w_unit = torch.ones_like(rho_unit)
    elif mode == "truncate":
        w_unit = rho_unit.clamp(lo, hi)
        stats.truncated = int(outside.sum())
    else:
        w_unit = torch.where(outside, torch.zeros_like(rho_unit), rho_unit)
        stats.masked = int(outside.sum())
    w = w_unit[seq] if level == "sequence" else w_unit  # [N]
    return w.to(torch.float32), stats


class TokenLossParts(msgspec.Struct, kw_only=True):
    """Sums over one micro-batch's loss tokens, for metrics (not for the gradient)."""

    tokens: int = 0
    clipped: int = 0
    kl_sum: float = 0.0
    entropy_sum: float = 0.0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    is_stats: IsStats = msgspec.field(default_factory=IsStats)

    def merge(self, other: TokenLossParts) -> None:
        self.tokens += other.tokens
        self.clipped += other.clipped
        self.ratio_min = min(self.ratio_min, other.ratio_min)
        self.ratio_max = max(self.ratio_max, other.ratio_max)
        self.kl_sum += other.kl_sum
        self.entropy_sum += other.entropy_sum
        self.is_stats.merge(other.is_stats)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    adv: torch.Tensor,
    seq: torch.Tensor,
    n_seqs: int,
    *,
    clip_low: float,
    clip_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    is_level: IsLevel = "token",
    is_mode: IsMode = "truncate",
    is_min: float = 0.0,
    is_max: float = 3.0,
) -> tuple[torch.Tensor, TokenLossParts]:
    """Per-token GRPO loss [N] and its metric parts.

    logp: [N] learner log-probs (with grad); old_logp: [N] the learner's log-probs before
    this update (detached; equal to logp.detach() with one update per batch); sampler_logp:
    [N] the engine's. loss_t = clipsurr(exp(logp - old), A) * rho + beta * k3(logp, ref):
    as TRL, the IS weight multiplies the surrogate and not the KL term.
    """
    ratio = torch.exp(logp - old_logp)  # [N]
    loss, clipped = clipped_surrogate(ratio, adv, clip_low, clip_high)
    w, stats = is_weights(
        old_logp, sampler_logp, seq, n_seqs, level=is_level, mode=is_mode, lo=is_min, hi=is_max
    )
    loss = loss * w
    parts = TokenLossParts(tokens=int(logp.numel()), clipped=int(clipped.sum()), is_stats=stats)
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs (ref_logp); pass them or set grpo.beta = 0")
        kl = k3_kl(logp, ref_logp)  # [N]
        loss = loss + beta * kl
        parts.kl_sum = float(kl.detach().sum())
    return loss, parts


def aggregate(token_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Micro-batch share of the step loss: sum_t w_t * l_t. token_loss, weights: [N] -> []."""
    return (token_loss * weights).sum()
