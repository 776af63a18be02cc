"""The trainable policy: full fine-tuning, LoRA (peft) or QLoRA (bitsandbytes NF4 + LoRA).

Owns `Policy` (the model being trained plus how to evaluate the KL reference) and
`load_policy` / `wrap_policy`. The reference for LoRA and QLoRA is the base model with the
adapter disabled (`with model.disable_adapter():`), so no second model exists; for full
fine-tuning it is a frozen copy, made only when a KL term needs it and refused, with the
figures, when it cannot fit in the device's free memory.

Does not compute losses or step the optimiser (`learn/learner.py`). bitsandbytes is imported
only for QLoRA, which needs CUDA. No `.cuda()` calls: the device is an argument, and later
code reads it from the model's parameters.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from trustee.config import LearnerConfig
from trustee.learn.loading import init_lora

PolicyMode = Literal["full", "lora", "qlora"]

# A frozen reference copy must leave this share of the free memory for training itself.
REFERENCE_HEADROOM = 0.5


@dataclass
class Policy:
    """The model being trained and its KL reference.

    `model` is a PeftModel for 'lora'/'qlora' and a plain transformers model for 'full';
    `ref_model` is the frozen copy for 'full' with a KL term, else None.
    """

    model: nn.Module
    mode: PolicyMode
    ref_model: nn.Module | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Yields the module that computes reference log-probs (use under torch.no_grad)."""
        if self.mode in ("lora", "qlora"):
            with self.model.disable_adapter():
                yield self.model
        elif self.ref_model is not None:
            yield self.ref_model
        else:
            raise ValueError(
                "no KL reference: full fine-tuning keeps a frozen copy only when asked "
                "(wrap_policy(..., need_reference=True), set by grpo.beta > 0)"
            )


def module_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA free bytes, or available RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_reference_fits(model: nn.Module, available: int) -> None:
    """Refuse a frozen reference copy that would take more than REFERENCE_HEADROOM of `available`."""
    need = module_bytes(model)
    if need > REFERENCE_HEADROOM * available:
        raise MemoryError(
            f"a frozen reference copy for the KL term needs {need / 2**30:.2f} GiB, but only "
            f"{available / 2**30:.2f} GiB is free (at most {REFERENCE_HEADROOM:.0%} of it may go to the copy); "
            "set grpo.beta = 0, or use learner.mode = 'lora' (its reference is the base with the adapter disabled)"
        )


def lora_config(cfg: LearnerConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def wrap_policy(
    model: nn.Module,
    cfg: LearnerConfig,
    *,
    need_reference: bool = False,
    available_bytes: int | None = None,
    adapter: str | Path = "",
) -> Policy:
    """Turn a loaded (non-quantised) transformers model into a Policy for cfg.mode 'full' or 'lora'.

    need_reference: a KL term will ask for reference log-probs (grpo.beta > 0).
    available_bytes: free memory to plan the full-FT reference copy against (default: measured).
    adapter: a trained PEFT adapter directory to continue (LoRA only); '' = a fresh adapter.
    """
    if cfg.mode == "qlora":
        raise ValueError("learner.mode = 'qlora' quantises while loading; use load_policy(path, cfg, ...)")
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if cfg.mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = _with_adapter(model, cfg, adapter)
        peft_model.train()
        return Policy(model=peft_model, mode="lora")
    if adapter:
        raise ValueError(f"model.adapter = {str(adapter)!r} needs learner.mode 'lora' or 'qlora', not 'full'")
    ref = None
    if need_reference:
        dev = next(model.parameters()).device
        check_reference_fits(model, free_memory_bytes(dev) if available_bytes is None else available_bytes)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    return Policy(model=model, mode="full", ref_model=ref)


def _with_adapter(model: nn.Module, cfg: LearnerConfig, adapter: str | Path) -> nn.Module:
    """`model` with a fresh LoRA adapter, or with the trained one at `adapter`, trainable."""
    if not adapter:
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(cfg))
        if next(model.parameters()).device.type != "meta":  # a meta model's ranks draw it after sharding
            init_lora(peft_model, torch.initial_seed())
        return peft_model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)


def attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 on CUDA with half precision when flash-attn is installed, else SDPA."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def _load_qlora(
    path: str | Path, cfg: LearnerConfig, device: torch.device, dtype: torch.dtype, adapter: str | Path = ""
) -> Policy:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"learner.mode = 'qlora' needs CUDA (bitsandbytes NF4 kernels), but the learner device is {device}; "
            "set placement.learner_gpus on a GPU machine, or use learner.mode = 'lora' on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "learner.mode = 'qlora' needs bitsandbytes: pip install 'trustee[gpu]' (or bitsandbytes)"
        ) from e
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    base = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb,
        dtype=dtype,
        device_map={"": device.index or 0},
        attn_implementation=attn_implementation(device, dtype),
    )
    base = prepare_model_for_kbit_training(
        base,
        use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    undo_kbit_upcast(base, dtype)
    base.config.use_cache = False
    model = _with_adapter(base, cfg, adapter)
    model.train()
    return Policy(model=model, mode="qlora")


def undo_kbit_upcast(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast back to `dtype` the frozen matrices peft's `prepare_model_for_kbit_training` upcast
    to float32 (the embeddings and head: 0.78 GiB more for Qwen3-4B, which the memory model
    does not budget); the 1-D norm weights stay float32 (small; the reason peft upcasts).
    4-bit weights are untouched. Returns the bytes given back."""
    freed = 0
    for p in model.parameters():
        if (
            p.dtype == torch.float32
            and p.dim() >= 2
            and type(p).__name__ != "Params4bit"
            and dtype != p.dtype
        ):
            freed += p.numel() * (p.element_size() - torch.empty(0, dtype=dtype).element_size())
            p.data = p.data.to(dtype)
    return freed


def load_policy(
    path: str | Path,
    cfg: LearnerConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    need_reference: bool = False,
    adapter: str | Path = "",
) -> Policy:
    """Load the model at `path` (a local directory) as a Policy for cfg.mode. `adapter`: a
    trained PEFT adapter directory to continue training instead of a fresh adapter
    (model.adapter; LoRA and QLoRA only)."""
    device = torch.device(device)
    if cfg.mode == "qlora":
        return _load_qlora(path, cfg, device, dtype, adapter)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation(device, dtype)
    )
    model.to(device)
    return wrap_policy(model, cfg, need_reference=need_reference, adapter=adapter)
