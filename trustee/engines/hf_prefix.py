"""The transformers engine's prefix reuse: finished sequences' KV cache, kept for the prompts that
extend them (an episode's next turn), so prefill runs only the new tokens.

Owns `PrefixStore` (a least-recently-used store of per-sequence keys and values, keyed by their
token ids and bounded by a byte budget), `row_kv` (one row's keys and values out of a batch's
cache) and `reuse_layout` (the left-padded past cache and the new-token inputs of a prefill that
reuses stored prefixes). Called by `trustee/engines/hf.py`, which owns batching and decides when
the store is emptied: on every weight update, sleep and wake, since keys and values depend on
the weights.

Why: a multi-turn episode sends its whole conversation as each turn's prompt; without reuse the
engine prefills the conversation again at every turn (on CPU, most of a rollout's work). The
reused keys and values are the ones the engine computed for those tokens at those positions, so
the next-token logits equal a full prefill's up to floating-point rounding (prefilling a suffix
against a cache adds in another order): the tokens sampled are the same unless a draw falls
within rounding of a boundary (tests/test_engine_hf_prefix.py compares both).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

MIN_REUSE = 16
"""Fewest matching tokens worth reusing (below it the copy costs about what prefill saves)."""


@dataclass(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    tag: Any  # what the keys were computed under besides the weights (the adapter state)
    keys: list[torch.Tensor]  # per layer [Hkv, n, D]
    values: list[torch.Tensor]  # per layer [Hkv, n, D]
    nbytes: int


class PrefixStore:
    """Finished sequences' keys and values by token ids, least recently used dropped first once
    their bytes pass `budget` (0: store nothing). Not thread-safe: the engine uses it from its
    worker thread only, and empties it between batches."""

    def __init__(self, budget: int, min_reuse: int = MIN_REUSE):
        self.budget = budget
        self.min_reuse = min_reuse
        self._entries: OrderedDict[tuple[Any, tuple[int, ...]], _Entry] = OrderedDict()
        self.nbytes = 0
        self.reused_tokens = 0  # prompt tokens whose prefill reuse skipped, over the store's life

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def add(
        self, tokens: tuple[int, ...], tag: Any, keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        """Keep a sequence's keys and values ([Hkv, n, D] per layer, n = len(tokens)). A stored
        sequence that `tokens` extends is replaced; one that extends `tokens` makes it redundant."""
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        if len(tokens) < self.min_reuse or nbytes > self.budget:
            return
        for key, e in list(self._entries.items()):
            if e.tag != tag:
                continue
            if len(e.tokens) >= len(tokens) and e.tokens[: len(tokens)] == tokens:
                self._entries.move_to_end(key)
                return
            if e.tokens == tokens[: len(e.tokens)]:
                self._drop(key)
        self._entries[(tag, tokens)] = _Entry(tokens, tag, keys, values, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[Any, tuple[int, ...]]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def match(self, prompt: tuple[int, ...], tag: Any) -> tuple[_Entry | None, int]:
        """The stored sequence sharing the longest prefix with `prompt` (under `tag`) and that
        prefix's length, at most len(prompt) - 1 (prefill needs one token to give logits);
        (None, 0) when no prefix reaches `min_reuse`."""
        best, best_n = None, 0
        for e in self._entries.values():
            if e.tag == tag:
                n = _common_prefix(e.tokens, prompt)
                if n > best_n:
                    best, best_n = e, n
        best_n = min(best_n, len(prompt) - 1)
        if best is None or best_n < self.min_reuse:
            return None, 0
        self._entries.move_to_end((best.tag, best.tokens))
        return best, best_n


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of a and b (tuple slices compare in C; bisection)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def row_kv(cache: Any, mask: torch.Tensor, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Row `row`'s keys and values ([Hkv, n, D] per layer, copies) at the columns its mask
    marks real (mask [B, L], the cache's length)."""
    cols = mask[row].nonzero()[:, 0]  # [n]
    keys = [layer.keys[row].index_select(1, cols) for layer in cache.layers]
    values = [layer.values[row].index_select(1, cols) for layer in cache.layers]
    return keys, values


def reuse_layout(
    prompts: list[tuple[int, ...]], matches: list[tuple[_Entry | None, int]], device: torch.device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of a prefill whose row u reuses the first m_u tokens' keys and values of its match
    (m_u = 0: none) and runs the rest: (per layer (keys, values) [U, Hkv, P, D] left-padded to
    P = max m_u, ids [U, S] of the remaining tokens left-padded to S, mask [U, P + S], position
    ids [U, S]). Padding columns are zeros with mask 0."""
    entry = next(e for e, _ in matches if e is not None)
    width_past = max(m for _, m in matches)
    width_new = max(len(p) - m for p, (_, m) in zip(prompts, matches, strict=True))
    u = len(prompts)
    ids = torch.zeros((u, width_new), dtype=torch.long)  # [U, S]
    mask = torch.zeros((u, width_past + width_new), dtype=torch.long)  # [U, P + S]
    past = [
        (
            k.new_zeros((u, k.shape[0], width_past, k.shape[2])),
            v.new_zeros((u, v.shape[0], width_past, v.shape[2])),
        )
        for k, v in zip(entry.keys, entry.values, strict=True)
    ]  # per layer [U, Hkv, P, D]
    for i, (p, (e, m)) in enumerate(zip(prompts, matches, strict=True)):
        rest = p[m:]
        ids[i, width_new - len(rest) :] = torch.tensor(rest)
        mask[i, width_new + width_past - len(rest) :] = 1
        if e is not None:
            mask[i, width_past - m : width_past] = 1
            for (k, v), ek, ev in zip(past, e.keys, e.values, strict=True):
                k[i, :, width_past - m :] = ek[:, :m]
                v[i, :, width_past - m :] = ev[:, :m]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, width_past:]  # [U, S]
    past = [(k.to(device), v.to(device)) for k, v in past]
    return past, ids.to(device), mask.to(device), pos.to(device)
