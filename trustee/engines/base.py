"""The engine contract: token ids in, token ids and log-probs out.

Owns the types every backend speaks (`Sampling`, `Completion`, `WeightUpdate`,
`EngineStats`) and the error split (recoverable vs fatal). Backends live beside it
(`hf.py`, `vllm.py`, `openai.py`) and are chosen by `build_engine` in `engines/__init__.py`.
Callers (episode runner, simulator roles, learner weight sync) depend only on this module.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

FinishReason = Literal["stop", "length", "abort"]


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling settings.

    `top_p`/`top_k` other than 1.0/0 truncate the distribution, which the learner cannot
    reproduce; RL sampling keeps them off. `json_schema`, when set, constrains the output to
    JSON valid for that schema (simulator roles). `stop_token_ids` end generation and are
    included in the returned ids (the chat layer expects the end-of-turn id in the sample).
    `adapter` False: sample from the base weights with the LoRA adapter switched off (the
    simulator playing on the policy's base, `PolicyBase`); engines without an adapter ignore it.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    json_schema: dict[str, Any] | None = None
    seed: int | None = None
    adapter: bool = True


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """What one `generate` call returns.

    Invariant: `len(logprobs) == len(token_ids)`; `logprobs[i]` is log p(token_ids[i]) under
    the sampling distribution after temperature (what the learner recomputes).
    `prompt_cached_tokens` is None when the backend cannot tell.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    prompt_cached_tokens: int | None = None


class LoraUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """A LoRA adapter: either a PEFT directory on disk (what vLLM loads) or in-memory tensors
    keyed by PEFT names (what the HF engine loads), plus its config (r, lora_alpha,
    target_modules, ...). At least one of `path` / `tensors` is set."""

    config: dict[str, Any]
    path: str | None = None
    tensors: dict[str, Any] | None = None  # name -> torch.Tensor


class FullUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """Full weights, one of two ways (exactly one is set):
    - `chunks`: (HF parameter name, tensor) lists, any iterable, so a learner can stream an 8B
      model without materialising a second copy (the bytes transport; every engine);
    - `buckets`: shared-bucket payloads (`vllm_ext.SharedBucket`): whole decoder layers that the
      learner ranks keep in their own device memory, each filed under its device's key; only
      the handles travel. The consumer must be done with a bucket (its workers copied it out)
      before it asks the iterator for the next one: asking acknowledges it, and the ranks then
      free it. Only the vLLM engine opens them (`learner.weight_transport`)."""

    chunks: Any = None  # Iterable[list[tuple[str, torch.Tensor]]]
    buckets: Any = None  # Iterable[dict[str, Any]], vllm_ext's payloads

    def __post_init__(self) -> None:
        if (self.chunks is None) == (self.buckets is None):
            raise ValueError("FullUpdate needs exactly one of `chunks` and `buckets`")

    def chunks_for(self, engine: str) -> Any:
        """`chunks`, for an engine that loads only those; TypeError when these are buckets."""
        if self.chunks is None:
            raise TypeError(
                f"{engine} loads full weights as chunks; shared buckets are for the vLLM engine "
                "(set learner.weight_transport = 'bytes')"
            )
        return self.chunks


WeightUpdate = LoraUpdate | FullUpdate


class EngineStats(msgspec.Struct, kw_only=True):
    """Cumulative counters since the engine started. Prefix-cache figures are in tokens.
    `batches` counts decode steps (forward passes with running requests) and `max_batch` the
    most requests in one step; 0 where a backend cannot see them (openai). `sleeps` / `wakes`
    count completed sleep and wake calls that changed the engine's state."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    busy_s: float = 0.0
    batches: int = 0
    max_batch: int = 0
    aborted: int = 0
    failed: int = 0
    sleeps: int = 0
    wakes: int = 0
    reloads_skipped: int = 0
    """Level-2 wakes that did not re-read the checkpoint from disk (a full update follows)."""

    @property
    def mean_batch(self) -> float:
        """Mean requests per decode step (each running request gains one token per step)."""
        return self.generated_tokens / self.batches if self.batches else 0.0


class EngineError(Exception):
    """Base class of engine failures."""


class RecoverableEngineError(EngineError):
    """This request failed (bad input, timeout, one decode failure); the engine still works.
    The caller may retry or drop the episode."""


class FatalEngineError(EngineError):
    """The engine is dead (process gone, CUDA error, server unreachable after retries).
    The run must stop or rebuild the engine."""


@runtime_checkable
class Engine(Protocol):
    """What the rest of trustee needs from an inference backend."""

    version: int

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        """Sample a continuation of `prompt`. `key` routes all turns of one episode to the
        same replica (prefix-cache locality). Cancelling the caller aborts the request."""
        ...

    async def sleep(self, level: int = 1) -> None: ...

    async def wake(self) -> None: ...

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load new weights or a new adapter; bump `version`; reset the prefix cache."""
        ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...
