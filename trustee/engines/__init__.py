"""Inference engines behind one contract (`base.Engine`): token ids in, ids and log-probs out.

Owns the backend registry and `build_engine`, which turns an `EngineConfig` section into an
engine. Backends: 'hf' (transformers, CPU or one GPU; the embedded default and the test engine),
'vllm' (AsyncLLM; imported only when used), 'openai' (any OpenAI-compatible server). Callers:
`trustee.run` (policy and simulator engines), `bench/engine.py`.
"""

from __future__ import annotations

from typing import Any

from trustee.engines.base import Engine
from trustee.engines.hf import HFEngine
from trustee.engines.openai import OpenAIEngine
from trustee.engines.vllm import VLLMEngine  # vllm itself is imported lazily inside

ENGINES: dict[str, type] = {"hf": HFEngine, "vllm": VLLMEngine, "openai": OpenAIEngine}


def build_engine(
    cfg: Any,
    *,
    model_path: str,
    dtype: str = "auto",
    max_model_len: int = 8192,
    device: str = "cpu",
    seed: int = 0,
) -> Engine:
    """Build the engine `cfg.backend` names from an `EngineConfig`.

    `model_path`, `dtype` and `max_model_len` come from the model section; `device` is where the
    'hf' backend runs ('cpu', 'cuda', 'cuda:1'; vLLM and remote servers place themselves).
    Blocking (vLLM start-up takes tens of seconds): call before the event loop's hot path.
    """
    if cfg.backend not in ENGINES:
        raise ValueError(f"engine backend {cfg.backend!r} unknown; choose one of {sorted(ENGINES)}")
    if cfg.backend == "hf":
        return HFEngine.from_config(
            cfg, model_path=model_path, dtype=dtype, max_model_len=max_model_len, device=device, seed=seed
        )
    if cfg.backend == "vllm":
        return VLLMEngine.from_config(
            cfg, model_path=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed
        )
    return OpenAIEngine.from_config(cfg, model_path=model_path)


__all__ = ["ENGINES", "HFEngine", "OpenAIEngine", "VLLMEngine", "build_engine"]
