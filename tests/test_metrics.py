"""RunLog: one JSON line per step and per trajectory, flushed as written."""

from __future__ import annotations

import json

from trustee.config import LoggingConfig
from trustee.metrics import RunLog
from trustee.types import Trajectory


def test_metrics_and_trajectories_are_jsonl(tmp_path):
    log = RunLog(tmp_path, LoggingConfig(progress_bar=False), total_steps=2, run_name="t")
    log.step(0, {"reward_mean": 0.5, "loss": float("nan")})
    t = Trajectory(
        episode_id="e",
        task_id="t",
        tokens=[1, 2],
        loss_mask=[0, 1],
        logprobs=[0.0, -1.0],
        versions=[-1, 0],
        prompt_len=1,
    )
    log.trajectories(0, [t])
    # Written before close: a run killed now keeps these records.
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["step"] == 0 and rec["reward_mean"] == 0.5 and rec["loss"] is None
    line = json.loads((tmp_path / "trajectories.jsonl").read_text())
    assert line["trajectory"]["tokens"] == [1, 2] and line["step"] == 0
    log.close()
