"""Log-probs of the trained tokens, from hidden states, in chunks.

Owns `token_logprobs`: run the model body once over a micro-batch, gather the hidden states
whose *next* token is a loss token, and apply lm_head + log-softmax to those rows only, a
chunk of rows at a time. Each chunk runs under activation checkpointing when gradients are
on, so at no point does a float32 [tokens x vocab] tensor exist for the whole sequence: the
backward keeps only the gathered hidden states and recomputes one chunk's logits at a time.
A micro-batch whose logits all fit one chunk and `SMALL_LOGITS` elements keeps them instead
(no recompute; tiny models and short completions, where the recompute was a tenth of a step).
Logits are divided by the sampling temperature first, as the engines do, so the result is
comparable with the sampler's log-probs.

Does not pack (`learn/packing.py`) or compute losses (`learn/grpo.py`). Called by the
learner and by tests and the benchmark. No device assumptions: tensors go to the device of
the model's parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trustee.learn.attention import use_segment_attention
from trustee.learn.packing import MicroBatch, to_device

SMALL_LOGITS = 1 << 22
"""Logit elements (16 MiB in float32) up to which a one-chunk micro-batch's backward keeps its
logits rather than recomputing them; within the 3 x chunk x vocab the memory plan counts."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a PeftModel (LoRA layers stay injected), or `model`."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, lm_head) of a transformers causal LM, possibly wrapped by peft.

    The body returns normed hidden states (`last_hidden_state`); the head maps them to
    logits. Models that post-process logits (e.g. soft-capping) are not supported.
    """
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    body = getattr(lm, lm.base_model_prefix, None)
    if head is None or body is None or body is lm:
        raise TypeError(f"{type(lm).__name__} is not a causal LM with a separate body and lm_head")
    if getattr(lm.config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{type(lm).__name__} soft-caps its logits; token_logprobs does not model that"
        )
    return body, head


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _chunk_logprobs(
    h: torch.Tensor, targets: torch.Tensor, head: nn.Module, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [n, H], targets: [n] -> (logp [n], entropy [n]) in float32; entropy carries no grad."""
    logits = head(h).float() / temperature  # [n, V]
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    logp = logits.gather(-1, targets[:, None])[:, 0] - lse  # [n]
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1)  # [n, V]
        entropy = lse - (p * logits).sum(-1)  # [n]
    return logp, entropy


def body_forward(body: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Hidden states of the whole micro-batch, flattened: [R*T, H].

    The model is switched to `attention.segment_attention` first (once, it stays; a
    flash-attention model only when a shared-prefix micro-batch comes): packed micro-batches
    get per-sequence attention, so no attention work crosses a sequence boundary; shared-prefix
    ones let each branch see its prefix and itself; padded ones compute what SDPA computes, and
    all keep grouped-query attention on SDPA's fast kernels (transformers' own SDPA path passes
    enable_gqa on CPU, which runs the math kernel, several times slower). With a shared-prefix
    layout on the CPU kernel, the last layer leaves a prefix's rows before its last at zero
    (`attention._SharedRowAttention`): read only the rows that predict loss tokens (`mb.src`)."""
    use_segment_attention(body, shared=mb.layout is not None)
    out = body(
        input_ids=mb.input_ids,
        position_ids=mb.position_ids,
        attention_mask=mb.attention_mask,
        use_cache=False,
        **mb.attn_kwargs,
    )
    h = out.last_hidden_state  # [R, T, H]
    return h.reshape(-1, h.shape[-1])


def _vocab(head: nn.Module) -> int:
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else 1 << 62  # unknown: always checkpoint


def token_logprobs(
    model: nn.Module, mb: MicroBatch, *, temperature: float = 1.0, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [N] (with grad if enabled) and entropies [N] (no grad) of `mb`'s loss tokens.

    `mb` may live on the CPU; it is moved to the model's device. Row chunks of `chunk`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: log-probs need a positive sampling temperature")
    body, head = split_causal_lm(model)
    mb = to_device(mb, model_device(model))
    h = body_forward(body, mb)[mb.src]  # [N, H]
    logps, ents = [], []
    grad = torch.is_grad_enabled()
    keep = h.shape[0] <= chunk and h.shape[0] * _vocab(head) <= SMALL_LOGITS
    for start in range(0, h.shape[0], chunk):
        hc, tc = h[start : start + chunk], mb.targets[start : start + chunk]  # [n, H], [n]
        if grad and not keep:
            lp, ent = checkpoint(_chunk_logprobs, hc, tc, head, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(hc, tc, head, temperature)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)
