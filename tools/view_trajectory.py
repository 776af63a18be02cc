"""Show episodes from a run's trajectories.jsonl, with what the policy sampled marked.

    python tools/view_trajectory.py RUN_DIR [--step N] [--episode ID] [--limit 3] [--model DIR]

Sampled (trained) tokens are shown between «» (or in green on a terminal); everything else
is environment text rendered by the chat template. Without --model the tokenizer of the
run's policy model (resolved.json) decodes the ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GREEN, RESET = "\033[32m", "\033[0m"


def spans(tokens: list[int], mask: list[int]):
    """Consecutive runs of (mask value, ids)."""
    out: list[tuple[int, list[int]]] = []
    for t, m in zip(tokens, mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(t)
        else:
            out.append((m, [t]))
    return out


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--episode", default=None, help="episode id (e.g. s0t1/3)")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--model", default=None)
    a = p.parse_args()
    run = Path(a.run_dir)
    model = a.model or json.loads((run / "resolved.json").read_text())["policy_model"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    shown = 0
    with open(run / "trajectories.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            t = rec["trajectory"]
            if a.step is not None and rec["step"] != a.step:
                continue
            if a.episode is not None and t["episode_id"] != a.episode:
                continue
            print(f"[step {rec['step']}] " + render(t, tok, sys.stdout.isatty()) + "\n")
            shown += 1
            if shown >= a.limit:
                break
    if not shown:
        sys.exit("no matching trajectories")


if __name__ == "__main__":
    main()
