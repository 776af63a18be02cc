"""The typed configuration tree and its loader.

A package whose parts read alone:

- `schema`: one frozen msgspec Struct per section of a run (model, engines, simulator,
  environment, rollout, grpo, learner, placement, curriculum, eval, logging, checkpoint); every
  default exists once, on its field, with a one-line docstring (the string literal under it);
- `backends`: what each engine backend can honour (one table, field -> backends);
- `problems`: `Problem`, `ConfigError` and the structural check of a raw table;
- `rules`: the cross-field rules, one named function per idea (`RULES`), each naming the field,
  the value and the fix;
- `overrides`: `--set section.key=value`;
- `load`: `load_config(path, overrides)`;
- `resolution`: `resolve(cfg, run_dir)`, the values derived for one run (written beside the run as
  resolved.json, never back into the config).

Errors: `load_config` raises `ConfigError` listing every problem at once. Callers import the
names below from `trustee.config`.
"""

from trustee.config.backends import HONOURED_BY, honours, unhonoured_fields
from trustee.config.load import load_config
from trustee.config.overrides import apply_overrides
from trustee.config.placement_rules import needs_simulator, weight_transport
from trustee.config.problems import ConfigError, Problem, field_docs, struct_type
from trustee.config.resolution import Resolved, resolve
from trustee.config.rules import REWARD_RANGES, RULES, cross_checks, curriculum_thresholds
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
    "BFCL_AST_CATEGORIES",
    "BFCL_EVAL_CATEGORIES",
    "BFCL_MULTI_TURN_CATEGORIES",
    "BFCL_RELEVANCE_CATEGORIES",
    "HONOURED_BY",
    "REWARD_RANGES",
    "RULES",
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
    "cross_checks",
    "field_docs",
    "honours",
    "load_config",
    "needs_simulator",
    "weight_transport",
    "resolve",
    "resolve_dtype",
    "struct_type",
    "unhonoured_fields",
]
