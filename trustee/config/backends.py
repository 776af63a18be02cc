"""What each engine backend can honour: a field set on a backend that cannot use it is refused
at load time, never silently ignored."""

from __future__ import annotations

from typing import Any

import msgspec

from trustee.config.schema import EngineConfig

_DEFAULT = object()
# What each backend cannot honour: field -> the one value it accepts (_DEFAULT = the field's
# default). Any other value is refused at load time, never ignored. The HF engine is one process
# on one device with no memory cap or compilation; a remote (openai) server's parallelism and
# memory are configured on the server, not here (placement never asks it to sleep, and it never
# receives an adapter, so enable_sleep_mode / max_lora_rank do not apply to it).
BACKEND_ONLY: dict[str, dict[str, Any]] = {
    "hf": {
        "tensor_parallel_size": _DEFAULT,
        "data_parallel_size": _DEFAULT,
        "kv_cache_gib": _DEFAULT,
        "gpu_memory_utilization": _DEFAULT,
        "enforce_eager": _DEFAULT,
        "base_url": _DEFAULT,
        "timeout_s": _DEFAULT,
        "max_retries": _DEFAULT,
    },
    "vllm": {"base_url": _DEFAULT, "timeout_s": _DEFAULT, "max_retries": _DEFAULT},
    "openai": {
        "tensor_parallel_size": _DEFAULT,
        "data_parallel_size": _DEFAULT,
        "kv_cache_gib": _DEFAULT,
        "gpu_memory_utilization": _DEFAULT,
        "enforce_eager": _DEFAULT,
    },
}


def unhonoured_fields(e: EngineConfig) -> list[tuple[str, Any, Any]]:
    """(field, value, the value the backend accepts) for each field `e.backend` cannot honour."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(EngineConfig)}
    out = []
    for name, only in BACKEND_ONLY[e.backend].items():
        want = defaults[name] if only is _DEFAULT else only
        if getattr(e, name) != want:
            out.append((name, getattr(e, name), want))
    return out


# Which engine backends honour each EngineConfig field (fields not listed: every backend).
# A value other than the role's default on a backend that cannot honour it is refused.
ENGINE_FIELD_BACKENDS: dict[str, tuple[str, ...]] = {
    "max_num_seqs": ("hf", "vllm"),
    "gpu_memory_utilization": ("vllm",),
    "kv_cache_gib": ("vllm",),
    "enable_prefix_caching": ("vllm",),
    "enable_sleep_mode": ("vllm",),
    "max_lora_rank": ("vllm",),
    "tensor_parallel_size": ("vllm",),
    "data_parallel_size": ("vllm",),
    "enforce_eager": ("vllm",),
    "base_url": ("openai",),
    "timeout_s": ("openai",),
    "max_retries": ("openai",),
}
