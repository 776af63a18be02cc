"""configs/cpu-vllm.toml for 2 steps: the colocated shape through two real vLLM CPU engines.

Checks what the config exists to show: every step both engines slept and woke (counted by the
engines themselves), the adapter was hot-swapped (the policy engine's version), sampling after
the wake used the new adapter version, and the simulator's prefix-cache hit rate comes from vLLM's
own scheduler counters. Two engines start (about 30 s each on 2 idle cores), so this is the
longest test of the default suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import vllm  # noqa: F401

    NO_VLLM = ""
except Exception as e:  # noqa: BLE001 - any import failure means the backend is absent
    NO_VLLM = f"import vllm failed: {e!r}"


@pytest.mark.vllm
@pytest.mark.skipif(bool(NO_VLLM), reason=NO_VLLM or "vllm present")
def test_cpu_vllm_colocated_two_steps(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    sets = {
        "model.path": str(tiny_model_dir),
        "model.tiny": "''",
        "grpo.steps": "2",
        "grpo.tasks_per_step": "2",
        "grpo.group_size": "2",
        "rollout.max_turns": "2",
        "rollout.max_tokens_per_turn": "64",
        "logging.progress_bar": "false",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run(
        [sys.executable, "-m", "trustee.run", "configs/cpu-vllm.toml", "--out", str(out), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1500,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [0, 1]
    for i, rec in enumerate(recs):
        assert rec["groups_trained"] >= 1
        for role in ("policy", "simulator"):
            # The engines' own counters: one sleep and one wake per step, each timed.
            assert rec[f"engine/{role}/sleeps"] == i + 1 and rec[f"engine/{role}/wakes"] == i + 1
            assert rec[f"time/sleep_{role}_s"] >= 0 and rec[f"time/wake_{role}_s"] >= 0
        assert rec["time/sync_s"] > 0 and rec["time/sleep_s"] > 0 and rec["time/wake_s"] > 0
        # LoRA hot-swapped every step: the policy engine's version follows the learner.
        assert rec["policy_version"] == i + 1 and rec["engine/simulator/version"] == 0
        # Prefix-cache figures from vLLM's scheduler stats (queries counted per step).
        assert rec["engine/simulator/prefix_queries"] > 0
        assert 0.0 <= rec["engine/simulator/prefix_hit_rate"] <= 1.0
        # ...and the simulator's own view of them (sim/*: per step, from the same counters).
        assert 0.0 <= rec["sim/prefix_hit_rate"] <= 1.0 and rec["sim/requests"] > 0
        assert rec["sim/latency_p95_s"] >= rec["sim/latency_p50_s"] > 0.0 and "sim/retries/task" in rec
    # Sampling after the wake used the adapter of the step before: every sampled token of step 1
    # carries version 1 (the adapter pushed after step 0's update).
    seen = set()
    for line in (out / "trajectories.jsonl").read_text().splitlines():
        rec = json.loads(line)
        t = rec["trajectory"]
        sampled = {v for v, m in zip(t["versions"], t["loss_mask"], strict=True) if m}
        if sampled:  # an episode the simulator failed before the policy spoke has no sampled token
            assert sampled == {rec["step"]}, (rec["step"], sampled)
            seen.add(rec["step"])
    assert seen == {0, 1}
    assert (out / "adapter" / "adapter_config.json").exists()
