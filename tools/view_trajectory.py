"""Show episodes from a run's trajectories.jsonl, with what the policy sampled marked.

    python tools/view_trajectory.py RUN_DIR [--step N|last|all] [--episode ID] [--limit 3] [--model DIR]
                                    [--eval greedy|sampled] [--malformed]

By default the episodes of the run's last logged step are shown (the trained policy's
behaviour); `--step 0` shows the untrained policy's. Sampled (trained) tokens are shown
between «» (or in green on a terminal); everything else is environment text rendered by the
chat template. Without --model the tokenizer of the run's policy model (resolved.json)
decodes the ids. `--eval MODE` shows the held-out evaluation's episodes of that mode
(eval_trajectories.jsonl) instead of the training ones; `--malformed` only episodes with a
call that did not run. For plots and a browsable page: python -m trustee.report RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trustee.report import spans

GREEN, RESET = "\033[32m", "\033[0m"


def render(traj: dict, tok, color: bool) -> str:
    parts = []
    for m, ids in spans(traj["tokens"], traj["loss_mask"]):
        text = tok.decode(ids, skip_special_tokens=False)
        parts.append((GREEN + text + RESET) if (m and color) else (f"«{text}»" if m else text))
    c = traj["counters"]
    head = (
        f"=== {traj['episode_id']}  status={traj['status']}  reward={traj['reward']:.3g}  parts={traj['parts']}\n"
        f"    turns={c['turns']} tool_calls={c['tool_calls']} format_errors={c['format_errors']} "
        f"schema_errors={c['schema_errors']} sim_retries={c['sim_retries']} tokens={len(traj['tokens'])} "
        f"sampled={sum(traj['loss_mask'])}"
    )
    if traj.get("error"):
        head += f"\n    error: {traj['error']}"
    return head + "\n" + "".join(parts)


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a killed run may leave a cut last line
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--step", default="last", help="a step number, 'last' (default) or 'all'")
    p.add_argument("--episode", default=None, help="episode id (e.g. s0t1/3)")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--model", default=None, help="tokenizer directory (default: the run's policy model)")
    p.add_argument(
        "--eval", default=None, choices=["greedy", "sampled"], help="held-out episodes of this mode instead"
    )
    p.add_argument("--malformed", action="store_true", help="only episodes with a call that did not run")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    if not run.is_dir():
        return _fail(f"run directory {run} does not exist")
    trajs = run / ("eval_trajectories.jsonl" if a.eval else "trajectories.jsonl")
    if not trajs.exists():
        return _fail(f"{run} has no {trajs.name} (not a run directory, or logging.trajectories = 'none')")
    if a.step not in ("last", "all") and not a.step.isdigit():
        return _fail(f"--step {a.step!r}: give a step number, 'last' or 'all'")
    recs = [r for r in _records(trajs) if a.eval is None or r.get("mode") == a.eval]
    if not recs:
        return _fail(f"{trajs} holds no episodes yet")
    step = max(r["step"] for r in recs) if a.step == "last" else None if a.step == "all" else int(a.step)
    chosen = [
        r
        for r in recs
        if (step is None or r["step"] == step)
        and (a.episode is None or r["trajectory"]["episode_id"] == a.episode)
        and (not a.malformed or _malformed(r["trajectory"]))
    ][: a.limit]
    if not chosen:
        steps = sorted({r["step"] for r in recs})
        return _fail(f"no matching episodes (steps logged: {steps[0]}..{steps[-1]})")
    model = a.model
    if model is None:
        resolved = run / "resolved.json"
        if not resolved.exists():
            return _fail(f"{run} has no resolved.json; pass --model DIR (the policy's tokenizer)")
        model = json.loads(resolved.read_text())["policy_model"]
    if not Path(model).exists():
        return _fail(f"tokenizer directory {model} not found; pass --model DIR")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    for rec in chosen:
        print(f"[step {rec['step']}] " + render(rec["trajectory"], tok, sys.stdout.isatty()) + "\n")
    return 0


def _malformed(traj: dict) -> bool:
    c = traj["counters"]
    return bool(c["format_errors"] + c["schema_errors"] + c.get("unknown_tools", 0))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
