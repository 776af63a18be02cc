"""A short training run through the CLI, for tests of environments that plug into a run (the
custom Python environment, the MCP environment): two steps of two groups of two on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_two_steps(config: str, out: Path, model: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    sets = {
        "model.path": str(model),
        "model.tiny": "''",
        "grpo.steps": 2,
        "grpo.tasks_per_step": 2,
        "grpo.group_size": 2,
        "grpo.filter_zero_variance": "false",
        "rollout.max_turns": 2,
        "rollout.max_tokens_per_turn": 24,
        "logging.progress_bar": "false",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run(
        [sys.executable, "-m", "trustee.run", config, "--out", str(out), *args, *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trajs = [json.loads(x)["trajectory"] for x in (out / "trajectories.jsonl").read_text().splitlines()]
    return recs, trajs
