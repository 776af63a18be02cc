"""Where a run's numbers go: metrics JSONL, trajectories JSONL, optional wandb, a progress bar.

Owns `RunLog`. Records are flat dicts of scalars (one per step) and Trajectory structs (one
per episode), appended to `metrics.jsonl` / `trajectories.jsonl` in the run directory and
flushed per record, so a killed run keeps everything logged before it died. wandb is
imported only when `logging.wandb_project` is set. Callers: the training loop and eval.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import msgspec

from trustee.config import LoggingConfig
from trustee.types import Trajectory

_enc = msgspec.json.Encoder()


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunLog:
    def __init__(
        self, run_dir: str | Path, cfg: LoggingConfig, *, total_steps: int, run_name: str, config: Any = None
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self._metrics = open(self.dir / "metrics.jsonl", "ab")
        self._trajs = open(self.dir / "trajectories.jsonl", "ab") if cfg.save_trajectories else None
        self._t0 = time.monotonic()
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=run_name, unit="step", dynamic_ncols=True)
        self._wandb = None
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed: pip install -e '.[wandb]'"
                ) from e
            self._wandb = wandb.init(
                project=cfg.wandb_project, name=run_name, config=msgspec.to_builtins(config)
            )

    def step(self, step: int, record: dict[str, Any], *, advance: int = 1) -> None:
        rec = {"step": step, "elapsed_s": round(time.monotonic() - self._t0, 3)}
        rec.update({k: _clean(v) for k, v in record.items()})
        self._metrics.write(_enc.encode(rec) + b"\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log(rec, step=step)
        if self._bar is not None:
            shown = {
                k: rec[k]
                for k in ("reward_mean", "loss", "difficulty")
                if isinstance(rec.get(k), int | float)
            }
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(advance)

    def trajectories(self, step: int, trajs: list[Trajectory]) -> None:
        if self._trajs is None:
            return
        for t in trajs:
            self._trajs.write(_enc.encode({"step": step, "trajectory": t}) + b"\n")
        self._trajs.flush()

    def close(self) -> None:
        self._metrics.close()
        if self._trajs is not None:
            self._trajs.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
