"""The transformers engine's sampler: next tokens and their exact log-probs from a batch's logits.

Owns `sample` (temperature, top-k/top-p, the JSON grammar mask, then one draw per row by
inverse CDF from the shared generator, a per-request generator or a keyed hash stream) and its
helpers. Called by `trustee/engines/hf.py` (`HFEngine._sample`), which owns the requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def sample(
    logits: torch.Tensor, reqs: Sequence[Any], gen: torch.Generator, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token ids [B], log-probs [B] under the distribution sampled from:
    after temperature, top-k/top-p and the grammar mask; greedy rows use temperature 1).
    `reqs` are the engine's requests, row i for logits[i] (their params, grammar matcher,
    generator, keyed stream and ids so far); `gen` is the engine's shared generator."""
    temps = torch.tensor([r.params.temperature or 1.0 for r in reqs], device=logits.device)
    scores = logits / temps[:, None]  # [B, V]
    for i, r in enumerate(reqs):
        if r.params.top_k > 0 or r.params.top_p < 1.0:
            scores[i] = _truncate(scores[i], r.params.top_k, r.params.top_p)
    constrained = [i for i, r in enumerate(reqs) if r.matcher is not None]
    if constrained:
        _apply_grammar(scores, reqs, constrained, vocab_size)
    logp = torch.log_softmax(scores, dim=-1)  # [B, V]
    toks = logp.argmax(dim=-1)  # [B] greedy default
    free = [
        i for i, r in enumerate(reqs) if r.params.temperature > 0 and r.generator is None and r.stream is None
    ]
    keyed = [i for i, r in enumerate(reqs) if r.params.temperature > 0 and r.stream is not None]
    if keyed:
        us = [_uniform(reqs[i].stream, len(reqs[i].ids)) for i in keyed]
        toks[keyed] = _draw(logp[keyed].exp(), torch.tensor(us, dtype=torch.float64))
    if free:  # one uniform per row and an inverse CDF (torch.multinomial costs several times more)
        us = torch.rand(len(free), generator=gen, dtype=torch.float64, device=gen.device)
        toks[free] = _draw(logp[free].exp(), us)
    for i, r in enumerate(reqs):
        if r.params.temperature > 0 and r.generator is not None:
            u = torch.rand(1, generator=r.generator, dtype=torch.float64, device=r.generator.device)
            toks[i] = _draw(logp[i : i + 1].exp(), u)[0]
    return toks, logp.gather(1, toks[:, None])[:, 0]


def _apply_grammar(scores: torch.Tensor, reqs: Sequence[Any], rows: list[int], vocab_size: int) -> None:
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(reqs), vocab_size)  # [B, ceil(V/32)] int32
    for i in rows:
        reqs[i].matcher.fill_next_token_bitmask(bitmask, i)
    on_cpu = scores.device.type == "cpu"
    target = scores if on_cpu else scores.cpu()
    xgr.apply_token_bitmask_inplace(target, bitmask, vocab_size=vocab_size, indices=rows)
    if not on_cpu:
        scores.copy_(target)


def _uniform(stream: bytes, index: int) -> float:
    """A uniform in [0, 1) that depends only on (stream, index): 53 bits of a blake2b digest."""
    import hashlib

    h = hashlib.blake2b(stream + index.to_bytes(8, "little"), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) / float(1 << 53)


def _draw(probs: torch.Tensor, us: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V], one uniform in [0, 1) per row (us [N]) -> token ids
    [N]. Tokens of probability 0 (masked by grammar or top-k/top-p) have empty intervals and are
    never drawn."""
    cdf = probs.double().cumsum(-1)  # [N, V]
    x = us.to(dtype=cdf.dtype, device=cdf.device) * cdf[:, -1]  # [N]
    idx = torch.searchsorted(cdf, x[:, None], right=True)[:, 0]  # [N]
    return idx.clamp(max=probs.shape[-1] - 1)


def _truncate(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """scores [V] -> scores with tokens outside top-k / the top-p nucleus set to -inf."""
    out = scores.clone()
    if top_k > 0:
        kth = torch.topk(out, min(top_k, out.numel())).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_s, order = torch.sort(out, descending=True)
        cum = torch.softmax(sorted_s, -1).cumsum(-1)
        cut = cum - torch.softmax(sorted_s, -1) >= top_p  # drop tokens once the mass before them reaches p
        out[order[cut]] = float("-inf")
    return out
