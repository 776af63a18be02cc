"""`load_config` (file + overrides -> a checked `Config`) and `resolve` (the values derived for one run)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from trustee.config.overrides import apply_overrides
from trustee.config.problems import ConfigError, Problem, check_table
from trustee.config.rules import cross_checks, unhonoured
from trustee.config.schema import SIMULATOR_ENGINE_DEFAULTS, Config, resolve_dtype


def _with_simulator_engine_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with the simulator engine's own defaults under what [engines.simulator] sets (a
    table written with one key would otherwise take EngineConfig's class defaults for the
    rest: an adapter slot and sleep mode the simulator never uses). `raw` is not changed."""
    engines = raw.get("engines")
    if not isinstance(engines, dict) or not isinstance(engines.get("simulator"), dict):
        return raw
    return {**raw, "engines": {**engines, "simulator": {**SIMULATOR_ENGINE_DEFAULTS, **engines["simulator"]}}}


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a TOML file (or defaults, if `path` is None) plus `--set` overrides.

    Raises ConfigError naming every problem: syntax errors, unknown keys, wrong types,
    out-of-range values, and cross-field conflicts.
    """
    source = str(path) if path is not None else "(defaults)"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(source, [Problem("(file)", str(path), "file not found")]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(source, [Problem("(syntax)", str(path), f"not valid TOML: {e}")]) from None
    raw = apply_overrides(raw, list(overrides))
    problems: list[Problem] = []
    check_table(raw, Config, "", problems)
    if problems:
        raise ConfigError(source, problems)
    cfg = msgspec.convert(_with_simulator_engine_defaults(raw), Config)
    problems = cross_checks(cfg) + unhonoured(cfg, raw)
    if problems:
        raise ConfigError(source, problems)
    return cfg


# ============================================================================= derived values


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
                f"openai at {cfg.engines.simulator.base_url}"
                if cfg.engines.simulator.backend == "openai"
                else f"{cfg.engines.simulator.backend} on {where(pl.simulator_gpus)}"
            ),
        },
        learner=f"{cfg.learner.mode} on {where(pl.learner_gpus)} ({dtype})",
    )
