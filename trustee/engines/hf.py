"""The transformers engine: the embedded default on CPU or one GPU, and the test engine.

Owns `HFEngine`: dynamic batching of concurrent `generate` calls over a plain transformers
causal LM with a KV cache, exact log-probs of the sampled tokens after temperature, per-request
JSON constraints through xgrammar, in-place full-weight and LoRA updates, and sleep/wake.
It does not own tokenization or chat rendering (callers pass token ids). A prompt that extends
a sequence the engine finished earlier (an episode's next turn) reuses that sequence's keys and
values and prefills only its new tokens (`engines/hf_prefix.py`; emptied on weight updates).

How batching works (continuous batching at the step level): callers enqueue requests; one
background task prefills up to `max_batch` of them as a left-padded batch with a KV cache,
then decodes one token per step for every live row. Identical prompts in one prefill (a GRPO
group's G episodes open with the same prompt) are run once and their cache rows repeated.
Between steps, finished rows and rows whose caller was cancelled are dropped from the cache,
and queued requests join: they are prefilled and their cache is left-padded and stacked onto
the running one. Weights never change inside a batch (updates and sleep wait for it to drain,
and while one waits no newcomer joins), so each `Completion.policy_version` is exact. A batch
holds requests of one adapter state (`Sampling.adapter`): a batch of base requests (the
simulator on the policy's base) runs with the LoRA adapter switched off. Torch work runs in a
worker thread, so the event loop stays free; the thread runs decode steps until a request
finishes or a queued one could join. A decode step appends to a KV cache with room and, for
Llama-family models, runs the decoder layers directly (`engines/hf_decode.py`; the same
logits as the model's forward).
`EngineStats.batches` counts decode steps, `max_batch` the most rows in one.

Callers: `build_engine` (backend 'hf'), the episode runner and learner tests, `bench/engine.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from trustee.engines.base import (
    Completion,
    EngineStats,
    FatalEngineError,
    FinishReason,
    FullUpdate,
    LoraUpdate,
    RecoverableEngineError,
    Sampling,
    WeightUpdate,
)
from trustee.engines.grammar import json_grammar
from trustee.engines.hf_decode import decode_logits, fast_decode_ok, room_cache
from trustee.engines.hf_prefix import PrefixStore, reuse_layout, row_kv
from trustee.engines.hf_sample import sample

ADAPTER = "policy"
PREFIX_CACHE_BYTES = 512 * 2**20
"""Default byte budget of the stored keys and values reused across an episode's turns."""


@dataclass(eq=False)
class _Request:
    """One generate call while it is queued or decoding (mutable; engine-internal)."""

    prompt: list[int]
    params: Sampling
    stops: frozenset[int]
    max_new: int
    future: asyncio.Future[Completion]
    matcher: Any = None  # xgrammar.GrammarMatcher for JSON-constrained requests
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    stream: bytes | None = None  # keyed sampling: hashed (seed, key, prompt length), see `keyed_sampling`
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None

    @property
    def dropped(self) -> bool:
        return self.future.done()  # cancelled by its caller (or failed)


@dataclass(eq=False)
class _Batch:
    """Decoding state of one batch: row i of every tensor belongs to `reqs[i]`."""

    reqs: list[_Request]
    cache: Any  # transformers DynamicCache over the live rows
    mask: torch.Tensor  # [B, L] 1 for real tokens, 0 for left padding
    next_pos: torch.Tensor  # [B] position id of the next token
    logits: torch.Tensor  # [B, V] logits for the next token, float32
    fast: bool = False  # decode with hf_decode's layer-by-layer step (see `HFEngine.fast_decode`)
    adapter: bool = True  # the batch's adapter state (`Sampling.adapter`), what its keys were computed under


class _Grammars:
    """Compiles each JSON schema once (xgrammar), keyed by its canonical JSON text."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compiled: dict[str, Any] = {}

    def get(self, schema: dict[str, Any]) -> Any:
        # Property order is meaningful (it fixes the output order), so the key keeps it.
        key = json.dumps(schema, separators=(",", ":"))
        if key not in self._compiled:
            try:
                self._compiled[key] = self._compiler.compile_grammar(json_grammar(key))
            except (RuntimeError, ValueError) as e:  # xgrammar's InvalidJSONError etc. derive from these
                raise RecoverableEngineError(
                    f"json_schema cannot be compiled by xgrammar: {e}; schema: {key[:300]}"
                ) from e
        return self._compiled[key]


def _as_list(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return [x] if isinstance(x, int) else list(x)


class HFEngine:
    """Dynamic-batching transformers engine. See the module docstring for the batching model.

    `model` is a loaded causal LM (or use `from_pretrained`). `source_dir` (the checkpoint
    directory) is needed only for `sleep(2)`, which drops the weights and reloads them on wake.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_batch: int = 64,
        max_model_len: int | None = None,
        source_dir: str | Path | None = None,
        seed: int = 0,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
    ):
        # Frozen, as peft freezes the base when an adapter arrives (torch's matmul takes another path
        # for weights that require grad): the base's outputs must not move when one is loaded.
        self._model = model.eval().requires_grad_(False)
        self._tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self._source_dir = Path(source_dir) if source_dir is not None else None
        self.max_batch = max_batch
        cfg = model.config
        self.max_model_len = max_model_len or int(getattr(cfg, "max_position_embeddings", 4096))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_ids = frozenset(_as_list(getattr(model.generation_config, "eos_token_id", None)))
        self.version = 0
        self._stats = EngineStats()
        self._seed = seed
        self._gen = torch.Generator(device=self._device).manual_seed(seed)
        self.keyed_sampling = False
        """Sample each keyed request (`generate(..., key=...)`, no `params.seed`) from uniforms
        hashed from (engine seed, key, prompt length, token index) instead of the shared generator,
        so a sample does not depend on which requests share its batch or in what order requests
        arrived (what makes an interrupted run resume bit for bit; see trustee/resume.py). Logits
        can still differ in the last bits between batch compositions; with max_batch = 1 they do
        not. A key must not repeat with the same prompt (an episode's turns grow the prompt)."""
        self._grammars: _Grammars | None = None
        self._peft: Any = None  # peft.PeftModel wrapping self._model once a LoRA update arrived
        self._lora: LoraUpdate | None = None  # the active adapter, re-applied after sleep(2)
        self.sleep_mode = True  # from_config: the engine's enable_sleep_mode; sleep() refuses when False
        self._sleep_level = 0
        self._needs_weights = False  # sleep(2) after a full update: the checkpoint is stale
        self._full_updates = 0
        self._fatal: BaseException | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exclusive_waiters = 0  # sleep/wake/update calls waiting for the gate
        self.prefilled_rows = 0  # prompt rows prefill ran (one per distinct prompt of a batch)
        self.prefilled_tokens = 0  # token positions prefill ran (padding included)
        self.prefix = PrefixStore(prefix_cache_bytes)
        """Finished sequences' keys and values for the prompts that extend them (hf_prefix.py);
        emptied on every weight update and sleep. `prefix_cache_bytes` = 0 turns reuse off."""
        self.fast_decode = True
        """Decode with `hf_decode` (a KV cache with room, Llama-family layers called directly;
        the same logits); False: transformers' DynamicCache and the model's forward (tests)."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch: int = 64,
        max_model_len: int | None = None,
        seed: int = 0,
    ) -> HFEngine:
        """Load model and tokenizer from a local directory (no hub access)."""
        from transformers import AutoTokenizer

        model = _load_model(Path(path), device, dtype)
        tok = AutoTokenizer.from_pretrained(path)
        return cls(model, tok, max_batch=max_batch, max_model_len=max_model_len, source_dir=path, seed=seed)

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        model_path: str | Path,
        dtype: str = "auto",
        max_model_len: int | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> HFEngine:
        """Build from an `EngineConfig` (trustee.config): `max_num_seqs` caps the batch,
        `enable_prefix_caching` = false turns prefix reuse off.
        dtype 'auto' = bfloat16 on CUDA, float32 on CPU."""
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        engine = cls.from_pretrained(
            model_path,
            device=device,
            dtype=getattr(torch, dtype),
            max_batch=cfg.max_num_seqs,
            max_model_len=max_model_len,
            seed=seed,
        )
        engine.sleep_mode = cfg.enable_sleep_mode
        if not cfg.enable_prefix_caching:
            engine.prefix.budget = 0
        return engine

    # ------------------------------------------------------------------ event-loop plumbing

    def _bind_loop(self) -> None:
        """Create the queue and batcher on the running loop (again if the caller's loop changed,
        e.g. one `asyncio.run` per test; only allowed while nothing is in flight)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed() and self._pending:
            raise RuntimeError("HFEngine is busy on another event loop; use one loop per engine")
        self._loop = loop
        self._pending: list[_Request] = []
        self._has_work = asyncio.Event()
        self._awake = asyncio.Event()
        if self._sleep_level == 0:
            self._awake.set()
        self._gate = asyncio.Lock()  # held while a batch runs, and by sleep/wake/update
        self._batcher = loop.create_task(self._serve(), name="hf-engine-batcher")

    def _check_alive(self) -> None:
        if self._closed:
            raise FatalEngineError("HFEngine is closed; build a new engine")
        if self._fatal is not None:
            raise FatalEngineError(f"HFEngine failed earlier and cannot generate: {self._fatal!r}")

    # ------------------------------------------------------------------ generate

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        """Queue one request and wait for its completion. `key` is ignored (one replica)."""
        self._check_alive()
        self._bind_loop()
        req = await self._make_request(prompt, params)
        if self.keyed_sampling and key is not None and params.seed is None:
            req.stream = f"{self._seed}\x00{key}\x00{len(prompt)}".encode()
        self._pending.append(req)
        self._stats.requests += 1
        self._stats.prompt_tokens += len(prompt)
        self._has_work.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            if req in self._pending:
                self._pending.remove(req)
            self._stats.aborted += 1
            raise

    async def _make_request(self, prompt: list[int], params: Sampling) -> _Request:
        self._validate(prompt, params)
        stops = frozenset(params.stop_token_ids) | self.eos_ids
        matcher = None
        if params.json_schema is not None:
            compiled = await asyncio.to_thread(self._grammars_for().get, params.json_schema)
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stops))
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self._device).manual_seed(params.seed)
        max_new = min(params.max_tokens, self.max_model_len - len(prompt))
        loop = asyncio.get_running_loop()
        return _Request(list(prompt), params, stops, max_new, loop.create_future(), matcher, gen)

    def _validate(self, prompt: list[int], params: Sampling) -> None:
        if not prompt:
            raise RecoverableEngineError("prompt is empty; pass at least one token id")
        if len(prompt) >= self.max_model_len:
            raise RecoverableEngineError(
                f"prompt has {len(prompt)} tokens, max_model_len is {self.max_model_len}; shorten the episode"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RecoverableEngineError(f"prompt holds token ids outside [0, {self.vocab_size}): {bad[:5]}")
        if params.max_tokens < 1:
            raise RecoverableEngineError(f"max_tokens = {params.max_tokens}; must be >= 1")
        if params.temperature < 0:
            raise RecoverableEngineError(f"temperature = {params.temperature}; must be >= 0 (0 = greedy)")

    def _grammars_for(self) -> _Grammars:
        if self._grammars is None:
            if self._tokenizer is None:
                raise RecoverableEngineError(
                    "json_schema needs the tokenizer; build HFEngine with a tokenizer (HFEngine.from_pretrained does)"
                )
            self._grammars = _Grammars(self._tokenizer, self.vocab_size, sorted(self.eos_ids))
        return self._grammars

    # ------------------------------------------------------------------ the batcher

    async def _serve(self) -> None:
        while True:
            await self._has_work.wait()
            await self._awake.wait()
            async with self._gate:
                if self._sleep_level:
                    continue  # fell asleep between the two waits
                reqs = self._take(self.max_batch)
                if reqs:
                    await self._run_batch(reqs)

    async def _run_batch(self, reqs: list[_Request]) -> None:
        t0 = time.perf_counter()
        version = self.version
        members = list(reqs)  # everyone who rode in this batch, for failure reporting
        try:
            if self._needs_weights:
                raise FatalEngineError(
                    "weights were dropped by sleep(2) after a full-weight update; push the current "
                    "weights with update_weights(FullUpdate) before generating"
                )
            adapter = reqs[0].params.adapter  # `_take` keeps a batch to one adapter state
            with self._adapter_state(adapter):
                batch = await asyncio.to_thread(self._prefill, reqs)
                while batch.reqs:
                    done = await asyncio.to_thread(self._steps, batch, adapter)
                    self._finish(done, version)
                    room = self.max_batch - len(batch.reqs)
                    joiners = self._take(room, adapter) if self._exclusive_waiters == 0 else []
                    if joiners:
                        members += joiners
                        await asyncio.to_thread(self._join, batch, joiners)
        except FatalEngineError as e:
            self._fail(members, e)
        except Exception as e:  # a torch/xgrammar failure mid-batch: the engine state is unknown
            self._fatal = e
            self._fail(members, FatalEngineError(f"HFEngine batch failed: {e!r}"))
        finally:
            self._stats.busy_s += time.perf_counter() - t0

    def _take(self, room: int, adapter: bool | None = None) -> list[_Request]:
        """Up to `room` queued requests (skipping those whose callers already left) that share
        one adapter state (`Sampling.adapter`): `adapter`, or the oldest request's. The others
        stay queued in order for a later batch."""
        taken: list[_Request] = []
        left: list[_Request] = []
        for r in self._pending:
            if r.dropped:
                continue
            if adapter is None:
                adapter = r.params.adapter
            if len(taken) < room and r.params.adapter == adapter:
                taken.append(r)
            else:
                left.append(r)
        self._pending = left
        if not left:
            self._has_work.clear()
        return taken

    @contextlib.contextmanager
    def _adapter_state(self, adapter: bool) -> Iterator[None]:
        """The adapter off (peft's `disable_adapter`) while a batch of base requests runs; the
        gate is held, so no update or sleep changes the model meanwhile."""
        if adapter or self._peft is None:
            yield
            return
        with self._peft.disable_adapter():
            yield

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold the gate between batches; while waiting, the running batch admits no newcomers
        (so weight updates and sleep are not starved by a batch that keeps growing)."""
        self._exclusive_waiters += 1
        try:
            await self._gate.acquire()
        finally:
            self._exclusive_waiters -= 1
        try:
            yield
        finally:
            self._gate.release()

    def _finish(self, done: list[_Request], version: int) -> None:
        for r in done:
            if r.dropped:
                continue
            assert r.finish is not None and len(r.ids) == len(r.logprobs)
            r.future.set_result(
                Completion(
                    token_ids=r.ids, logprobs=r.logprobs, finish_reason=r.finish, policy_version=version
                )
            )

    def _fail(self, reqs: list[_Request], err: BaseException) -> None:
        for r in reqs:
            if not r.future.done():
                self._stats.failed += 1
                r.future.set_exception(err)

    # ------------------------------------------------------------------ torch work (worker thread)

    @torch.inference_mode()
    def _prefill(self, reqs: list[_Request]) -> _Batch:
        """Prefill `reqs` as a left-padded batch. A GRPO group sends its G episodes' opening
        prompt G times: each distinct prompt is run once, and its cache rows, mask, position
        and last logits are repeated for its copies (each copy then samples on its own). A
        prompt that extends a stored sequence (`prefix`) reuses its keys and values and runs
        only the rest; every prompt run is stored in turn."""
        from transformers import DynamicCache

        first: dict[tuple[int, ...], int] = {}
        rows = [first.setdefault(tuple(r.prompt), len(first)) for r in reqs]  # request -> prompt row
        prompts, tag = list(first), reqs[0].params.adapter  # `_take` keeps a batch to one adapter state
        matches = [self.prefix.match(p, tag) for p in prompts] if self.prefix.budget else []
        cache = (
            room_cache(self._model.config) if self.fast_decode else DynamicCache(config=self._model.config)
        )
        if any(e is not None for e, _ in matches):
            past, ids, mask, pos = reuse_layout(prompts, matches, self._device)
            for layer, (k, v) in enumerate(past):
                cache.update(k, v, layer)
            self.prefix.reused_tokens += sum(m for _, m in matches)
        else:
            ids, mask, pos = _left_padded(prompts, self._device)
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # [U, V]
        cache, next_pos = out.past_key_values, pos[:, -1] + 1
        self.prefilled_rows += len(prompts)
        self.prefilled_tokens += int(ids.shape[0] * ids.shape[1])
        if self.prefix.budget:
            for u, p in enumerate(prompts):
                self.prefix.add(p, tag, *row_kv(cache, mask, u))
        if len(prompts) < len(reqs):
            idx = torch.tensor(rows, device=self._device)  # [B]
            cache.batch_select_indices(idx)
            mask, next_pos, logits = mask[idx], next_pos[idx], logits[idx]
        fast = self.fast_decode and fast_decode_ok(self._model)
        return _Batch(reqs, cache, mask, next_pos, logits, fast, tag)

    def _steps(self, b: _Batch, adapter: bool) -> list[_Request]:
        """Decode steps in the worker thread until a request finishes (its caller is answered on
        the event loop), a queued request could join, or the engine closes: one thread hop per
        such event instead of one per token. The tokens are the same as one hop per step."""
        while True:
            self._stats.batches += 1
            self._stats.max_batch = max(self._stats.max_batch, len(b.reqs))
            done = self._step(b)
            if done or not b.reqs or self._closed or self._joinable(len(b.reqs), adapter):
                return done

    def _joinable(self, rows: int, adapter: bool) -> bool:
        """Whether a queued request could join a batch of `rows` rows now (read from the worker
        thread: `_pending` is only appended to or replaced on the event loop)."""
        if rows >= self.max_batch or self._exclusive_waiters:
            return False
        return any(not r.dropped and r.params.adapter == adapter for r in self._pending)

    @torch.inference_mode()
    def _step(self, b: _Batch) -> list[_Request]:
        """Sample one token per live row, retire finished rows, run the next forward pass.
        Returns the requests that finished (or were dropped) in this step."""
        toks, lps = self._sample(b.logits, b.reqs)  # [B], [B]
        done: list[_Request] = []
        keep: list[int] = []
        for i, (r, t, lp) in enumerate(zip(b.reqs, toks.tolist(), lps.tolist(), strict=True)):
            if r.dropped:
                done.append(r)
                continue
            r.ids.append(t)
            r.logprobs.append(lp)
            if r.matcher is not None:
                r.matcher.accept_token(t)
            if t in r.stops or (r.matcher is not None and r.matcher.is_terminated()):
                r.finish = "stop"
            elif len(r.ids) >= r.max_new:
                r.finish = "length"
            if r.finish is None:
                keep.append(i)
                continue
            done.append(r)
            if self.prefix.budget:  # its keys cover the prompt and every token but the last
                self.prefix.add(tuple(r.prompt + r.ids[:-1]), b.adapter, *row_kv(b.cache, b.mask, i))
        self._stats.generated_tokens += len(b.reqs) - sum(r.dropped for r in b.reqs)
        if len(keep) < len(b.reqs):
            self._select(b, keep)
        if b.reqs:
            self._forward_one(b, toks[keep] if keep else toks[:0])
        return done

    def _select(self, b: _Batch, keep: list[int]) -> None:
        """Keep rows `keep`, then cut leading columns that are padding in every kept row."""
        b.reqs = [b.reqs[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, device=self._device)
        b.cache.batch_select_indices(idx)
        b.mask, b.next_pos, b.logits = b.mask[idx], b.next_pos[idx], b.logits[idx]
        first = int(b.mask.any(dim=0).long().argmax())  # first column some row uses
        if first > 0:
            for layer in b.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            b.mask = b.mask[:, first:]

    @torch.inference_mode()
    def _join(self, b: _Batch, reqs: list[_Request]) -> None:
        """Prefill `reqs` and merge them into the running batch `b` (continuous batching):
        both caches are left-padded to a common length and stacked on the batch dimension."""
        nb = self._prefill(reqs)
        if not b.reqs:
            vars(b).update(vars(nb))  # every field of the new batch
            return
        width = max(b.mask.shape[1], nb.mask.shape[1])
        for old, new in zip(b.cache.layers, nb.cache.layers, strict=True):
            old.keys = torch.cat(
                [_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)]
            )  # [B+N, H, W, D]
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        b.mask = torch.cat([_pad_left(b.mask, width, 1), _pad_left(nb.mask, width, 1)])  # [B+N, W]
        b.next_pos = torch.cat([b.next_pos, nb.next_pos])
        b.logits = torch.cat([b.logits, nb.logits])
        b.reqs = b.reqs + nb.reqs

    def _forward_one(self, b: _Batch, toks: torch.Tensor) -> None:
        n = len(b.reqs)
        b.mask = torch.cat([b.mask, b.mask.new_ones((n, 1))], dim=1)  # [B, L+1]
        toks = toks.to(self._device)
        b.logits = decode_logits(self._model, toks, b.next_pos, b.mask, b.cache, fast=b.fast)  # [B, V]
        b.next_pos = b.next_pos + 1

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (token ids [B], log-probs [B]); see `hf_sample.sample`."""
        return sample(logits, reqs, self._gen, self.vocab_size)

    # ------------------------------------------------------------------ sampler state

    def rng_state(self) -> torch.Tensor:
        """The shared sampler generator's state (what unkeyed, unseeded requests draw from);
        a checkpoint stores it so a resumed run continues the same stream."""
        return self._gen.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._gen.set_state(state)

    # ------------------------------------------------------------------ weights

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load a full-weight update or a LoRA adapter between batches; bump `version`."""
        self._check_alive()
        self._bind_loop()
        async with self._exclusive():
            if self._sleep_level == 2:
                raise RecoverableEngineError(
                    "engine sleeps at level 2 (weights dropped); call wake() before update_weights"
                )
            self.prefix.clear()  # stored keys and values were computed under the old weights
            if isinstance(update, FullUpdate):
                await asyncio.to_thread(self._load_full, update.chunks_for("the HF engine"))
                self._full_updates += 1
                self._needs_weights = False
            elif isinstance(update, LoraUpdate):
                await asyncio.to_thread(self._load_lora, update)
            else:
                raise TypeError(f"update must be LoraUpdate or FullUpdate, got {type(update).__name__}")
            self.version += 1

    def _base_params(self) -> dict[str, torch.Tensor]:
        """HF checkpoint name -> parameter/buffer tensor, seeing through PEFT's `.base_layer`."""
        out = {}
        for name, t in self._model.state_dict(keep_vars=True).items():
            if "lora_" in name:
                continue
            out[name.replace(".base_layer.", ".")] = t
        return out

    @torch.inference_mode()
    def _load_full(self, chunks: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        params = self._base_params()
        for chunk in chunks:
            unknown = [n for n, _ in chunk if n not in params]
            if unknown:
                raise ValueError(
                    f"full update names {unknown[:3]} are not parameters of this model "
                    f"(expected HF checkpoint names such as {next(iter(params))!r}); earlier chunks were applied"
                )
            for name, t in chunk:
                p = params[name]
                if tuple(p.shape) != tuple(t.shape):
                    raise ValueError(
                        f"full update {name}: shape {tuple(t.shape)} != model's {tuple(p.shape)}"
                    )
                p.data.copy_(t.to(device=p.device, dtype=p.dtype))

    def _load_lora(self, update: LoraUpdate) -> None:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        tensors, config = _lora_tensors(update)
        cfg = LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "auto_mapping")})
        if self._peft is None or not _same_lora_shape(self._peft.peft_config[ADAPTER], cfg):
            if self._peft is not None:
                self._model = self._peft.unload()
            self._peft = get_peft_model(self._model, cfg, adapter_name=ADAPTER)
            self._model = self._peft.base_model.model  # same object, adapters injected in place
            self._model.eval()
        result = set_peft_model_state_dict(self._peft, tensors, adapter_name=ADAPTER)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        missing = [k for k in result.missing_keys if "lora_" in k]
        if unexpected or missing:
            raise ValueError(
                f"LoRA tensors do not match the adapter built from their config: unexpected {unexpected[:3]}, "
                f"missing {missing[:3]}; keys must be PEFT names as get_peft_model_state_dict returns them"
            )
        self._lora = LoraUpdate(config=config, tensors=tensors)

    # ------------------------------------------------------------------ sleep / wake

    async def sleep(self, level: int = 1) -> None:
        """Level 1: weights to CPU (frees accelerator memory; no-op for memory on CPU).
        Level 2: drop the weights; `wake` reloads the checkpoint (and the active adapter)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level {level}: use 1 (offload weights) or 2 (drop weights)")
        if not self.sleep_mode:
            raise ValueError(
                "this engine was built with enable_sleep_mode = false; set enable_sleep_mode = true on "
                "the engine that must sleep"
            )
        if level == 2 and self._source_dir is None:
            raise ValueError(
                "sleep(2) reloads weights from the checkpoint dir; build with source_dir= or use sleep(1)"
            )
        self._bind_loop()
        async with self._exclusive():
            if self._sleep_level:
                return
            self._awake.clear()
            self._sleep_level = level
            self.prefix.clear()
            await asyncio.to_thread(self._release, level)
            self._stats.sleeps += 1

    def _release(self, level: int) -> None:
        if level == 1:
            self._model.to("cpu")
        else:
            self._model.to("meta")
            self._peft = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    async def wake(self) -> None:
        self._bind_loop()
        async with self._exclusive():
            if not self._sleep_level:
                return
            await asyncio.to_thread(self._restore, self._sleep_level)
            self._sleep_level = 0
            self._stats.wakes += 1
            self._awake.set()

    def _restore(self, level: int) -> None:
        if level == 1:
            self._model.to(self._device)
            return
        assert self._source_dir is not None
        self._model = _load_model(self._source_dir, str(self._device), self._dtype)
        if self._lora is not None:
            self._load_lora(self._lora)
        self._needs_weights = self._full_updates > 0

    # ------------------------------------------------------------------ misc

    def stats(self) -> EngineStats:
        return msgspec.structs.replace(self._stats)

    async def close(self) -> None:
        self._closed = True
        if self._loop is None:
            return
        for r in self._pending:
            if not r.future.done():
                r.future.set_exception(FatalEngineError("HFEngine closed while the request was queued"))
        self._pending.clear()
        if self._loop is asyncio.get_running_loop():
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass


def _load_model(path: Path, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)  # frozen: see HFEngine.__init__


def _left_padded(prompts: list[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Prefill inputs of prompts left-padded to the longest: ids, mask and position ids [U, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)  # [U, T]; pad id 0
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [U, T]
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [U, T]
    return ids.to(device), mask.to(device), pos.to(device)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left of `dim` up to `width` (masked positions in the KV cache)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


# The LoRA config fields that fix the adapter's tensors: an update that changes one needs a new adapter.
LORA_SHAPE_KEYS = tuple(
    "r lora_alpha target_modules use_rslora use_dora rank_pattern alpha_pattern bias".split()
)


def _same_lora_shape(old: Any, new: Any) -> bool:
    norm = lambda v: sorted(v) if isinstance(v, (set, list, tuple)) else v  # noqa: E731
    return all(norm(getattr(old, k, None)) == norm(getattr(new, k, None)) for k in LORA_SHAPE_KEYS)


def _lora_tensors(update: LoraUpdate) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's PEFT-named tensors and config, from memory or from a PEFT directory."""
    if update.tensors is not None:
        return dict(update.tensors), dict(update.config)
    if update.path is None:
        raise ValueError("LoraUpdate needs `tensors` or `path`; both are None")
    from safetensors.torch import load_file

    d = Path(update.path)
    files = [d / "adapter_model.safetensors", d / "adapter_model.bin"]
    found = next((f for f in files if f.exists()), None)
    if found is None:
        raise ValueError(f"LoRA dir {d} has no adapter_model.safetensors (write it with save_pretrained)")
    tensors = load_file(found) if found.suffix == ".safetensors" else torch.load(found, weights_only=True)
    config = dict(update.config) or json.loads((d / "adapter_config.json").read_text())
    return tensors, config
