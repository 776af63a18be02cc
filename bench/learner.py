"""Learner throughput and peak memory: shared-prefix, packed and padded micro-batches, LoRA vs full (+ QLoRA on CUDA).

Run:  python -m bench.learner [--quick] [--out DIR]   (CPU, tiny 'demo' model, fp32)
      python -m bench.learner --device cuda            (adds QLoRA; bf16)

Two batch distributions, both of GRPO groups whose G episodes share their prompt:

- `realistic` (`bench/trajectories.py`): whole episodes of the toy, simulated and BFCL
  environments, token-exact under the project chat template, so lengths spread over 10x and
  more (toy and simulated episodes of a few hundred tokens, BFCL episodes of several
  thousand), sampled spans where the policy spoke. Group g's members all start with episode
  g*G's prompt and continue with the sampled turns and tool results of episodes g*G..g*G+G-1
  (a group's episodes share the prompt and differ after it; only lengths and masks matter);
- `tool-prompt`: the agent-RL shape where the prompt dominates: prompts of 1,000 to 3,000
  tokens (system prompt and many tool schemas), G = 8 completions of 50 to 300 tokens each,
  every completion token trained.

Advantages are drawn at random, fixed seed.
Every (mode, layout) case runs `Learner.step` on that batch in its own subprocess, so each
has a fresh allocator and its own peak-memory figure. Tokens/s counts real tokens (padding
excluded) per optimiser step: median over the measured steps after one warm-up step, then
median over rounds (cases run in ABBA order across rounds, so drift in machine load hits
all cases alike). The packed layout does no attention work across sequence boundaries
(`learn/attention.py`), and feeds every episode whole (`learner.share_prefix = 'off'`); the
shared layout feeds each group's prompt once (`'on'`: the run-time check of 'auto' runs once
per new shape in a run, so it is left out of these steady-state figures). Tokens/s counts the
episodes' tokens (each prompt G times) in every layout, so shared/packed is the speed-up on
the same work. Two padded layouts, both on the same budget (realistic distribution only):
`padded` is the learner's own (`layout='padded'`: arrival-order rows padded to the longest of
their micro-batch, count x longest <= budget), `trl-padded` is the layout TRL's GRPOTrainer
trains on (its `_generate_and_score_completions` pads the whole generation batch to its
longest prompt and completion before splitting it into micro-batches of a fixed row count;
here that count is budget // longest, so it uses the same memory). The token budget is
twice the longest episode: on CPU the learner's default (`learner.micro_batch_tokens`,
16,384) over episodes cut at 8,192, on CUDA 32,768 over 16,384; `--budget` changes it (at a
budget equal to the longest episode every long episode fills a micro-batch alone in any
layout, so the work packing can save shrinks to the short episodes' padding).
Peak memory is CUDA max_memory_allocated, or on CPU the process's peak RSS during a step
(Linux VmHWM; it includes the weights, torch itself and memory the allocator keeps, so CPU
memory ratios are close to 1). Comparisons are ratios within one run; the load average is
recorded before and after each case. Writes OUT/learner-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_BUDGET = 16384
"""`learner.micro_batch_tokens`'s default (a test keeps the two equal)."""
PRESETS = {
    # device: model size, dtype, groups x group size samples, longest sequence, token budget
    "cpu": dict(
        size="demo",
        dtype="float32",
        groups=3,
        group_size=8,
        max_len=8192,
        budget=DEFAULT_BUDGET,
        tool_groups=3,
    ),
    "cuda": dict(
        size="demo",
        dtype="bfloat16",
        groups=8,
        group_size=8,
        max_len=16384,
        budget=2 * DEFAULT_BUDGET,
        tool_groups=8,
    ),
}
LAYOUTS = ("packed", "shared", "padded", "trl-padded")
DISTRIBUTIONS = ("realistic", "tool-prompt")
PADDED = ("padded", "trl-padded")  # run on the realistic distribution only
QUICK = {"size": "test", "groups": 1, "tool_groups": 2}
TOOL_PROMPT = dict(group_size=8, prompt=(1000, 3000), completion=(50, 300))
"""The tool-prompt distribution (issue 28): prompt and completion lengths drawn uniformly."""
# Episode lengths are measured with the 'demo' tokenizer (vocabulary 2048) whatever the model
# size; ids are folded into the model's vocabulary (only lengths and masks matter here).
LENGTH_TOKENIZER = "demo"


def preset(device: str, quick: bool, budget: int | None = None) -> dict:
    return dict(PRESETS[device], **(QUICK if quick else {}), **({"budget": budget} if budget else {}))


def cases(
    device: str, layouts: tuple[str, ...] = LAYOUTS, dists: tuple[str, ...] = DISTRIBUTIONS
) -> list[tuple[str, str, str]]:
    """(mode, layout, distribution) of every case; the padded layouts on `realistic` only."""
    modes = ["lora", "full"] + (["qlora"] if device == "cuda" else [])
    return [
        (m, lay, d)
        for d in dists
        for m in modes
        for lay in layouts
        if not (lay in PADDED and d != "realistic")
    ]


def tool_prompt_batch(p: dict, seed: int = 0) -> list[list[tuple[list[int], list[int]]]]:
    """`tool_groups` groups of the tool-prompt distribution: (ids, loss_mask) per episode, ids
    drawn at random from the tokenizer's range (folded into the model's by `groups_from`)."""
    rng = random.Random(seed)
    out = []
    for _ in range(p["tool_groups"]):
        prompt = [rng.randrange(2048) for _ in range(rng.randint(*TOOL_PROMPT["prompt"]))]
        group = []
        for _ in range(TOOL_PROMPT["group_size"]):
            n = rng.randint(*TOOL_PROMPT["completion"])
            group.append((prompt + [rng.randrange(2048) for _ in range(n)], [0] * len(prompt) + [1] * n))
        out.append(group)
    return out


def shared_prompt_groups(
    samples: list[tuple[list[int], list[int]]], group_size: int, max_len: int
) -> list[list[tuple[list[int], list[int]]]]:
    """Episodes regrouped so that a group's members share its first episode's prompt and
    continue with each member's own sampled turns and tool results, cut at max_len."""
    out = []
    for g in range(0, len(samples) - group_size + 1, group_size):
        ids0, mask0 = samples[g]
        prompt = ids0[: mask0.index(1)]
        group = []
        for ids, mask in samples[g : g + group_size]:
            p = mask.index(1)
            group.append(((prompt + ids[p:])[:max_len], ([0] * len(prompt) + mask[p:])[:max_len]))
        out.append(group)
    return out


def realistic_batch(p: dict, seed: int = 0) -> dict:
    """Both distributions (see the module docstring) as plain lists, for `groups_from`."""
    from transformers import AutoTokenizer

    from bench.trajectories import realistic_samples
    from trustee.models.tiny import build_tiny_model

    tok_dir = build_tiny_model(ROOT / ".cache" / f"tiny-{LENGTH_TOKENIZER}", size=LENGTH_TOKENIZER, seed=0)
    n = p["groups"] * p["group_size"]
    # ask for more: an episode whose prompt alone exceeds max_len has nothing to train and is skipped
    samples, summary = realistic_samples(
        AutoTokenizer.from_pretrained(tok_dir), n + n // 2, p["max_len"], seed=seed
    )
    if len(samples) < n:
        raise RuntimeError(
            f"only {len(samples)} usable episodes for {n} samples; raise max_len ({p['max_len']})"
        )
    tool = tool_prompt_batch(p, seed)
    return {
        "realistic": shared_prompt_groups(samples[:n], p["group_size"], p["max_len"]),
        "tool-prompt": tool,
        "summary": {"realistic": summary, "tool-prompt": _lengths_summary(tool)},
    }


def _lengths_summary(groups: list) -> dict:
    lens = sorted(len(ids) for g in groups for ids, _ in g)
    prompts = sorted(m.index(1) for g in groups for _, m in g[:1])
    return dict(episodes=len(lens), min=lens[0], max=lens[-1], prompts=prompts)


def groups_from(batch: dict, dist: str, vocab: int, seed: int = 0):
    """GRPO groups of one distribution, ids folded into `vocab`, with the sampler's log-probs
    and advantages drawn at random."""
    from trustee.types import Group, Trajectory

    rng = random.Random(seed)
    groups = []
    for g, members in enumerate(batch[dist]):
        trajs = []
        for i, (toks, mask) in enumerate(members):
            trajs.append(
                Trajectory(
                    episode_id=f"{g}-{i}",
                    task_id=str(g),
                    tokens=[t % vocab for t in toks],
                    loss_mask=mask,
                    logprobs=[rng.uniform(-8.0, -6.0) if m else 0.0 for m in mask],
                    versions=[0 if m else -1 for m in mask],
                    prompt_len=mask.index(1),
                )
            )
        adv = [rng.gauss(0.0, 1.0) for _ in trajs]
        groups.append(Group(task_id=str(g), trajectories=trajs, advantages=adv))
    return groups


def run_case(
    device: str,
    mode: str,
    layout: str,
    dist: str,
    steps: int,
    quick: bool,
    batch_file: str,
    budget: int | None = None,
) -> dict:
    """One configuration in this process; returns its figures."""
    import torch

    from trustee.config import GrpoConfig, LearnerConfig
    from trustee.learn.learner import Learner
    from trustee.learn.policy import load_policy
    from trustee.models.tiny import build_tiny_model

    p = preset(device, quick, budget)
    load0 = list(os.getloadavg())
    path = build_tiny_model(ROOT / ".cache" / f"tiny-{p['size']}", size=p["size"], seed=0)
    dtype = getattr(torch, p["dtype"])
    cfg = LearnerConfig(
        mode=mode,
        lr=1e-5,
        micro_batch_tokens=p["budget"],
        gradient_checkpointing=True,
        logprob_chunk=1024,
        share_prefix="on" if layout == "shared" else "off",
    )
    policy = load_policy(path, cfg, device=torch.device(device if device == "cpu" else "cuda:0"), dtype=dtype)
    if layout == "trl-padded":
        learner = trl_padded_learner(policy, GrpoConfig(beta=0.0), cfg)
    else:
        learner = Learner(
            policy, GrpoConfig(beta=0.0), cfg, layout="packed" if layout == "shared" else layout
        )
    batch = json.loads(Path(batch_file).read_text())
    groups = groups_from(batch, dist, policy.model.config.vocab_size)
    if not quick:
        learner.step(groups)  # warm-up (quick: none; lazy start-up costs are small beside a step)
    ms, cpu = [], []
    for _ in range(steps):
        c0 = time.process_time()
        ms.append(learner.step(groups))
        cpu.append(time.process_time() - c0)
    m = ms[-1]
    bins = learner.micro_batches(learner_samples(groups))
    return dict(
        mode=mode,
        layout=layout,
        dist=dist,
        tokens_per_s=statistics.median(x.tokens_per_s for x in ms),
        # CPU seconds of this process (all torch threads): less sensitive to other load than wall time
        tokens_per_cpu_s=statistics.median(x.tokens / c for x, c in zip(ms, cpu, strict=True)),
        step_s=statistics.median(x.wall_s for x in ms),
        step_cpu_s=statistics.median(cpu),
        # what the layout computes: token rows fed (linear work) and attention score entries (quadratic)
        work_tokens=sum(mb.n_input_tokens for mb in bins),
        work_attention=sum(_attention_work(mb) for mb in bins),
        warmup=not quick,
        peak_mem_bytes=max(x.peak_mem_bytes for x in ms),
        tokens=m.tokens,
        input_tokens=m.input_tokens,
        padding_frac=max(0.0, 1.0 - m.tokens / m.input_tokens),
        shared_frac=m.shared_prefix_frac,
        loss_tokens=m.loss_tokens,
        micro_batches=m.micro_batches,
        seqs=m.seqs,
        trainable_params=sum(q.numel() for q in policy.trainable_parameters()),
        attn_implementation=getattr(policy.model.config, "_attn_implementation", None),
        lengths=batch["summary"][dist],
        load_avg_before=[round(x, 2) for x in load0],
        load_avg_after=[round(x, 2) for x in os.getloadavg()],
    )


def trl_padded_learner(policy, grpo, cfg, **kw):
    """A `Learner` whose micro-batches are laid out as TRL's GRPOTrainer lays them out: every
    row padded to the longest sequence of the whole batch, a fixed number of rows per
    micro-batch (budget // longest, the most that fits the same memory), arrival order."""
    from trustee.learn.learner import Learner
    from trustee.learn.packing import build_padded

    class TrlPaddedLearner(Learner):
        def micro_batches(self, samples):
            width = max(len(s.tokens) for s in samples)
            rows = max(1, self.cfg.micro_batch_tokens // width)
            bins = [list(range(i, min(i + rows, len(samples)))) for i in range(0, len(samples), rows)]
            return [build_padded([samples[i] for i in b], b, pad_id=self.pad_id, width=width) for b in bins]

    return TrlPaddedLearner(policy, grpo, cfg, layout="padded", **kw)


def learner_samples(groups: list) -> list:
    from trustee.learn.learner import samples_from_groups

    return samples_from_groups(groups)


def _attention_work(mb) -> int:
    """Causal attention score entries of a micro-batch: per packed sequence L(L+1)/2, per
    padded row T(T+1)/2 (SDPA computes the padding too); a shared unit P(P+1)/2 for its
    prefix and S(S+1)/2 + S*P per branch."""
    if mb.layout is not None:
        return sum(
            p * (p + 1) // 2 + sum(s * (s + 1) // 2 + s * p for s in branches)
            for _, p, branches in mb.layout.units
        )
    cu = mb.attn_kwargs.get("cu_seq_lens_q")
    if cu is not None:
        lens = (cu[1:] - cu[:-1]).tolist()
        return sum(n * (n + 1) // 2 for n in lens)
    R, T = mb.input_ids.shape
    return R * T * (T + 1) // 2


def machine(device: str) -> dict:
    from bench.common import machine as common_machine

    extra = {}
    if device == "cuda":
        import torch

        extra["gpu"] = torch.cuda.get_device_name(0)
    return common_machine(**extra)


def ratios(results: list[dict]) -> dict:
    """Same-run ratios. Packed against the padded layouts on `realistic` (keys without a
    distribution, as before issue 28); shared against packed per distribution, keys
    '<mode>: shared/packed tokens_per_s (<distribution>)' and the like."""
    by = {(r["mode"], r["layout"], r["dist"]): r for r in results}
    out = {}
    for mode in sorted({r["mode"] for r in results}):
        pk = by.get((mode, "packed", "realistic"))
        for name in PADDED:
            if pk is None or (mode, name, "realistic") not in by:
                continue
            pd = by[(mode, name, "realistic")]
            out[f"{mode}: packed/{name} tokens_per_s"] = pk["tokens_per_s"] / pd["tokens_per_s"]
            out[f"{mode}: packed/{name} tokens_per_cpu_s"] = pk["tokens_per_cpu_s"] / pd["tokens_per_cpu_s"]
            # The most packing could gain on this batch if the step's cost were all per token
            # (padded/packed token rows) or all attention (padded/packed score entries).
            out[f"{mode}: {name} bound if cost per token"] = pd["work_tokens"] / pk["work_tokens"]
            out[f"{mode}: {name} bound if cost all attention"] = pd["work_attention"] / pk["work_attention"]
            out[f"{mode}: packed/{name} peak_mem"] = pk["peak_mem_bytes"] / pd["peak_mem_bytes"]
            out[f"{mode}: {name} layout padding fraction"] = pd["padding_frac"]
        for dist in DISTRIBUTIONS:
            pk, sh = by.get((mode, "packed", dist)), by.get((mode, "shared", dist))
            if pk is None or sh is None:
                continue
            out[f"{mode}: shared/packed tokens_per_s ({dist})"] = sh["tokens_per_s"] / pk["tokens_per_s"]
            out[f"{mode}: shared/packed tokens_per_cpu_s ({dist})"] = (
                sh["tokens_per_cpu_s"] / pk["tokens_per_cpu_s"]
            )
            out[f"{mode}: shared/packed peak_mem ({dist})"] = sh["peak_mem_bytes"] / pk["peak_mem_bytes"]
            out[f"{mode}: shared bound if cost per token ({dist})"] = pk["work_tokens"] / sh["work_tokens"]
            out[f"{mode}: shared bound if cost all attention ({dist})"] = (
                pk["work_attention"] / sh["work_attention"]
            )
            out[f"shared tokens saved ({dist})"] = sh["shared_frac"]
    for mode in ("lora", "qlora"):
        if (mode, "packed", "realistic") in by and ("full", "packed", "realistic") in by:
            a, b = by[(mode, "packed", "realistic")], by[("full", "packed", "realistic")]
            out[f"packed: {mode}/full tokens_per_s"] = a["tokens_per_s"] / b["tokens_per_s"]
            out[f"packed: {mode}/full peak_mem"] = a["peak_mem_bytes"] / b["peak_mem_bytes"]
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Learner benchmark ({report['device']})",
        "",
        f"`{report['command']}` on {report['machine']['cpu']} "
        f"({report['machine']['cpu_count']} cores){', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}; "
        f"torch {report['machine']['versions'].get('torch')}, transformers {report['machine']['versions'].get('transformers')}; "
        f"load average before {report['load_avg_before']}, at the end {report['machine']['load_avg_1_5_15']} "
        "(a shared machine: compare only the ratios of one run).",
        f"Config: {json.dumps(report['config'])}",
        f"Lengths (realistic: toy, simulated, BFCL episodes regrouped to share prompts; tool-prompt): "
        f"{json.dumps(report['lengths'])}",
        "",
        "| distribution | mode | layout | tokens/s | tokens/CPU-s | step s | peak MiB | padding | shared | micro-batches | trainable params |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['dist']} | {r['mode']} | {r['layout']} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | "
            f"{r['step_s']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['padding_frac']:.0%} | {r['shared_frac']:.0%} | "
            f"{r['micro_batches']} | {r['trainable_params']:,} |"
        )
    lines += ["", "| ratio (same run) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def _subprocess_case(
    device: str,
    mode: str,
    layout: str,
    dist: str,
    steps: int,
    quick: bool,
    batch_file: str,
    budget: int | None = None,
) -> dict:
    """One case in a fresh interpreter (its own allocator and peak memory)."""
    cmd = (
        [
            sys.executable,
            "-m",
            "bench.learner",
            "--device",
            device,
            "--steps",
            str(steps),
            "--case",
            f"{mode},{layout},{dist}",
            "--batch-file",
            batch_file,
        ]
        + (["--quick"] if quick else [])
        + (["--budget", str(budget)] if budget else [])
    )
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {mode},{layout},{dist} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _combine(rs: list[dict]) -> dict:
    """Rounds of one case: median tokens/s and step time, the largest peak memory."""
    out = dict(rs[0])
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rs)
    out["step_s"] = statistics.median(r["step_s"] for r in rs)
    out["tokens_per_cpu_s"] = statistics.median(r["tokens_per_cpu_s"] for r in rs)
    out["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in rs)
    out["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in rs]
    return out


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, load_avg, plot_bars, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the test-size model, one group of 8 episodes, 1 step without warm-up, 1 round",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured steps per case after one warm-up (default 2; quick 1)",
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="runs of every case, alternating order (default 2; quick 1)"
    )
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="token budget per micro-batch (default: twice the longest episode)",
    )
    ap.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help="layouts to run, comma-separated; packed is always run (default: all four; on CPU the "
        "full form's trl-padded cases take longer than the rest together)",
    )
    ap.add_argument(
        "--dists",
        default=",".join(DISTRIBUTIONS),
        help=f"distributions to run, comma-separated (default: {','.join(DISTRIBUTIONS)})",
    )
    ap.add_argument(
        "--case", help=argparse.SUPPRESS
    )  # internal: 'mode,layout,dist' runs one case, prints JSON
    ap.add_argument(
        "--batch-file", help=argparse.SUPPRESS
    )  # internal: the episodes, written once by the parent
    add_out_arg(ap)
    a = ap.parse_args(argv)
    layouts = tuple(dict.fromkeys(["packed", *a.layouts.split(",")]))
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        ap.error(f"--layouts {a.layouts}: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    dists = tuple(dict.fromkeys(a.dists.split(",")))
    if unknown := [x for x in dists if x not in DISTRIBUTIONS]:
        ap.error(f"--dists {a.dists}: unknown {unknown}; choose from {', '.join(DISTRIBUTIONS)}")
    steps = a.steps or (1 if a.quick else 2)
    rounds = a.rounds or (1 if a.quick else 2)
    if a.case:
        mode, layout, dist = a.case.split(",")
        print(json.dumps(run_case(a.device, mode, layout, dist, steps, a.quick, a.batch_file, a.budget)))
        return
    import tempfile

    t0 = time.time()
    before = load_avg()
    tmp = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-learner-", delete=False)
    tmp.write(json.dumps(realistic_batch(preset(a.device, a.quick, a.budget))))
    tmp.close()
    todo = cases(a.device, layouts, dists)
    runs: dict[tuple[str, str, str], list[dict]] = {c: [] for c in todo}
    for r in range(rounds):
        order = todo if r % 2 == 0 else todo[::-1]  # ABBA: drift hits all cases alike
        for mode, layout, dist in order:
            runs[(mode, layout, dist)].append(
                _subprocess_case(a.device, mode, layout, dist, steps, a.quick, tmp.name, a.budget)
            )
            last = runs[(mode, layout, dist)][-1]
            print(
                f"round {r} {dist:11s} {mode:6s} {layout:10s} {last['tokens_per_s']:8.0f} tok/s  "
                f"{last['peak_mem_bytes'] / 2**20:7.0f} MiB  padding {last['padding_frac']:.0%}  "
                f"shared {last['shared_frac']:.0%}  load {last['load_avg_after']}",
                flush=True,
            )
    os.unlink(tmp.name)
    results = [_combine(rs) for rs in runs.values()]
    report = dict(
        bench="learner",
        command="python -m bench.learner"
        + (" --quick" if a.quick else "")
        + (f" --device {a.device}" if a.device != "cpu" else "")
        + (f" --layouts {','.join(layouts)}" if layouts != LAYOUTS else "")
        + (f" --dists {','.join(dists)}" if dists != DISTRIBUTIONS else "")
        + (f" --budget {a.budget}" if a.budget else ""),
        device=a.device,
        machine=machine(a.device),
        load_avg_before=before,
        config=dict(
            preset(a.device, a.quick, a.budget),
            steps=steps,
            rounds=rounds,
            layouts=list(layouts),
            dists=list(dists),
            tool_prompt=TOOL_PROMPT,
        ),
        lengths={r["dist"]: r["lengths"] for r in results},
        results=results,
        ratios=ratios(results),
        goal="packed/padded tokens_per_s >= 1.5 for full and LoRA (issue 14), measured quietly; "
        "padded = the learner's own budget-binned layout (the stronger baseline), trl-padded beside it; "
        "shared/packed tokens_per_s >= 3.0 on tool-prompt for LoRA and full with peak memory no higher (issue 28)",
        wall_s=time.time() - t0,
    )
    path = write_report(a.out, f"learner-{a.device}", report, markdown(report))
    why = plot_bars(
        path.with_suffix(".png"),
        [f"{r['mode']}\n{r['layout']}\n{r['dist']}" for r in results],
        [r["tokens_per_s"] for r in results],
        title=f"Learner tokens/s, realistic and tool-prompt groups ({a.device})",
        ylabel="real tokens / s",
    )
    if why:
        print(why)
    print(markdown(report))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
