"""`resolve`: the values derived from a `Config` for one run (`Resolved`: absolute paths, device,
dtype, episode counts, GPUs needed, what each role runs on), written beside the run as
resolved.json and never back into the config."""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from trustee.config.schema import Config, resolve_dtype


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    """Values derived from a Config for one run; written beside the run as resolved.json.

    Paths (`run_dir`, `policy_model`, `simulator_model`) are absolute, so the file (and the
    adapter's base_model, which comes from `policy_model`) still work from another directory.
    """

    run_dir: str
    device: Literal["cpu", "cuda"]
    dtype: str
    policy_model: str
    simulator_model: str
    episodes_per_step: int
    total_episodes: int
    gpus_required: int
    engines: dict[str, str]
    learner: str


def resolve(cfg: Config, run_dir: str | os.PathLike) -> Resolved:
    pl = cfg.placement
    gpus = sorted(set(pl.policy_gpus) | set(pl.simulator_gpus) | set(pl.learner_gpus))
    device: Literal["cpu", "cuda"] = "cuda" if pl.learner_gpus else "cpu"
    dtype = resolve_dtype(cfg.model.dtype, device)
    per_step = cfg.grpo.tasks_per_step * cfg.grpo.group_size

    def where(ids: list[int]) -> str:
        return f"GPUs {ids}" if ids else "CPU"

    return Resolved(
        run_dir=os.path.abspath(run_dir),
        device=device,
        dtype=dtype,
        policy_model=os.path.abspath(cfg.model.path),
        simulator_model=os.path.abspath(cfg.simulator.model_path or cfg.model.path),
        episodes_per_step=per_step,
        total_episodes=per_step * cfg.grpo.steps,
        gpus_required=(max(gpus) + 1) if gpus else 0,
        engines={
            "policy": f"{cfg.engines.policy.backend} on {where(pl.policy_gpus)}",
            "simulator": (
                f"on the policy engine, adapter off: {cfg.engines.policy.backend} on {where(pl.policy_gpus)}"
                if cfg.simulator.engine == "policy-base"
                else f"openai at {cfg.engines.simulator.base_url}"
                if cfg.engines.simulator.backend == "openai"
                else f"{cfg.engines.simulator.backend} on {where(pl.simulator_gpus)}"
            ),
        },
        learner=f"{cfg.learner.mode} on {where(pl.learner_gpus)} ({dtype})",
    )
