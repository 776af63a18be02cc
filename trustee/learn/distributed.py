"""The multi-rank learner: FSDP2 ranks in child processes, driven from the asyncio process.

Owns `DistributedLearner` (starts `placement.learner_ranks` learner processes itself: one
per learner GPU with NCCL, or N CPU processes with gloo; users never call torchrun),
`balance_by_tokens` (which rank trains which sequence), `global_norm` (the step's loss
normaliser over all ranks) and `build_distributed_learner` (from the config). What each
rank holds is the memory model's (`trustee/memory.py`).
The ranks themselves live in `learn/fsdp_rank.py`.

Talking to the ranks: one duplex pipe per rank carries (command, kwargs) down and ('ok',
payload) / ('error', traceback) back. Every command is collective: all ranks get it, all
reply, only rank 0's payload is used (except `step`, whose per-rank shares are summed).
Calls block the calling thread, so the asyncio side uses `step_async` (a worker thread);
the loop keeps running rollouts while the ranks train. A rank that raises or dies makes the
call raise `RankError` at once (the parent waits on every pipe and every process sentinel),
and the learner is then closed: a broken collective cannot be resumed.

Gradient equality. The parent computes the loss normaliser from all the step's sequences
(`global_norm`, the single-process normaliser), each rank weights its tokens with it, and
FSDP sums (not averages) gradients over ranks, so the gradient is the single-process one
for every grpo.loss_type, whatever the split. Sequences are balanced by tokens (longest
first onto the rank with the fewest tokens), and every rank runs as many micro-batches as
the busiest one (idle passes with zero weight), so their collectives pair up.

Weights out. LoRA: rank 0 gathers the adapter (a few MB) and sends it whole. Full: every
weight is all-gathered one tensor at a time and rank 0 streams chunks of about
`chunk_bytes` to the parent, one at a time (the next chunk is gathered after the parent has
taken the previous one), so no device ever holds a second full copy; the engine consumes
the chunks as a lazy `FullUpdate`. Checkpoints: `torch.distributed.checkpoint` (DCP), each
rank writing its shards; DCP reshards on load, so a checkpoint written by two ranks loads
on one or on four, and in the single-process `Learner` (`fsdp_rank.load_dcp_into`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import anyio.to_thread

from trustee import atomic
from trustee.config import Config, Resolved
from trustee.engines.base import FullUpdate, LoraUpdate
from trustee.learn.export import DEFAULT_CHUNK_BYTES
from trustee.learn.fsdp_rank import RankMemory, RankReady, RankSpec, RankStep, rank_main, unpack_tensors
from trustee.learn.grpo import LossNorm, TokenLossParts, loss_norm
from trustee.learn.learner import StepMetrics, samples_from_groups, turn_credit, update_plan
from trustee.learn.packing import Sample, check_sample
from trustee.types import Group

log = logging.getLogger("trustee.learn.distributed")

START_TIMEOUT_S = 900.0  # loading and sharding an 8B model on every rank
CLOSE_TIMEOUT_S = 30.0


class RankError(RuntimeError):
    """A learner rank raised or died; the message carries its traceback or exit code."""


def balance_by_tokens(lengths: list[int], world: int) -> list[list[int]]:
    """Sample indices per rank: longest first, each onto the rank with the fewest tokens so far
    (ties: fewer sequences, then lower rank). Deterministic; a rank may get none when there
    are fewer sequences than ranks."""
    if world < 1:
        raise ValueError(f"world = {world}: need at least one rank")
    out: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], len(out[r]), r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(b) for b in out]


def global_norm(grpo_loss_type: str, samples: list[Sample], *, max_len: int) -> LossNorm:
    """The single-process normaliser of the whole step (all ranks' sequences). With gradients
    summed over ranks this makes the sharded gradient equal the single-process one."""
    return loss_norm(grpo_loss_type, [s.n_loss for s in samples], max_len=max_len)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DistributedLearner:
    """The learner of `spec.world_size` FSDP2 ranks; same surface as `Learner` for the run:
    `step` / `step_async` -> StepMetrics, `export_lora` / `export_full`, `save` / `load`
    (DCP), `save_pretrained`, `close` (ends every rank; also on errors and at exit).

    mode: 'lora' or 'full' (spec.learner.mode). export_dtype: dtype of exported full weights
    (the engine's, e.g. 'bfloat16'); None keeps the master dtype. Build it on a long-lived
    thread (not in `anyio.to_thread`): the ranks' parent-death signal follows that thread.
    """

    def __init__(
        self, spec: RankSpec, *, export_dtype: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ):
        if spec.world_size < 1:
            raise ValueError(f"learner ranks = {spec.world_size}: need at least 1")
        if spec.device == "cuda" and len(spec.gpus) != spec.world_size:
            raise ValueError(
                f"placement.learner_gpus = {spec.gpus}: {spec.world_size} learner ranks need one GPU each; "
                "list as many GPUs as placement.learner_ranks"
            )
        self.spec, self.export_dtype, self.chunk_bytes = spec, export_dtype, chunk_bytes
        self.mode = spec.learner.mode
        self.step_count = 0
        self._lock = threading.Lock()
        self._stream: Iterator[Any] | None = None
        self._closed = False
        self._early: dict[int, list[tuple[str, Any]]] = {}
        self.last_rank_steps: list[RankStep] = []
        ctx = mp.get_context("spawn")  # CUDA and a running asyncio loop do not survive fork
        self._conns, self._procs = [], []
        for r in range(spec.world_size):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=rank_main, args=(r, spec, child), name=f"trustee-learner-{r}", daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        try:
            ready = self._collect(timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.ready: list[RankReady] = ready  # per rank: pid, bytes read from the weight files, host memory
        self.load_s = max(x.load_s for x in ready)
        self.pids = [x.pid for x in ready]
        log.info(
            "learner: %d FSDP2 ranks (%s) ready in %.1fs, pids %s",
            spec.world_size,
            spec.device,
            self.load_s,
            self.pids,
        )

    # ------------------------------------------------------------------ pipes

    def _next(self, r: int, timeout: float | None = None) -> tuple[str, Any]:
        """The next message of rank r. Messages other ranks send meanwhile are kept for later
        (a rank that is done waits quietly); an error or a death anywhere raises RankError at
        once, since rank r may be blocked in a collective with the failed rank."""
        if self._early.get(r):
            return self._early[r].pop(0)
        while True:
            watch = [c for i, c in enumerate(self._conns) if not self._early.get(i)]
            ready = wait(watch + [p.sentinel for p in self._procs], timeout)
            if not ready:
                raise RankError(f"learner ranks did not answer within {timeout}s")
            for i, c in enumerate(self._conns):
                if c in ready:
                    msg = self._read(i)
                    if i == r:
                        return msg
                    self._early.setdefault(i, []).append(msg)
            for i, p in enumerate(self._procs):
                if p.sentinel in ready and not self._conns[i].poll():
                    raise RankError(self._death(i))

    def _read(self, r: int) -> tuple[str, Any]:
        try:
            kind, payload = self._conns[r].recv()
        except (EOFError, OSError):  # a killed rank: EOF, or ECONNRESET when it left data unread
            raise RankError(self._death(r)) from None
        if kind == "error":
            raise RankError(payload)
        return kind, payload

    def _death(self, r: int) -> str:
        p = self._procs[r]
        p.join(1.0)
        return f"learner rank {r} (pid {p.pid}) died with exit code {p.exitcode}"

    def _collect(self, timeout: float | None = None) -> list[Any]:
        """('ok', payload) from every rank, in rank order."""
        out = []
        for r in range(len(self._conns)):
            kind, payload = self._next(r, timeout)
            if kind != "ok":
                raise RankError(f"rank {r} sent {kind!r} where 'ok' was expected")
            out.append(payload)
        return out

    def _call(self, cmd: str, per_rank: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[Any]:
        """Run `cmd` on every rank (per_rank[r] merged into rank r's kwargs); payloads in rank
        order. Any failure closes the learner: a broken collective cannot be resumed."""
        if self._closed:
            raise RankError("the distributed learner is closed")
        self._end_stream()
        try:
            for r, c in enumerate(self._conns):
                try:
                    c.send((cmd, {**kwargs, **(per_rank[r] if per_rank else {})}))
                except OSError:  # BrokenPipeError: the rank is gone
                    raise RankError(self._death(r)) from None
            return self._collect()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ steps

    def _samples(self, groups: list[Group]) -> list[Sample]:
        samples = samples_from_groups(groups, turn_credit(self.spec.grpo))
        if not samples:
            raise ValueError("Learner.step got no trajectories; skip the step when every group was filtered")
        for i, s in enumerate(samples):
            check_sample(s, i)
        return samples

    def _split(self, samples: list[Sample], idx: list[int]) -> list[dict[str, Any]]:
        """One update over samples[idx]: per rank its ids and samples (balanced by tokens) and
        the update's normaliser over all of them."""
        part = [samples[i] for i in idx]
        g = self.spec.grpo
        norm = global_norm(g.loss_type, part, max_len=g.dr_grpo_length)
        shares = balance_by_tokens([len(s.tokens) for s in part], self.spec.world_size)
        return [{"ids": [idx[j] for j in b], "samples": [part[j] for j in b], "norm": norm} for b in shares]

    def step(self, groups: list[Group]) -> StepMetrics:
        """One learner step on `groups` (with advantages) over all ranks: the updates of
        `update_plan` (the single-process learner's), each split over the ranks. Thread-safe."""
        with self._lock:
            samples = self._samples(groups)
            g = self.spec.grpo
            plan = update_plan(len(samples), self.step_count, g.updates_per_batch, g.mini_batches)
            per_update = [self._split(samples, idx) for idx in plan]
            per_rank = [
                {"updates": [u[r] for u in per_update], "proximal": len(plan) > 1}
                for r in range(self.spec.world_size)
            ]
            t0 = time.perf_counter()
            shares: list[RankStep] = self._call("step", per_rank)
            wall = time.perf_counter() - t0
            self.step_count = shares[0].step_count
            self.last_rank_steps = shares
            return self._metrics(samples, shares, wall)

    async def step_async(self, groups: list[Group]) -> StepMetrics:
        """`step` in a worker thread, so the event loop (rollouts) keeps running."""
        return await anyio.to_thread.run_sync(self.step, groups)

    def release(self) -> list[RankMemory]:
        """Every rank frees its gradients and its allocator's cached blocks (before an engine
        wakes on its GPU); one report per rank, in rank order."""
        with self._lock:
            return self._call("release")

    def offload(self) -> list[tuple[int, str]]:
        """Every rank moves its AdamW state and KL reference shards to host memory
        (`learn/offload.py`) and releases; per rank (bytes moved, digest before the move)."""
        with self._lock:
            return self._call("offload")

    def reload(self) -> list[str]:
        """Every rank takes its offloaded state back; per rank the digest after (bit-exact when
        equal to `offload`'s)."""
        with self._lock:
            return self._call("reload")

    def gradients(self, groups: list[Group]) -> tuple[float, dict[str, Any]]:
        """The step's loss and the full gradient of every trainable parameter (HF/PEFT names),
        without an optimiser step. For tests and tools/gpu_check.sh."""
        with self._lock:
            samples = self._samples(groups)
            out = self._call("gradients", self._split(samples, list(range(len(samples)))))
            return sum(x[0] for x in out), unpack_tensors(out[0][1])

    def _metrics(self, samples: list[Sample], shares: list[RankStep], wall: float) -> StepMetrics:
        parts = TokenLossParts()
        for s in shares:
            parts.merge(s.parts)
        n_tok, isx = max(1, parts.tokens), parts.is_stats
        units = max(1, isx.count)
        real = sum(len(s.tokens) for s in samples)
        fed = sum(s.input_tokens for s in shares)
        shared = sum(s.shared_tokens for s in shares)
        first = shares[0]
        return StepMetrics(
            step=self.step_count,
            loss=sum(s.loss for s in shares),
            clip_frac=parts.clipped / n_tok,
            ratio_min=parts.ratio_min if parts.tokens else 1.0,
            ratio_max=parts.ratio_max if parts.tokens else 1.0,
            optimizer_steps=first.updates - first.skipped,
            kl=parts.kl_sum / n_tok,
            entropy=parts.entropy_sum / n_tok,
            is_ratio_min=isx.min if isx.count else 1.0,
            is_ratio_mean=isx.sum / units if isx.count else 1.0,
            is_ratio_max=isx.max if isx.count else 1.0,
            is_masked_frac=isx.masked / units,
            is_truncated_frac=isx.truncated / units,
            grad_norm=first.grad_norm,
            lr=first.lr,
            seqs=len(samples),
            loss_tokens=parts.tokens,
            tokens=real,
            input_tokens=fed,
            micro_batches=sum(s.micro_batches + s.idle_passes for s in shares),
            oversize=sum(len(s.tokens) > self.spec.learner.micro_batch_tokens for s in samples),
            wall_s=wall,
            tokens_per_s=real / wall if wall > 0 else 0.0,
            peak_mem_bytes=max(s.peak_mem_bytes for s in shares),
            shared_prefix_frac=shared / max(1, shared + fed),
            shared_prefix_fallback=max(s.shared_prefix_fallback for s in shares),
            skipped_nonfinite=int(first.skipped > 0),
        )

    # ------------------------------------------------------------------ weights out

    def export_lora(self, *, path: str | Path | None = None, tensors: bool = True) -> LoraUpdate:
        """The adapter (gathered on rank 0) as a LoraUpdate: a PEFT directory at `path`
        (adapter_config.json + adapter_model.safetensors, what vLLM loads) and/or tensors."""
        if self.mode == "full":
            raise TypeError("learner.mode = 'full' has no adapter; use export_full")
        if path is None and not tensors:
            raise ValueError("export_lora needs a path, tensors=True, or both")
        t0 = time.perf_counter()
        with self._lock:
            data, config = self._call("export_lora")[0]
        weights = unpack_tensors(data)
        if path is not None:
            write_adapter(Path(path), weights, config)
        log.debug("learner: adapter export %.2fs", time.perf_counter() - t0)
        return LoraUpdate(
            config=config, path=str(path) if path is not None else None, tensors=weights if tensors else None
        )

    def export_full(self) -> FullUpdate:
        """Every weight as a lazy FullUpdate streamed from the ranks (HF names, tied weights
        once, in `export_dtype`). Consume it before the next learner call: a new call first
        finishes (and drops) whatever is left of an unconsumed stream."""
        if self.mode != "full":
            raise TypeError("a LoRA learner exports its adapter (export_lora)")
        with self._lock:
            self._end_stream()
            self._stream = self._chunks()
        return FullUpdate(chunks=self._stream)

    def _chunks(self) -> Iterator[list[tuple[str, Any]]]:
        """The stream; the ranks get the command on the first `next()`, so a stream that is
        dropped unstarted costs nothing."""
        if self._closed:
            raise RankError("the distributed learner is closed")
        done = False
        t0, n = time.perf_counter(), 0
        try:
            for c in self._conns:
                c.send(("export_full", {"chunk_bytes": self.chunk_bytes, "dtype": self.export_dtype}))
            while True:
                kind, payload = self._next(0)
                if kind == "ok":
                    done = True
                    break
                chunk = list(unpack_tensors(payload).items())
                n += sum(t.numel() * t.element_size() for _, t in chunk)
                yield chunk
                self._conns[0].send("next")
        except GeneratorExit:
            pass
        except BaseException:
            self._stream = None
            self.close()
            raise
        self._stream = None
        if not done:  # the consumer stopped early: let rank 0 finish its gathers without sending
            self._conns[0].send("stop")
            kind, _ = self._next(0)
            assert kind == "ok", f"rank 0 sent {kind!r} after 'stop'"
        for r in range(1, len(self._conns)):
            self._next(r)
        self.last_export = (n, time.perf_counter() - t0)
        log.info("learner: streamed %.1f MB of weights in %.2fs", n / 2**20, self.last_export[1])

    def _end_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()  # type: ignore[attr-defined]

    def save_pretrained(self, out: str | Path, model_path: str | Path) -> Path:
        """The trained policy where `trustee.eval` and vLLM load it: the adapter directory
        (LoRA) or a transformers directory (full: config from `model_path`, weights streamed
        into safetensors shards with an index)."""
        out = Path(out)
        if self.mode != "full":
            self.export_lora(path=out, tensors=False)
            return out
        return write_model(out, model_path, self.export_full().chunks)

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> dict[str, Any]:
        """Sharded DCP checkpoint of trainable weights + AdamW state into directory `path`;
        returns the schedule state (small; the caller stores it with the run's checkpoint)."""
        with self._lock:
            out = self._call("save", path=str(path))[0]
        return {**out, "world_size": self.spec.world_size}

    def load(self, path: str | Path, schedule: dict[str, Any]) -> None:
        """Resume from a DCP checkpoint written by any number of ranks."""
        with self._lock:
            self._call("load", path=str(path), schedule=schedule)
            self.step_count = int(schedule["step_count"])

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """End every rank: ask, wait CLOSE_TIMEOUT_S, then terminate and kill. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for c in self._conns:
            try:
                c.send(("close", {}))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                log.warning("learner rank pid %d did not exit; terminating", p.pid)
                p.terminate()
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for c in self._conns:
            c.close()

    def __enter__(self) -> DistributedLearner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_adapter(path: Path, weights: dict[str, Any], config: dict[str, Any]) -> None:
    """A PEFT adapter directory, as `save_pretrained` writes it (config + safetensors), put in
    place atomically: a crash leaves the previous adapter, never a config without its weights."""
    from safetensors.torch import save_file

    with atomic.directory(path) as tmp:
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def write_model(out: Path, model_path: str | Path, chunks: Iterable[list[tuple[str, Any]]]) -> Path:
    """A transformers model directory: `model_path`'s config, one safetensors shard per chunk
    of (name, tensor) pairs (one chunk in memory at a time), then the index. Built beside `out`
    and renamed into place, so a crash mid-export leaves the previous export, never shards
    without an index or an index naming shards that are not there."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    with atomic.directory(out) as tmp:
        AutoConfig.from_pretrained(model_path).save_pretrained(tmp)
        weight_map = {}
        for i, chunk in enumerate(chunks):
            name = f"model-{i + 1:05d}.safetensors"
            save_file(dict(chunk), str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k, _ in chunk})
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
    return Path(out)


# ----------------------------------------------------------------------------- from the config


def rank_spec(cfg: Config, res: Resolved, *, pad_id: int, threads: int | None = None) -> RankSpec:
    import os

    ranks = cfg.placement.learner_ranks
    cpus = os.cpu_count() or 1
    return RankSpec(
        model_path=res.policy_model,  # absolute: the adapter config names its base by it
        learner=cfg.learner,
        grpo=cfg.grpo,
        temperature=cfg.rollout.temperature,
        total_steps=cfg.grpo.steps,
        world_size=ranks,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        device=res.device,
        gpus=list(cfg.placement.learner_gpus),
        dtype=res.dtype,
        pad_id=pad_id,
        threads=threads if threads is not None else max(1, cpus // ranks),
        seed=cfg.seed,
    )


def build_distributed_learner(cfg: Config, res: Resolved, *, pad_id: int) -> DistributedLearner:
    """The FSDP2 learner over placement.learner_ranks processes (called by train.py when > 1)."""
    return DistributedLearner(rank_spec(cfg, res, pad_id=pad_id), export_dtype=res.dtype)


# ----------------------------------------------------------------------------- train.py glue


def weight_update(learner: DistributedLearner, run_dir: Path, needs_path: bool) -> LoraUpdate | FullUpdate:
    """What train.weight_update does for the single-process learner."""
    if learner.mode != "full":
        return learner.export_lora(path=run_dir / "adapter" if needs_path else None, tensors=not needs_path)
    return learner.export_full()


LEARNER_DIR = "learner-dcp"


def checkpoint_state(learner: DistributedLearner, ckpt_dir: Path) -> dict[str, Any]:
    """Write the DCP shards into `ckpt_dir/learner-dcp`; returns the schedule for state.pt."""
    return learner.save(ckpt_dir / LEARNER_DIR)


def resume_state(learner: DistributedLearner, ckpt_dir: Path, schedule: dict[str, Any]) -> None:
    learner.load(ckpt_dir / LEARNER_DIR, schedule)
