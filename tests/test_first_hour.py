"""A GPU user's first hour, checked on CPU.

configs/1gpu-lora.toml's CPU twin (the `--set` lines of docs/gpu.md, read from the doc) trains two
steps; every key its metrics.jsonl holds is documented in docs/run-dir.md; a dry run on the
finished run still prints the plan and says a start would do nothing; a new run continues the
trained adapter (model.adapter); the dry run refuses a KV cache that cannot hold one sequence and
runs the simulator-tokenizer check a real start runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from glossary import undocumented

ROOT = Path(__file__).resolve().parents[1]
GPU_DOC = ROOT / "docs" / "gpu.md"

# What the test adds to the doc's twin to make it small (the doc's twin runs the tiny model as is).
SMALL = [
    "grpo.tasks_per_step=2",
    "grpo.group_size=2",
    "grpo.filter_zero_variance=false",  # every step reaches the learner, so its learn/* keys are logged
    "grpo.kl_metric=true",
    "rollout.max_turns=2",
    "rollout.max_tokens_per_turn=24",
    "eval.every_steps=1",
    "eval.heldout_tasks=2",
    "eval.heldout_samples=1",
    "logging.progress_bar=false",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trustee.run", *args], capture_output=True, text=True, cwd=ROOT
    )


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def twin_overrides() -> list[str]:
    """The `--set` values of the CPU-twin command in docs/gpu.md (the block that runs 1gpu-lora.toml
    with backend hf)."""
    block = next(
        b
        for b in GPU_DOC.read_text().split("```bash")[1:]
        if "configs/1gpu-lora.toml" in b and "backend=hf" in b
    ).split("```")[0]
    return [v.strip("'\"") for v in re.findall(r"--set\s+('[^']*'|\S+)", block)]


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("twin") / "run"
    sets = [s for s in twin_overrides() if not s.startswith(("model.path=", "model.tiny"))]
    sets += [f"model.path={tiny_model_dir}", "model.tiny=''", *SMALL]
    r = _run("configs/1gpu-lora.toml", "--out", str(out), *_sets(sets))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_docs_twin_is_the_gpu_config_on_cpu():
    sets = dict(s.split("=", 1) for s in twin_overrides())
    assert sets["engines.policy.backend"] == "hf" and sets["placement.mode"] == "sync"
    assert sets["placement.policy_gpus"] == "[]" and sets["placement.learner_gpus"] == "[]"
    assert sets["grpo.steps"] == "2"


def test_cpu_twin_of_1gpu_lora_trains_two_steps_on_the_arithmetic_tasks(twin):
    recs = [r for r in _records(twin) if not r.get("final_eval")]
    assert [r["step"] for r in recs] == [0, 1]
    assert [r["policy_version"] for r in recs] == [1.0, 2.0]  # one update per step reached the engine
    assert all(r["groups_trained"] == 2.0 and r["status/error"] == 0.0 for r in recs)
    assert all("learn/loss" in r for r in recs)
    tasks = {json.loads(x)["id"] for x in (ROOT / "examples/arithmetic/tasks.jsonl").read_text().splitlines()}
    trajs = [json.loads(x)["trajectory"] for x in (twin / "trajectories.jsonl").read_text().splitlines()]
    assert trajs and {t["task_id"] for t in trajs} <= tasks
    base = json.loads((twin / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and (Path(base) / "config.json").exists()


def test_every_metric_key_of_a_two_step_run_is_in_the_run_dir_doc(twin):
    keys = {k for r in _records(twin) for k in r}
    assert {
        "learn/kl",
        "eval/reward_greedy",
        "final_eval",
        "adv/abs_mean",
    } <= keys  # the run logs these groups
    missing = undocumented(keys, (ROOT / "docs" / "run-dir.md").read_text())
    assert not missing, f"metrics.jsonl keys not documented in docs/run-dir.md: {missing}"


def test_the_glossary_check_catches_an_undocumented_key():
    text = "| `learn/loss` | x |\n| `engine/<role>/requests` | y |\n| `curriculum/success/<aspect>=<value>` | z |"
    assert undocumented({"learn/loss", "engine/policy/requests", "curriculum/success/n_tools=1"}, text) == []
    assert undocumented({"learn/new_thing", "engine/policy/other"}, text) == [
        "engine/policy/other",
        "learn/new_thing",
    ]


def test_dry_run_on_a_finished_run_prints_the_plan_and_says_it_would_do_nothing(twin, tiny_model_dir):
    sets = [s for s in twin_overrides() if not s.startswith(("model.path=", "model.tiny"))]
    sets += [f"model.path={tiny_model_dir}", "model.tiny=''", *SMALL]
    r = _run("configs/1gpu-lora.toml", "--out", str(twin), "--dry-run", *_sets(sets))
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stdout and "memory     per device and phase" in r.stdout
    assert "dry run: a real start would do nothing: the run is finished" in r.stdout
    # more steps: the same directory resumes, and the dry run says from where
    r = _run("configs/1gpu-lora.toml", "--out", str(twin), "--dry-run", *_sets(sets + ["grpo.steps=3"]))
    assert r.returncode == 0, r.stderr
    assert "dry run: a real start would resume from step-000001: 1 of 3 steps left" in r.stdout
    assert "memory     per device and phase" in r.stdout


def test_a_new_run_continues_a_trained_adapter(twin, tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    # The twin's adapter with every lora_B set to random values (a fresh adapter has B = 0): what a
    # trained adapter looks like, whatever the two random-model steps learnt.
    start = tmp_path / "trained-adapter"
    shutil.copytree(twin / "adapter", start)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: (torch.randn(v.shape, generator=gen) * 0.05).to(v.dtype) if "lora_B" in k else v
        for k, v in load_file(start / "adapter_model.safetensors").items()
    }
    save_file(tensors, start / "adapter_model.safetensors")
    sets = [s for s in twin_overrides() if not s.startswith(("model.path=", "model.tiny"))]
    sets += [f"model.path={tiny_model_dir}", "model.tiny=''", *SMALL, "eval.every_steps=0"]
    sets += ["grpo.steps=1", "learner.lr=0", f"model.adapter={start}"]
    out = tmp_path / "from-adapter"
    r = _run("configs/1gpu-lora.toml", "--out", str(out), *_sets(sets))
    assert r.returncode == 0, r.stderr[-3000:]
    # lr 0: the exported adapter is the one it started from, tensor for tensor (a fresh adapter
    # has B = 0 and a new random A, so this holds only if the given one was loaded)
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors.keys() == b.keys() and all(torch.equal(tensors[k], b[k]) for k in b)
    # the engine sampled with the adapter from step 0: it took it before the first update
    assert _records(out)[0]["policy_version"] == 2.0


def test_an_adapter_that_does_not_match_the_learner_is_refused_at_dry_run(twin):
    r = _run(
        "configs/1gpu-lora.toml",
        "--dry-run",
        "--out",
        str(twin.parent / "x"),
        *_sets([f"model.adapter={twin / 'adapter'}", "learner.lora_rank=4"]),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has r = 16 but learner.lora_rank = 4" in r.stderr and "set learner.lora_rank = 16" in r.stderr
    r = _run(
        "configs/1gpu-lora.toml", "--dry-run", *_sets(["model.adapter=/nonexistent", "learner.mode=full"])
    )
    assert r.returncode == 2 and "model.adapter" in r.stderr and "learner.mode = 'full'" in r.stderr


def _plan_totals(stdout: str) -> list[float]:
    rows = [x for x in stdout.splitlines() if x.strip().startswith("GPU")]
    return [
        float(x.split()[x.split().index(ph) + 1])
        for x in rows
        for ph in ("rollout", "learning")
        if f" {ph} " in x
    ]


def test_1gpu_lora_dry_run_fits_one_24_gb_gpu_in_every_phase():
    r = _run("configs/1gpu-lora.toml", "--dry-run")
    assert r.returncode == 0, r.stderr
    totals = _plan_totals(r.stdout)
    assert len(totals) == 2 and max(totals) < 23.5
    comment = (ROOT / "configs" / "1gpu-lora.toml").read_text().split("\nname =")[0]
    for t in totals:  # the opening comment carries the figures the plan prints
        assert f"{t:.2f} of 23.5" in comment, t


def test_a_vllm_share_below_its_weights_is_refused_with_the_numbers_and_the_fix():
    r = _run("configs/1gpu-qlora.toml", "--dry-run", "--set", "engines.policy.gpu_memory_utilization=0.3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = next(x for x in r.stderr.splitlines() if "engines.policy.gpu_memory_utilization = 0.3" in x)
    assert "0.3 x 23.5 = 7.05 GiB" in line and "weights take 7.49" in line and "leaves 0.00 GiB" in line
    assert "needs 1.12 GiB" in line and "raise engines.policy.gpu_memory_utilization to at least" in line
    r = _run("configs/1gpu-qlora.toml", "--dry-run", "--set", "engines.policy.kv_cache_gib=0.5")
    assert r.returncode == 2 and "engines.policy.kv_cache_gib = 0.5" in r.stderr and ">= 1.12" in r.stderr


def test_dry_run_runs_the_simulator_tokenizer_check_of_a_real_start(tmp_path, tiny_model_dir):
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "config.json").write_text(
        (tiny_model_dir / "config.json").read_text()
    )  # weights' shapes, no tokenizer
    r = _run("configs/1gpu-qlora.toml", "--dry-run", "--set", f"simulator.model_path={sim}")
    assert r.returncode == 2
    assert f"simulator.model_path = '{sim}'" in r.stderr and "holds no tokenizer" in r.stderr
    # not on this machine at all: left to the real start, and said so by name
    r = _run("configs/1gpu-qlora.toml", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dry run: skipped simulator tokenizer" in r.stdout and "dry run: skipped GPU count" in r.stdout
    assert "dry run: skipped loading the weights" in r.stdout
