"""Exact, visible resume and clean interruption, end to end through `python -m trustee.run`.

The bit-exact claims run the HF engine with `engines.policy.max_num_seqs = 1`: each turn is
then decoded alone (no padding, batch of one), so its logits do not depend on which other
episodes were in flight, and keyed sampling (`HFEngine.keyed_sampling`) makes the sampled
token independent of arrival order. With larger batches the logits of a row can differ in the
last bits between batch compositions; `bench/resume_drift.py`-style measurements are reported
in the issue notes instead of being asserted here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def _args(tiny_model_dir, out, steps=STEPS, *extra):
    sets = {
        "model.path": str(tiny_model_dir),
        "model.tiny": "''",
        "grpo.steps": str(steps),
        "grpo.tasks_per_step": "2",
        "grpo.group_size": "2",
        "grpo.filter_zero_variance": "false",
        "rollout.max_turns": "2",
        "rollout.max_tokens_per_turn": "16",
        "engines.policy.max_num_seqs": "1",
        "checkpoint.every_steps": "1",
        "eval.every_steps": "0",
        "logging.progress_bar": "false",
    }
    args = [sys.executable, "-m", "trustee.run", "configs/cpu-tiny.toml", "--out", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    for e in extra:
        args += ["--set", e]
    return args


def _run(tiny_model_dir, out, steps=STEPS, *extra):
    return subprocess.run(_args(tiny_model_dir, out, steps, *extra), capture_output=True, text=True, cwd=ROOT)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter_bytes(out):
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


# What must match an uninterrupted run exactly (timings and memory excluded).
SAME = ("reward_mean", "tokens_mean", "learn/loss", "learn/grad_norm", "learn/step", "policy_version")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = _run(tiny_model_dir, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith("new run 'cpu-tiny': 3 steps")
    return out


def _kill_trial(tiny_model_dir, out, rng: random.Random, reference: Path) -> int:
    """Start the run, SIGKILL it at a random point, restart; repeat until it finishes.
    Returns the number of kills."""
    kills = 0
    for attempt in range(8):
        p = subprocess.Popen(
            _args(tiny_model_dir, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if attempt < 2:
            # A random point: after a random number of logged steps, plus a random delay (mid
            # step, mid checkpoint, mid export, or during start-up when no step is logged yet).
            target = rng.randrange(0, STEPS)
            delay = rng.uniform(0.0, 2.0)
            t_end = time.monotonic() + 300
            while p.poll() is None and time.monotonic() < t_end:
                done = len(_metrics(out)) if (out / "metrics.jsonl").exists() else 0
                if done >= target:
                    break
                time.sleep(0.05)
            time.sleep(delay)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        stdout, stderr = p.communicate(timeout=600)
        if p.returncode == 0:
            first = stdout.splitlines()[0]
            assert first.startswith(("new run", "resuming run", "run 'cpu-tiny' is already finished")), first
            break
        assert p.returncode == -signal.SIGKILL, stderr[-3000:]
    else:
        pytest.fail("the run did not finish after 8 starts")
    return kills


def _check_like_reference(out, reference):
    recs = _metrics(out)
    assert [r["step"] for r in recs] == list(range(STEPS)), "each step exactly once"
    ref = _metrics(reference)
    for a, b in zip(recs, ref, strict=True):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}, a["step"]
    assert _adapter_bytes(out) == _adapter_bytes(reference), (
        "final adapter differs from the uninterrupted run"
    )
    assert json.loads((out / "adapter" / "trustee_step.json").read_text())["step"] == STEPS - 1
    # trajectories: the same episodes, each once
    n = sum(1 for _ in (out / "trajectories.jsonl").open())
    assert n == sum(1 for _ in (reference / "trajectories.jsonl").open())


def _trials(n, seed, tmp_path, tiny_model_dir, reference):
    rng = random.Random(seed)
    total = 0
    for i in range(n):
        out = tmp_path / f"trial{i}"
        total += _kill_trial(tiny_model_dir, out, rng, reference)
        _check_like_reference(out, reference)
    assert total >= n  # every trial was really interrupted at least once


def test_sigkill_at_random_points_resumes_bit_exact(tmp_path, tiny_model_dir, reference):
    _trials(3, 1, tmp_path, tiny_model_dir, reference)


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bit_exact_many(tmp_path, tiny_model_dir, reference):
    _trials(10, 2, tmp_path, tiny_model_dir, reference)


def test_sigint_mid_step_checkpoints_closes_and_resumes(tmp_path, tiny_model_dir, reference):
    out = tmp_path / "run"
    p = subprocess.Popen(
        _args(tiny_model_dir, out, STEPS, "checkpoint.every_steps=0"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t_end = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and _metrics(out)) and time.monotonic() < t_end:
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    # Mid step 1 (step 0 logged; no checkpoint yet: every_steps = 0 means only at the end).
    assert not (out / "checkpoints").exists()
    from trustee.interrupt import alive, children_of

    kids = children_of(p.pid)  # at least the watchdog; engine processes with other backends
    assert kids
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "SIGINT: stopping: finishing the current step" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT after ") and "run the same command to resume" in last, last
    done = int(last.split("after ")[1].split(" of")[0])
    assert done >= 1
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists() and ckpts[-1].name == f"step-{done - 1:06d}"
    assert json.loads((out / "adapter" / "trustee_step.json").read_text())["step"] == done - 1
    t_end = time.monotonic() + 20
    while any(alive(k) for k in kids) and time.monotonic() < t_end:
        time.sleep(0.1)
    assert not any(alive(k) for k in kids), "a child of the run outlived it"
    # The same command resumes and ends like the uninterrupted run.
    r = subprocess.run(
        _args(tiny_model_dir, out, STEPS, "checkpoint.every_steps=0"),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith(f"resuming run 'cpu-tiny' from step-{done - 1:06d}")
    _check_like_reference(out, reference)


def test_finished_run_says_so_and_changed_config_is_refused(tmp_path, tiny_model_dir, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    config_before = (out / "config.json").read_bytes()
    r = _run(tiny_model_dir, out, STEPS)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert (
        first.startswith("run 'cpu-tiny' is already finished: 3 of 3 steps done") and "grpo.steps=" in first
    )
    # An unsafe change is shown as a diff and refused; nothing is written.
    r = _run(tiny_model_dir, out, 6, "learner.lora_rank=16")
    assert r.returncode == 2
    assert "learner.lora_rank: 8 -> 16" in r.stderr and "grpo.steps: 3 -> 6" in r.stderr
    assert "learner.lora_rank cannot change mid-run" in r.stderr
    assert (out / "config.json").read_bytes() == config_before
    # checkpoint.resume = 'never' refuses a directory that holds a checkpoint.
    r = _run(tiny_model_dir, out, STEPS, "checkpoint.resume=never")
    assert r.returncode == 2 and "checkpoint.resume = 'never'" in r.stderr


def test_truncate_logs_drops_later_steps_and_torn_lines(tmp_path):
    from trustee.resume import truncate_logs

    lines = [json.dumps({"step": s, "x": s}) + "\n" for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 5, "x"')
    (tmp_path / "trajectories.jsonl").write_text("".join(lines[:3]))
    dropped = truncate_logs(tmp_path, 2)
    assert dropped == {"metrics.jsonl": 3, "trajectories.jsonl": 0}
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])


def test_reaper_kills_children_when_the_main_process_is_killed(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from trustee.interrupt import start_reaper\n"
        "start_reaper()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    from trustee.interrupt import alive

    p = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    child = int(p.stdout.readline())
    time.sleep(1.5)  # the watchdog records descendants every 0.5 s
    assert alive(child)
    p.kill()
    p.wait()
    t_end = time.monotonic() + 20
    while alive(child) and time.monotonic() < t_end:
        time.sleep(0.1)
    assert not alive(child), f"child {child} survived kill -9 of its parent"


def test_plan_resume_allows_only_safe_changes(tmp_path):
    import msgspec

    from trustee.checkpoint import save_checkpoint
    from trustee.config import load_config
    from trustee.resume import ResumeRefused, export_kind, plan_resume

    cfg = load_config(None, ["grpo.steps=10"])
    assert plan_resume(cfg, tmp_path).headline().startswith("new run 'trustee': 10 steps")
    save_checkpoint(tmp_path, 3, {}, {"config": json.loads(msgspec.json.encode(cfg))})
    plan = plan_resume(load_config(None, ["grpo.steps=12", "logging.log_every=5"]), tmp_path)
    assert plan.done_steps == 4 and not plan.finished
    assert plan.headline().startswith(
        "resuming run 'trustee' from step-000003 (steps 0-3 done): 8 of 12 steps left"
    )
    assert "grpo.steps 10 -> 12" in plan.headline() and "logging.log_every 1 -> 5" in plan.headline()
    done = load_config(None, ["grpo.steps=4"])
    plan = plan_resume(done, tmp_path)  # every step done, but no policy was published after the last
    assert plan.trained and not plan.finished
    assert "finished its 4 steps but its final policy was not published" in plan.headline()
    kind = export_kind(done.learner.mode)
    (tmp_path / kind).mkdir()
    (tmp_path / kind / "trustee_step.json").write_text('{"step": 3}')
    assert plan_resume(done, tmp_path).finished
    assert plan_resume(done, tmp_path).headline().startswith("run 'trustee' is already finished")
    with pytest.raises(ResumeRefused) as e:
        plan_resume(
            load_config(
                None, ["grpo.steps=10", "learner.lr=0.1", "environment.kind=toy", "environment.reward=exact"]
            ),
            tmp_path,
        )
    msg = str(e.value)
    assert "learner.lr: 1e-06 -> 0.1" in msg and 'environment.kind: "simulated" -> "toy"' in msg
    assert "cannot change mid-run" in msg and "another --out" in msg


def test_a_run_killed_while_publishing_its_final_policy_publishes_it_on_restart(
    tmp_path, tiny_model_dir, reference
):
    """Killed after the last checkpoint was written but before the policy of that step was
    published (RUN/adapter still the previous step's): the same command exports it from the
    checkpoint instead of saying 'already finished' and leaving the old policy."""
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    (out / "adapter").unlink()  # as if the kill landed before the final export's swap
    shutil.rmtree(out / "exports")
    before = (out / "metrics.jsonl").read_text()
    r = _run(tiny_model_dir, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith("run 'cpu-tiny' finished its 3 steps but its final policy")
    assert json.loads((out / "adapter" / "trustee_step.json").read_text())["step"] == STEPS - 1
    assert _adapter_bytes(out) == _adapter_bytes(reference)
    assert (out / "metrics.jsonl").read_text() == before  # no step was run again
    r = _run(tiny_model_dir, out)
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("run 'cpu-tiny' is already finished")
