"""What each engine backend can honour: one table, field -> the backends that honour it.

A field set on a backend that cannot honour it is refused at load time (the rule
`backend_capabilities` in `rules.py`), never silently ignored. The HF engine is one process on
one device with no memory cap, compilation, sleep mode or hot-loaded adapter slot;
a remote (openai) server's parallelism, memory and batching are configured on the server (the
placement never asks it to sleep and it never receives an adapter); vLLM honours everything
except the HTTP client's fields.
"""

from __future__ import annotations

from typing import Any

import msgspec

from trustee.config.schema import EngineConfig

BACKENDS: tuple[str, ...] = ("hf", "vllm", "openai")

# Which backends honour each EngineConfig field; a field not listed is honoured by every backend.
HONOURED_BY: dict[str, tuple[str, ...]] = {
    "max_num_seqs": ("hf", "vllm"),
    "gpu_memory_utilization": ("vllm",),
    "kv_cache_gib": ("vllm",),
    "enable_prefix_caching": ("hf", "vllm"),
    "enable_sleep_mode": ("vllm",),
    "max_lora_rank": ("vllm",),
    "tensor_parallel_size": ("vllm",),
    "data_parallel_size": ("vllm",),
    "enforce_eager": ("vllm",),
    "base_url": ("openai",),
    "timeout_s": ("openai",),
    "max_retries": ("openai",),
}


def honours(backend: str, field: str) -> bool:
    """Whether `backend` does something with EngineConfig field `field`."""
    return backend in HONOURED_BY.get(field, BACKENDS)


def unhonoured_fields(
    e: EngineConfig, role_default: EngineConfig | None = None
) -> list[tuple[str, Any, Any]]:
    """(field, value, default) for each field set on `e` that `e.backend` cannot honour: a value
    other than EngineConfig's default and the role's own default (`role_default`, e.g. the
    simulator's no-sleep default)."""
    plain = EngineConfig()
    out = []
    for f in msgspec.structs.fields(EngineConfig):
        if honours(e.backend, f.name):
            continue
        value, default = getattr(e, f.name), getattr(plain, f.name)
        if value != default and (role_default is None or value != getattr(role_default, f.name)):
            out.append((f.name, value, default))
    return out
