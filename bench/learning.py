"""Does trustee make a policy better? Trained against an untouched control, same seeds.

Run:  python -m bench.learning --quick [--out DIR] [--seeds 0,1,2] [--config configs/cpu-tiny.toml]
      python -m bench.learning --model smollm2-135m-instruct --quick [--out DIR]

For each seed, the same run twice through `python -m trustee.run` (the README's main job;
--quick evaluates less often): once as configured ("trained") and once with learner.lr = 0
("control": the same rollouts, curriculum, evaluation and learner passes, but the weights
never move). Runs go side by side, three at a time on one thread each by default (`--jobs`). Both start
from the same SFT-warmed tiny model, built once before the runs. The figure of merit is the
held-out reward (toy: a fixed task set never trained on) at the end, sampled at the rollout
temperature as the policy is trained to act (`--metric sampled`, the default) or greedy:
`gain` = mean over seeds of trained minus control. Both are in the JSON, with each arm's
held-out shares of episodes with a malformed call and of truncated ones (in the gain's mode),
so a gain bought with broken episodes shows. Writes learning.json
(machine, versions, config, per-seed curves and figures), learning.md (a table) and
learning.png (training and held-out reward per step, trained vs control) into --out
(default: runs/bench-learning, never the committed bench/results unless asked).

`--model NAME` trains a real pretrained model from its package (`trustee.models.packaged`;
tools/install.sh --models) on configs/cpu-smollm.toml, with no SFT. Its control is the cheaper
form the issue allows: with lr 0 the weights never move, so the control arm is the untouched
model evaluated on the same held-out tasks, with the same samples per task, at the same steps,
with one task of two episodes per step instead of the training batch (`control_form` in the
JSON says which form ran). The two arms run one after the other (memory), each on every
core. The JSON adds `model` and the held-out score parts per arm (`aspects`: tool_names,
arguments, exact, ...), so tool choice and argument copying show apart from the reward. `--quick` is one seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ASPECTS = ("tool_names", "arguments", "expected_calls", "exact", "finished", "well_formed")

QUICK = [  # the main job with fewer evaluations: the same model, environment, steps and learner
    "eval.every_steps=10",
    "eval.heldout_samples=2",
    "checkpoint.every_steps=0",
]


def _run(config: str, out: Path, seed: int, model: str, extra: list[str], threads: int) -> list[dict]:
    # the model is built before the runs: neither run builds one
    sets = [
        f"seed={seed}",
        f"model.path={model}",
        "model.tiny=''",
        "model.packaged=''",
        "logging.progress_bar=false",
    ]
    sets += extra
    cmd = [sys.executable, "-m", "trustee.run", config, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _curve(recs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in recs if key in r and r[key] == r[key]]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _call_errors(run_dir: Path, mode: str) -> tuple[int, int]:
    """(calls that did not run, calls written) over the held-out episodes of the run's last
    evaluation in `mode`, from its eval_trajectories.jsonl: an arm that calls tools five times
    as often has more episodes with a broken call at the same rate per call, and this tells the
    two apart. (0, 0) when the run kept no held-out episodes."""
    import msgspec

    from trustee.types import Counters

    path = run_dir / "eval_trajectories.jsonl"
    if not path.exists():
        return 0, 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return 0, 0
    last = max(r["step"] for r in rows)
    bad = written = 0
    for r in rows:
        if r["step"] == last:
            c = msgspec.convert(r["trajectory"]["counters"], Counters)
            bad += c.malformed_calls
            written += c.tool_calls + c.malformed_calls
    return bad, written


def _model(config: str, out: Path, packaged: str = "") -> str:
    """Build the config's tiny SFT-warmed model once (trustee.run does it on first use), or
    write the packaged model `packaged` (python -m trustee.models get) when it is missing."""
    sys.path.insert(0, str(ROOT))
    from trustee.config import load_config

    if packaged:
        from trustee.models.packaged import default_dir, get

        return str(get(packaged, ROOT / default_dir(packaged)))

    cfg = load_config(config)
    path = Path(cfg.model.path)
    path = path if path.is_absolute() else ROOT / path
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "trustee.run",
                config,
                "--out",
                str(out / "build"),
                "--set",
                "grpo.steps=1",
                "--set",
                "eval.every_steps=0",
                "--set",
                "logging.progress_bar=false",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return str(path)


def _plot(results: dict, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed, r in results.items():
        for kind, color in (("trained", "tab:blue"), ("control", "tab:gray")):
            for ax, key in zip(axes, ("reward_mean", f"eval/reward_{metric}"), strict=True):
                xs, ys = zip(*r[kind][key], strict=True) if r[kind][key] else ((), ())
                ax.plot(
                    xs,
                    ys,
                    color=color,
                    alpha=0.8,
                    marker="." if key != "reward_mean" else None,
                    label=f"{kind}" if seed == next(iter(results)) else None,
                )
    axes[0].set_title("training reward (mean per step)")
    axes[1].set_title(f"held-out reward ({metric}, fixed tasks never trained on)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config", default="", help="default configs/cpu-tiny.toml; with --model configs/cpu-smollm.toml"
    )
    ap.add_argument(
        "--model",
        default="",
        help="a packaged real model (python -m trustee.models list), trained with no SFT against the untouched model",
    )
    ap.add_argument("--seeds", default="", help="default 0,1,2; with --model --quick: 0")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="evaluate every 10 steps instead of every 5 (the runs are the main job's)",
    )
    ap.add_argument(
        "--jobs", type=int, default=3, help="runs side by side (each gets cpus / jobs threads, >= 1)"
    )
    ap.add_argument(
        "--runs",
        default=str(ROOT / "runs" / "bench-learning-runs"),
        help="where the runs' own directories go",
    )
    ap.add_argument(
        "--metric", choices=["sampled", "greedy"], default="sampled", help="held-out reward that defines gain"
    )
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-learning"))
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both arms")
    args = ap.parse_args(argv)
    args.config = args.config or ("configs/cpu-smollm.toml" if args.model else "configs/cpu-tiny.toml")
    args.seeds = args.seeds or ("0" if args.model and args.quick else "0,1,2")
    if args.model:
        # One arm at a time: a SmolLM2 arm holds 10-16 GB of RSS on CPU (2026-12-06), two side
        # by side need about 23 GB and one was OOM-killed; one after the other, each gets every core.
        args.jobs = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    runs = Path(args.runs)
    if runs.exists():  # a run directory left from before would resume instead of training afresh
        import shutil

        shutil.rmtree(runs)
    model = _model(args.config, runs, args.model)
    extra = ([] if args.model else QUICK if args.quick else []) + list(args.set)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    arms_of = {"trained": [], "control": ["learner.lr=0"]}
    control_form = (
        "lr 0: the same rollouts, curriculum, evaluation and learner passes; the weights never move"
    )
    if args.model:
        arms_of["control"] += ["grpo.tasks_per_step=1", "grpo.group_size=2", "checkpoint.every_steps=0"]
        control_form = (
            "untouched: lr 0 and 1 task x 2 episodes per step instead of the training batch; evaluated on "
            "the same held-out tasks, samples per task and steps as the trained arm"
        )

    def one(seed: int, kind: str) -> dict:
        t = time.perf_counter()
        recs = _run(args.config, runs / f"seed{seed}-{kind}", seed, model, extra + arms_of[kind], threads)
        train = _curve(recs, "reward_mean")
        arm: dict = {"reward_mean": train, "wall_s": 0.0}
        for m in ("greedy", "sampled"):
            evals = _curve(recs, f"eval/reward_{m}")
            arm[f"eval/reward_{m}"] = evals
            arm[f"heldout_{m}_first"] = evals[0][1] if evals else float("nan")
            arm[f"heldout_{m}_final"] = evals[-1][1] if evals else float("nan")
        arm["heldout_first"] = arm[f"heldout_{args.metric}_first"]
        arm["heldout_final"] = arm[f"heldout_{args.metric}_final"]
        # Health of the held-out episodes at the end, in the mode that defines the gain: a gain
        # bought with broken or rambling episodes would show here.
        for share in ("malformed", "truncated"):
            evals = _curve(recs, f"eval/{args.metric}_{share}")
            arm[f"heldout_{share}_final"] = evals[-1][1] if evals else float("nan")
            arm[f"train_{share}_last5"] = _mean([y for _, y in _curve(recs, f"health/{share}_share")[-5:]])
        arm["heldout_bad_calls_final"], arm["heldout_calls_final"] = _call_errors(
            runs / f"seed{seed}-{kind}", args.metric
        )
        arm["aspects_first"], arm["aspects_final"] = {}, {}
        for part in ASPECTS:
            evals = _curve(recs, f"eval/{args.metric}/{part}")
            arm[f"eval/{args.metric}/{part}"] = evals
            arm["aspects_first"][part] = evals[0][1] if evals else float("nan")
            arm["aspects_final"][part] = evals[-1][1] if evals else float("nan")
        arm["train_first5"] = _mean([y for _, y in train[:5]])
        arm["train_last5"] = _mean([y for _, y in train[-5:]])
        arm["wall_s"] = time.perf_counter() - t
        print(
            f"seed {seed} {kind}: held-out {args.metric} {arm['heldout_first']:.3f} -> {arm['heldout_final']:.3f} "
            f"(malformed {arm['heldout_malformed_final']:.0%}, truncated {arm['heldout_truncated_final']:.0%}), "
            f"train {arm['train_first5']:.3f} -> {arm['train_last5']:.3f} ({arm['wall_s']:.0f} s)",
            flush=True,
        )
        return arm

    jobs = [(seed, kind) for seed in seeds for kind in arms_of]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(jobs, pool.map(lambda j: one(*j), jobs), strict=True))
    results: dict[str, dict] = {}
    for seed in seeds:
        arms = {kind: done[(seed, kind)] for kind in arms_of}
        arms["gain"] = arms["trained"]["heldout_final"] - arms["control"]["heldout_final"]
        arms["gain_greedy"] = (
            arms["trained"]["heldout_greedy_final"] - arms["control"]["heldout_greedy_final"]
        )
        arms["gain_sampled"] = (
            arms["trained"]["heldout_sampled_final"] - arms["control"]["heldout_sampled_final"]
        )
        results[str(seed)] = arms
    import torch
    import transformers

    gains = [results[str(s)]["gain"] for s in seeds]
    report = {
        "benchmark": "learning",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": args.model or "tiny (the config's SFT-warmed model)",
        "control_form": control_form,
        "config": {
            "config": args.config,
            "overrides": extra,
            "model": model,
            "quick": args.quick,
            "jobs": args.jobs,
            "threads_per_run": threads,
        },
        "seeds": seeds,
        "metric": args.metric,
        "gain": _mean(gains),
        "gains": gains,
        "gain_greedy": _mean([results[str(s)]["gain_greedy"] for s in seeds]),
        "gain_sampled": _mean([results[str(s)]["gain_sampled"] for s in seeds]),
        "all_positive": all(g > 0 for g in gains),
        "trained_final": _mean([results[str(s)]["trained"]["heldout_final"] for s in seeds]),
        "control_final": _mean([results[str(s)]["control"]["heldout_final"] for s in seeds]),
        "trained_first": _mean([results[str(s)]["trained"]["heldout_first"] for s in seeds]),
        **{
            f"{kind}_{share}": _mean([results[str(s)][kind][f"heldout_{share}_final"] for s in seeds])
            for kind in arms_of
            for share in ("malformed", "truncated")
        },
        **{
            f"{kind}_{key}": sum(results[str(s)][kind][f"heldout_{key}_final"] for s in seeds)
            for kind in arms_of
            for key in ("bad_calls", "calls")
        },
        "aspects": {
            kind: {
                when: {
                    part: _mean([results[str(s)][kind][f"aspects_{when}"][part] for s in seeds])
                    for part in ASPECTS
                }
                for when in ("first", "final")
            }
            for kind in arms_of
        },
        "wall_s": time.perf_counter() - t0,
        "runs": results,
    }
    (out / "learning.json").write_text(json.dumps(report, indent=1))
    rows = [
        f"| seed | held-out ({args.metric}) start | trained end | control end | gain | gain (greedy) | gain (sampled) "
        "| held-out malformed / truncated, trained | control "
        "| train reward first 5 -> last 5 (trained) | (control) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def per_call(rep: dict, kind: str) -> str:
        bad, n = rep[f"{kind}_bad_calls"], rep[f"{kind}_calls"]
        return f"{bad}/{n} ({bad / n:.1%})" if n else "0/0"

    def shares(arm: dict) -> str:
        return f"{arm['heldout_malformed_final']:.0%} / {arm['heldout_truncated_final']:.0%}"

    for s in seeds:
        r = results[str(s)]
        rows.append(
            f"| {s} | {r['trained']['heldout_first']:.3f} | {r['trained']['heldout_final']:.3f} | "
            f"{r['control']['heldout_final']:.3f} | {r['gain']:+.3f} | {r['gain_greedy']:+.3f} | "
            f"{r['gain_sampled']:+.3f} | {shares(r['trained'])} | {shares(r['control'])} | "
            f"{r['trained']['train_first5']:.3f} -> {r['trained']['train_last5']:.3f} | "
            f"{r['control']['train_first5']:.3f} -> {r['control']['train_last5']:.3f} |"
        )
    rows.append(
        f"\ngain (mean over seeds) **{report['gain']:+.3f}**; held-out ({args.metric}) episodes with a malformed "
        f"call: trained {report['trained_malformed']:.0%}, control {report['control_malformed']:.0%}; truncated: "
        f"trained {report['trained_truncated']:.0%}, control {report['control_truncated']:.0%}; calls that did "
        f"not run, per call written: trained {per_call(report, 'trained')}, control {per_call(report, 'control')}; wall "
        f"{report['wall_s']:.0f} s; load average at start {load0[0]:.1f}, at end {report['machine']['loadavg_end'][0]:.1f}."
    )
    rows += [
        f"\nHeld-out score parts ({args.metric}, mean over seeds), first evaluation -> last:\n",
        "| arm | " + " | ".join(ASPECTS) + " |",
        "|---|" + "---|" * len(ASPECTS),
    ]
    for kind in arms_of:
        a = report["aspects"][kind]
        rows.append(
            f"| {kind} | " + " | ".join(f"{a['first'][p]:.2f} -> {a['final'][p]:.2f}" for p in ASPECTS) + " |"
        )
    rows.append(f"\ncontrol: {control_form}.")
    model_flag = f"--model {args.model} " if args.model else ""
    (out / "learning.md").write_text(
        f"# bench.learning\n\n`python -m bench.learning {model_flag}{'--quick ' if args.quick else ''}` "
        f"on {args.config}\n\n" + "\n".join(rows) + "\n"
    )
    _plot(results, out / "learning.png", args.metric)
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "metric",
                    "gain",
                    "gains",
                    "gain_greedy",
                    "trained_final",
                    "control_final",
                    "trained_malformed",
                    "control_malformed",
                    "trained_truncated",
                    "control_truncated",
                    "trained_bad_calls",
                    "trained_calls",
                    "control_bad_calls",
                    "control_calls",
                    "wall_s",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
