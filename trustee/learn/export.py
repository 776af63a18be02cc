"""Weights out of the learner, in the shapes engines load.

Owns the conversion of a trained policy into `trustee.engines.base` updates:
- `export_lora`: the adapter as a PEFT directory (`save_pretrained`, what vLLM loads) and/or
  as in-memory tensors keyed by PEFT state-dict names (`get_peft_model_state_dict`, what the
  HF engine loads), with the LoRA config as a plain JSON-able dict;
- `export_full`: every weight of a fully fine-tuned model as chunks of (HF name, tensor);
- `export_merged`: W + delta for a LoRA/QLoRA policy, computed beside the model (no
  merge/unmerge, which drifts bf16 weights and re-quantises 4-bit ones), dequantising
  bitsandbytes 4-bit weights first.

Chunks are produced lazily (a generator): consume a `FullUpdate` before the next learner
step, or the later chunks will hold the newer weights. Called by the controller's weight
sync and by tests. Does not talk to engines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustee.engines.base import FullUpdate, LoraUpdate
from trustee.learn.logprobs import unwrap
from trustee.memory import CHUNK_BYTES

DEFAULT_CHUNK_BYTES = CHUNK_BYTES  # the memory model counts the engine's copy of one chunk
_QUANT_KEY = re.compile(r"\.weight\.(absmax|quant_map|nested_|quant_state)")


def _plain(v: Any) -> Any:
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    raise TypeError(f"cannot put {type(v).__name__} into a LoRA config dict")


def lora_config_dict(model: nn.Module, adapter: str = "default") -> dict[str, Any]:
    """The adapter's LoraConfig as plain JSON types (what adapter_config.json holds)."""
    cfg = model.peft_config[adapter].to_dict()
    return json.loads(json.dumps(cfg, default=_plain))


def lora_tensors(
    model: nn.Module, adapter: str = "default", device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors, copied (training may go on while the engine holds them)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {k: v.detach().to(device, copy=True) for k, v in state.items()}


def export_lora(
    model: nn.Module, *, path: str | Path | None = None, tensors: bool = True, adapter: str = "default"
) -> LoraUpdate:
    """A LoraUpdate with the adapter written to `path` (if given) and/or as tensors."""
    if not hasattr(model, "peft_config"):
        raise TypeError(
            f"{type(model).__name__} has no LoRA adapter; use export_full for learner.mode = 'full'"
        )
    if path is None and not tensors:
        raise ValueError("export_lora needs a path, tensors=True, or both")
    if path is not None:
        model.save_pretrained(str(path), selected_adapters=[adapter])
        # save_pretrained puts a non-default adapter in a subdirectory.
        path = Path(path) if adapter == "default" else Path(path) / adapter
    return LoraUpdate(
        config=lora_config_dict(model, adapter),
        path=str(path) if path is not None else None,
        tensors=lora_tensors(model, adapter) if tensors else None,
    )


def chunked(
    items: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of about chunk_bytes (a tensor is never split)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes = {chunk_bytes}: must be >= 1")
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in items:
        chunk.append((name, t))
        size += t.numel() * t.element_size()
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _dequantized(p: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit parameter as a dense tensor; other tensors unchanged."""
    if getattr(p, "quant_state", None) is None:
        return p
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(p, state=p.quant_state)


def _is_quant_state(name: str) -> bool:
    """bitsandbytes' extra state-dict entries of a 4-bit weight (absmax, quant_map, ...)."""
    return _QUANT_KEY.search(name) is not None


def _tied(t: torch.Tensor, seen: set[int]) -> bool:
    """True if a tensor with the same storage start was already yielded (tied weights);
    records `t` otherwise. Empty tensors are never treated as tied."""
    if t.numel() == 0:
        return False
    ptr = t.data_ptr()
    if ptr in seen:
        return True
    seen.add(ptr)
    return False


def _state_items(model: nn.Module, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a plain transformers model's state dict, tied tensors once."""
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if _tied(t, seen) or _is_quant_state(name):  # tied weights: engines re-tie on load
            continue
        t = _dequantized(t).detach()
        yield name, t.to(dtype) if dtype is not None else t


def export_full(
    model: nn.Module, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, dtype: torch.dtype | None = None
) -> FullUpdate:
    """Full weights of a fully fine-tuned model as a lazy FullUpdate (HF parameter names)."""
    if hasattr(model, "peft_config"):
        raise TypeError("this policy has LoRA adapters; use export_merged (W + delta) or export_lora")
    return FullUpdate(chunks=chunked(_state_items(model, dtype), chunk_bytes))


@torch.no_grad()
def _merged_items(
    model: nn.Module, adapter: str, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, W + delta) for LoRA-wrapped weights, (HF name, W) for the rest."""
    from peft.tuners.lora import LoraLayer

    lm = unwrap(model)
    wrapped: dict[str, nn.Module] = {}
    for mname, mod in lm.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            if getattr(mod, "merged", False):
                raise RuntimeError(f"{mname} has a merged adapter; export_merged expects an unmerged model")
            wrapped[mname] = mod
    seen: set[int] = set()
    for name, t in lm.state_dict(keep_vars=True).items():
        if ".lora_" in name or _is_quant_state(name) or _tied(t, seen):
            continue
        dense = _dequantized(t).detach()  # a 4-bit weight comes back in its compute dtype
        owner, sep, leaf = name.rpartition(".base_layer.")
        if sep and owner in wrapped and leaf == "weight":
            delta = wrapped[owner].get_delta_weight(adapter)  # [out, in], scaled
            w, name = (dense.float() + delta.float()).to(dense.dtype), f"{owner}.weight"
        else:
            w, name = dense, name.replace(".base_layer.", ".")
        yield name, w.to(dtype) if dtype is not None else w


def export_merged(
    model: nn.Module,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    dtype: torch.dtype | None = None,
    adapter: str = "default",
) -> FullUpdate:
    """Full weights W + scale * B @ A of a LoRA/QLoRA policy, without modifying the model.

    dtype: the output dtype (default: each weight's own dtype; 4-bit weights come back in
    their compute dtype). Pass the engine's dtype for QLoRA: peft's kbit preparation upcasts
    the norms and embeddings to float32.
    """
    if not hasattr(model, "peft_config"):
        raise TypeError(f"{type(model).__name__} has no LoRA adapter; use export_full")
    return FullUpdate(chunks=chunked(_merged_items(model, adapter, dtype), chunk_bytes))
