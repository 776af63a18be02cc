"""The typed configuration tree and its loader.

A package whose parts read alone:

- `schema`: one frozen msgspec Struct per section of a run (model, engines, simulator,
  environment, rollout, grpo, learner, placement, curriculum, eval, logging, checkpoint); every
  default exists once, on its field, with a one-line docstring (the string literal under it);
- `backends`: what each engine backend can honour;
- `problems`: `Problem`, `ConfigError` and the structural check of a raw table;
- `rules`: the cross-field rules, each naming the field, the value and the fix;
- `overrides`: `--set section.key=value`;
- `load`: `load_config(path, overrides)` and `resolve` (values derived for one run, written
  beside the run as resolved.json, never back into the config).

Errors: `load_config` raises `ConfigError` listing every problem at once. Callers import the
names below from `trustee.config`.
"""

from trustee.config.backends import BACKEND_ONLY, ENGINE_FIELD_BACKENDS, unhonoured_fields
from trustee.config.load import Resolved, load_config, resolve
from trustee.config.overrides import apply_overrides
from trustee.config.problems import ConfigError, Problem, field_docs, struct_type
from trustee.config.rules import REWARD_RANGES, curriculum_thresholds, environment_problems, needs_simulator
from trustee.config.schema import (
    BFCL_AST_CATEGORIES,
    BFCL_EVAL_CATEGORIES,
    BFCL_MULTI_TURN_CATEGORIES,
    BFCL_RELEVANCE_CATEGORIES,
    SIMULATOR_ENGINE_DEFAULTS,
    AspectRanges,
    BfclConfig,
    CheckpointConfig,
    Config,
    CurriculumConfig,
    EngineConfig,
    EnginesConfig,
    EnvironmentConfig,
    EvalConfig,
    GrpoConfig,
    LearnerConfig,
    LoggingConfig,
    MCPConfig,
    MCPServerConfig,
    ModelConfig,
    PlacementConfig,
    RolloutConfig,
    Section,
    SimulatorConfig,
    StageConfig,
    TasksFileConfig,
    resolve_dtype,
)

__all__ = [
    "BACKEND_ONLY",
    "BFCL_AST_CATEGORIES",
    "BFCL_EVAL_CATEGORIES",
    "BFCL_MULTI_TURN_CATEGORIES",
    "BFCL_RELEVANCE_CATEGORIES",
    "ENGINE_FIELD_BACKENDS",
    "REWARD_RANGES",
    "SIMULATOR_ENGINE_DEFAULTS",
    "AspectRanges",
    "BfclConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CurriculumConfig",
    "EngineConfig",
    "EnginesConfig",
    "EnvironmentConfig",
    "EvalConfig",
    "GrpoConfig",
    "LearnerConfig",
    "LoggingConfig",
    "MCPConfig",
    "MCPServerConfig",
    "ModelConfig",
    "PlacementConfig",
    "Problem",
    "Resolved",
    "RolloutConfig",
    "Section",
    "SimulatorConfig",
    "StageConfig",
    "TasksFileConfig",
    "apply_overrides",
    "curriculum_thresholds",
    "environment_problems",
    "field_docs",
    "load_config",
    "needs_simulator",
    "resolve",
    "resolve_dtype",
    "struct_type",
    "unhonoured_fields",
]
