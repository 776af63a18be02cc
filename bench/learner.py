"""Learner throughput and peak memory: packed vs padded micro-batches, LoRA vs full (+ QLoRA on CUDA).

Run:  python -m bench.learner                 (CPU, tiny 'demo' model, fp32)
      python -m bench.learner --device cuda   (adds QLoRA; bf16)

Every (mode, layout) case runs `Learner.step` on the same synthetic GRPO batch (multi-turn-
like sequences of very different lengths, a fixed seed) in its own subprocess, so each has a
fresh allocator and its own peak-memory figure. Tokens/s counts real tokens (padding
excluded) per optimiser step: median over the measured steps after one warm-up step, then
median over rounds (cases run in ABBA order across rounds, so drift in machine load hits
all cases alike). Peak memory is CUDA max_memory_allocated, or on CPU the process's peak
RSS during a step (Linux VmHWM, reset at each step's start; it includes the weights, torch
itself and memory the allocator keeps, so CPU memory ratios are close to 1).
Comparisons are ratios within one run. Writes bench/results/learner-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

PRESETS = {
    # device: (model size, dtype, groups, group size, max seq len, token budget)
    "cpu": dict(size="demo", dtype="float32", groups=2, group_size=8, max_len=512, budget=1024),
    "cuda": dict(size="demo", dtype="bfloat16", groups=8, group_size=8, max_len=4096, budget=16384),
}


def cases(device: str) -> list[tuple[str, str]]:
    modes = ["lora", "full"] + (["qlora"] if device == "cuda" else [])
    return [(m, lay) for m in modes for lay in ("packed", "padded")]


def synthetic_groups(p: dict, vocab: int, seed: int = 0):
    """GRPO groups with long-tailed lengths: a prompt, then 1-4 sampled/observed turn pairs."""
    from trustee.types import Group, Trajectory

    rng = random.Random(seed)
    groups = []
    for g in range(p["groups"]):
        trajs = []
        for i in range(p["group_size"]):
            target = int(min(p["max_len"], max(48, rng.lognormvariate(5.0, 0.8))))
            mask = [0] * rng.randint(16, 40)
            while len(mask) < target:
                mask += [1] * rng.randint(8, 60) + [0] * rng.randint(4, 40)
            mask = mask[:target]
            mask[-1] = 1
            toks = [rng.randrange(vocab) for _ in mask]
            lps = [rng.uniform(-8.0, -6.0) if m else 0.0 for m in mask]
            trajs.append(
                Trajectory(
                    episode_id=f"{g}-{i}",
                    task_id=str(g),
                    tokens=toks,
                    loss_mask=mask,
                    logprobs=lps,
                    versions=[0] * len(toks),
                    prompt_len=mask.index(1),
                )
            )
        adv = [rng.gauss(0.0, 1.0) for _ in trajs]
        groups.append(Group(task_id=str(g), trajectories=trajs, advantages=adv))
    return groups


def run_case(device: str, mode: str, layout: str, steps: int) -> dict:
    """One configuration in this process; returns its figures."""
    import torch

    from trustee.config import GrpoConfig, LearnerConfig
    from trustee.learn.learner import Learner
    from trustee.learn.policy import load_policy
    from trustee.tiny import build_tiny_model

    p = PRESETS[device]
    path = build_tiny_model(ROOT / ".cache" / f"tiny-{p['size']}", size=p["size"], seed=0)
    dtype = getattr(torch, p["dtype"])
    cfg = LearnerConfig(
        mode=mode, lr=1e-5, micro_batch_tokens=p["budget"], gradient_checkpointing=True, logprob_chunk=1024
    )
    policy = load_policy(path, cfg, device=torch.device(device if device == "cpu" else "cuda:0"), dtype=dtype)
    learner = Learner(policy, GrpoConfig(beta=0.0), cfg, layout=layout)
    groups = synthetic_groups(p, policy.model.config.vocab_size)
    learner.step(groups)  # warm-up
    ms = [learner.step(groups) for _ in range(steps)]
    m = ms[-1]
    return dict(
        mode=mode,
        layout=layout,
        tokens_per_s=statistics.median(x.tokens_per_s for x in ms),
        step_s=statistics.median(x.wall_s for x in ms),
        peak_mem_bytes=max(x.peak_mem_bytes for x in ms),
        tokens=m.tokens,
        input_tokens=m.input_tokens,
        padding_frac=1.0 - m.tokens / m.input_tokens,
        loss_tokens=m.loss_tokens,
        micro_batches=m.micro_batches,
        seqs=m.seqs,
        trainable_params=sum(q.numel() for q in policy.trainable_parameters()),
    )


def machine(device: str) -> dict:
    import peft
    import torch
    import transformers

    info = dict(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
    )
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_avg_1_5_15"] = list(os.getloadavg())  # other work on a shared machine skews tokens/s
    return info


def ratios(results: list[dict]) -> dict:
    by = {(r["mode"], r["layout"]): r for r in results}
    out = {}
    for mode in sorted({r["mode"] for r in results}):
        pk, pd = by[(mode, "packed")], by[(mode, "padded")]
        out[f"{mode}: packed/padded tokens_per_s"] = pk["tokens_per_s"] / pd["tokens_per_s"]
        out[f"{mode}: packed/padded peak_mem"] = pk["peak_mem_bytes"] / pd["peak_mem_bytes"]
    for mode in ("lora", "qlora"):
        if (mode, "packed") in by:
            a, b = by[(mode, "packed")], by[("full", "packed")]
            out[f"packed: {mode}/full tokens_per_s"] = a["tokens_per_s"] / b["tokens_per_s"]
            out[f"packed: {mode}/full peak_mem"] = a["peak_mem_bytes"] / b["peak_mem_bytes"]
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Learner benchmark ({report['device']})",
        "",
        f"`python -m bench.learner --device {report['device']}` on {report['machine']['cpu']} "
        f"({report['machine']['cpu_count']} cores){', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}; "
        f"torch {report['machine']['torch']}, transformers {report['machine']['transformers']}; "
        f"load average at the end {report['machine']['load_avg_1_5_15']} (a shared machine: tokens/s is noisy).",
        f"Config: {json.dumps(report['config'])}",
        "",
        "| mode | layout | tokens/s | step s | peak MiB | padding | micro-batches | trainable params |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['layout']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['padding_frac']:.0%} | {r['micro_batches']} | {r['trainable_params']:,} |"
        )
    lines += ["", "| ratio (same run) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def _subprocess_case(device: str, mode: str, layout: str, steps: int) -> dict:
    """One case in a fresh interpreter (its own allocator and peak memory)."""
    cmd = [
        sys.executable,
        "-m",
        "bench.learner",
        "--device",
        device,
        "--steps",
        str(steps),
        "--case",
        f"{mode},{layout}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {mode},{layout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _combine(rs: list[dict]) -> dict:
    """Rounds of one case: median tokens/s and step time, the largest peak memory."""
    out = dict(rs[0])
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rs)
    out["step_s"] = statistics.median(r["step_s"] for r in rs)
    out["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in rs)
    out["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in rs]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per case (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every case, in alternating order")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: 'mode,layout' runs one case and prints JSON
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.case:
        mode, layout = a.case.split(",")
        print(json.dumps(run_case(a.device, mode, layout, a.steps)))
        return
    t0 = time.time()
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in cases(a.device)}
    for r in range(a.rounds):
        order = cases(a.device) if r % 2 == 0 else cases(a.device)[::-1]  # ABBA: drift hits all cases alike
        for mode, layout in order:
            runs[(mode, layout)].append(_subprocess_case(a.device, mode, layout, a.steps))
            last = runs[(mode, layout)][-1]
            print(
                f"round {r} {mode:6s} {layout:7s} {last['tokens_per_s']:8.0f} tok/s  {last['peak_mem_bytes'] / 2**20:7.0f} MiB",
                flush=True,
            )
    results = [_combine(rs) for rs in runs.values()]
    report = dict(
        bench="learner",
        device=a.device,
        machine=machine(a.device),
        config=dict(PRESETS[a.device], steps=a.steps, rounds=a.rounds),
        results=results,
        ratios=ratios(results),
        wall_s=time.time() - t0,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"learner-{a.device}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"learner-{a.device}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
