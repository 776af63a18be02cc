"""The learner on CUDA against the CPU reference, on the tiny model: one table, every row pass/fail.

Run by `tools/gpu_check.sh` (which says what it needs). Each row is one point, with the bound
it must meet (a row whose bound is not met prints FAIL and the exit status is 1):
- `cpu-ref-{full,lora}`: the single-process learner on the CPU in float32, the reference; its
  loss and every gradient must be finite and the gradient non-zero;
- `cpu-transport-{bytes,shared}`: the weight transports between two processes, bit-exact:
  bytes (`engines/vllm_ext.pack` / `unpack`, the CPU path), and the learner rank's side of the
  shared route (`learn/transport.share_full`: buckets in /dev/shm, handles keyed by device,
  each kept until the receiver acknowledges) into `VllmWorkerDouble` (below);
- `fsdp-gloo-1-lora`: the FSDP2 learner, one gloo rank: gradient within 1e-5 of the reference;
- `cuda-fp32-{full,lora}`: the learner on CUDA in float32: gradient within 1e-4 (relative L2)
  of the CPU reference (kernels differ, the math does not);
- `cuda-bf16-{full,lora}`: bf16 weights: gradient within 5e-2 of the fp32 reference (bf16 keeps
  about 3 significant digits; a few percent over two layers is rounding, tens of percent a bug);
- `cuda-peak-vs-plan-{full,lora}`: one step's max_memory_allocated against the memory model's
  peak for this learner (trustee/memory.py, without the CUDA context): within 0.5x-1.5x;
- `cuda-bf16-flash-lora`: the flash-attention packed path (flash_attn installed only), vs the
  same model on SDPA: gradient within 5e-2;
- `cuda-qlora`: NF4 base + LoRA (bitsandbytes installed only): a step, then the sampler-vs-
  learner gap (bf16 base + adapter, what vLLM serves, against NF4 base + adapter, what trains)
  as exp(learner - sampler) per token: mean within [0.9, 1.1], every token within [0.33, 3]
  (grpo.is_max's default truncation);
- `cuda-ipc-transport`: the shared route on a GPU: a learner rank's `share_full` (buckets in
  GPU memory, CUDA IPC handles keyed by the GPU's UUID, each kept until acknowledged, then
  freed: the sender's allocated bytes after it equal those before) into
  `VllmWorkerDouble`, a plain process on the same GPU standing in for the vLLM worker (it
  opens the bucket filed under its own GPU's UUID with the worker extension's `open_bucket`);
  bit-exact and two buckets, with GB/s;
- `fsdp-nccl-{1,2}-{full,lora}`: the FSDP2 learner on 1 and (two GPUs) 2 NCCL ranks, gradient
  within 1e-4 of the reference, and its rank's peak within the plan's band;
- `vllm`: when vLLM is installed, the signatures the engine relies on (sleep(level),
  wake_up(tags), collective_rpc, reset_prefix_cache, the weight-transfer calls).
A row that cannot run here says "skipped (why)" and does not count as passed or failed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import multiprocessing as mp
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from trustee.config import Config, GrpoConfig, LearnerConfig, PlacementConfig
from trustee.learn.learner import Learner, samples_from_groups
from trustee.learn.policy import load_policy, wrap_policy
from trustee.types import Group, Trajectory

ROWS: list[tuple[str, str, str, str, str]] = []  # name, status, figure, tokens/s, peak MiB
GRPO = GrpoConfig(beta=0.0)
FP32_TOL, BF16_TOL, GLOO_TOL, BAND = 1e-4, 5e-2, 1e-5, (0.5, 1.5)
QLORA_MEAN, QLORA_TOKEN = (0.9, 1.1), (1 / 3, 3.0)


def groups(n: int, length: int, vocab: int, seed: int = 0) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(0, n, 2):
        trajs = []
        for _ in range(2):
            toks = torch.randint(3, vocab, (length,), generator=g).tolist()
            mask = [0] * (length // 4) + [1] * (length - length // 4)
            trajs.append(
                Trajectory(
                    episode_id="e",
                    task_id=f"t{k}",
                    tokens=toks,
                    loss_mask=mask,
                    logprobs=[-6.0 if m else 0.0 for m in mask],
                    versions=[0 if m else -1 for m in mask],
                    prompt_len=length // 4,
                )
            )
        out.append(Group(task_id=f"t{k}", trajectories=trajs, advantages=[1.0, -1.0]))
    return out


def lcfg(mode: str) -> LearnerConfig:
    return LearnerConfig(
        mode=mode, lr=1e-4, lora_rank=8, lora_alpha=16.0, micro_batch_tokens=4096, gradient_checkpointing=True
    )


def learner(path: Path, mode: str, device: str, dtype: torch.dtype, attn: str | None = None) -> Learner:
    torch.manual_seed(0)
    if attn is None:
        policy = load_policy(path, lcfg(mode), device=device, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
        policy = wrap_policy(model, lcfg(mode))
    return Learner(policy, GRPO, lcfg(mode), total_steps=10)


def grads(lr: Learner, gs: list[Group]) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _, _ = lr.accumulate(samples_from_groups(gs))
    return loss, {n: p.grad.detach().float().cpu() for n, p in lr.model.named_parameters() if p.requires_grad}


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[k] - want[k]).norm()) ** 2 for k in want) ** 0.5
    den = sum(float(w.norm()) ** 2 for w in want.values()) ** 0.5
    return num / max(den, 1e-30)


def within(err: float, tol: float) -> str:
    return "ok" if err <= tol else f"FAIL (> {tol:g})"


def timed_step(lr: Learner, gs: list[Group]) -> tuple[str, str]:
    m = lr.step(gs)
    return f"{m.tokens_per_s:,.0f}", f"{m.peak_mem_bytes / 2**20:,.0f}"


def row(name: str, fn: Callable[[], tuple[str, str, str, str]] | None, why: str = "") -> None:
    """Run one point; fn None: skipped (why). An exception is a FAIL with its type and text."""
    t0 = time.perf_counter()
    if fn is None:
        status, err, tps, mem = f"skipped ({why})", "", "", ""
    else:
        try:
            status, err, tps, mem = fn()
        except Exception as e:  # noqa: BLE001 - one point failing must not hide the others
            traceback.print_exc()
            status, err, tps, mem = f"FAIL ({type(e).__name__}: {e})"[:120], "", "", ""
    ROWS.append((name, status, err, tps, mem))
    print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {status} {err}", flush=True)


def plan_peak_gib(path: Path, mode: str, dtype: str, ranks: int, on_gpu: bool) -> float:
    """The memory model's peak for this learner, without the CUDA context (allocated memory)."""
    from trustee import memory

    cfg = Config(learner=lcfg(mode), grpo=GRPO, placement=PlacementConfig(learner_ranks=ranks))
    rank = memory.learner_items(cfg, memory.model_shape(path), dtype, on_gpu=on_gpu)
    return rank.peak_gib - sum(i.gib for i in rank.context)


# ----------------------------------------------------------------------------- weight transport


def _digest(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str]]:
    return [
        (n, hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest())
        for n, t in items
    ]


def _bytes_receiver(conn) -> None:
    """Receives packed tensors as the vLLM worker's `trustee_load_weights` does; replies digests."""
    from trustee.engines.vllm_ext import unpack

    conn.send("ready")
    conn.send(_digest([unpack(item) for item in conn.recv()]))


def VllmWorkerDouble(conn, device: str) -> None:  # noqa: N802 - named as the thing it stands in for
    """Stands in for the vLLM worker on the sender's device: per ('bucket', payload) it opens the
    bucket filed under its own device with the worker extension's own `open_bucket` (on a GPU:
    by the GPU's UUID), copies it out and acknowledges ('next'), as the engine does before the
    learner frees a bucket; at 'done' it replies the digests of everything it copied."""
    from trustee.engines.vllm_ext import open_bucket

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # the CUDA context, before the timed part
    conn.send("ready")
    got = []
    while (msg := conn.recv()) != "done":
        got += open_bucket(msg[1], device)
        conn.send("next")
    conn.send(_digest(got))


def _sample_weights(device: str) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = {"model.embed_tokens.weight": (4096, 1024), "model.layers.0.mlp.up_proj.weight": (2048, 1024)}
    return [(n, torch.randn(s, generator=g).to(device, torch.float32)) for n, s in shapes.items()]


def transport_row(kind: str) -> tuple[str, str, str, str]:
    """kind 'bytes': packed tensors through a pipe; 'shared' (host) / 'ipc' (CUDA): the learner
    rank's side of the shared route, `learn/transport.share_full` (plan, bucket on the rank's
    device, cast to bf16 in the copy, handle keyed by device, kept until acknowledged, freed),
    into `VllmWorkerDouble` in another process. Bit-exact against the bf16 weights."""
    from types import SimpleNamespace

    from trustee.engines.vllm_ext import pack
    from trustee.learn.transport import share_full

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    device = "cuda:0" if kind == "ipc" else "cpu"
    items = _sample_weights(device)
    want = [(n, t.to(torch.bfloat16)) for n, t in items]
    target = _bytes_receiver if kind == "bytes" else VllmWorkerDouble
    proc = ctx.Process(target=target, args=(child,) if kind == "bytes" else (child, device))
    proc.start()
    assert parent.recv() == "ready"
    t0 = time.perf_counter()
    buckets = 0
    if kind == "bytes":
        parent.send([pack(n, t) for n, t in want])
    else:
        model = SimpleNamespace(state_dict=lambda keep_vars: dict(items))  # what share_full reads
        kw = {"rank": 0, "device": torch.device(device), "dtype": torch.bfloat16, "conn": parent}
        held = torch.cuda.memory_allocated(device) if kind == "ipc" else 0
        buckets = share_full(model, [n for n, _ in items], bucket_bytes=2**20, full=lambda t: t, **kw)
        left = torch.cuda.memory_allocated(device) - held if kind == "ipc" else 0  # buckets not freed
        parent.send("done")
    got = parent.recv()
    wall = time.perf_counter() - t0
    proc.join(60)
    nbytes = sum(t.numel() * t.element_size() for _, t in want)
    same = got == _digest(want)
    # A bucket per unit (the embedding, then layer 0), and every bucket freed once acknowledged.
    ok = same and (kind == "bytes" or (buckets == 2 and left == 0))
    return (
        "ok" if ok else f"FAIL (bit-exact {same}, {buckets} buckets, {left} bytes not freed)",
        f"bit-exact {same}; {nbytes / 2**20:.0f} MiB in {buckets or 1} piece(s) at {nbytes / wall / 1e9:.2f} GB/s",
        "",
        "",
    )


# ----------------------------------------------------------------------------- rows


def cpu_rows(path: Path, check: list[Group], bench: list[Group], ref: dict) -> None:
    for mode in ("full", "lora"):

        def cpu_ref(mode=mode):
            loss, g = grads(learner(path, mode, "cpu", torch.float32), check)
            finite = all(bool(torch.isfinite(t).all()) for t in g.values()) and torch.isfinite(
                torch.tensor(loss)
            )
            norm = sum(float(t.norm()) ** 2 for t in g.values()) ** 0.5
            ref[mode] = (loss, g)
            status = "ok" if finite and norm > 0 else f"FAIL (finite {finite}, grad norm {norm})"
            return (
                status,
                f"0 (reference; grad norm {norm:.3g})",
                *timed_step(learner(path, mode, "cpu", torch.float32), bench),
            )

        row(f"cpu-ref-{mode}", cpu_ref)
    row("cpu-transport-bytes", lambda: transport_row("bytes"))
    row("cpu-transport-shared", lambda: transport_row("shared"))


def cuda_rows(path: Path, check: list[Group], bench: list[Group], ref: dict, cuda: bool) -> None:
    for mode in ("full", "lora"):
        for dtype, tol in ((torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)):

            def cuda_row(mode=mode, dtype=dtype, tol=tol):
                lr = learner(path, mode, "cuda:0", dtype)
                _, g = grads(lr, check)
                err = rel_err(g, ref[mode][1])
                return (within(err, tol), f"{err:.2e} vs fp32 CPU", *timed_step(lr, bench))

            name = f"cuda-{'fp32' if dtype == torch.float32 else 'bf16'}-{mode}"
            row(name, cuda_row if cuda else None, "no CUDA")

        def peak_row(mode=mode):
            lr = learner(path, mode, "cuda:0", torch.bfloat16)
            lr.release()
            m = lr.step(bench)
            plan = plan_peak_gib(path, mode, "bfloat16", 1, True)
            ratio = m.peak_mem_bytes / 2**30 / plan
            ok = BAND[0] <= ratio <= BAND[1]
            return (
                "ok" if ok else f"FAIL (outside {BAND})",
                f"measured/plan {ratio:.2f} (plan {plan * 1024:.0f} MiB)",
                f"{m.tokens_per_s:,.0f}",
                f"{m.peak_mem_bytes / 2**20:,.0f}",
            )

        row(f"cuda-peak-vs-plan-{mode}", peak_row if cuda else None, "no CUDA")


def flash_row(path: Path, check: list[Group], bench: list[Group]) -> tuple[str, str, str, str]:
    a = learner(path, "lora", "cuda:0", torch.bfloat16, attn="flash_attention_2")
    b = learner(path, "lora", "cuda:0", torch.bfloat16, attn="sdpa")
    err = rel_err(grads(a, check)[1], grads(b, check)[1])
    return (within(err, BF16_TOL), f"{err:.2e} vs sdpa", *timed_step(a, bench))


def qlora_row(path: Path, check: list[Group], bench: list[Group]) -> tuple[str, str, str, str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trustee.learn.export import export_lora
    from trustee.learn.logprobs import token_logprobs
    from trustee.learn.packing import build_packed

    torch.manual_seed(0)
    q = Learner(
        load_policy(path, lcfg("qlora"), device="cuda:0", dtype=torch.bfloat16),
        GRPO,
        lcfg("qlora"),
        total_steps=10,
    )
    tps, mem = timed_step(q, bench)  # one step, so the adapter is not zero
    with tempfile.TemporaryDirectory() as d:
        export_lora(q.model, path=d, tensors=False)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:0")
        sampler = PeftModel.from_pretrained(base, d).eval()
        samples = samples_from_groups(check)
        mb = build_packed(samples, list(range(len(samples))))
        with torch.no_grad():
            lp_s, _ = token_logprobs(sampler, mb)
            lp_l, _ = token_logprobs(q.model, mb)
    r = torch.exp(lp_l.float() - lp_s.float())
    lo, hi, mean = float(r.min()), float(r.max()), float(r.mean())
    ok = QLORA_MEAN[0] <= mean <= QLORA_MEAN[1] and QLORA_TOKEN[0] <= lo and hi <= QLORA_TOKEN[1]
    gap = f"is_ratio min {lo:.3f} mean {mean:.3f} max {hi:.3f}"
    return (
        "ok" if ok else f"FAIL (mean outside {QLORA_MEAN} or a token outside {QLORA_TOKEN})",
        gap,
        tps,
        mem,
    )


def fsdp_row(
    path: Path, check: list[Group], bench: list[Group], ref: dict, mode: str, device: str, world: int
):
    from trustee.learn.distributed import DistributedLearner, _free_port
    from trustee.learn.fsdp_rank import RankSpec

    def run() -> tuple[str, str, str, str]:
        spec = RankSpec(
            model_path=str(path),
            learner=lcfg(mode),
            grpo=GRPO,
            temperature=1.0,
            total_steps=10,
            world_size=world,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            device=device,
            gpus=list(range(world)) if device == "cuda" else [],
            threads=1,
            seed=0,
            dtype="float32" if device == "cpu" else "bfloat16",
        )
        with DistributedLearner(spec) as dl:
            _, g = dl.gradients(check)
            err = rel_err(g, ref[mode][1])
            m = dl.step(bench)
        tol = GLOO_TOL if device == "cpu" else BF16_TOL
        status = within(err, tol)
        figure = f"{err:.2e}"
        if device == "cuda":  # the rank's allocated peak against the plan (without its context)
            ratio = m.peak_mem_bytes / 2**30 / plan_peak_gib(path, mode, "bfloat16", world, True)
            figure += f"; peak/plan {ratio:.2f}"
            if not BAND[0] <= ratio <= BAND[1] and status == "ok":
                status = f"FAIL (peak outside {BAND} of the plan)"
        return (status, figure, f"{m.tokens_per_s:,.0f}", f"{m.peak_mem_bytes / 2**20:,.0f}")

    return run


def vllm_row() -> tuple[str, str, str, str]:
    from vllm.v1.engine.async_llm import AsyncLLM

    need = {
        "sleep": ["level"],
        "wake_up": ["tags"],
        "collective_rpc": ["method", "kwargs"],
        "reset_prefix_cache": [],
        "init_weight_transfer_engine": [],
        "update_weights": [],
    }
    missing = [
        f"{name}({', '.join(args)})"
        for name, args in need.items()
        if not hasattr(AsyncLLM, name)
        or any(a not in inspect.signature(getattr(AsyncLLM, name)).parameters for a in args)
    ]
    import vllm

    return ("ok" if not missing else f"FAIL (missing {missing})", f"vllm {vllm.__version__}", "", "")


def report() -> list[str]:
    """Print the table of the rows so far; returns the names of the rows that failed."""
    print()
    print(f"{'point':<26} {'status':<40} {'figure':<48} {'tokens/s':>9} {'peak MiB':>9}")
    for name, status, err, tps, mem in ROWS:
        print(f"{name:<26} {status[:40]:<40} {err[:48]:<48} {tps:>9} {mem:>9}")
    print(
        "\npeak MiB: CUDA max_memory_allocated, or the process's peak RSS on CPU (FSDP rows: the largest rank)."
    )
    failed = [n for n, s, *_ in ROWS if s.startswith("FAIL")]
    print(
        f"summary: {len(ROWS) - len(failed)} of {len(ROWS)} rows did not fail; FAIL: {failed or 'none'}",
        flush=True,
    )
    return failed


def _on_timeout(signum, frame) -> None:
    """gpu_check.sh's inner timeout sends SIGTERM: print what ran, then exit 124."""
    import os

    print(f"\ntimed out (signal {signum}) during the next row; the rows so far:")
    report()
    sys.stdout.flush()
    os._exit(124)


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, _on_timeout)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".cache/gpu-check", help="where the tiny model is built")
    ap.add_argument("--size", default="test", help="trustee.models.tiny size of the model")
    ap.add_argument("--cpu-only", action="store_true", help="run only the CPU rows")
    args = ap.parse_args()
    from trustee.models.tiny import build_tiny_model

    path = build_tiny_model(Path(args.cache) / f"tiny-{args.size}", size=args.size, seed=0)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    check = groups(4, 64, vocab)  # gradient comparisons
    bench = groups(16, 512, vocab, seed=1)  # GPU rows: throughput and memory
    small = groups(4, 128, vocab, seed=1)  # CPU rows: one step, for the table (a 2-core machine is slow)
    cuda = torch.cuda.is_available() and not args.cpu_only
    ref: dict = {}
    cpu_rows(path, check, small, ref)
    cuda_rows(path, check, bench, ref, cuda)
    no_cuda = "no CUDA"
    flash = importlib.util.find_spec("flash_attn") is not None
    row(
        "cuda-bf16-flash-lora",
        (lambda: flash_row(path, check, bench)) if cuda and flash else None,
        no_cuda if not cuda else "flash_attn not installed",
    )
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    row(
        "cuda-qlora",
        (lambda: qlora_row(path, check, bench)) if cuda and bnb else None,
        no_cuda if not cuda else "bitsandbytes not installed",
    )
    row("cuda-ipc-transport", (lambda: transport_row("ipc")) if cuda else None, no_cuda)
    row("fsdp-gloo-1-lora", fsdp_row(path, check, small, ref, "lora", "cpu", 1))
    n_gpu = torch.cuda.device_count() if cuda else 0
    for mode in ("full", "lora"):
        for world in (1, 2):
            run = fsdp_row(path, check, bench, ref, mode, "cuda", world) if n_gpu >= world else None
            row(f"fsdp-nccl-{world}-{mode}", run, f"needs {world} GPU(s), have {n_gpu}")
    have_vllm = importlib.util.find_spec("vllm") is not None
    row("vllm", vllm_row if have_vllm else None, "vllm not installed")
    return 1 if report() else 0


if __name__ == "__main__":
    import os

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with vLLM imported it ran long enough on a loaded machine
    # (load 12) that the inner timeout fired after the summary had printed 18 of 18 rows (rc 124).
    os._exit(code)
