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
    when `fast` is off or `fast_decode_ok` is false; otherwise the same modules layer by layer. The mask is what
    transformers' SDPA mask builder gives a one-token query: none when no row is padded,
    else a [B, 1, 1, L] boolean mask."""
    n = toks.shape[0]
    ids, position = toks.view(n, 1), pos.view(n, 1)  # [B, 1]
    if not (fast and fast_decode_ok(model)):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1].float()
    inner = model.model
    attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]  # [B, 1, 1, L]
    hidden = inner.embed_tokens(ids)  # [B, 1, H]
    rotary = inner.rotary_emb(hidden, position)
    for layer in inner.layers[: model.config.num_hidden_layers]:
        hidden = layer(
            hidden,
            attention_mask=attend,
            position_embeddings=rotary,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
    hidden = inner.norm(hidden)
    return model.lm_head(hidden)[:, -1].float()  # [B, V]
