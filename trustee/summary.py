"""`python -m trustee.summary RUN_DIR`: did training help? Four lines.

Owns `read_run` (a run directory's metrics, trajectories and resolved plan, tolerant of a
run that is still going or was killed), `summarize` (the four lines): the training reward
early vs late with its standard error, the held-out evaluation (in-run `eval/*` metrics,
sampled then greedy, first vs last, or the `bfcl_eval.json` that `trustee.eval --run-dir`
writes), the episodes' health early vs late (`health/*`: shares of episodes with a malformed
call and of truncated ones), and a verdict; and `hack_signs`, the health shares that at least
doubled while the reward rose. The verdict is "yes" only when the late reward beats the early
one by more than two standard errors of the difference and no health share rose with it; a
reward that rises while malformed or truncated episodes multiply is how a gamed reward looks,
and the verdict says so. Called by the CLI, by `trustee.report`, and by the training loop (its
closing lines, and a warning in the log on every step that shows the signs); it reads files
and metric records only (no model, no torch).
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
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
    run = RunData(path=p, metrics=read_jsonl(p / "metrics.jsonl"))
    if trajectories:
        run.trajectories = [(int(r["step"]), r["trajectory"]) for r in read_jsonl(p / "trajectories.jsonl")]
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
    steps = _training_steps(run.metrics)
    if len(steps) < 2:
        return steps, steps, [], []
    early, late = _windows(steps)
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


def _windows(steps: list[int]) -> tuple[list[int], list[int]]:
    """The first and last quarter of `steps`, 1 to 5 steps each."""
    k = max(1, min(5, len(steps) // 4))
    return steps[:k], steps[-k:]


# The health shares (docs/run-dir.md), each with the words the summary uses for it.
HEALTH_SHARES = (
    ("health/malformed_share", "episodes with a malformed call"),
    ("health/truncated_share", "truncated episodes"),
)
HACK_FACTOR = 2.0  # a health share that at least doubles ...
HACK_MIN_RISE = 0.10  # ... and grows by at least this much (so 0% -> 3% is not a sign) ...
HACK_MIN_STEPS = 8  # ... over at least this many steps (two a window: one step's 32 episodes are noisy)


@dataclass(frozen=True)
class HackSign:
    """A health share that rose with the reward: `early` and `late` are its window means."""

    key: str
    label: str
    early: float
    late: float

    def text(self) -> str:
        return f"{self.label} went from {self.early:.0%} to {self.late:.0%}"


def _window_mean(metrics: list[dict[str, Any]], key: str, steps: list[int]) -> float | None:
    want = set(steps)
    xs = [
        float(m[key])
        for m in metrics
        if m.get("step") in want and isinstance(m.get(key), int | float) and math.isfinite(m[key])
    ]
    return sum(xs) / len(xs) if xs else None


def _training_steps(metrics: list[dict[str, Any]]) -> list[int]:
    return [
        int(m["step"])
        for m in metrics
        if isinstance(m.get("reward_mean"), int | float) and math.isfinite(m["reward_mean"])
    ]


def health_windows(metrics: list[dict[str, Any]]) -> list[tuple[str, str, float, float]]:
    """(key, label, early, late) of each health share the run logged, over the same windows
    as the reward (per-step means)."""
    steps = _training_steps(metrics)
    if len(steps) < 2:
        return []
    early, late = _windows(steps)
    out = []
    for key, label in HEALTH_SHARES:
        a, b = _window_mean(metrics, key, early), _window_mean(metrics, key, late)
        if a is not None and b is not None:
            out.append((key, label, a, b))
    return out


def hack_signs(metrics: list[dict[str, Any]]) -> list[HackSign]:
    """The health shares that at least doubled (by HACK_FACTOR, and by HACK_MIN_RISE at
    least) from the first steps to the last while the mean training reward rose: a policy
    that games its reward (names the right tool, then rambles until the turn limit) shows
    these. Empty when the reward did not rise, nothing doubled, or fewer than HACK_MIN_STEPS
    steps are logged. `metrics`: step records in order (each with `step`, `reward_mean` and
    `health/*`)."""
    steps = _training_steps(metrics)
    if len(steps) < HACK_MIN_STEPS:
        return []
    early, late = _windows(steps)
    r0, r1 = _window_mean(metrics, "reward_mean", early), _window_mean(metrics, "reward_mean", late)
    if r0 is None or r1 is None or r1 <= r0:
        return []
    return [
        HackSign(key, label, a, b)
        for key, label, a, b in health_windows(metrics)
        if b >= HACK_FACTOR * a and b - a >= HACK_MIN_RISE
    ]


def health_line(run: RunData) -> str:
    rows = health_windows(run.metrics)
    if not rows:
        if len(_training_steps(run.metrics)) < 2:
            return "health   too few steps to compare early and late"
        return "health   not logged by this run (no health/* metrics)"
    early, late = _windows(_training_steps(run.metrics))
    shares = ", ".join(f"{label} {a:.0%} -> {b:.0%}" for _, label, a, b in rows)
    extra = []
    for key, label in (("health/format_errors_per_episode", "format errors"), ("health/turns_mean", "turns")):
        a, b = _window_mean(run.metrics, key, early), _window_mean(run.metrics, key, late)
        if a is not None and b is not None:
            extra.append(f"{label} {a:.2f} -> {b:.2f}")
    per_episode = f"; per episode: {', '.join(extra)}" if extra else ""
    return f"health   {shares} ({_steps_text(early)} -> {_steps_text(late)}){per_episode}"


def _steps_text(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def eval_line(run: RunData) -> str:
    """The held-out evaluation, first vs last: the sampled reward first (the policy as it acts
    and is trained), then the greedy one (which jumps when a small shift flips an argmax)."""
    keys = sorted(
        {k for m in run.metrics for k, v in m.items() if k.startswith("eval/") and isinstance(v, int | float)}
    )
    if keys:
        shown = [k for k in ("eval/reward_sampled", "eval/reward_greedy") if k in keys] or [
            next((k for k in keys if "reward" in k or "accuracy" in k), keys[0])
        ]
        texts, span = [], ""
        for key in shown:
            pts = [
                (int(m["step"]), float(m[key])) for m in run.metrics if isinstance(m.get(key), int | float)
            ]
            if len(pts) >= 2:
                (s0, v0), (s1, v1) = pts[0], pts[-1]
                texts.append(f"{key} {v0:.3f} -> {v1:.3f} ({v1 - v0:+.3f})")
                span = span or f" (step {s0} -> step {s1})"
            else:
                texts.append(
                    f"{key} {pts[0][1]:.3f} at step {pts[0][0]} (one evaluation: nothing to compare)"
                )
        return f"eval     {'; '.join(texts)}{span}"
    if run.eval_report is not None:
        summ = run.eval_report.get("summary", {})
        shown_report = ", ".join(f"{k} {v:.3f}" for k, v in list(summ.items())[:3])
        return f"eval     trained policy (bfcl_eval.json): {shown_report or 'no summary'}; evaluate the base model the same way to compare"
    return (
        f"eval     none in this run; compare base and trained policy with "
        f"`python -m trustee.eval CONFIG` and `python -m trustee.eval --run-dir {run.path}`"
    )


def summarize(run: RunData) -> list[str]:
    """The four lines: reward early vs late, evaluation, health, verdict."""
    early, late, a, b = reward_windows(run)
    if not a or not b:
        n = len(run.metrics)
        return [
            f"reward   {n} step(s) logged with a reward: too few to compare early and late",
            eval_line(run),
            health_line(run),
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
    untrained = next(
        (
            m["untrained_steps"]
            for m in reversed(run.metrics)
            if isinstance(m.get("untrained_steps"), int | float)
        ),
        0,
    )
    if untrained:
        line1 += f"; {int(untrained)} step(s) trained nothing (no reward variance)"
    rose = ""
    if not math.isfinite(se) or se == 0.0:
        if diff == 0 or not math.isfinite(se):
            verdict = "unclear: no spread to judge the change against"
        elif diff > 0:
            rose = "reward rose with no spread in either window"
        else:
            verdict = "no: reward fell with no spread in either window"
    elif diff > 2 * se:
        rose = f"the training reward rose by {diff / se:.1f} standard errors"
    elif diff < -2 * se:
        verdict = f"no: the training reward fell by {-diff / se:.1f} standard errors"
    else:
        verdict = f"unclear: the change ({diff / se:+.1f} s.e.) is within noise; train longer or evaluate"
    if rose:
        signs = hack_signs(run.metrics)
        verdict = (
            f"suspect: {rose}, but {' and '.join(x.text() for x in signs)}: a policy that games its "
            f"reward looks like this; read the late episodes (python tools/view_trajectory.py {run.path} "
            f"--step {late[-1]})"
            if signs
            else f"yes: {rose}"
        )
    return [line1, eval_line(run), health_line(run), f"verdict  {verdict}"]


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
