"""Inference engines behind one contract (`base.Engine`): token ids in, ids and log-probs out.

Owns the backend registry and `build_engine`, which turns an `EngineConfig` section into an
engine. Backends: 'hf' (transformers, CPU or one GPU; the embedded default and the test engine),
'vllm' (AsyncLLM; imported only when used), 'openai' (any OpenAI-compatible server). Callers:
`trustee.placement` (policy and simulator engines), `bench/engine.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trustee.engines.base import Engine
from trustee.engines.hf import HFEngine
from trustee.engines.openai import OpenAIEngine
from trustee.engines.vllm import VLLMEngine  # vllm itself is imported lazily inside

ENGINES: dict[str, type] = {"hf": HFEngine, "vllm": VLLMEngine, "openai": OpenAIEngine}


def build_engine(
    cfg: Any,
    model_path: str,
    *,
    dtype: str = "auto",
    max_model_len: int = 8192,
    seed: int = 0,
    gpus: Sequence[int] = (),
    lora: bool = False,
    lora_rank: int = 0,
) -> Engine:
    """Build the engine `cfg.backend` names from an `EngineConfig`.

    `model_path`, `dtype` ('auto', 'float32', 'bfloat16', 'float16') and `max_model_len` come
    from the model section; `gpus` from placement (empty = CPU; 'hf' uses the first one, vLLM
    sees exactly these). `lora`: the policy is trained with LoRA, so a vLLM engine enables
    adapters with `max(cfg.max_lora_rank, lora_rank)` (vLLM rejects larger adapters); without
    it vLLM runs with LoRA off. Blocking (vLLM start-up takes tens of seconds).
    """
    if cfg.backend not in ENGINES:
        raise ValueError(f"engine backend {cfg.backend!r} unknown; choose one of {sorted(ENGINES)}")
    if cfg.backend == "hf":
        device = f"cuda:{gpus[0]}" if gpus else "cpu"
        return HFEngine.from_config(
            cfg, model_path=model_path, dtype=dtype, max_model_len=max_model_len, device=device, seed=seed
        )
    if cfg.backend == "vllm":
        return VLLMEngine.from_config(
            cfg,
            model_path=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpus=tuple(gpus),
            lora_rank=max(cfg.max_lora_rank, lora_rank) if lora else 0,
        )
    return OpenAIEngine.from_config(cfg)


__all__ = ["ENGINES", "HFEngine", "OpenAIEngine", "VLLMEngine", "build_engine"]
