"""`python -m trustee.summary RUN_DIR`: did training help? Three lines.

Owns `read_run` (a run directory's metrics, trajectories and resolved plan, tolerant of a
run that is still going or was killed) and `summarize` (the three lines): the training
reward early vs late with its standard error, the evaluation (in-run `eval/*` metrics,
first vs last, or the `bfcl_eval.json` that `trustee.eval --run-dir` writes), and a verdict.
The verdict is "yes" only when the late reward beats the early one by more than two
standard errors of the difference. Called by the CLI and by `trustee.report`; it reads
files only (no model, no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORED = ("ok", "truncated")


@dataclass
class RunData:
    """What a run directory holds. `metrics`: one dict per logged step (in order);
    `trajectories`: (step, trajectory dict) per episode; missing files give empty lists."""

    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    eval_report: dict[str, Any] | None = None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut
            continue
    return out


def read_run(run_dir: str | Path, *, trajectories: bool = True) -> RunData:
    """Load a run directory; raises FileNotFoundError naming what is missing."""
    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory {p} does not exist")
    if not (p / "metrics.jsonl").exists():
        raise FileNotFoundError(
            f"{p} has no metrics.jsonl: not a trustee run directory, or the run has not finished a step"
        )
    run = RunData(path=p, metrics=_jsonl(p / "metrics.jsonl"))
    if trajectories:
        run.trajectories = [(int(r["step"]), r["trajectory"]) for r in _jsonl(p / "trajectories.jsonl")]
    for name in ("resolved", "config"):
        f = p / f"{name}.json"
        if f.exists():
            setattr(run, name, json.loads(f.read_text()))
    f = p / "bfcl_eval.json"
    if f.exists():
        run.eval_report = json.loads(f.read_text())
    return run


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def reward_windows(run: RunData) -> tuple[list[int], list[int], list[float], list[float]]:
    """(early steps, late steps, early rewards, late rewards): the first and last quarter of
    the logged steps (1 to 5 steps each), rewards per scored episode when trajectories were
    saved, else the per-step reward means."""
    steps = [int(m["step"]) for m in run.metrics if isinstance(m.get("reward_mean"), int | float)]
    if len(steps) < 2:
        return steps, steps, [], []
    k = max(1, min(5, len(steps) // 4))
    early, late = steps[:k], steps[-k:]
    by_step: dict[int, list[float]] = {}
    for s, t in run.trajectories:
        if t.get("status") in SCORED:
            by_step.setdefault(s, []).append(float(t["reward"]))
    if by_step:
        return (
            early,
            late,
            [r for s in early for r in by_step.get(s, [])],
            [r for s in late for r in by_step.get(s, [])],
        )
    means = {
        int(m["step"]): float(m["reward_mean"])
        for m in run.metrics
        if isinstance(m.get("reward_mean"), int | float)
    }
    return early, late, [means[s] for s in early], [means[s] for s in late]


def _steps_text(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def eval_line(run: RunData) -> str:
    keys = sorted(
        {k for m in run.metrics for k, v in m.items() if k.startswith("eval/") and isinstance(v, int | float)}
    )
    if keys:
        key = next((k for k in keys if "reward" in k or "accuracy" in k), keys[0])
        pts = [(int(m["step"]), float(m[key])) for m in run.metrics if isinstance(m.get(key), int | float)]
        if len(pts) >= 2:
            (s0, v0), (s1, v1) = pts[0], pts[-1]
            return f"eval     {key} {v0:.3f} (step {s0}) -> {v1:.3f} (step {s1}), {v1 - v0:+.3f}"
        return f"eval     {key} {pts[0][1]:.3f} at step {pts[0][0]} (one evaluation: nothing to compare)"
    if run.eval_report is not None:
        summ = run.eval_report.get("summary", {})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in list(summ.items())[:3])
        return f"eval     trained policy (bfcl_eval.json): {shown or 'no summary'}; evaluate the base model the same way to compare"
    return (
        f"eval     none in this run; compare base and trained policy with "
        f"`python -m trustee.eval CONFIG` and `python -m trustee.eval --run-dir {run.path}`"
    )


def summarize(run: RunData) -> list[str]:
    """The three lines: reward early vs late, evaluation, verdict."""
    early, late, a, b = reward_windows(run)
    if not a or not b:
        n = len(run.metrics)
        return [
            f"reward   {n} step(s) logged with a reward: too few to compare early and late",
            eval_line(run),
            "verdict  unknown: train longer (at least 2 steps with scored episodes)",
        ]
    (m0, se0), (m1, se1) = _mean_se(a), _mean_se(b)
    diff = m1 - m0
    se = math.sqrt(se0**2 + se1**2) if math.isfinite(se0) and math.isfinite(se1) else float("nan")
    noise = f"±{2 * se:.3f} (2 s.e.)" if math.isfinite(se) else "no error estimate (one value per window)"
    line1 = (
        f"reward   {m0:.3f} ({_steps_text(early)}, n={len(a)}) -> {m1:.3f} ({_steps_text(late)}, n={len(b)}): "
        f"{diff:+.3f} {noise}"
    )
    if not math.isfinite(se) or se == 0.0:
        verdict = (
            "verdict  unclear: no spread to judge the change against"
            if diff == 0 or not math.isfinite(se)
            else (
                f"verdict  {'yes' if diff > 0 else 'no'}: reward {'rose' if diff > 0 else 'fell'} with no spread in either window"
            )
        )
    elif diff > 2 * se:
        verdict = f"verdict  yes: the training reward rose by {diff / se:.1f} standard errors"
    elif diff < -2 * se:
        verdict = f"verdict  no: the training reward fell by {-diff / se:.1f} standard errors"
    else:
        verdict = (
            f"verdict  unclear: the change ({diff / se:+.1f} s.e.) is within noise; train longer or evaluate"
        )
    return [line1, eval_line(run), verdict]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trustee.summary", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run directory (runs/<name>)")
    a = p.parse_args(argv)
    try:
        run = read_run(a.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summarize(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
