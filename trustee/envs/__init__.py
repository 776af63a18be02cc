"""Environments: the registry of kinds and the one function that builds a run's environment.

Owns `BUILDERS` (an explicit dict: `environment.kind` -> builder), `EnvContext` (what a
builder, and a user's factory for kind 'python', receives), `needs_simulator` (whether a run
must start the simulator engine) and `check_environment` (the start-up checks a dry run also
runs). Builders import their environment lazily, so a toy run never imports BFCL. The
contract every environment implements is `envs/base.py`'s `Environment` protocol (see
docs/environments.md). Called by the training loop and `trustee.run`; it does not run
episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trustee.config import needs_simulator as needs_simulator  # re-exported: placement and run ask here

if TYPE_CHECKING:
    from trustee.config import Config, EnvironmentConfig, SimulatorConfig
    from trustee.engines.base import Engine
    from trustee.envs.base import Environment
    from trustee.sim.client import SimClient


@dataclass(frozen=True)
class EnvContext:
    """What an environment builder gets.

    `config` is the [environment] section; `options` its free-form `options` table (kind
    'python'); `seed` the run's seed; `simulator` a client of the simulator engine (typed
    JSON outputs from the simulator model) when the run has one, else None; `sim_config`
    the [simulator] section (judge settings, budgets).
    """

    config: EnvironmentConfig
    sim_config: SimulatorConfig
    seed: int = 0
    simulator: SimClient | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_expected_calls: int = 3
    """The most tool calls a task may need at any difficulty (curriculum.aspects), for budgets."""
    max_model_len: int = 8192
    """The simulator model's context (model.max_model_len), for budgets."""


Builder = Callable[[EnvContext], "Environment"]


def _toy(ctx: EnvContext) -> Environment:
    from trustee.envs.toy import ToyEnv

    return ToyEnv(reward=ctx.config.reward, few_shot=ctx.config.few_shot)


def _simulated(ctx: EnvContext) -> Environment:
    from trustee.envs.simulated import build_simulated_env

    c = ctx.simulator
    assert c is not None, "needs_simulator() is true for kind 'simulated'"
    return build_simulated_env(
        ctx.sim_config,
        ctx.config,
        c.engine,
        c.tokenizer,
        template=c.template,
        max_expected_calls=ctx.max_expected_calls,
        max_model_len=ctx.max_model_len,
    )


def _bfcl(ctx: EnvContext) -> Environment:
    from trustee.envs.bfcl import build_bfcl_env

    return build_bfcl_env(ctx.config, seed=ctx.seed)


def _tasks_file(ctx: EnvContext) -> Environment:
    from trustee.envs.tasks_file import build_tasks_file_env

    return build_tasks_file_env(ctx)


def _python(ctx: EnvContext) -> Environment:
    from trustee.envs.python import build_python_env

    return build_python_env(ctx)


def _mcp(ctx: EnvContext) -> Environment:
    from trustee.envs.mcp_env import build_mcp_env

    return build_mcp_env(ctx)


BUILDERS: dict[str, Builder] = {
    "toy": _toy,
    "simulated": _simulated,
    "bfcl": _bfcl,
    "tasks_file": _tasks_file,
    "python": _python,
    "mcp": _mcp,
}


def simulator_client(cfg: Config, engine: Engine, tokenizer: Any, template: str | None) -> SimClient:
    """A typed-output client of the simulator engine, with the [simulator] budgets."""
    from trustee.sim.client import SimClient

    sim = cfg.simulator
    return SimClient(
        engine,
        tokenizer,
        temperature=sim.temperature,
        max_tokens=sim.max_tokens,
        max_decode_retries=sim.max_decode_retries,
        template=template,
    )


def build_environment(
    cfg: Config, sim_engine: Engine | None = None, sim_tokenizer: Any = None, sim_template: str | None = None
) -> Environment:
    """The run's environment, from `environment.kind` (and the simulator engine when
    `needs_simulator`). `sim_template` is the chat template for the simulator's tokenizer."""
    kind = cfg.environment.kind
    if kind not in BUILDERS:
        raise ValueError(f"environment.kind = {kind!r} has no builder; known: {sorted(BUILDERS)}")
    client = None
    if needs_simulator(cfg.environment):
        if sim_engine is None:
            raise ValueError(f"environment.kind = {kind!r} needs the simulator engine, but none was started")
        client = simulator_client(cfg, sim_engine, sim_tokenizer, sim_template)
    ctx = EnvContext(
        config=cfg.environment,
        sim_config=cfg.simulator,
        seed=cfg.seed,
        simulator=client,
        options=dict(cfg.environment.options),
        max_expected_calls=int(max(cfg.curriculum.aspects.n_expected_calls)),
        max_model_len=cfg.model.max_model_len,
    )
    return BUILDERS[kind](ctx)


def check_environment(env: EnvironmentConfig) -> list[str]:
    """Problems the environment would hit at start-up, found without building it (files
    that do not exist, factories or functions that do not import). Run by the real start
    and by --dry-run."""
    problems: list[str] = []
    if env.kind == "python":
        from trustee.envs.python import check_factory

        problems += check_factory(env.factory)
    elif env.kind == "tasks_file":
        from trustee.envs.tasks_file import check_tasks_file

        problems += check_tasks_file(env.tasks_file, env.reward)
    elif env.kind == "mcp":
        from trustee.envs.mcp_env import check_mcp

        problems += check_mcp(env.mcp, env.reward)
    return problems
