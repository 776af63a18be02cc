"""Where a run's numbers go: metrics JSONL, trajectories JSONL, optional wandb, a progress bar.

Owns `RunLog`. Records are flat dicts of scalars (one per `logging.log_every` steps) and
Trajectory structs (all, a hashed sample, or none, up to a size cap), appended to
`metrics.jsonl` / `trajectories.jsonl` in the run directory and flushed per record, so a
killed run keeps everything logged before it died. A resumed run's logs are first truncated
back to its checkpoint (`trustee.resume.truncate_logs`), `elapsed_s` continues from the
checkpoint's, and W&B continues the same run (its id is kept in `RUN/wandb_id`). wandb is
imported only when `logging.wandb_project` is set. Callers: the training loop and eval.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import msgspec

from trustee import atomic
from trustee.config import LoggingConfig
from trustee.types import Trajectory

_enc = msgspec.json.Encoder()
log = logging.getLogger("trustee.metrics")

# Shown on the progress bar: (record key, label). Every key is written by each training step
# that trains (tests/test_metrics.py checks them against a real step's record).
BAR_KEYS = (("reward_mean", "reward"), ("learn/loss", "loss"), ("curriculum/difficulty", "D"))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _sampled(episode_id: str, fraction: float) -> bool:
    """Deterministic choice of a `fraction` of episodes by id (independent of the run's RNG, so
    logging choices never change what the run trains on)."""
    h = hashlib.blake2b(episode_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


def env_counters(env: Any) -> dict[str, float]:
    """Cumulative fault counters of an environment's simulator client (calls, decode retries,
    failed asks, episodes ended by a simulator failure), as `sim/*_total` beside the per-step
    `sim/*` figures of `sim/metrics.py`; {} for environments without one."""
    stats = getattr(getattr(env, "client", None), "stats", None)
    if stats is None:
        return {}
    return {
        "sim/calls_total": float(stats.calls),
        "sim/retries_total": float(stats.retries),
        "sim/failures_total": float(stats.failures),
        "sim/episode_errors_total": float(getattr(env, "sim_errors", 0)),
    }


class RunLog:
    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        *,
        total_steps: int,
        run_name: str,
        config: Any = None,
        elapsed_s: float = 0.0,
        done_steps: int = 0,
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.total_steps = total_steps
        self._metrics = open(self.dir / "metrics.jsonl", "ab")
        self._trajs = open(self.dir / "trajectories.jsonl", "ab") if cfg.trajectories != "none" else None
        self._traj_bytes = self._trajs.tell() if self._trajs is not None else 0
        self._evals = open(self.dir / "eval_trajectories.jsonl", "ab") if cfg.trajectories != "none" else None
        self.trajectories_dropped = 0
        self._t0 = time.monotonic() - elapsed_s
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=done_steps, desc=run_name, unit="step", dynamic_ncols=True
            )
        self._wandb = None
        self.wandb_id: str | None = None
        if cfg.wandb_project:
            self._wandb = self._init_wandb(cfg, run_name, config)

    def _init_wandb(self, cfg: LoggingConfig, run_name: str, config: Any) -> Any:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError(
                "logging.wandb_project is set but wandb is not installed: pip install -e '.[wandb]'"
            ) from e
        id_file = self.dir / "wandb_id"
        if id_file.exists():
            self.wandb_id = id_file.read_text().strip()
        else:
            self.wandb_id = wandb.util.generate_id()
            atomic.write_text(id_file, self.wandb_id + "\n")  # a torn id would start a second W&B run
        return wandb.init(
            project=cfg.wandb_project,
            name=run_name,
            id=self.wandb_id,
            resume="allow",
            config=msgspec.to_builtins(config),
        )

    def elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def step(self, step: int, record: dict[str, Any], *, advance: int = 1) -> None:
        rec = {"step": step, "elapsed_s": self.elapsed()}
        rec.update({k: _clean(v) for k, v in record.items()})
        if self.trajectories_dropped:
            rec["log/trajectories_dropped"] = self.trajectories_dropped
        if (step + 1) % self.cfg.log_every == 0 or step + 1 >= self.total_steps:
            self._metrics.write(_enc.encode(rec) + b"\n")
            self._metrics.flush()
            if self._wandb is not None:
                self._wandb.log(rec, step=step)
        if self._bar is not None:
            shown = {label: rec[k] for k, label in BAR_KEYS if isinstance(rec.get(k), int | float)}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(advance)

    def trajectories(self, step: int, trajs: list[Trajectory]) -> None:
        if self._trajs is None:
            return
        cap = self.cfg.trajectories_max_mb * 1e6
        # Every line is encoded into one buffer, written with one call: a trajectory's line is
        # kilobytes (one number per token, four times), larger than the file's own buffer, so
        # line-by-line writes were a system call each.
        buf = bytearray()
        for t in trajs:
            if self.cfg.trajectories == "sampled" and not _sampled(
                t.episode_id, self.cfg.trajectories_fraction
            ):
                continue
            start = len(buf)
            _enc.encode_into({"step": step, "trajectory": t}, buf, -1)
            buf += b"\n"
            n = len(buf) - start
            if cap and self._traj_bytes + n > cap:
                del buf[start:]
                if not self.trajectories_dropped:
                    log.warning(
                        "trajectories.jsonl reached logging.trajectories_max_mb = %s; later episodes are counted, not written",
                        self.cfg.trajectories_max_mb,
                    )
                self.trajectories_dropped += 1
                continue
            self._traj_bytes += n
        if buf:
            self._trajs.write(buf)
            self._trajs.flush()

    def eval_trajectories(self, step: int, results: list[tuple[str, Trajectory]]) -> None:
        """The held-out evaluation's episodes, one line each with its mode ('greedy' or
        'sampled'), to eval_trajectories.jsonl: every one while trajectories are logged at all
        (an evaluation is a fixed, small set; it is not under trajectories_max_mb)."""
        if self._evals is None or not results:
            return
        buf = bytearray()
        for mode, t in results:
            _enc.encode_into({"step": step, "mode": mode, "trajectory": t}, buf, -1)
            buf += b"\n"
        self._evals.write(buf)
        self._evals.flush()

    def close(self) -> None:
        self._metrics.close()
        if self._trajs is not None:
            self._trajs.close()
        if self._evals is not None:
            self._evals.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
