"""The run report and summary: the three-line verdict on known data, every plot drawn, the
page self-contained, and rendered by a real headless browser that decodes every plot."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trustee.report import build_page, spans
from trustee.summary import hack_signs, read_run, summarize

ROOT = Path(__file__).resolve().parents[1]


def make_run(
    path: Path,
    rewards_by_step: list[list[float]],
    *,
    model: str = "",
    extra: bool = True,
    malformed: list[float] | None = None,
    truncated: list[float] | None = None,
) -> Path:
    """A run directory in the shape trustee.train writes (synthetic values, real formats).
    `malformed` / `truncated`: the health shares per step (default 0.05 and 0.0)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(path / "metrics.jsonl", "w") as m, open(path / "trajectories.jsonl", "w") as t:
        for step, rewards in enumerate(rewards_by_step):
            rec = {
                "step": step,
                "elapsed_s": 3.0 * step,
                "episodes": float(len(rewards)),
                "reward_mean": sum(rewards) / len(rewards),
                "status/ok": float(len(rewards)),
                "status/truncated": 0.0,
                "curriculum/difficulty": 1.0 + 3 * step,
                "time/rollout_s": 2.0,
                "time/learn_s": 1.0,
                "learn/loss": rng.uniform(-0.1, 0.1),
                "learn/kl": 0.01,
                "learn/entropy": 2.0,
                "learn/grad_norm": 0.5,
                "learn/is_ratio_min": 0.9,
                "learn/is_ratio_mean": 1.0,
                "learn/is_ratio_max": 1.1,
                "learn/clip_frac": 0.0,
                "learn/tokens_per_s": 500.0,
                "format_errors": 1.0,
                "policy_version": float(step + 1),
                "health/malformed_share": malformed[step] if malformed else 0.05,
                "health/truncated_share": truncated[step] if truncated else 0.0,
                "health/format_errors_per_episode": 0.03,
                "health/turns_mean": 1.3,
            }
            if extra:
                rec["sched/lag_mean"] = 0.5
                if step % 2 == 0:  # the held-out evaluation's keys (trustee/rollout/heldout.py)
                    for mode, v in (("greedy", 0.1 * step), ("sampled", 0.05 * step)):
                        rec[f"eval/reward_{mode}"] = v
                        rec[f"eval/{mode}/exact"] = v / 2
                        rec[f"eval/{mode}/tool_names"] = 0.5
                        rec[f"eval/{mode}_ok"] = 0.9
                        rec[f"eval/{mode}_malformed"] = 0.1
                        rec[f"eval/{mode}_truncated"] = 0.05
                        rec[f"eval/{mode}_episodes"] = 32.0  # a count: not drawn with the rewards
            m.write(json.dumps(rec) + "\n")
            for i, r in enumerate(rewards):
                toks = list(range(10, 30))
                mask = [0] * 8 + [1] * 6 + [0] * 2 + [1] * 4
                traj = {
                    "episode_id": f"s{step}t0/{i}",
                    "task_id": "t",
                    "tokens": toks,
                    "loss_mask": mask,
                    "logprobs": [-0.5 * x for x in mask],
                    "versions": [step if x else -1 for x in mask],
                    "prompt_len": 8,
                    "reward": r,
                    "parts": {"exact": r},
                    "counters": {
                        "turns": 2,
                        "user_turns": 0,
                        "tool_calls": 1,
                        "format_errors": 0,
                        "schema_errors": 0,
                        "unknown_tools": 0,
                        "tool_errors": 0,
                        "sim_retries": 0,
                        "truncated_results": 0,
                        "wall_s": 0.1,
                    },
                    "status": "ok",
                    "error": "",
                    "messages": [
                        {"role": "user", "content": "What is 2 plus 2?"},
                        {"role": "assistant", "content": "4", "tool_calls": []},
                    ],
                    "knobs": {"n_tools": float(1 + i % 3), "difficulty": 1.0},
                }
                t.write(json.dumps({"step": step, "trajectory": traj}) + "\n")
    (path / "resolved.json").write_text(
        json.dumps({"run_dir": str(path), "policy_model": model, "device": "cpu"})
    )
    (path / "config.json").write_text(json.dumps({"name": "synthetic", "curriculum": {"high": 0.5}}))
    return path


def test_summary_verdicts(tmp_path):
    rising = make_run(tmp_path / "up", [[0.0, 0.1, 0.0, 0.1]] * 4 + [[0.9, 1.0, 0.8, 1.0]] * 4)
    lines = summarize(read_run(rising))
    assert len(lines) == 4
    assert lines[0].startswith("reward   0.050 (steps 0-1, n=8) -> 0.925 (steps 6-7, n=8): +0.875 ±")
    # the sampled held-out reward first, then the greedy one
    assert lines[1] == (
        "eval     eval/reward_sampled 0.000 -> 0.300 (+0.300); eval/reward_greedy 0.000 -> 0.600 (+0.600) "
        "(step 0 -> step 6)"
    )
    assert lines[2].startswith(
        "health   episodes with a malformed call 5% -> 5%, truncated episodes 0% -> 0% (steps 0-1 -> steps 6-7)"
    )
    assert lines[3].startswith("verdict  yes")
    falling = make_run(
        tmp_path / "down", [[1.0, 0.9, 1.0, 0.8]] * 4 + [[0.0, 0.1, 0.0, 0.2]] * 4, extra=False
    )
    lines = summarize(read_run(falling))
    assert lines[3].startswith("verdict  no") and "trustee.eval --run-dir" in lines[1]
    flat = make_run(tmp_path / "flat", [[0.0, 1.0, 0.0, 1.0]] * 8)
    assert summarize(read_run(flat))[3].startswith("verdict  unclear")
    one = make_run(tmp_path / "one", [[0.5, 0.5]])
    lines = summarize(read_run(one))
    assert lines[2] == "health   too few steps to compare early and late"
    assert lines[3].startswith("verdict  unknown")


def _hacked_shape() -> tuple[list[list[float]], list[float], list[float]]:
    """Issue 26's main-job run, step by step from its table: (steps, mean reward, share of
    episodes with a malformed call, truncated share) 0-9: 0.10, 5%, 0%; 10-19: 0.17, 8%, 1%;
    20-24: 0.29, 46%, 26%; 25-29: 0.34, 56%, 38% (32 episodes a step)."""
    rng = random.Random(1)
    bands = [(10, 0.10, 0.05, 0.0), (10, 0.17, 0.08, 0.01), (5, 0.29, 0.46, 0.26), (5, 0.34, 0.56, 0.38)]
    rewards, malformed, truncated = [], [], []
    for n, mean, mal, trunc in bands:
        for _ in range(n):
            noise = [rng.uniform(-0.1, 0.1) for _ in range(16)]
            rewards.append([mean + e for e in noise] + [mean - e for e in noise])  # mean exactly `mean`
            malformed.append(mal)
            truncated.append(trunc)
    return rewards, malformed, truncated


def test_summary_calls_a_reward_that_rises_with_malformed_episodes_suspect(tmp_path):
    rewards, malformed, truncated = _hacked_shape()
    run = read_run(make_run(tmp_path / "hacked", rewards, malformed=malformed, truncated=truncated))
    lines = summarize(run)
    assert lines[0].startswith("reward   0.100 (steps 0-4, n=160) -> 0.340 (steps 25-29, n=160)")
    assert lines[2].startswith(
        "health   episodes with a malformed call 5% -> 56%, truncated episodes 0% -> 38% (steps 0-4 -> steps 25-29)"
    )
    verdict = lines[3]
    assert verdict.startswith("verdict  suspect: the training reward rose by "), verdict
    assert (
        "but episodes with a malformed call went from 5% to 56% and truncated episodes went from 0% to 38%"
        in verdict
    )
    assert "yes" not in verdict
    signs = hack_signs(run.metrics)
    assert [x.key for x in signs] == ["health/malformed_share", "health/truncated_share"]
    # The report's summary box carries the same verdict.
    assert "verdict  suspect" in build_page(run, episodes=0)
    # The same rise with healthy episodes is a plain yes; a small drift (0% -> 6%) is no sign.
    calm = make_run(tmp_path / "calm", rewards, truncated=[0.06 * (s >= 25) for s in range(30)])
    assert summarize(read_run(calm))[3].startswith("verdict  yes")
    # Malformed episodes that multiply while the reward falls: a failing run, not a hack.
    falling = read_run(
        make_run(tmp_path / "falling", rewards[::-1], malformed=malformed, truncated=truncated)
    )
    assert hack_signs(falling.metrics) == [] and summarize(falling)[3].startswith("verdict  no")


def test_training_warns_when_the_reward_rises_with_malformed_episodes(tmp_path, caplog):
    """The loop's per-step check (`_Run.warn_health`) on the hacked shape: one warning per
    share, at the step where it first shows, and none on a healthy run."""
    from trustee.train import _Run

    rewards, malformed, truncated = _hacked_shape()

    def steps(run, mal, trunc):
        for step, rs in enumerate(rewards):
            record = {
                "reward_mean": sum(rs) / len(rs),
                "health/malformed_share": mal[step],
                "health/truncated_share": trunc[step],
            }
            run.warn_health(step, record)

    hacked = _Run.__new__(_Run)
    hacked.health, hacked.warned, hacked.run_dir = [], set(), tmp_path
    with caplog.at_level("WARNING", logger="trustee.train"):
        steps(hacked, malformed, truncated)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert (
        "episodes with a malformed call went from" in warnings[0]
        and "may be gaming the reward" in warnings[0]
    )
    assert "truncated episodes went from" in warnings[1]
    caplog.clear()
    healthy = _Run.__new__(_Run)
    healthy.health, healthy.warned, healthy.run_dir = [], set(), tmp_path
    with caplog.at_level("WARNING", logger="trustee.train"):
        steps(healthy, [0.05] * 30, [0.02] * 30)
    assert caplog.records == []


def test_summary_cli_missing_dir_is_a_clean_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "trustee.summary", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_spans_group_consecutive_mask_values():
    assert spans([1, 2, 3, 4, 5], [0, 0, 1, 1, 0]) == [(0, [1, 2]), (1, [3, 4]), (0, [5])]


def test_page_is_self_contained_with_every_plot_and_highlighted_tokens(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", [[0.0, 0.5, 1.0, 0.0]] * 6, model=str(tiny_model_dir))
    page = build_page(read_run(run), episodes=3)
    ids = set(re.findall(r"id=plot-([a-z_]+)", page))
    assert {
        "reward",
        "eval",
        "eval_parts",
        "health",
        "difficulty",
        "phases",
        "staleness",
        "logprob_gap",
        "aspects",
        "throughput",
    } <= ids
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing fetched from the network
    assert page.count("<div class=episode>") == 3 and page.count("<span class=s>") >= 6


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_headless_chromium_renders_every_plot(tmp_path, tiny_model_dir):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium package (apt-get install -y chromium)")
    run = make_run(tmp_path / "run", [[0.0, 0.5, 1.0, 0.0]] * 6, model=str(tiny_model_dir))
    r = subprocess.run(
        [sys.executable, "-m", "trustee.report", str(run)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    page = run / "report.html"
    n_plots = page.read_text().count("<img class=plot")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    # The page's script counted, after load, the plots the browser decoded (naturalWidth > 0).
    assert f'data-plots="{n_plots}"' in body.group(0) and f'data-plots-loaded="{n_plots}"' in body.group(0)
    widths = [int(w) for w in re.findall(r'data-width="(\d+)"', dom)]
    assert len(widths) == n_plots >= 9 and min(widths) > 200
    # The evaluation's rewards and score parts, and the health shares, are drawn on a 0-1 axis
    # (the episode counts are not drawn with them: 32 would have flattened the rewards).
    for pid in ("eval", "eval_parts", "health"):
        img = re.search(rf"<img [^>]*id=\"plot-{pid}\"[^>]*>", dom)
        assert img, pid
        assert 'data-ymin="0"' in img.group(0) and 'data-ymax="1"' in img.group(0), img.group(0)[:300]
