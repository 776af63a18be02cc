"""What a new user sees at start: --dry-run runs every start-up check a real start runs
(hardware aside) and says which it skipped; the plan does not list engines a run never
builds; resolved.json holds absolute paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec

from trustee.config import load_config, resolve

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trustee.run", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def _finished_main_job(clone: Path) -> None:
    """A clone where the README's main job has finished: configs/cpu-tiny.toml and a complete
    runs/cpu-tiny as `plan_resume` reads it (the last step's checkpoint with the main job's
    config, the adapter tagged with that step; no weights: a dry run never loads them)."""
    from trustee.checkpoint import save_checkpoint

    (clone / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "cpu-tiny.toml", clone / "configs" / "cpu-tiny.toml")
    cfg = load_config(clone / "configs" / "cpu-tiny.toml")
    run = clone / "runs" / "cpu-tiny"
    last = cfg.grpo.steps - 1
    save_checkpoint(run, last, {}, {"config": json.loads(msgspec.json.encode(cfg))})
    (run / "adapter").mkdir()
    (run / "adapter" / "trustee_step.json").write_text(json.dumps({"step": last, "run": cfg.name}))


def test_the_suite_after_the_readme_main_job(tmp_path, _own_run_root):
    """The README's order: the main job first (runs/cpu-tiny finished), then the tests. The
    suite's own run root keeps the tests' runs away from the user's, so the dry runs the tests
    make still plan a new run; without it they hit the finished run (or refuse a changed config)."""
    from trustee.paths import RUNS_ENV

    clone = tmp_path / "clone"
    _finished_main_job(clone)
    user_env = {k: v for k, v in os.environ.items() if k != RUNS_ENV}
    # The user's own command sees the user's finished run ...
    r = _run("configs/cpu-tiny.toml", "--dry-run", cwd=clone, env=user_env)
    assert r.returncode == 0 and "is already finished" in r.stdout, r.stdout + r.stderr
    variant = ("--set", "environment.kind=simulated", "--set", "environment.reward=judge")
    r = _run("configs/cpu-tiny.toml", "--dry-run", *variant, cwd=clone, env=user_env)
    assert r.returncode == 2 and "a run with a different config" in r.stderr, r.stderr
    # ... and the suite's dry runs, made from the same clone, do not.
    assert os.environ[RUNS_ENV] == str(_own_run_root) and not _own_run_root.is_relative_to(clone)
    r = _run("configs/cpu-tiny.toml", "--dry-run", cwd=clone)
    assert r.returncode == 0 and "every start-up check passed" in r.stdout, r.stdout + r.stderr
    assert f"new run 'cpu-tiny': 30 steps -> {_own_run_root / 'cpu-tiny'}" in r.stdout
    r = _run("configs/cpu-tiny.toml", "--dry-run", *variant, cwd=clone)
    assert r.returncode == 0 and "simulator  /" in r.stdout, r.stdout + r.stderr
    assert (clone / "runs" / "cpu-tiny" / "adapter" / "trustee_step.json").exists()


def test_dry_run_refuses_what_the_real_start_refuses(tmp_path):
    # A 4-GPU learner with one rank: the start refuses it on any machine, so the dry run does.
    r = _run(
        "configs/bfcl-envtuning.toml",
        "--dry-run",
        "--set",
        f"model.path={tmp_path}",
        "--set",
        "placement.learner_ranks=1",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "placement.learner_gpus = [0, 1, 2, 3]" in r.stderr and "one FSDP2 rank per GPU" in r.stderr
    # The model is not on this machine: like the GPU count, a check left to the real start.
    r = _run("configs/bfcl-envtuning.toml", "--dry-run", "--set", f"model.path={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "dry run: skipped model directory" in r.stdout and "dry run: skipped GPU count" in r.stdout


def test_dry_run_says_what_it_skipped(tmp_path, tiny_model_dir):
    r = _run("configs/cpu-tiny.toml", "--dry-run", "--set", "model.path=" + str(tmp_path / "not-built-yet"))
    assert r.returncode == 0, r.stderr
    assert "every start-up check passed" in r.stdout
    assert "dry run: skipped model directory (the tiny model is built at" in r.stdout
    # A GPU config on this machine: the GPU count is the one check left to the real start.
    r = _run(
        "configs/cpu-tiny.toml",
        "--dry-run",
        *("--set", f"model.path={tiny_model_dir}", "--set", "model.tiny=''"),
        *(
            "--set",
            "placement.policy_gpus=[0]",
            "--set",
            "placement.learner_gpus=[0]",
            "--set",
            "placement.mode=colocate",
        ),
    )
    assert r.returncode == 0, r.stderr
    assert "dry run: skipped GPU count (1 needed; checked on the real start)" in r.stdout


def test_dry_run_checks_the_environment_files(tmp_path):
    r = _run(
        "configs/cpu-tiny.toml",
        "--dry-run",
        *("--set", "environment.kind=python", "--set", "environment.reward=custom"),
        *("--set", f"environment.factory={tmp_path}/missing.py:make_env"),
    )
    assert r.returncode == 2
    assert "error: environment: environment.factory" in r.stderr and "not found" in r.stderr


def test_plan_lists_the_simulator_only_when_the_environment_uses_it():
    r = _run("configs/cpu-tiny.toml", "--dry-run")
    assert "simulator  none (this environment does not use one)" in r.stdout
    r = _run(
        "configs/cpu-tiny.toml",
        "--dry-run",
        "--set",
        "environment.kind=simulated",
        "--set",
        "environment.reward=judge",
    )
    assert "simulator  /" in r.stdout and "(hf on CPU)" in r.stdout


def test_resolved_paths_are_absolute(tmp_path):
    res = resolve(load_config(ROOT / "configs" / "cpu-tiny.toml"), "runs/x")
    for p in (res.run_dir, res.policy_model, res.simulator_model):
        assert Path(p).is_absolute(), p
    assert json.loads(json.dumps(res.policy_model)).endswith(".cache/models/tiny-toy-sft")


def test_a_missing_tiny_simulator_is_built_and_warmed_on_the_toy_teacher(tmp_path, tiny_model_dir):
    from trustee.config import ConfigError
    from trustee.run import _model_checks

    cfg = load_config(
        ROOT / "configs" / "cpu-sim.toml",
        [
            f"model.path={tiny_model_dir}",
            f"simulator.model_path={tmp_path / 'sim'}",
            "simulator.tiny_sft_steps=3",
        ],
    )
    notes = _model_checks(cfg, build=False)
    assert (
        any("tiny simulator (test) will be built at" in n for n in notes) and not (tmp_path / "sim").exists()
    )
    notes = _model_checks(cfg, build=True)
    report = json.loads((tmp_path / "sim" / "trustee_sft.json").read_text())
    assert report["data"] == "simulator" and report["steps"] == 3
    assert any("SFT-warmed the simulator 3 steps" in n for n in notes)
    assert not (tmp_path / "sim.partial").exists()
    # the policy model is left alone (it existed); a second start builds nothing
    assert not any("SFT-warmed" in n for n in _model_checks(cfg, build=True))
    # without a simulator path there is nothing to build: refused with the fix
    try:
        load_config(ROOT / "configs" / "cpu-sim.toml", ["simulator.model_path=''"])
    except ConfigError as e:
        assert "simulator.tiny_sft_steps" in str(e) and "simulator.model_path" in str(e)
    else:
        raise AssertionError("simulator.tiny_sft_steps without simulator.model_path was accepted")


def test_a_tiny_model_built_from_another_recipe_is_refused(tmp_path, tiny_model_dir):
    """A cached tiny model warmed for fewer steps than the config asks (an older README job's
    model) is not silently reused: the start names the field, both values and the fix."""
    from trustee.run import tiny_recipe_problem

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(ROOT / "configs" / "cpu-tiny.toml", [f"model.path={model}"])
    problem = tiny_recipe_problem(cfg)  # built, never warmed: 0 steps against the config's
    assert f"model.tiny_sft_steps = {cfg.model.tiny_sft_steps}" in problem and "built with 0" in problem
    (model / "trustee_sft.json").write_text(json.dumps({"steps": cfg.model.tiny_sft_steps}))
    assert tiny_recipe_problem(cfg) == ""
    other = load_config(ROOT / "configs" / "cpu-tiny.toml", [f"model.path={model}", "model.tiny=demo"])
    assert "model.tiny = 'demo'" in tiny_recipe_problem(other) and "built with 'test'" in tiny_recipe_problem(
        other
    )
    stamp = json.loads((model / "trustee_tiny.json").read_text())
    (model / "trustee_tiny.json").write_text(json.dumps({**stamp, "format": 1}))  # an older trustee's build
    assert "built by an older trustee (format 1" in tiny_recipe_problem(cfg)
    (model / "trustee_tiny.json").write_text(json.dumps(stamp))
    r = _run(
        "configs/cpu-tiny.toml",
        "--dry-run",
        "--set",
        f"model.path={model}",
        "--set",
        "model.tiny_sft_steps=7",
    )
    assert r.returncode != 0 and "model.tiny_sft_steps = 7" in r.stderr and "Traceback" not in r.stderr
