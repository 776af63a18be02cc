"""How far a killed-and-resumed run lands from an uninterrupted one, with and without batching.

`python -m bench.resume_drift [--steps 4] [--batch 1 8] [--out bench/results/resume_drift.json]`

For each HF-engine batch cap B (engines.policy.max_num_seqs): run the tiny cpu-tiny config
uninterrupted twice (run-to-run noise), then once killed with SIGKILL after step 1 is logged
and resumed with the same command. Compares the final adapters tensor by tensor (max |diff|,
max relative diff, bit-identical or not) and the per-step records. With B = 1 every turn is
decoded alone and keyed sampling makes the sample independent of arrival order, so the runs
are expected to be bit-identical; with B > 1 a row's logits depend in the last bits on which
rows share its batch (padding width, GEMM blocking), so runs can drift apart. Writes JSON with
the machine, versions, config and figures; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _args(out: Path, steps: int, batch: int, model: str) -> list[str]:
    sets = {
        "model.path": model,
        "model.tiny": "''",
        "grpo.steps": steps,
        "grpo.tasks_per_step": 2,
        "grpo.group_size": 4,
        "grpo.filter_zero_variance": "false",
        "rollout.max_turns": 2,
        "rollout.max_tokens_per_turn": 24,
        "engines.policy.max_num_seqs": batch,
        "checkpoint.every_steps": 1,
        "logging.progress_bar": "false",
    }
    args = [sys.executable, "-m", "trustee.run", "configs/cpu-tiny.toml", "--out", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _run(out: Path, steps: int, batch: int, model: str, kill_after: int | None = None) -> bool:
    """Run to the end; with `kill_after`, SIGKILL once after that many logged steps (+0.3 s),
    then restart. Returns whether a kill happened."""
    p = subprocess.Popen(
        _args(out, steps, batch, model), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if kill_after is not None:
        m = out / "metrics.jsonl"
        while p.poll() is None and not (m.exists() and len(m.read_text().splitlines()) >= kill_after):
            time.sleep(0.05)
        time.sleep(0.3)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        p.wait()
        _run(out, steps, batch, model)
        return killed
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}): {err.decode()[-2000:]}")
    return False


def _compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    max_abs = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    max_rel = max(float(((ta[k] - tb[k]).abs() / ta[k].abs().clamp(min=1e-12)).max()) for k in ta)
    scale = max(float(ta[k].abs().max()) for k in ta)
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward_mean", "learn/loss", "tokens_mean")
    same_steps = sum(all(x.get(k) == y.get(k) for k in keys) for x, y in zip(ma, mb, strict=True))
    return {
        "bit_identical": all(bool((ta[k] == tb[k]).all()) for k in ta),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "max_abs_weight": scale,
        "steps_with_identical_records": same_steps,
        "steps": len(ma),
        "engine_mean_batch": [x.get("engine/mean_batch") for x in ma],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--model", default=str(ROOT / ".cache" / "tiny-test"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume_drift.json"))
    a = ap.parse_args()
    import torch
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in a.batch:
            base = Path(tmp) / f"b{b}"
            t0 = time.perf_counter()
            _run(base / "ref1", a.steps, b, a.model)
            _run(base / "ref2", a.steps, b, a.model)
            killed = _run(base / "killed", a.steps, b, a.model, kill_after=2)
            rows.append(
                {
                    "batch": b,
                    "rerun_vs_ref": _compare(base / "ref1", base / "ref2"),
                    "resumed_vs_ref": _compare(base / "ref1", base / "killed"),
                    "killed": killed,
                    "wall_s": time.perf_counter() - t0,
                }
            )
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "config": {
            "steps": a.steps,
            "tasks_per_step": 2,
            "group_size": 4,
            "max_tokens_per_turn": 24,
            "model": a.model,
        },
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(
        "| batch | rerun bit-identical | rerun max abs diff | resumed bit-identical | resumed max abs diff | max abs weight |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        x, y = r["rerun_vs_ref"], r["resumed_vs_ref"]
        print(
            f"| {r['batch']} | {x['bit_identical']} | {x['max_abs_diff']:.3g} | {y['bit_identical']} | "
            f"{y['max_abs_diff']:.3g} | {y['max_abs_weight']:.3g} |"
        )


if __name__ == "__main__":
    main()
