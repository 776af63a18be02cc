"""Micro-batches: sequences packed by a token budget, position ids restarting per sequence.

Owns `Sample` (one trajectory as the learner sees it), `plan_bins` (first-fit decreasing
over lengths), and `MicroBatch` built packed (`build_packed`: one row, no padding) or padded
(`build_padded`: one row per sequence plus an attention mask; used by the benchmark and
as the reference in tests). Knows nothing about losses or models beyond the input layout.
Called by the learner.

Packed layout: the sequences' ids are concatenated into input_ids [1, T]; position_ids
[1, T] restart at 0 for each sequence. transformers turns such position_ids into a
block-diagonal causal mask for SDPA/eager (`masking_utils.find_packed_sequence_indices`)
when no attention_mask is given; flash-attention models get cu_seq_lens_* / max_length_*
(the varlen kernel's arguments), computed once here instead of in every layer.

Targets: the loss tokens are positions i with loss_mask[i] == 1; the hidden state that
predicts token i sits at i - 1 of the same sequence. A sampled token at position 0 would
have no predictor and is rejected (a trajectory always starts with a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import torch


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """One trajectory for the learner: ids, mask, the sampler's log-probs and its advantage.

    Invariant: equal lengths; loss_mask[0] == 0; at least one loss token.
    """

    tokens: list[int]
    loss_mask: list[int]
    sampler_logprobs: list[float]
    advantage: float

    @property
    def n_loss(self) -> int:
        return sum(self.loss_mask)


def check_sample(s: Sample, i: int) -> None:
    n = len(s.tokens)
    if len(s.loss_mask) != n or len(s.sampler_logprobs) != n:
        raise ValueError(
            f"sample {i}: tokens/loss_mask/logprobs lengths differ ({n}, {len(s.loss_mask)}, {len(s.sampler_logprobs)})"
        )
    if n and s.loss_mask[0]:
        raise ValueError(
            f"sample {i}: loss_mask[0] = 1, but the first token has no predictor; a trajectory starts with a prompt"
        )
    if not any(s.loss_mask):
        raise ValueError(
            f"sample {i}: no loss tokens; drop untrainable trajectories before the learner (Trajectory.trainable)"
        )


def plan_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each bin's total length <= budget.

    A sequence longer than the budget gets a bin of its own (it cannot be split without
    changing its attention); the learner counts those. Deterministic for equal inputs.
    """
    if budget < 1:
        raise ValueError(f"token budget = {budget}: must be >= 1 (learner.micro_batch_tokens)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


@dataclass
class MicroBatch:
    """Model inputs plus the flat loss-token tensors of some sequences.

    input_ids, position_ids: [R, T]; attention_mask: [R, T] or None (packed); attn_kwargs:
    extra forward kwargs (flash varlen); src: [N] flat index into R*T of the hidden state
    that predicts each loss token; targets, seq, seq_tokens, sampler_logp, adv: [N].
    `sample_ids` are the indices of the samples in the step's list, in `seq` order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    src: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    seq_tokens: torch.Tensor
    sampler_logp: torch.Tensor
    adv: torch.Tensor
    sample_ids: list[int]
    attn_kwargs: dict = field(default_factory=dict)

    @property
    def n_seqs(self) -> int:
        return len(self.sample_ids)

    @property
    def n_input_tokens(self) -> int:
        """Tokens fed to the model, padding included."""
        return int(self.input_ids.numel())


def _loss_positions(s: Sample) -> list[int]:
    return [i for i, m in enumerate(s.loss_mask) if m]


def _flat_targets(samples: list[Sample], offsets: list[int]) -> dict[str, torch.Tensor]:
    """The [N] tensors; offsets[k] = flat index of sample k's first token."""
    src, tgt, seq, seq_tokens, old, adv = [], [], [], [], [], []
    for k, (s, off) in enumerate(zip(samples, offsets, strict=True)):
        pos = _loss_positions(s)
        src += [off + i - 1 for i in pos]
        tgt += [s.tokens[i] for i in pos]
        seq += [k] * len(pos)
        seq_tokens += [len(pos)] * len(pos)
        old += [s.sampler_logprobs[i] for i in pos]
        adv += [s.advantage] * len(pos)
    return dict(
        src=torch.tensor(src, dtype=torch.long),
        targets=torch.tensor(tgt, dtype=torch.long),
        seq=torch.tensor(seq, dtype=torch.long),
        seq_tokens=torch.tensor(seq_tokens, dtype=torch.long),
        sampler_logp=torch.tensor(old, dtype=torch.float32),
        adv=torch.tensor(adv, dtype=torch.float32),
    )


def flash_kwargs(lengths: list[int]) -> dict:
    """cu_seq_lens_q/k (int32 [S+1]) and max_length_q/k for flash-attention varlen."""
    lens = torch.tensor(lengths, dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # [S+1]
    m = int(lens.max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)


def build_packed(samples: list[Sample], sample_ids: list[int], *, flash: bool = False) -> MicroBatch:
    """One row [1, sum T_k], positions restarting per sequence, no attention mask."""
    lengths = [len(s.tokens) for s in samples]
    offsets = [sum(lengths[:k]) for k in range(len(samples))]
    ids = torch.tensor([t for s in samples for t in s.tokens], dtype=torch.long)[None]  # [1, T]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    return MicroBatch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=None,
        sample_ids=list(sample_ids),
        attn_kwargs=flash_kwargs(lengths) if flash else {},
        **_flat_targets(samples, offsets),
    )


def build_padded(samples: list[Sample], sample_ids: list[int], *, pad_id: int = 0) -> MicroBatch:
    """One row per sequence, right-padded to the longest, with an attention mask [R, T]."""
    T = max(len(s.tokens) for s in samples)
    R = len(samples)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    mask = torch.zeros((R, T), dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, : len(s.tokens)] = torch.tensor(s.tokens)
        mask[r, : len(s.tokens)] = 1
    pos = torch.arange(T).expand(R, T).clone()  # [R, T]
    return MicroBatch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=mask,
        sample_ids=list(sample_ids),
        **_flat_targets(samples, [r * T for r in range(R)]),
    )


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """The same micro-batch with every tensor on `device` (non_blocking copies)."""

    def mv(x):
        return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

    return MicroBatch(
        input_ids=mv(mb.input_ids),
        position_ids=mv(mb.position_ids),
        attention_mask=mv(mb.attention_mask),
        src=mv(mb.src),
        targets=mv(mb.targets),
        seq=mv(mb.seq),
        seq_tokens=mv(mb.seq_tokens),
        sampler_logp=mv(mb.sampler_logp),
        adv=mv(mb.adv),
        sample_ids=mb.sample_ids,
        attn_kwargs={k: mv(v) for k, v in mb.attn_kwargs.items()},
    )
