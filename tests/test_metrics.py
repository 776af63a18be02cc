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


def _traj(i: int, n_tokens: int = 50) -> Trajectory:
    return Trajectory(
        episode_id=f"s0t0/{i}",
        task_id="t",
        tokens=[1] * n_tokens,
        loss_mask=[0] * n_tokens,
        logprobs=[0.0] * n_tokens,
        versions=[-1] * n_tokens,
        prompt_len=n_tokens,
    )


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_trajectories_all_sampled_none_and_the_size_cap(tmp_path):
    trajs = [_traj(i) for i in range(200)]
    for mode, frac in (("all", 0.1), ("sampled", 0.25), ("none", 0.1)):
        d = tmp_path / mode
        log = RunLog(d, LoggingConfig(progress_bar=False, trajectories=mode, trajectories_fraction=frac),
                     total_steps=1, run_name="t")
        log.trajectories(0, trajs)
        log.close()
        n = len(_lines(d / "trajectories.jsonl"))
        if mode == "all":
            assert n == 200
        elif mode == "sampled":
            assert 25 <= n <= 75  # ~50 of 200, chosen by a hash of the episode id
            # The same episodes are chosen every time (not the run's RNG).
            again = RunLog(tmp_path / "again", LoggingConfig(progress_bar=False, trajectories=mode,
                           trajectories_fraction=frac), total_steps=1, run_name="t")
            again.trajectories(0, trajs)
            again.close()
            assert _lines(tmp_path / "again" / "trajectories.jsonl") == _lines(d / "trajectories.jsonl")
        else:
            assert n == 0 and not (d / "trajectories.jsonl").exists()
    # The cap: lines stop before the file would pass it; the rest are counted in the step record.
    d = tmp_path / "cap"
    line_bytes = len(_lines(tmp_path / "all" / "trajectories.jsonl")[0]) + 1
    cap_mb = 10.5 * line_bytes / 1e6
    log = RunLog(d, LoggingConfig(progress_bar=False, trajectories_max_mb=cap_mb), total_steps=1, run_name="t")
    log.trajectories(0, trajs[:30])
    log.step(0, {"reward_mean": 1.0})
    log.close()
    assert len(_lines(d / "trajectories.jsonl")) == 10
    assert json.loads(_lines(d / "metrics.jsonl")[0])["log/trajectories_dropped"] == 20


def test_log_every_and_elapsed_continue_after_resume(tmp_path):
    log = RunLog(tmp_path, LoggingConfig(progress_bar=False, log_every=3), total_steps=7, run_name="t",
                 elapsed_s=100.0)
    for s in range(7):
        log.step(s, {"reward_mean": float(s)})
    log.close()
    recs = [json.loads(x) for x in _lines(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [2, 5, 6]  # every 3rd step, and the last
    assert all(r["elapsed_s"] >= 100.0 for r in recs)  # a resumed run's clock continues


def test_progress_bar_shows_keys_a_training_step_writes(tmp_path, capsys):
    # The keys a trained step's record carries (train._Run.step: rollout_metrics, curriculum,
    # learn/<StepMetrics field>); the bar must look up those, not names no step writes.
    from trustee.learn.learner import StepMetrics
    from trustee.metrics import BAR_KEYS

    learn_keys = {f"learn/{f}" for f in StepMetrics.__struct_fields__}
    written = learn_keys | {"reward_mean", "curriculum/difficulty"}
    assert {k for k, _ in BAR_KEYS} <= written
    log = RunLog(tmp_path, LoggingConfig(progress_bar=True), total_steps=2, run_name="t")
    log.step(0, {"reward_mean": 0.25, "learn/loss": 0.5, "curriculum/difficulty": 4.0})
    log._bar.refresh()
    log.close()
    err = capsys.readouterr().err
    assert "reward=0.25" in err and "loss=0.5" in err and "D=4" in err


class FakeWandb:
    """Test double for the wandb module: records init arguments and logged steps."""

    def __init__(self):
        self.inits = []
        self.logged = []
        outer = self

        class util:
            @staticmethod
            def generate_id():
                return "abc123"

        class Run:
            def log(self, rec, step):
                outer.logged.append(step)

            def finish(self):
                pass

        self.util = util
        self._run = Run

    def init(self, **kw):
        self.inits.append(kw)
        return self._run()


def test_wandb_resumes_the_same_run_id(tmp_path, monkeypatch):
    import sys

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggingConfig(progress_bar=False, wandb_project="p")
    RunLog(tmp_path, cfg, total_steps=2, run_name="t").close()
    RunLog(tmp_path, cfg, total_steps=2, run_name="t").close()  # the resumed process
    assert [i["id"] for i in fake.inits] == ["abc123", "abc123"]
    assert all(i["resume"] == "allow" for i in fake.inits)
