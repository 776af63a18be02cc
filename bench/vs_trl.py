"""trustee against TRL's GRPOTrainer: the same tiny model, prompts, group size and loss, on CPU.

    python -m bench.vs_trl [--quick] [--out DIR]

Needs TRL: `pip install -e '.[compare]'` (on a CPU machine put `torch==2.13.0` on the same
pip line so nothing pulls a CUDA build). Without it the benchmark says so and exits 2.

Same work on both sides: single-turn prompts (toy-environment queries under the project
chat template), G completions per prompt sampled at temperature 1 with at most M new
tokens, a reward function (the share of distinct characters, for variance), group-relative
advantages, the `dapo` loss with clip 0.2 / 0.28, no KL (beta 0), one optimiser update per
batch (TRL: num_iterations 1, steps_per_generation 1, no gradient accumulation), AdamW at the
same learning rate, no gradient checkpointing (TRL's GRPOConfig turns it on by default: that
would recompute TRL's forward, work trustee's side does not do). trustee: `HFEngine` (continuous batching) to sample, `Learner` (packed
micro-batches) to train. TRL: `GRPOTrainer.train` (transformers `generate`, padded batches).
Each side runs in its own subprocess (fresh allocator; peak RSS from Linux VmHWM), `rounds`
times, the sides alternating (trustee, TRL, TRL, trustee, ...) so that drift in the machine's
speed hits both alike; wall time per optimiser step is the median over every round's steps
after its first; per generated token divides by the completion tokens of those steps. CPU
seconds per step (the process's, all threads) are reported beside wall time: under load their
ratio moves less than the wall ratio.

Threads: each side runs as its users get it. trustee's side applies trustee.run's CPU rule
(trustee/threads.py: a model this small runs on one thread, where its step takes about half
the time it takes on two); TRL's keeps torch's default, one thread per core, its faster
setting here (on one thread its step took 0.39 s against 0.28 s on two, 2 cores, measured
while writing this). Each side's thread count is in the JSON and the table.

First-step loss: one batch of completions sampled once (token ids), fed to both losses on
copies of the same weights: trustee's `Learner.accumulate` (is_mode 'off', so the objective
is the same clipped surrogate TRL computes) and TRL's `GRPOTrainer.compute_loss` on the same
tokens, prompt left-padded and completions right-padded as TRL lays them out. They must
agree to float tolerance; the gradients are compared too. Writes OUT/vs_trl.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(prompts=4, group=4, max_new=48, steps=4, lr=1e-4, rounds=3)
QUICK = dict(prompts=2, group=4, max_new=24, steps=3, lr=1e-4, rounds=3)
INSTALL = "pip install -e '.[compare]' torch==2.13.0   (CPU machines: keep torch pinned on the same line)"


def _have_trl() -> str | None:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def reward(text: str) -> float:
    """Share of distinct characters (a cheap reward with spread within a group)."""
    return len(set(text)) / max(1, len(text))


def _model_and_prompts(p: dict) -> tuple[Path, list[str]]:
    import random

    from transformers import AutoTokenizer

    from trustee.chat.render import ChatFormat, project_template
    from trustee.envs.base import Knobs
    from trustee.envs.toy import ToyEnv
    from trustee.models.tiny import build_tiny_model
    from trustee.types import Message

    path = build_tiny_model(ROOT / ".cache" / "tiny-test", size="test", seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    env, rng = ToyEnv(), random.Random(0)
    prompts = []
    for _ in range(p["prompts"]):
        t = env.task(Knobs(), rng)
        fmt = ChatFormat(tok, t.tools, template=project_template())
        prompts.append(fmt.render_text([Message(role="user", content=t.first_query)], generation_prompt=True))
    return path, prompts


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- trustee side


def run_trustee(p: dict) -> dict[str, Any]:
    import anyio
    import torch
    from transformers import AutoTokenizer

    from trustee.config import GrpoConfig, LearnerConfig
    from trustee.engines.base import Sampling
    from trustee.engines.hf import HFEngine
    from trustee.learn.advantages import compute_advantages
    from trustee.learn.learner import Learner
    from trustee.learn.policy import load_policy
    from trustee.threads import cpu_threads
    from trustee.types import Group, Trajectory

    torch.manual_seed(0)
    path, prompts = _model_and_prompts(p)
    threads, _ = cpu_threads(path)  # what trustee.run does on CPU (trustee/threads.py)
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    engine = HFEngine.from_pretrained(path, max_batch=64)
    cfg = LearnerConfig(mode="full", lr=p["lr"], micro_batch_tokens=4096, gradient_checkpointing=False)
    learner = Learner(
        load_policy(path, cfg), GrpoConfig(loss_type="dapo", beta=0.0, clip_low=0.2, clip_high=0.28), cfg
    )
    ids = [tok.encode(x, add_special_tokens=False) for x in prompts]
    params = Sampling(max_tokens=p["max_new"], temperature=1.0, stop_token_ids=(eos,))
    times, cpu, gen = [], [], []

    async def one_step() -> int:
        outs: list[Any] = [None] * (len(ids) * p["group"])

        async def go(k: int) -> None:
            outs[k] = await engine.generate(ids[k // p["group"]], params, key=str(k))

        async with anyio.create_task_group() as tg:
            for k in range(len(outs)):
                tg.start_soon(go, k)
        groups = []
        for i, pr in enumerate(ids):
            trajs = []
            for j in range(p["group"]):
                c = outs[i * p["group"] + j]
                toks = pr + c.token_ids
                trajs.append(
                    Trajectory(
                        episode_id=f"{i}/{j}", task_id=str(i), tokens=toks,
                        loss_mask=[0] * len(pr) + [1] * len(c.token_ids),
                        logprobs=[0.0] * len(pr) + list(c.logprobs),
                        versions=[-1] * len(pr) + [c.policy_version] * len(c.token_ids),
                        prompt_len=len(pr), reward=reward(tok.decode(c.token_ids)),
                    )
                )  # fmt: skip
            groups.append(Group(task_id=str(i), trajectories=trajs))
        adv = compute_advantages(groups, scale="group", filter_zero_variance=False)
        await learner.step_async(adv.groups)
        await engine.update_weights(_full_update(learner.model))
        return sum(len(o.token_ids) for o in outs)

    async def main() -> None:
        for _ in range(p["steps"]):
            t0, c0 = time.perf_counter(), time.process_time()
            n = await one_step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            gen.append(n)
        await engine.close()

    anyio.run(main)
    return _summary("trustee", times, cpu, gen)


def _full_update(model: Any) -> Any:
    from trustee.learn.export import export_full

    return export_full(model)


def _step_figures(later: list[float], cpu: list[float], toks: list[int]) -> dict[str, Any]:
    """Median wall and CPU seconds per optimiser step and seconds per generated token of
    measured steps."""
    return dict(
        step_s_median=round(statistics.median(later), 3),
        step_cpu_s_median=round(statistics.median(cpu), 3),
        s_per_generated_token=round(sum(later) / max(1, sum(toks)), 6),
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _summary(name: str, times: list[float], cpu: list[float], gen: list[int]) -> dict[str, Any]:
    """One process's run of one side: every step's time, figures over those after the first."""
    return dict(
        side=name,
        **_step_figures(times[1:], cpu[1:], gen[1:]),
        step_s_all=[round(t, 3) for t in times],
        step_cpu_s_all=[round(t, 3) for t in cpu],
        generated_tokens=gen[1:],
        peak_rss_bytes=_peak_rss(),
        threads=_threads(),
    )


# ----------------------------------------------------------------------------- TRL side


def _trl_trainer(
    p: dict, path: Path, prompts: list[str], out_dir: str, callbacks: list | None = None, model: Any = None
) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=p["prompts"] * p["group"],
        num_generations=p["group"],
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=p["max_new"],
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        gradient_checkpointing=False,  # as trustee's side; TRL's default (True) adds a recompute
        learning_rate=p["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=p["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        shuffle_dataset=False,
    )
    ds = Dataset.from_dict({"prompt": prompts * 64})
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="sdpa")

    def reward_fn(completions: list[str], **_: Any) -> list[float]:
        return [reward(c) for c in completions]

    return GRPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=callbacks,
    )


def run_trl(p: dict) -> dict[str, Any]:
    from transformers import TrainerCallback

    path, prompts = _model_and_prompts(p)
    times: list[float] = []
    cpu: list[float] = []
    gen: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as d:
        tr = _trl_trainer(p, path, prompts, d, callbacks=[Timer()])
        tr.train()
        for rec in tr.state.log_history:
            if "completions/mean_length" in rec:
                gen.append(int(round(rec["completions/mean_length"] * p["prompts"] * p["group"])))
    gen = (gen + [0] * len(times))[: len(times)]
    return _summary("trl", times, cpu, gen)


# ----------------------------------------------------------------------------- first-step loss


def first_loss(p: dict) -> dict[str, Any]:
    """Both losses (and gradients) on one batch of completions sampled once."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustee.config import GrpoConfig, LearnerConfig
    from trustee.learn.learner import Learner, samples_from_groups
    from trustee.learn.policy import wrap_policy
    from trustee.types import Group, Trajectory

    torch.manual_seed(0)
    path, prompts = _model_and_prompts(p)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok.encode(x, add_special_tokens=False) for x in prompts]
    rows = []  # (prompt ids, completion ids)
    with torch.no_grad():
        for pr in ids:
            out = base.generate(
                torch.tensor([pr] * p["group"]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=p["max_new"], eos_token_id=eos, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
            for r in out[:, len(pr) :].tolist():
                comp = r[: r.index(eos) + 1] if eos in r else r
                rows.append((pr, comp))
    rewards = [reward(tok.decode(c)) for _, c in rows]
    G = p["group"]
    adv = []
    for i in range(0, len(rows), G):
        rs = torch.tensor(rewards[i : i + G])
        adv += ((rs - rs.mean()) / (rs.std() + 1e-4)).tolist()  # TRL's default: scale by group std

    # trustee
    m1 = copy.deepcopy(base).train()
    cfg = LearnerConfig(mode="full", lr=p["lr"], micro_batch_tokens=4096, gradient_checkpointing=False)
    learner = Learner(
        wrap_policy(m1, cfg),
        GrpoConfig(loss_type="dapo", beta=0.0, clip_low=0.2, clip_high=0.28, is_mode="off"),
        cfg,
    )
    groups = []
    for i in range(0, len(rows), G):
        trajs = [
            Trajectory(
                episode_id=str(i + j), task_id=str(i), tokens=pr + c, loss_mask=[0] * len(pr) + [1] * len(c),
                logprobs=[0.0] * (len(pr) + len(c)), versions=[-1] * len(pr) + [0] * len(c), prompt_len=len(pr),
            )
            for j, (pr, c) in enumerate(rows[i : i + G])
        ]  # fmt: skip
        groups.append(Group(task_id=str(i), trajectories=trajs, advantages=adv[i : i + G]))
    learner.optimizer.zero_grad(set_to_none=True)
    t_loss, _, _ = learner.accumulate(samples_from_groups(groups))
    g1 = torch.cat([q.grad.flatten() for q in m1.parameters() if q.grad is not None])

    # TRL, on the same tokens
    m2 = copy.deepcopy(base)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as d:
        tr = _trl_trainer(p, path, prompts, d, model=m2)  # TRL patches its model's LM head (fused log-probs)
        m2.eval()  # TRL normalises 'eval' losses by num_items_in_batch alone (no accumulation factor)
        P = max(len(pr) for pr, _ in rows)
        C = max(len(c) for _, c in rows)
        pad = tok.pad_token_id
        prompt_ids = torch.tensor([[pad] * (P - len(pr)) + pr for pr, _ in rows])
        prompt_mask = torch.tensor([[0] * (P - len(pr)) + [1] * len(pr) for pr, _ in rows])
        comp_ids = torch.tensor([c + [pad] * (C - len(c)) for _, c in rows])
        comp_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for _, c in rows])
        inputs = dict(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp_ids, completion_mask=comp_mask,
            advantages=torch.tensor(adv), num_items_in_batch=comp_mask.sum(),
        )  # fmt: skip
        loss = tr.compute_loss(m2, inputs)
        loss.backward()
    g2 = torch.cat([q.grad.flatten() for q in m2.parameters() if q.grad is not None])
    return dict(
        completions=len(rows),
        completion_tokens=int(comp_mask.sum()),
        trustee_loss=t_loss,
        trl_loss=float(loss.detach()),
        first_loss_abs_diff=abs(t_loss - float(loss.detach())),
        grad_max_abs_diff=float((g1 - g2).abs().max()),
        grad_max_abs=float(g2.abs().max()),
    )


# ----------------------------------------------------------------------------- driver


def _combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's rounds: figures over every measured step of every round, the largest peak
    RSS, and every round."""
    later = [t for r in rounds for t in r["step_s_all"][1:]]
    cpu = [t for r in rounds for t in r["step_cpu_s_all"][1:]]
    toks = [n for r in rounds for n in r["generated_tokens"]]
    return dict(
        side=rounds[0]["side"],
        **_step_figures(later, cpu, toks),
        step_s_measured=later,
        generated_tokens=toks,
        peak_rss_bytes=max(r["peak_rss_bytes"] for r in rounds),
        threads=rounds[0]["threads"],
        rounds=rounds,
    )


def _sub(which: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.vs_trl", "--side", which] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, load_avg, machine, plot_bars, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help=f"smaller batch and fewer steps ({QUICK})")
    ap.add_argument("--side", choices=["trustee", "trl", "loss"], help=argparse.SUPPRESS)  # internal
    add_out_arg(ap)
    a = ap.parse_args(argv)
    p = QUICK if a.quick else FULL
    version = _have_trl()
    if version is None:
        print(f"TRL is not installed; this benchmark compares against it. Install the extra:\n  {INSTALL}")
        sys.exit(2)
    if a.side:
        fn = {"trustee": run_trustee, "trl": run_trl, "loss": first_loss}[a.side]
        print(json.dumps(fn(p)))
        return
    before = load_avg()
    runs: dict[str, list[dict[str, Any]]] = {"trustee": [], "trl": []}
    for k in range(p["rounds"]):
        for which in ("trustee", "trl") if k % 2 == 0 else ("trl", "trustee"):
            runs[which].append(_sub(which, a.quick))
            print(f"  round {k + 1} {which}: {json.dumps(runs[which][-1])[:300]}", flush=True)
    sides = {which: _combine(rs) for which, rs in runs.items()}
    sides["loss"] = _sub("loss", a.quick)
    print(f"  loss: {json.dumps(sides['loss'])[:300]}", flush=True)
    t, r, lo = sides["trustee"], sides["trl"], sides["loss"]
    rep = dict(
        bench="vs_trl",
        command="python -m bench.vs_trl" + (" --quick" if a.quick else ""),
        machine=machine(),
        load_avg_before=before,
        trl_version=version,
        config=dict(p, loss="dapo", beta=0.0, clip=(0.2, 0.28), mode="full", device="cpu", model="tiny-test"),
        trustee=t,
        trl=r,
        step_time_ratio=round(r["step_s_median"] / t["step_s_median"], 3),
        step_cpu_time_ratio=round(r["step_cpu_s_median"] / max(1e-9, t["step_cpu_s_median"]), 3),
        per_token_time_ratio=round(r["s_per_generated_token"] / max(1e-12, t["s_per_generated_token"]), 3),
        peak_rss_ratio=round(r["peak_rss_bytes"] / max(1, t["peak_rss_bytes"]), 3),
        first_loss=lo,
        first_loss_abs_diff=lo["first_loss_abs_diff"],
        goal="trustee >= 2x faster per optimiser step (step_time_ratio >= 2.0; issue 28)",
    )
    md = "\n".join(
        [
            "# trustee vs TRL GRPOTrainer (CPU, tiny model)",
            "",
            f"`{rep['command']}`; TRL {version}; load average before {before}, after {rep['machine']['load_avg_1_5_15']}.",
            f"Config: {json.dumps(rep['config'])}",
            "",
            f"Each side ran {p['rounds']} times in its own process, the sides alternating; step s is the median "
            "over every measured step of every round.",
            "",
            "| | step s (median) | step CPU s (median) | s per generated token | peak RSS MiB | torch threads |",
            "|---|---:|---:|---:|---:|---:|",
            f"| trustee | {t['step_s_median']} | {t['step_cpu_s_median']} | {t['s_per_generated_token']:.5f} | {t['peak_rss_bytes'] / 2**20:.0f} | {t['threads']} |",
            f"| TRL | {r['step_s_median']} | {r['step_cpu_s_median']} | {r['s_per_generated_token']:.5f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['threads']} |",
            "",
            f"step_time_ratio (TRL / trustee) = **{rep['step_time_ratio']}**; CPU time per step "
            f"{rep['step_cpu_time_ratio']}; per generated token {rep['per_token_time_ratio']}; peak RSS {rep['peak_rss_ratio']}.",
            "",
            f"First-step loss on identical completions ({lo['completions']} completions, {lo['completion_tokens']} tokens): "
            f"trustee {lo['trustee_loss']:.8f}, TRL {lo['trl_loss']:.8f}, |diff| {lo['first_loss_abs_diff']:.2e}; "
            f"gradients max |diff| {lo['grad_max_abs_diff']:.2e} (max |grad| {lo['grad_max_abs']:.2e}).",
            "",
        ]
    )
    path = write_report(a.out, "vs_trl", rep, md)
    plot_bars(path.with_suffix(".png"), ["trustee", "TRL"], [t["step_s_median"], r["step_s_median"]],
              title="Seconds per optimiser step (CPU, tiny model)", ylabel="s / step")  # fmt: skip
    print(md)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
