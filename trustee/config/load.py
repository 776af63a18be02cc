"""`load_config`: a TOML file plus `--set` overrides -> a checked `Config` (structure first, then
every cross-field rule; all problems reported at once). Derived values: `resolution.py`."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from trustee.config.overrides import apply_overrides
from trustee.config.problems import ConfigError, Problem, check_table
from trustee.config.rules import cross_checks
from trustee.config.schema import SIMULATOR_ENGINE_DEFAULTS, Config


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
    problems = cross_checks(cfg, raw)
    if problems:
        raise ConfigError(source, problems)
    return cfg
