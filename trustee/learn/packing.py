"""Micro-batches: sequences packed by a token budget, position ids restarting per sequence.

Owns `Sample` (one trajectory as the learner sees it), `plan_bins` (first-fit decreasing
over lengths), and `MicroBatch` built packed (`build_packed`: one row, no padding) or padded
(`build_padded`: one row per sequence plus an attention mask; used by the benchmark and
as the reference in tests). Knows nothing about losses or models beyond the input layout.
Called by the learner.

Packed layout: the sequences' ids are concatenated into input_ids [1, T]; position_ids
[1, T] restart at 0 for each sequence, and every packed micro-batch carries cu_seq_lens_* /
max_length_* (the sequence boundaries, computed once here instead of in every layer).
No attention work crosses a sequence boundary on any device: flash-attention models hand
the boundaries to the varlen kernel; SDPA/eager models are switched (`use_segment_attention`,
by `logprobs.body_forward`) to `segment_attention`, registered with transformers'
`AttentionInterface`, which runs causal SDPA per sequence, so a pack of sequences of lengths
L_k costs sum(L_k^2) attention instead of the (sum L_k)^2 of the block-diagonal mask that
transformers would otherwise build (`masking_utils.find_packed_sequence_indices`) and SDPA
would compute in full. Padded micro-batches go through the same function (SDPA with the
padding mask, as transformers computes it), so the two layouts run the same kernels; both
repeat key/value heads for grouped-query attention off CUDA instead of passing SDPA
`enable_gqa`, which on CPU selects the math kernel (`_kv_heads_for_sdpa`). Checked against
transformers 5.19: the attention function is looked up per layer from `config._attn_implementation` (`models/qwen3/modeling_qwen3.py`
Qwen3Attention.forward, `modeling_utils.AttentionInterface`), forward kwargs such as
cu_seq_lens_q reach it unchanged, and the mask function is looked up from
`masking_utils.ALL_MASK_ATTENTION_FUNCTIONS` under the same name.

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
    extra forward kwargs (packed: the sequence boundaries, `segment_kwargs`); src: [N] flat index into R*T of the hidden state
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


def segment_kwargs(lengths: list[int]) -> dict:
    """cu_seq_lens_q/k (int32 [S+1]) and max_length_q/k: the sequence boundaries of a pack,
    in flash-attention varlen's argument names (also read by `segment_attention`)."""
    lens = torch.tensor(lengths, dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # [S+1]
    m = int(lens.max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)


SEGMENT_ATTENTION = "trustee_segments"


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA within each packed sequence. query [1, H, T, D], key/value [1, Hkv, T, D];
    returns ([1, T, H, D], None) like transformers' sdpa_attention_forward. Without
    cu_seq_lens_q (padded or single-sequence batches) it is sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if kwargs.get("position_bias") is not None or key.shape[2] != query.shape[2]:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        # sdpa_attention_forward's computation for the learner's case (no cache, no position
        # bias), with grouped-query attention that stays on SDPA's fast kernels (see below)
        key, value, gqa = _kv_heads_for_sdpa(query, key, value, masked=attention_mask is not None)
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=is_causal,
            **gqa,
        )  # [R, H, T, D]
        return out.transpose(1, 2).contiguous(), None
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("segment_attention does not implement sliding-window attention")
    assert query.shape[0] == 1, "a packed micro-batch is one row"
    key, value, gqa = _kv_heads_for_sdpa(query, key, value)
    bounds = cu.tolist()
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            **gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]  # each [1, H, L_k, D]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # [1, T, H, D]


def _kv_heads_for_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, masked: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Grouped-query attention for SDPA: `enable_gqa` on CUDA without a mask (its flash kernel
    takes fewer key/value heads; with a mask it would not run, as transformers also notes);
    otherwise key/value repeated to the query's heads, because on CPU
    `enable_gqa=True` sends SDPA to its math kernel (measured with torch 2.13 CPU, one
    sequence of 4,096, 2 query heads on 1 key/value head, forward + backward: 4.0 s with
    enable_gqa, 1.0 s repeated; 13 s with a non-contiguous query, which is how attention
    modules hand it over). key/value [1, Hkv, T, D] -> [1, H, T, D] off CUDA."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep == 1:
        return key, value, {}
    if query.device.type == "cuda" and not masked:
        return key, value, {"enable_gqa": True}
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv(key, n_rep), repeat_kv(value, n_rep), {}


def _segment_mask(**kwargs):
    """No mask for packs (segment_attention is causal per sequence); padded batches get
    exactly the SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**kwargs)


def use_segment_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA/eager transformers model to `segment_attention` (registered once with
    transformers' AttentionInterface and AttentionMaskInterface). Models on flash-attention
    (varlen already) or another implementation are left alone. Returns whether the model now
    uses segment attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == SEGMENT_ATTENTION:
        return True
    if impl not in ("sdpa", "eager"):
        return False
    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, _segment_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True


def build_packed(samples: list[Sample], sample_ids: list[int]) -> MicroBatch:
    """One row [1, sum T_k], positions restarting per sequence, no attention mask; the
    sequence boundaries in attn_kwargs (`segment_kwargs`)."""
    lengths = [len(s.tokens) for s in samples]
    offsets = [sum(lengths[:k]) for k in range(len(samples))]
    ids = torch.tensor([t for s in samples for t in s.tokens], dtype=torch.long)[None]  # [1, T]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    return MicroBatch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=None,
        sample_ids=list(sample_ids),
        attn_kwargs=segment_kwargs(lengths),
        **_flat_targets(samples, offsets),
    )


def build_padded(
    samples: list[Sample], sample_ids: list[int], *, pad_id: int = 0, width: int | None = None
) -> MicroBatch:
    """One row per sequence, right-padded to the longest (or to `width`, e.g. the longest of a
    whole batch as TRL pads), with an attention mask [R, T]."""
    T = max(max(len(s.tokens) for s in samples), width or 0)
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
