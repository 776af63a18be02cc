"""The transformers engine's decode step, made cheap: a KV cache with room to grow, and a
one-token forward that calls a Llama-family model's decoder layers directly.

Owns `room_cache` (a `DynamicCache` whose full-attention layers are `RoomLayer`s) and
`decode_logits` (one decode step: next-token logits of every row). Called by
`trustee/engines/hf.py` only; it owns batching, sampling and weights.

Why: on CPU (and for small models anywhere) a decode step is dominated by fixed costs, not by
the matmuls. transformers' `DynamicLayer` concatenates the whole cache to append one column
(a copy of every key and value per layer per token), and the model's top-level forward
rebuilds a 4-D mask, checks its arguments and wraps its outputs on every call. `RoomLayer`
writes the new column into spare room; `decode_logits` builds the mask once per step and runs
the same embedding, rotary, decoder-layer, norm and head modules the model's own forward runs,
in the same order, so the logits are the same numbers (tests/test_engine_hf.py compares them
bit for bit with the model's forward). Models outside `FAST_TYPES`, or with sliding-window
layers, use the model's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 64
"""Spare columns a `RoomLayer` allocates beyond what it holds (one reallocation per ROOM
decode steps, or after the engine selects rows or joins a batch)."""

FAST_TYPES = frozenset({"llama", "qwen2", "qwen3"})
"""Model types whose decoder layers take (hidden, attention_mask, position_embeddings,
position_ids, past_key_values) and whose model forward is embed -> rotary -> layers -> norm."""


ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "num_key_value_groups")
"""What `_attend` uses of an attention module (Llama, Qwen2 and Qwen3 all have them)."""


class RoomLayer(DynamicLayer):
    """A full-attention cache layer whose `keys` / `values` ([B, H, L, D]) are views of buffers
    with spare columns, so appending a token writes it in place instead of copying the cache.
    The engine may replace `keys` / `values` (row selection, left-trim, joins): the next
    `update` then copies them into fresh buffers with room."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _view: torch.Tensor | None = None  # the `keys` view this layer last handed out

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if self.keys is not self._view or self._kbuf is None or n + t > self._kbuf.shape[-2]:
            self._grow(key_states, value_states, n + t + ROOM)
        assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, n : n + t] = key_states
        self._vbuf[:, :, n : n + t] = value_states
        self.keys = self._view = self._kbuf[:, :, : n + t]
        self.values = self._vbuf[:, :, : n + t]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, cap: int) -> None:
        """New buffers of `cap` columns holding the current keys and values."""
        n = self.get_seq_length()
        b, h, _, dk = key_states.shape
        kbuf = key_states.new_empty((b, h, cap, dk))  # [B, H, cap, D]
        vbuf = value_states.new_empty((b, value_states.shape[1], cap, value_states.shape[-1]))
        if n:
            kbuf[:, :, :n] = self.keys
            vbuf[:, :, :n] = self.values
        self._kbuf, self._vbuf = kbuf, vbuf


def room_cache(config: Any) -> DynamicCache:
    """transformers' `DynamicCache` for `config`, its plain full-attention layers made
    `RoomLayer`s (sliding-window and other layer kinds are kept as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def fast_decode_ok(model: Any) -> bool:
    """Whether `decode_logits` may run `model` layer by layer: a Llama-family causal LM on
    SDPA attention with every layer full attention."""
    cfg = model.config
    inner = getattr(model, "model", None)
    return (
        cfg.model_type in FAST_TYPES
        and getattr(cfg, "_attn_implementation", None) == "sdpa"
        and all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"])
        and all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm"))
        and hasattr(model, "lm_head")
        and all(hasattr(layer.self_attn, a) for layer in inner.layers for a in ATTENTION_PARTS)
    )


def decode_logits(
    model: Any,
    toks: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    cache: DynamicCache,
    *,
    fast: bool = True,
) -> torch.Tensor:
    """One decode step: toks [B] (the sampled tokens), pos [B] (their position ids), mask
    [B, L] (1 for real columns, 0 for left padding; L counts the new token) -> next-token
    logits [B, V] float32, `cache` extended by one column (in place). Uses the model's forward
    when `fast` is off; otherwise (the caller checked `fast_decode_ok`) the same modules and
    ops layer by layer. The attention mask is the additive form SDPA makes of the boolean mask
    transformers builds for a one-token query: none when no row is padded, else [B, 1, 1, L]
    with -inf on padding."""
    n = toks.shape[0]
    ids, position = toks.view(n, 1), pos.view(n, 1)  # [B, 1]
    if not fast:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1].float()
    inner = model.model
    hidden = inner.embed_tokens(ids)  # [B, 1, H]
    attend = None  # what SDPA makes of transformers' boolean mask, made once for all layers:
    if not bool(mask.all()):  # 0 where a row attends, -inf on its left padding
        attend = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        attend = attend.masked_fill_(mask == 0, float("-inf"))[:, None, None, :]  # [B, 1, 1, L]
    cos, sin = inner.rotary_emb(hidden, position)  # [B, 1, D] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D]
    for i, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        residual = hidden
        hidden = residual + _attend(
            layer.self_attn, layer.input_layernorm(hidden), cos, sin, attend, cache, i
        )
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = inner.norm(hidden)
    return model.lm_head(hidden)[:, -1].float()  # [B, V]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, the same ops as transformers' `apply_rotary_pos_emb` / `rotate_half`."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _attend(
    attn: Any,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cache: DynamicCache,
    i: int,
) -> torch.Tensor:
    """One query token's self-attention for a Llama-family attention module: the ops of its
    forward and of transformers' SDPA integration, without their per-call plumbing.
    x [B, 1, H] (normed) -> [B, 1, H]."""
    n, d = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(n, 1, -1, d)  # [B, 1, Hq, D]
    k = attn.k_proj(x).view(n, 1, -1, d)  # [B, 1, Hkv, D]
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)  # [B, Hq|Hkv, 1, D]
    v = attn.v_proj(x).view(n, 1, -1, d).transpose(1, 2)  # [B, Hkv, 1, D]
    keys, values = cache.update(k, v, i)  # [B, Hkv, L, D]
    groups, extra = attn.num_key_value_groups, {}
    if groups > 1:  # GQA inside SDPA; with a mask off CPU, repeated heads as transformers does
        # (the CPU kernel gives the same numbers either way; CUDA's would fall back to the math kernel)
        if (mask is None or x.device.type == "cpu") and keys.shape[-1] == values.shape[-1] <= 256:
            extra["enable_gqa"] = True
        else:
            keys, values = _repeat(keys, groups), _repeat(values, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, is_causal=False, **extra
    )  # [B, Hq, 1, D]
    out = out.transpose(1, 2).contiguous().reshape(n, 1, -1).contiguous()
    return attn.o_proj(out)


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D], each head repeated in place (transformers' repeat_kv)."""
    b, h, length, d = t.shape
    return t[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)
