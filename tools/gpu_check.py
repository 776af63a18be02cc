"""The learner on CUDA against the CPU reference, on the tiny model: one table, no network.

Run by `tools/gpu_check.sh` (which says what it needs). Each row is one point:
- `cpu-ref-{full,lora}`: the single-process learner on the CPU in float32 (the reference);
- `cuda-fp32-{full,lora}`: the same on CUDA, world size 1; gradients must match the CPU to
  1e-4 relative (kernels differ, the math does not);
- `cuda-bf16-{full,lora}`: bf16 weights; gradient error vs the reference is reported (bf16
  has about 3 significant digits; a few percent is normal, tens of percent is a bug);
- `cuda-bf16-flash-lora`: the flash-attention packed path (flash_attn installed only), vs
  the same model on SDPA;
- `cuda-qlora`: NF4 base + LoRA (bitsandbytes installed only): a step, and the sampler-vs-
  learner gap a QLoRA run has: log-probs of the bf16 base + adapter (what vLLM serves)
  against the NF4 base + adapter (what trains), as the spread of exp(learner - sampler),
  the quantity `learn/is_ratio_*` logs;
- `fsdp-{gloo,nccl}-*`: the FSDP2 learner (learn/distributed.py) at world size 1 and, with
  two GPUs, 2; gradients vs the reference;
- `vllm`: whether vLLM imports here (its GPU model runner differs from the CPU one the tests
  use; nothing here drives it).
Every row prints ok / FAIL / skipped (why). Exit status 1 if any row FAILs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn.learner import Learner, samples_from_groups
from trustee.learn.policy import load_policy, wrap_policy
from trustee.types import Group, Trajectory

ROWS: list[tuple[str, str, str, str, str]] = []  # name, status, grad rel err, tokens/s, peak MiB
GRPO = GrpoConfig(beta=0.0)


def groups(n: int, length: int, vocab: int, seed: int = 0) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(0, n, 2):
        trajs = []
        for _ in range(2):
            toks = torch.randint(3, vocab, (length,), generator=g).tolist()
            mask = [0] * (length // 4) + [1] * (length - length // 4)
            lps = [-6.0 if m else 0.0 for m in mask]
            trajs.append(
                Trajectory(
                    episode_id="e",
                    task_id=f"t{k}",
                    tokens=toks,
                    loss_mask=mask,
                    logprobs=lps,
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


def timed_step(lr: Learner, gs: list[Group]) -> tuple[str, str]:
    m = lr.step(gs)
    return f"{m.tokens_per_s:,.0f}", f"{m.peak_mem_bytes / 2**20:,.0f}"


def row(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        status, err, tps, mem = fn()
    except Exception as e:  # noqa: BLE001 - one point failing must not hide the others
        traceback.print_exc()
        status, err, tps, mem = f"FAIL ({type(e).__name__}: {e})"[:120], "", "", ""
    ROWS.append((name, status, err, tps, mem))
    print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {status} {err}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".cache/gpu-check", help="where the tiny model is built")
    ap.add_argument("--size", default="test", help="trustee.models.tiny size of the model")
    ap.add_argument("--cpu-only", action="store_true", help="run only the CPU rows")
    args = ap.parse_args()
    from trustee.models.tiny import build_tiny_model

    path = build_tiny_model(Path(args.cache) / f"tiny-{args.size}", size=args.size, seed=0)
    import json

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    check = groups(4, 64, vocab)  # gradient comparisons
    bench = groups(16, 512, vocab, seed=1)  # throughput and memory
    cuda = torch.cuda.is_available() and not args.cpu_only
    ref: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}

    for mode in ("full", "lora"):

        def cpu_ref(mode=mode):
            ref[mode] = grads(learner(path, mode, "cpu", torch.float32), check)
            return ("ok", "0 (reference)", *timed_step(learner(path, mode, "cpu", torch.float32), bench))

        row(f"cpu-ref-{mode}", cpu_ref)

    def skip(why):
        return lambda: (f"skipped ({why})", "", "", "")

    for mode in ("full", "lora"):
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, None)):
            name = f"cuda-{'fp32' if dtype == torch.float32 else 'bf16'}-{mode}"

            def cuda_row(mode=mode, dtype=dtype, tol=tol):
                lr = learner(path, mode, "cuda:0", dtype)
                _, g = grads(lr, check)
                err = rel_err(g, ref[mode][1])
                status = "ok" if tol is None or err <= tol else f"FAIL (> {tol})"
                return (status, f"{err:.2e}", *timed_step(lr, bench))

            row(name, cuda_row if cuda else skip("no CUDA"))

    def flash_row():
        a = learner(path, "lora", "cuda:0", torch.bfloat16, attn="flash_attention_2")
        b = learner(path, "lora", "cuda:0", torch.bfloat16, attn="sdpa")
        _, ga = grads(a, check)
        _, gb = grads(b, check)
        err = rel_err(ga, gb)
        return (
            "ok" if err < 5e-2 else "FAIL (flash vs sdpa > 5e-2)",
            f"{err:.2e} vs sdpa",
            *timed_step(a, bench),
        )

    if not cuda:
        row("cuda-bf16-flash-lora", skip("no CUDA"))
    elif importlib.util.find_spec("flash_attn") is None:
        row("cuda-bf16-flash-lora", skip("flash_attn not installed"))
    else:
        row("cuda-bf16-flash-lora", flash_row)

    def qlora_row():
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
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:0")
            sampler = PeftModel.from_pretrained(base, d).eval()
            samples = samples_from_groups(check)
            mb = build_packed(samples, list(range(len(samples))))
            with torch.no_grad():
                lp_s, _ = token_logprobs(sampler, mb)
                lp_l, _ = token_logprobs(q.model, mb)
        r = torch.exp(lp_l.float() - lp_s.float())
        gap = f"is_ratio min {r.min():.3f} mean {r.mean():.3f} max {r.max():.3f}"
        return ("ok", gap, tps, mem)

    if not cuda:
        row("cuda-qlora", skip("no CUDA"))
    elif importlib.util.find_spec("bitsandbytes") is None:
        row("cuda-qlora", skip("bitsandbytes not installed"))
    else:
        row("cuda-qlora", qlora_row)

    from trustee.learn.distributed import DistributedLearner, _free_port
    from trustee.learn.fsdp_rank import RankSpec

    def fsdp_row(mode: str, device: str, world: int):
        def run():
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
            )
            with DistributedLearner(spec) as dl:
                _, g = dl.gradients(check)
                err = rel_err(g, ref[mode][1])
                m = dl.step(bench)
            tol = 1e-5 if device == "cpu" else 1e-4
            return (
                "ok" if err <= tol else f"FAIL (> {tol})",
                f"{err:.2e}",
                f"{m.tokens_per_s:,.0f}",
                f"{m.peak_mem_bytes / 2**20:,.0f}",
            )

        return run

    row("fsdp-gloo-1-lora", fsdp_row("lora", "cpu", 1))
    n_gpu = torch.cuda.device_count() if cuda else 0
    for mode in ("full", "lora"):
        for world in (1, 2):
            name = f"fsdp-nccl-{world}-{mode}"
            row(
                name,
                fsdp_row(mode, "cuda", world)
                if n_gpu >= world
                else skip(f"needs {world} GPU(s), have {n_gpu}"),
            )

    have_vllm = importlib.util.find_spec("vllm") is not None
    row(
        "vllm",
        (lambda: ("imports; not driven here", "", "", "")) if have_vllm else skip("vllm not installed"),
    )

    print()
    print(f"{'point':<24} {'status':<40} {'grad rel err':<44} {'tokens/s':>9} {'peak MiB':>9}")
    for name, status, err, tps, mem in ROWS:
        print(f"{name:<24} {status[:40]:<40} {err[:44]:<44} {tps:>9} {mem:>9}")
    print(
        "\npeak MiB: CUDA max_memory_allocated, or the process's peak RSS on CPU (FSDP rows: the largest rank)."
    )
    return 1 if any(s.startswith("FAIL") for _, s, *_ in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
