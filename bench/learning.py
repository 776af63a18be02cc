"""Does trustee make a policy better? Trained against an untouched control, same seeds.

Run:  python -m bench.learning --quick [--out DIR] [--seeds 0,1,2] [--config configs/cpu-tiny.toml]

For each seed, the same run twice through `python -m trustee.run` (the README's main job,
shortened with --quick): once as configured ("trained") and once with learner.lr = 0
("control": the same rollouts, curriculum, evaluation and learner passes, but the weights
never move). Both start from the same SFT-warmed tiny model, built once before the runs.
The figure of merit is the held-out greedy reward (toy: a fixed task set never trained on)
at the end: `gain` = mean over seeds of trained minus control. Writes learning.json
(machine, versions, config, per-seed curves and figures), learning.md (a table) and
learning.png (training and held-out reward per step, trained vs control) into --out
(default: runs/bench-learning, never the committed bench/results unless asked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUICK = [  # a shorter main job: the same model, environment and learner settings
    "grpo.steps=16",
    "eval.every_steps=4",
    "checkpoint.every_steps=0",
]


def _run(config: str, out: Path, seed: int, model: str, extra: list[str]) -> list[dict]:
    sets = [f"seed={seed}", f"model.path={model}", "model.tiny=''", "logging.progress_bar=false", *extra]
    cmd = [sys.executable, "-m", "trustee.run", config, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _curve(recs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in recs if key in r and r[key] == r[key]]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _model(config: str, out: Path) -> str:
    """Build the config's tiny SFT-warmed model once (trustee.run does it on first use)."""
    sys.path.insert(0, str(ROOT))
    from trustee.config import load_config

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


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed, r in results.items():
        for kind, color in (("trained", "tab:blue"), ("control", "tab:gray")):
            for ax, key in zip(axes, ("reward_mean", "eval/reward_greedy"), strict=True):
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
    axes[1].set_title("held-out reward (greedy, fixed tasks)")
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
    ap.add_argument("--config", default="configs/cpu-tiny.toml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--quick", action="store_true", help="16 steps per run (6 runs in under 10 minutes on 2 cores)"
    )
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-learning"))
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both arms")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    model = _model(args.config, out)
    extra = (QUICK if args.quick else []) + list(args.set)
    results: dict[str, dict] = {}
    for seed in seeds:
        arms = {}
        for kind, more in (("trained", []), ("control", ["learner.lr=0"])):
            t = time.perf_counter()
            recs = _run(args.config, out / f"seed{seed}-{kind}", seed, model, extra + more)
            evals = _curve(recs, "eval/reward_greedy")
            train = _curve(recs, "reward_mean")
            arms[kind] = {
                "reward_mean": train,
                "eval/reward_greedy": evals,
                "eval/reward_sampled": _curve(recs, "eval/reward_sampled"),
                "heldout_first": evals[0][1] if evals else float("nan"),
                "heldout_final": evals[-1][1] if evals else float("nan"),
                "train_first5": _mean([y for _, y in train[:5]]),
                "train_last5": _mean([y for _, y in train[-5:]]),
                "wall_s": time.perf_counter() - t,
            }
            print(
                f"seed {seed} {kind}: held-out {arms[kind]['heldout_first']:.3f} -> {arms[kind]['heldout_final']:.3f}, "
                f"train {arms[kind]['train_first5']:.3f} -> {arms[kind]['train_last5']:.3f} "
                f"({arms[kind]['wall_s']:.0f} s)",
                flush=True,
            )
        arms["gain"] = arms["trained"]["heldout_final"] - arms["control"]["heldout_final"]
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
        "config": {"config": args.config, "overrides": extra, "model": model, "quick": args.quick},
        "seeds": seeds,
        "gain": _mean(gains),
        "gains": gains,
        "all_positive": all(g > 0 for g in gains),
        "trained_final": _mean([results[str(s)]["trained"]["heldout_final"] for s in seeds]),
        "control_final": _mean([results[str(s)]["control"]["heldout_final"] for s in seeds]),
        "trained_first": _mean([results[str(s)]["trained"]["heldout_first"] for s in seeds]),
        "wall_s": time.perf_counter() - t0,
        "runs": results,
    }
    (out / "learning.json").write_text(json.dumps(report, indent=1))
    rows = [
        "| seed | held-out start | trained end | control end | gain | train reward first 5 -> last 5 (trained) |",
        "|---|---|---|---|---|---|",
    ]
    for s in seeds:
        r = results[str(s)]
        rows.append(
            f"| {s} | {r['trained']['heldout_first']:.3f} | {r['trained']['heldout_final']:.3f} | "
            f"{r['control']['heldout_final']:.3f} | {r['gain']:+.3f} | "
            f"{r['trained']['train_first5']:.3f} -> {r['trained']['train_last5']:.3f} |"
        )
    rows.append(
        f"\ngain (mean over seeds) **{report['gain']:+.3f}**; wall {report['wall_s']:.0f} s; "
        f"load average at start {load0[0]:.1f}, at end {report['machine']['loadavg_end'][0]:.1f}."
    )
    (out / "learning.md").write_text(
        f"# bench.learning\n\n`python -m bench.learning {'--quick ' if args.quick else ''}` on {args.config}\n\n"
        + "\n".join(rows)
        + "\n"
    )
    _plot(results, out / "learning.png")
    print(json.dumps({k: report[k] for k in ("gain", "gains", "trained_final", "control_final", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
