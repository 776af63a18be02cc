"""The learner's attention: causal attention within packed sequences, and shared-prefix attention.

Owns the attention function the learner swaps into a transformers model (`use_segment_attention`)
and its kernels. A micro-batch (`learn/packing.py`) is one row [1, T] in one of three layouts,
told apart by the forward kwargs transformers hands every attention call unchanged:

- padded rows (`attention_mask` set): SDPA with transformers' padding mask;
- packed sequences (`cu_seq_lens_q`): causal attention within each sequence, none across;
- shared prefix (`shared_prefix`, a `SharedLayout`): units of one prefix followed by its
  branches (the episodes of a GRPO group after their common prompt). The prefix attends
  causally to itself; each branch token attends to the whole prefix and causally to its own
  branch, never to another branch. A unit without branches is a plain packed sequence.

The shared-prefix split is exact (Prefix Grouper, arXiv 2506.05433): a branch token's attention
over [prefix, own tokens] is softmax-merged from two parts by their log-sum-exp, so outputs and
every gradient equal those of each episode attended whole. Kernels, chosen per call:

- CPU: `_SharedRowAttention`, one autograd node for the whole row (its gradients come back
  as one concatenation, not as a zero-filled row per slice). Per unit, the prefix is one
  causal call of torch's CPU flash kernel. Its branches take the merge written out: one call
  puts every branch query over the prefix (no mask), one causal call per branch over its own
  tokens, and the outputs merge by their log-sum-exp; the backward calls the kernel's own
  backward on each part with the *merged* output and log-sum-exp, which gives each key block's
  exact share of the gradient (the same identity ring attention relies on). Measured on this
  2-core CPU (one unit: prefix 2,000, eight branches of 50-300, 2 heads of 64, forward +
  backward, CPU seconds of one thread): 0.18 s, against 0.22 s for one masked SDPA call per
  branch over [prefix, branch], 0.47 s for one SDPA call over the unit with a dense mask, and
  0.65 s for the unshared layout (each episode whole). At bench.vs_trl's size (prefix ~290,
  four branches of 24) one masked call per unit over [prefix, branches] measured the same as
  the merge within noise, so the merge serves every size. In the model's last layer a
  prefix's rows other than its last are skipped (see `_SharedRowAttention`).
- CUDA with flash-attn: one `flash_attn_varlen_func` call per layer. Keys and values are gathered
  per segment (a branch's keys are its prefix's then its own: `SharedLayout.kv_index`) and the
  causal mask of flash-attn >= 2.1 is aligned to the bottom-right corner when a segment has more
  keys than queries, which is exactly "all of the prefix, causal within the branch". NOT RUN:
  no GPU was available when this was written; the same index and boundaries are checked on the
  CPU through the generic kernel below.
- anything else (CUDA without flash-attn, other devices; tests on CPU): the generic kernel, one
  SDPA call per segment over its gathered keys with a bottom-right causal bias
  (`torch.nn.attention.bias.causal_lower_right`, which SDPA's CUDA kernels take without
  building a mask).

How the function gets in (transformers 5.19, read in the installed source):
`Qwen3Attention.forward` (and Llama's) looks the function up per call with
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)` and passes its
forward kwargs through unchanged (`models/qwen3/modeling_qwen3.py`); `AttentionInterface.register`
adds a name to the global mapping (`modeling_utils.AttentionInterface`), and the mask function
is looked up under the same name in `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`
(`create_causal_mask` -> `_preprocess_mask_arguments`). `model.set_attn_implementation(name)`
switches a loaded model. Transformers' own flash path picks its kernel from that name
(`integrations/flash_attention.py` passes `config._attn_implementation` to
`_flash_attention_forward`), so a switched flash model calls flash-attn here directly.

Does not build micro-batches (`learn/packing.py`) or compute log-probs (`learn/logprobs.py`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

SEGMENT_ATTENTION = "trustee_segments"
KERNELS = ("auto", "cpu-merge", "flash-varlen", "sdpa-gather")


@dataclass(frozen=True)
class SharedLayout:
    """Where the units of a shared-prefix micro-batch lie in its row [1, T].

    units: (start, prefix_len, branch_lens) per unit, in row order; the unit's prefix is
    row[start : start + prefix_len] and its branches follow one after another. A unit with
    no branches is one whole sequence (causal). Segments, for the gathering kernels: the
    prefix (or whole sequence) of each unit, then each branch; `cu_q` [S+1] bounds their
    queries in the row, `kv_index` [K] lists each segment's key rows (a branch: its prefix's
    rows then its own) and `cu_k` [S+1] bounds them in `kv_index`. kernel: one of KERNELS
    ('auto' picks by device, see the module docstring).
    """

    units: tuple[tuple[int, int, tuple[int, ...]], ...]
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_index: torch.Tensor
    max_q: int
    max_k: int
    kernel: str = "auto"

    @staticmethod
    def build(units: list[tuple[int, int, tuple[int, ...]]], kernel: str = "auto") -> SharedLayout:
        if kernel not in KERNELS:
            raise ValueError(f"kernel = {kernel!r}: choose one of {KERNELS}")
        q_lens, k_rows = [], []
        for start, p, branches in units:
            pre = list(range(start, start + p))
            q_lens.append(p)
            k_rows += pre
            at = start + p
            for s in branches:
                q_lens.append(s)
                k_rows += pre + list(range(at, at + s))
                at += s
        k_lens = []
        for _, p, branches in units:
            k_lens.append(p)
            k_lens += [p + s for s in branches]
        cu_q = torch.nn.functional.pad(
            torch.tensor(q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)
        )
        cu_k = torch.nn.functional.pad(
            torch.tensor(k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)
        )
        return SharedLayout(
            units=tuple((a, p, tuple(b)) for a, p, b in units),
            cu_q=cu_q,
            cu_k=cu_k,
            kv_index=torch.tensor(k_rows, dtype=torch.long),
            max_q=max(q_lens),
            max_k=max(k_lens),
            kernel=kernel,
        )

    def to(self, device: torch.device) -> SharedLayout:
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return SharedLayout(
            units=self.units,
            cu_q=mv(self.cu_q),
            cu_k=mv(self.cu_k),
            kv_index=mv(self.kv_index),
            max_q=self.max_q,
            max_k=self.max_k,
            kernel=self.kernel,
        )


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel 'auto' means on this device and dtype (see the module docstring)."""
    if kernel != "auto":
        return kernel
    if device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "cpu-merge"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _have_flash_attn():
        return "flash-varlen"
    return "sdpa-gather"


def _have_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# ----------------------------------------------------------------------------- the attention function


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
    """The learner's attention function (transformers' attention-interface signature).

    query [R, H, T, D], key/value [R, Hkv, T, D]; returns ([R, T, H, D], None) like
    transformers' sdpa_attention_forward. Dispatches on the layout (module docstring)."""
    layout = kwargs.get("shared_prefix")
    cu = kwargs.get("cu_seq_lens_q")
    if layout is not None or cu is not None:
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("the learner's packed attention does not implement sliding windows")
        if dropout:
            raise NotImplementedError(f"attention dropout {dropout}: the learner's packed attention has none")
        assert query.shape[0] == 1, "a packed micro-batch is one row"
    if layout is not None:
        return _shared(module, layout, query, key, value, scaling), None
    if cu is not None:
        if query.device.type == "cuda" and query.dtype != torch.float32 and _have_flash_attn():
            return _flash_varlen(
                query, key, value, cu, cu, kwargs["max_length_q"], kwargs["max_length_q"], None, scaling
            ), None
        return _packed_sdpa(query, key, value, cu, scaling), None
    return _padded_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs), None


def _padded_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs) -> torch.Tensor:
    """Padded rows or one unpacked sequence: sdpa_attention_forward's computation for the
    learner's case (no cache, no position bias), with grouped-query attention kept on SDPA's
    fast kernels."""
    if kwargs.get("position_bias") is not None or key.shape[2] != query.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )[0]
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
    return out.transpose(1, 2).contiguous()


def _packed_sdpa(query, key, value, cu: torch.Tensor, scaling) -> torch.Tensor:
    """Causal SDPA within each packed sequence: [1, H, T, D] -> [1, T, H, D]."""
    key, value, gqa = _kv_heads_for_sdpa(query, key, value)
    bounds = cu.tolist()
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale=scaling, is_causal=True, **gqa
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]  # each [1, H, L_k, D]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


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


# ----------------------------------------------------------------------------- shared prefix


def _shared(module, layout: SharedLayout, query, key, value, scaling) -> torch.Tensor:
    """Shared-prefix attention over a whole row: [1, H, T, D] -> [1, T, H, D]."""
    kernel = resolve_kernel(layout.kernel, query.device, query.dtype)
    if kernel == "flash-varlen":
        return _flash_varlen(
            query, key, value, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, layout.kv_index, scaling
        )
    if kernel == "cpu-merge":
        return _cpu_merge(layout, query, key, value, scaling, last=_is_last_layer(module))
    return _sdpa_gather(layout, query, key, value, scaling)


def _cpu_merge(layout: SharedLayout, query, key, value, scaling, *, last: bool = False) -> torch.Tensor:
    key, value, _ = _kv_heads_for_sdpa(query, key, value, masked=True)  # repeated: the CPU kernel has no GQA
    out = _SharedRowAttention.apply(query, key, value, layout.units, scaling, last)  # [1, H, T, D]
    return out.transpose(1, 2).contiguous()


def _is_last_layer(module) -> bool:
    """Whether `module` is the model's last attention layer (transformers' attention modules
    carry layer_idx and config); False when it cannot tell."""
    idx = getattr(module, "layer_idx", None)
    n = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    return isinstance(idx, int) and isinstance(n, int) and idx == n - 1


def _cpu_attn(q, k, v, causal: bool, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_attn_backward(g, q, k, v, out, lse, causal: bool, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, out, lse, 0.0, causal, scale=scale
    )


class _SharedRowAttention(torch.autograd.Function):
    """Shared-prefix attention over a whole row in one autograd node (no per-slice gradients).

    q, k, v: [1, H, T, D] (k, v with the query's heads), any strides (the CPU flash kernel reads
    strides; slices are views). Per unit: the prefix causally over itself, then its branches'
    queries over [prefix, own tokens] by the merge: with (o1, l1) the attention of every
    branch query over the prefix and (o2, l2) each branch's causal attention over itself,
    out = o1 w1 + o2 w2, where w_i = exp(l_i - lse) and lse = log(exp l1 + exp l2). The
    merge's backward: for attention
    with output `out` and log-sum-exp `lse` over keys split in blocks, each block's dq/dk/dv is
    the kernel's backward on that block given the *full* out and lse (the softmax of a block is
    exp(s - lse) and the row term is rowsum(dout * out)), so the calls give it exactly. The
    gradients come back as one cat of the per-unit pieces, in row order.

    `last` (the model's last layer): a prefix's rows other than its last are left at zero, out
    and gradient. Only the rows that predict a loss token are read after the last layer (the
    log-prob gather; every layer after attention works row by row), and no prefix row but the
    last predicts one (a prefix ends before its members' first trained token), so their
    incoming gradient is exactly zero and skipping them changes no loss, log-prob or gradient.
    The prefix's last row (it predicts the boundary token) is one query over the whole prefix.
    """

    @staticmethod
    def forward(ctx, q, k, v, units, scale, last):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        outs, lses = [], []
        for start, p, branches in units:
            a, b = start, start + p
            if last and branches:
                o, lse = _cpu_attn(q[:, :, b - 1 : b], k[:, :, a:b], v[:, :, a:b], False, scale)
                o, lse = _zero_rows_before(o, p - 1), _zero_rows_before(lse, p - 1)
            else:
                o, lse = _cpu_attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], True, scale)
            outs.append(o)  # [1, H, P, D], lse [1, H, P]
            lses.append(lse)
            if branches:
                o, lse = _branches_forward(q, k, v, a, p, branches, scale)  # [1, H, N, D], [1, H, N]
                outs.append(o)
                lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.units, ctx.scale, ctx.last = units, scale, last
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        saved = (g if g.stride(-1) == 1 else g.contiguous(), q, k, v, out, lse)
        dq, dk, dv = [], [], []
        for start, p, branches in ctx.units:
            a, b = start, start + p
            if ctx.last and branches:
                rows = [t[:, :, b - 1 : b] for t in saved]  # g, q: the prefix's last row
                gq, gk, gv = _cpu_attn_backward(
                    *rows[:2], k[:, :, a:b], v[:, :, a:b], *rows[4:], False, ctx.scale
                )
                gq = _zero_rows_before(gq, p - 1)
            else:
                gq, gk, gv = _cpu_attn_backward(*(t[:, :, a:b] for t in saved), True, ctx.scale)
            if not branches:
                dq.append(gq)
                dk.append(gk)
                dv.append(gv)
                continue
            bq, pk, pv, ok, ov = _branches_backward(saved, a, p, branches, ctx.scale)
            dq += [gq, bq]
            dk += [gk + pk, ok]
            dv += [gv + pv, ov]
        return torch.cat(dq, dim=2), torch.cat(dk, dim=2), torch.cat(dv, dim=2), None, None, None


def _zero_rows_before(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [1, H, m, ...] with n zero rows put before it on dim 2."""
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], n, *x.shape[3:]), x], dim=2)


def _branches_forward(q, k, v, a: int, p: int, branches: tuple[int, ...], scale):
    """A unit's branch queries (rows a + p ...) over their prefix (rows a ...) and own tokens:
    (out [1, H, N, D], lse [1, H, N])."""
    b = a + p
    e = b + sum(branches)
    o1, l1 = _cpu_attn(q[:, :, b:e], k[:, :, a:b], v[:, :, a:b], False, scale)
    parts, at = [], b
    for s in branches:
        parts.append(_cpu_attn(q[:, :, at : at + s], k[:, :, at : at + s], v[:, :, at : at + s], True, scale))
        at += s
    o2 = torch.cat([o for o, _ in parts], dim=2)
    l2 = torch.cat([lse for _, lse in parts], dim=2)
    lse = torch.logaddexp(l1, l2)  # [1, H, N] float32
    out = (o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]).to(q.dtype)
    return out, lse


def _branches_backward(saved, a: int, p: int, branches: tuple[int, ...], scale):
    """Gradients of `_branches_forward`: (dq of the branch queries, dk / dv of the prefix rows,
    dk / dv of the branch rows). saved: (grad_out, q, k, v, out, lse), whole rows."""
    g, q, k, v, out, lse = saved
    b = a + p
    e = b + sum(branches)
    rows = [t[:, :, b:e] for t in (g, q)]
    dq, dk_pre, dv_pre = _cpu_attn_backward(
        *rows, k[:, :, a:b], v[:, :, a:b], out[:, :, b:e], lse[:, :, b:e], False, scale
    )
    own, at = [], b
    for s in branches:
        own.append(_cpu_attn_backward(*(t[:, :, at : at + s] for t in saved), True, scale))
        at += s
    dq = dq + torch.cat([r[0] for r in own], dim=2)
    return dq, dk_pre, dv_pre, torch.cat([r[1] for r in own], dim=2), torch.cat([r[2] for r in own], dim=2)


def _sdpa_gather(layout: SharedLayout, query, key, value, scaling) -> torch.Tensor:
    """One SDPA call per segment over its gathered keys, bottom-right causal (module docstring)."""
    from torch.nn.attention.bias import causal_lower_right

    key, value, gqa = _kv_heads_for_sdpa(query, key, value, masked=query.device.type != "cuda")
    k_all = key[:, :, layout.kv_index]  # [1, H, K, D]
    v_all = value[:, :, layout.kv_index]
    cq, ck = layout.cu_q.tolist(), layout.cu_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        q = query[:, :, cq[i] : cq[i + 1]]
        k, v = k_all[:, :, ck[i] : ck[i + 1]], v_all[:, :, ck[i] : ck[i + 1]]
        nq, nk = q.shape[2], k.shape[2]
        if nq == nk:
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=scaling, is_causal=True, **gqa
            )
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(nq, nk), scale=scaling, **gqa
            )
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _flash_varlen(query, key, value, cu_q, cu_k, max_q: int, max_k: int, kv_index, scaling) -> torch.Tensor:
    """flash-attn's varlen kernel over the row's segments (keys gathered when `kv_index` is
    given): [1, H, T, D] -> [1, T, H, D]. flash-attn takes fewer key/value heads as they are."""
    from flash_attn import flash_attn_varlen_func

    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)  # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]  # [K, Hkv, D]
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scaling, causal=True
    )  # [T, H, D]
    return out[None]


# ----------------------------------------------------------------------------- registration


def _segment_mask(**kwargs):
    """No mask for packs (the attention function knows the layout); padded batches get
    exactly the SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**kwargs)


def use_segment_attention(model: torch.nn.Module, *, shared: bool = False) -> bool:
    """Switch a transformers model to `segment_attention` (registered once with transformers'
    AttentionInterface and AttentionMaskInterface). SDPA/eager models are switched always; a
    flash-attention model only for a shared-prefix micro-batch (transformers' own flash path
    handles plain packs with the same varlen kernel). Returns whether the model now uses it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == SEGMENT_ATTENTION:
        return True
    if impl not in ("sdpa", "eager") and not (shared and impl == "flash_attention_2"):
        return False
    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, _segment_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True
