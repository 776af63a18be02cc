"""tools/view_trajectory.py: last step by default, clean errors (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_report import make_run

ROOT = Path(__file__).resolve().parents[1]


def _view(*args: str) -> subprocess.CompletedProcess:
    # A script's sys.path starts at tools/; put this checkout's `trustee` first.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "tools/view_trajectory.py", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_default_is_the_last_step_and_errors_are_clean(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", [[0.0, 1.0]] * 3, model=str(tiny_model_dir))
    r = _view(str(run))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[step 2]") == 2 and "[step 0]" not in r.stdout and "«" in r.stdout
    r = _view(str(run), "--step", "0", "--limit", "1")
    assert r.stdout.count("[step 0]") == 1
    r = _view(str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _view(str(run), "--step", "9")
    assert r.returncode == 2 and "steps logged: 0..2" in r.stderr


def test_eval_episodes_and_the_malformed_filter(tmp_path, tiny_model_dir):
    import json

    run = make_run(tmp_path / "run", [[0.0, 1.0]] * 2, model=str(tiny_model_dir))
    r = _view(str(run), "--eval", "sampled")
    assert r.returncode == 2 and "no eval_trajectories.jsonl" in r.stderr and "Traceback" not in r.stderr
    recs = [json.loads(x) for x in (run / "trajectories.jsonl").read_text().splitlines()]
    broken = dict(recs[0]["trajectory"], episode_id="broken")
    broken["counters"] = dict(broken["counters"], format_errors=1)
    lines = [
        {"step": 2, "mode": "greedy", "trajectory": recs[1]["trajectory"]},
        {"step": 2, "mode": "sampled", "trajectory": broken},
        {"step": 2, "mode": "sampled", "trajectory": recs[1]["trajectory"]},
    ]
    (run / "eval_trajectories.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = _view(str(run), "--eval", "sampled", "--limit", "9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[step 2]") == 2 and "=== broken" in r.stdout
    r = _view(str(run), "--eval", "sampled", "--malformed", "--limit", "9")
    assert r.stdout.count("[step 2]") == 1 and "=== broken" in r.stdout
    r = _view(str(run), "--malformed")  # training episodes: none of make_run's is malformed
    assert r.returncode == 2 and "no matching episodes" in r.stderr
