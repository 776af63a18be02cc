"""Micro-batches: sequences packed by a token budget, whole or with a group's prompt shared.

Owns `Sample` (one trajectory as the learner sees it), `plan_bins` (first-fit decreasing
over lengths), and `MicroBatch` built packed (`build_packed`: one row, no padding), with shared
prefixes (`plan_shared` + `build_shared`) or padded (`build_padded`: one row per sequence plus
an attention mask; used by the benchmark and as the reference in tests). Knows nothing about
losses or models beyond the input layout. Called by the learner. The attention that reads
these layouts lives in `learn/attention.py`.

Packed layout: the sequences' ids are concatenated into input_ids [1, T]; position_ids
[1, T] restart at 0 for each sequence, and every packed micro-batch carries cu_seq_lens_* /
max_length_* (the sequence boundaries, computed once here instead of in every layer), so
no attention work crosses a sequence boundary (`attention.segment_attention`).

Shared-prefix layout: the episodes of a GRPO group start with the same prompt. `plan_shared`
finds, for sequences whose prompts agree (sorted, so equal prompts sit together), the longest
common prefix that holds no trained token (it never reaches past any member's first loss
token), and makes them one *unit*: the prefix once, then each member's remaining tokens (its
*branch*). Position ids run 0..P-1 over the prefix and continue P, P+1, ... in every branch,
so each token has the position it has in its own episode; the attention (`SharedLayout`)
lets a branch see the whole prefix and its own earlier tokens only. A unit that would exceed
the budget is cut into several, each with its own copy of the prefix; a unit of one member
is a plain sequence. Units are binned like sequences (first-fit decreasing), each prefix
counted once. The loss tokens keep their per-episode identity: a branch's token at position
i is predicted by the hidden state of position i - 1 of *its* episode, which is the prefix's
last row when i = P (the boundary token) and a row of its own branch after that.

Why only the first prompt: a multi-turn episode's later turns follow sampled tokens, which
differ across a group at temperature 1 almost always, so sharing past the first trained token
would need trees (AReaL's tree training) for a small gain on these tasks; not done.

Targets: the loss tokens are positions i with loss_mask[i] == 1; the hidden state that
predicts token i sits at i - 1 of the same sequence. A sampled token at position 0 would
have no predictor and is rejected (a trajectory always starts with a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import torch

from trustee.learn.attention import SharedLayout

MIN_SHARED_PREFIX = 16
"""Tokens a common prefix needs before sharing it is worth a unit (shorter: packed whole)."""


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """One trajectory for the learner: ids, mask, the sampler's log-probs and its advantage.

    `spans` overrides the advantage on token ranges: (start, end, advantage) for tokens
    start..end-1 (per-turn credit, `grpo.turn_credit`); elsewhere every loss token has
    `advantage`. Invariant: equal lengths; loss_mask[0] == 0; at least one loss token;
    spans inside the tokens, in order, not overlapping.
    """

    tokens: list[int]
    loss_mask: list[int]
    sampler_logprobs: list[float]
    advantage: float
    spans: tuple[tuple[int, int, float], ...] = ()

    def token_advantages(self, positions: list[int]) -> list[float]:
        """The advantage of each token at `positions` (ascending)."""
        if not self.spans:
            return [self.advantage] * len(positions)
        out, spans, k = [], self.spans, 0
        for i in positions:
            while k < len(spans) and spans[k][1] <= i:
                k += 1
            out.append(spans[k][2] if k < len(spans) and spans[k][0] <= i else self.advantage)
        return out

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
    end = 0
    for a, b, _ in s.spans:
        if not end <= a < b <= n:
            raise ValueError(f"sample {i}: advantage span ({a}, {b}) out of order or outside its {n} tokens")
        end = b


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
    extra forward kwargs (packed: the sequence boundaries, `segment_kwargs`; shared prefix:
    `shared_prefix`, a SharedLayout); src: [N] flat index into R*T of the hidden state
    that predicts each loss token; targets, seq, seq_tokens, sampler_logp, adv: [N].
    `sample_ids` are the indices of the samples in the step's list, in `seq` order.
    `shared_tokens`: tokens the samples hold that the row does not (prefixes fed once).
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
    shared_tokens: int = 0

    @property
    def layout(self) -> SharedLayout | None:
        """The shared-prefix layout, or None for packed and padded micro-batches."""
        return self.attn_kwargs.get("shared_prefix")

    @property
    def n_seqs(self) -> int:
        return len(self.sample_ids)

    @property
    def n_input_tokens(self) -> int:
        """Tokens fed to the model, padding included."""
        return int(self.input_ids.numel())


def _loss_positions(s: Sample) -> list[int]:
    return [i for i, m in enumerate(s.loss_mask) if m]


def _flat_targets(samples: list[Sample], places: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """The [N] tensors. places[k] = (prefix_at, prefix_len, own_at): sample k's token j sits at
    flat row prefix_at + j while j < prefix_len (a shared prefix), else own_at + j - prefix_len."""
    src, tgt, seq, seq_tokens, old, adv = [], [], [], [], [], []
    for k, (s, (pre_at, pre_len, own_at)) in enumerate(zip(samples, places, strict=True)):
        pos = _loss_positions(s)
        src += [pre_at + i - 1 if i - 1 < pre_len else own_at + i - 1 - pre_len for i in pos]
        tgt += [s.tokens[i] for i in pos]
        seq += [k] * len(pos)
        seq_tokens += [len(pos)] * len(pos)
        old += [s.sampler_logprobs[i] for i in pos]
        adv += s.token_advantages(pos)
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
        **_flat_targets(samples, [(o, 0, o) for o in offsets]),
    )


class Unit(msgspec.Struct, frozen=True):
    """Samples (indices in the step's list) fed as one prefix of `prefix` tokens followed by
    each member's remaining tokens; `size` tokens in the row. A plain sequence: one member,
    prefix 0."""

    members: tuple[int, ...]
    prefix: int
    size: int


def prompt_len(s: Sample) -> int:
    """Tokens before the first trained one: the most a shared prefix may cover."""
    return s.loss_mask.index(1)


def _common_len(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _clusters(samples: list[Sample], min_prefix: int) -> list[tuple[list[int], int]]:
    """(members, shared prefix length) over all samples: prompts sorted so that equal ones sit
    together; a sample joins the cluster before it while that does not lower the tokens the
    cluster saves ((members - 1) x prefix) and the prefix stays >= min_prefix."""
    order = sorted(range(len(samples)), key=lambda i: (samples[i].tokens[: prompt_len(samples[i])], i))
    out: list[tuple[list[int], int]] = []
    for i in order:
        pl = prompt_len(samples[i])
        if out:
            members, p = out[-1]
            q = _common_len(samples[members[0]].tokens, samples[i].tokens, min(p, pl))
            if q >= min_prefix and len(members) * q >= (len(members) - 1) * p:
                members.append(i)
                out[-1] = (members, q)
                continue
        out.append(([i], pl))
    return out


def _split_cluster(samples: list[Sample], members: list[int], p: int, budget: int) -> list[Unit]:
    """Units of one cluster that fit the budget: branches first-fit decreasing into units of
    room budget - p (each with its own copy of the prefix); a member alone is plain."""
    lens = {i: len(samples[i].tokens) for i in members}
    if budget - p < 1:  # the prefix alone fills the budget: nothing to share within it
        groups = [[i] for i in members]
    else:
        parts = plan_bins([lens[i] - p for i in members], budget - p)
        groups = [[members[k] for k in part] for part in parts]
    out = []
    for g in groups:
        g = sorted(g)
        if len(g) == 1:
            out.append(Unit(members=(g[0],), prefix=0, size=lens[g[0]]))
        else:
            out.append(Unit(members=tuple(g), prefix=p, size=p + sum(lens[i] - p for i in g)))
    return out


def plan_shared(
    samples: list[Sample], budget: int, *, min_prefix: int = MIN_SHARED_PREFIX
) -> list[list[Unit]]:
    """Micro-batches as lists of units (see the module docstring): clusters of shared
    prompts, cut to the budget, then first-fit decreasing over unit sizes. Deterministic."""
    units: list[Unit] = []
    for members, p in _clusters(samples, min_prefix):
        if len(members) == 1:
            units.append(Unit(members=(members[0],), prefix=0, size=len(samples[members[0]].tokens)))
        else:
            units += _split_cluster(samples, members, p, budget)
    return [[units[i] for i in b] for b in plan_bins([u.size for u in units], budget)]


def build_shared(samples: list[Sample], units: list[Unit], *, kernel: str = "auto") -> MicroBatch:
    """One row holding `units` (indices into `samples`, the step's list): each prefix once,
    branches after it with positions continuing from it, the layout in
    attn_kwargs['shared_prefix']. Without a shared unit it is `build_packed` of the members."""
    ids_of = [i for u in units for i in u.members]
    if all(u.prefix == 0 for u in units):
        return build_packed([samples[i] for i in ids_of], ids_of)
    ids: list[int] = []
    pos: list[int] = []
    places: dict[int, tuple[int, int, int]] = {}
    layout: list[tuple[int, int, tuple[int, ...]]] = []
    for u in units:
        start, p = len(ids), u.prefix
        if p == 0:  # a plain sequence: a unit that is all prefix, no branch
            toks = samples[u.members[0]].tokens
            ids += toks
            pos += range(len(toks))
            places[u.members[0]] = (start, 0, start)
            layout.append((start, len(toks), ()))
            continue
        ids += samples[u.members[0]].tokens[:p]
        pos += range(p)
        branches = []
        for i in u.members:
            toks = samples[i].tokens
            places[i] = (start, p, len(ids))
            ids += toks[p:]
            pos += range(p, len(toks))
            branches.append(len(toks) - p)
        layout.append((start, p, tuple(branches)))
    chosen = [samples[i] for i in ids_of]
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long)[None],  # [1, T]
        position_ids=torch.tensor(pos, dtype=torch.long)[None],  # [1, T]
        attention_mask=None,
        sample_ids=ids_of,
        attn_kwargs={"shared_prefix": SharedLayout.build(layout, kernel)},
        shared_tokens=sum(len(s.tokens) for s in chosen) - len(ids),
        **_flat_targets(chosen, [places[i] for i in ids_of]),
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
        **_flat_targets(samples, [(r * T, 0, r * T) for r in range(R)]),
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
        attn_kwargs={
            k: v.to(device) if isinstance(v, SharedLayout) else mv(v) for k, v in mb.attn_kwargs.items()
        },
        shared_tokens=mb.shared_tokens,
    )
