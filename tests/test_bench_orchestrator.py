"""bench/orchestrator.py runs as a command and reports what it says: the median of its
interleaved runs per level, every run kept, and a cost breakdown whose parts add up to the
measured time. (Speed itself is the benchmark's business, not a test's: nothing here asserts
a rate.)"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_orchestrator_reports_the_median_of_interleaved_runs(tmp_path):
    # a subprocess: the benchmark pins its process to one core
    cmd = [sys.executable, "-m", "bench.orchestrator", "--quick", "--inflight", "16,64", "--repeats", "3"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rep = json.loads((tmp_path / "orchestrator.json").read_text())
    assert [lv["inflight_episodes"] for lv in rep["levels"]] == [16, 64]
    for lv in rep["levels"]:
        runs = [r["turns_per_s"] for r in lv["runs"]]
        assert len(runs) == 3 and all(r > 0 for r in runs)
        assert lv["turns_per_s"] == round(statistics.median(runs), 1)
        assert lv["turns_per_s_min"] == min(runs) and lv["turns_per_s_max"] == max(runs)
        # the peak reached the level: 8-episode groups, so inflight // 8 groups at once
        assert lv["peak_inflight_groups"] == lv["inflight_episodes"] // 8
    # no level at 512: the headline is the middle level's
    assert rep["turns_per_s"] == rep["levels"][1]["turns_per_s"]
    prof = rep["profile"]
    # the real trajectory carries its tool list in its prompt: hundreds of tokens, not a toy
    assert prof["trajectory_tokens"] > 300
    parts = prof["us_per_turn"]
    assert all(v >= 0 for v in parts.values())
    assert 0 < prof["loop_free_us_per_turn"]
    # the parts add up to the measured time unless a difference was clipped at zero
    total = sum(parts.values())
    assert total >= prof["measured_us_per_turn"] - 0.1
    assert (tmp_path / "orchestrator.md").exists()


def test_orchestrator_help_does_not_run():
    done = subprocess.run(
        [sys.executable, "-m", "bench.orchestrator", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--repeats" in done.stdout
    assert "run 1/" not in done.stdout  # nothing was measured
