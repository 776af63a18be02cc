"""Cross-field rules: each is a named function `(cfg, raw) -> [Problem]` that checks one idea and
names the field, the value and the fix. `RULES` lists them in the order their problems are
reported; `cross_checks` runs them all (what `load_config` does after the structural check).
`raw` is the table as written (before defaults), for the few rules about what a file sets
explicitly. Each rule's messages are tested in tests/test_config_rules.py.

Rules that need model sizes (the memory plan) are not here: `trustee.placement.check_memory`
runs them at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from trustee.config.backends import HONOURED_BY, unhonoured_fields
from trustee.config.placement_rules import (
    colocate_placement,
    learner_devices,
    memory_fractions,
    offload_needs_colocate,
    shared_weights_fit,
    split_placement,
    sync_placement,
)
from trustee.config.problems import Problem, show_value
from trustee.config.schema import (
    Config,
    CurriculumConfig,
    EnginesConfig,
    MCPConfig,
    TasksFileConfig,
)

Rule = Callable[[Config, dict[str, Any]], list[Problem]]

# Reward range of each built-in (environment.kind, environment.reward); the curriculum's
# thresholds are derived from it when curriculum.low / high are not set.
REWARD_RANGES: dict[str, tuple[float, float]] = {
    "judge": (-1.0, 1.0),
    "rubric": (0.0, 1.0),
    "progress": (0.0, 1.0),
    "syntax": (0.0, 1.0),
    "exact": (0.0, 1.0),
    "graded": (0.0, 1.0),
    "reference": (0.0, 1.0),
}

# The rewards each environment kind scores with.
KIND_REWARDS: dict[str, tuple[str, ...]] = {
    "bfcl": ("progress", "syntax"),
    "toy": ("exact", "graded"),
    "simulated": ("judge", "rubric"),
    "tasks_file": ("function", "judge", "rubric", "function+judge", "reference"),
    "python": ("custom",),
    "mcp": ("reference", "function", "judge", "rubric", "function+judge"),
}


def curriculum_thresholds(cfg: CurriculumConfig, reward_range: tuple[float, float]) -> tuple[float, float]:
    """(low, high) of the adaptive curriculum: the configured values, or, when unset, the
    points at 1/2 and 3/4 of the reward range (TRUSTEE's 0.0 and 0.5 on its [-1, 1] judge)."""
    lo, hi = reward_range
    low = cfg.low if cfg.low is not None else lo + 0.5 * (hi - lo)
    high = cfg.high if cfg.high is not None else lo + 0.75 * (hi - lo)
    return low, high


def grpo_clip_and_correction(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """The PPO clip range and the importance-sampling bounds are ranges with a lower and an upper end."""
    p: list[Problem] = []
    g = cfg.grpo
    if g.clip_high < g.clip_low:
        p.append(
            Problem(
                "grpo.clip_high",
                g.clip_high,
                f"must be >= grpo.clip_low ({g.clip_low}); DAPO's clip-higher widens the upper bound, never narrows it",
            )
        )
    if g.is_mode != "off" and g.is_max <= g.is_min:
        p.append(Problem("grpo.is_max", g.is_max, f"must be > grpo.is_min ({g.is_min})"))
    if not 0.0 < g.clip_low < 1.0:
        p.append(
            Problem("grpo.clip_low", g.clip_low, "must be in (0, 1): the ratio's lower bound is 1 - clip_low")
        )
    if not 0.0 < g.clip_high <= 10.0:
        p.append(
            Problem(
                "grpo.clip_high",
                g.clip_high,
                "must be in (0, 10]: the ratio's upper bound is 1 + clip_high (DAPO: 0.28)",
            )
        )
    return p


def kl_metric_needs_a_reference(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Full fine-tuning has no adapter to switch off: the KL metric needs the reference copy that beta > 0 loads."""
    if cfg.learner.mode == "full" and cfg.grpo.kl_metric and cfg.grpo.beta == 0:
        return [
            Problem(
                "grpo.kl_metric",
                True,
                "with learner.mode = 'full' the KL metric needs a reference copy of the model; set grpo.beta > 0 "
                "(which loads it) or kl_metric = false",
            )
        ]
    return []


def curriculum_thresholds_fit_the_reward(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """The adaptive curriculum's low < high, both inside the reward's range (else D never moves one way)."""
    p: list[Problem] = []
    c = cfg.curriculum
    rng = REWARD_RANGES.get(cfg.environment.reward)
    if c.kind == "adaptive" and rng is not None:
        low, high = curriculum_thresholds(c, rng)
        lo, hi = rng
        why = f"environment.reward = {cfg.environment.reward!r} lies in [{lo:g}, {hi:g}]"
        if high < low:
            p.append(Problem("curriculum.high", high, f"must be >= curriculum.low ({low:g})"))
        if high >= hi:
            p.append(
                Problem(
                    "curriculum.high",
                    high,
                    f"the difficulty could never rise: {why} and D rises only when the batch mean is above high; "
                    "set it below the top of the range, or leave low/high unset to derive them",
                )
            )
        if low <= lo:
            p.append(
                Problem(
                    "curriculum.low",
                    low,
                    f"the difficulty could never fall: {why} and D falls only when the batch mean is below low; "
                    "set it above the bottom of the range, or leave low/high unset to derive them",
                )
            )
    elif c.low is not None and c.high is not None and c.high < c.low:
        p.append(Problem("curriculum.high", c.high, f"must be >= curriculum.low ({c.low})"))
    return p


def curriculum_stages(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Stages go with curriculum.kind = 'staged', which needs at least one and a BFCL environment."""
    c, p = cfg.curriculum, []
    if c.kind == "staged" and not c.stages:
        p.append(
            Problem(
                "curriculum.stages", [], "curriculum.kind = 'staged' needs at least one [[curriculum.stages]]"
            )
        )
    if c.kind == "staged" and cfg.environment.kind != "bfcl":
        p.append(
            Problem(
                "curriculum.kind",
                "staged",
                f"stages switch BFCL's reward, hints and data split; environment.kind = {cfg.environment.kind!r} "
                "has none of them to switch. Use curriculum.kind = 'adaptive' or 'fixed'",
            )
        )
    if c.stages and c.kind != "staged":
        p.append(
            Problem(
                "curriculum.stages",
                f"{len(c.stages)} stage(s)",
                f"only used with curriculum.kind = 'staged' (kind is {c.kind!r}); remove them or set the kind",
            )
        )
    return p


# ----------------------------------------------------------------------------- model


def model_limits(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """A tiny simulator needs a tiny model and a path; a turn leaves room for its prompt; thinking needs a format with a reasoning block."""
    p: list[Problem] = []
    sim = cfg.simulator
    if sim.tiny_sft_steps and not (cfg.model.tiny and sim.model_path):
        missing = "model.tiny" if not cfg.model.tiny else "simulator.model_path"
        p.append(
            Problem(
                "simulator.tiny_sft_steps",
                sim.tiny_sft_steps,
                f"builds a tiny simulator, so it needs {missing}: set model.tiny = 'test' and "
                "simulator.model_path = '.cache/models/tiny-sim-sft' (or set tiny_sft_steps = 0)",
            )
        )
    if cfg.rollout.max_tokens_per_turn >= cfg.model.max_model_len:
        p.append(
            Problem(
                "rollout.max_tokens_per_turn",
                cfg.rollout.max_tokens_per_turn,
                f"must be < model.max_model_len ({cfg.model.max_model_len}) to leave room for the prompt",
            )
        )
    if cfg.model.tiny and cfg.model.packaged:
        p.append(
            Problem(
                "model.packaged",
                cfg.model.packaged,
                f"model.tiny = {cfg.model.tiny!r} also builds model.path; set one of them to ''",
            )
        )
    if cfg.model.enable_thinking and cfg.model.chat_format in ("llama3", "mistral", "chatml"):
        p.append(
            Problem(
                "model.enable_thinking",
                True,
                f"the {cfg.model.chat_format} chat format has no reasoning block; set it to false or use chat_format 'qwen'",
            )
        )
    return p


def few_shot_environments(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Worked examples exist only where the environment has reference conversations (the
    simulated kind borrows the toy environment's, so it needs the toy tools as its catalog), and
    worked scenarios only where the task generator draws from a catalog."""
    env, p = cfg.environment, []
    if env.few_shot and env.kind not in ("toy", "tasks_file", "simulated"):
        p.append(
            Problem(
                "environment.few_shot",
                env.few_shot,
                f"worked examples exist for kinds 'toy', 'tasks_file' and 'simulated' only (kind is {env.kind!r}); "
                "set it to 0",
            )
        )
    if env.few_shot and env.kind == "simulated" and not cfg.simulator.tool_catalog:
        p.append(
            Problem(
                "environment.few_shot",
                env.few_shot,
                "the simulated kind's worked examples are the toy tools' calls; set simulator.tool_catalog = "
                "'configs/catalogs/toy-tools.jsonl' or environment.few_shot = 0",
            )
        )
    if cfg.simulator.few_shot and not cfg.simulator.tool_catalog:
        p.append(
            Problem(
                "simulator.few_shot",
                cfg.simulator.few_shot,
                "worked scenarios are written for catalog draws; set simulator.tool_catalog = "
                "'configs/catalogs/toy-tools.jsonl' or simulator.few_shot = 0",
            )
        )
    if cfg.simulator.tool_few_shot and not cfg.simulator.tool_catalog:
        p.append(
            Problem(
                "simulator.tool_few_shot",
                cfg.simulator.tool_few_shot,
                "worked tool calls are the toy tools' calls; set simulator.tool_catalog = "
                "'configs/catalogs/toy-tools.jsonl' or simulator.tool_few_shot = 0",
            )
        )
    return p


# ----------------------------------------------------------------------------- engines


def engine_gpus(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Each engine lists exactly tensor x data parallel GPU ids, none twice; a remote engine lists none."""
    p: list[Problem] = []
    pl = cfg.placement
    for role in ("policy", "simulator"):
        e = getattr(cfg.engines, role)
        gpus = pl.policy_gpus if role == "policy" else pl.simulator_gpus
        need = e.tensor_parallel_size * e.data_parallel_size
        if gpus and len(gpus) != need:
            p.append(
                Problem(
                    f"placement.{role}_gpus",
                    gpus,
                    f"engines.{role} needs tensor_parallel_size x data_parallel_size = {need} GPUs; "
                    f"list exactly {need} ids or change the parallel sizes",
                )
            )
        if len(set(gpus)) != len(gpus):
            p.append(Problem(f"placement.{role}_gpus", gpus, "lists a GPU twice"))
        if e.backend == "openai" and gpus:
            p.append(
                Problem(
                    f"placement.{role}_gpus", gpus, "a remote (openai) engine runs on no local GPU; set []"
                )
            )
    if len(set(pl.learner_gpus)) != len(pl.learner_gpus):
        p.append(Problem("placement.learner_gpus", pl.learner_gpus, "lists a GPU twice"))
    return p


def remote_engines(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """A remote (openai) engine needs its server's URL, and cannot be the policy (it never loads new weights)."""
    p = [
        Problem(
            f"engines.{role}.base_url",
            "",
            "backend 'openai' needs a server URL, e.g. http://127.0.0.1:8000/v1",
        )
        for role in ("policy", "simulator")
        if getattr(cfg.engines, role).backend == "openai" and not getattr(cfg.engines, role).base_url
    ]
    if cfg.engines.policy.backend == "openai":
        p.append(
            Problem(
                "engines.policy.backend",
                "openai",
                "the policy engine must load new weights; use 'vllm' or 'hf'",
            )
        )
    return p


def backend_capabilities(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """A field the chosen backend cannot honour (`backends.HONOURED_BY`) keeps its default;
    the simulator engine never loads an adapter, whatever its backend."""
    p: list[Problem] = []
    defaults = EnginesConfig()
    for role in ("policy", "simulator"):
        e = getattr(cfg.engines, role)
        for name, value, default in unhonoured_fields(e, getattr(defaults, role)):
            if (role, name) == ("simulator", "max_lora_rank"):
                continue  # said below, whatever the backend
            can = ", ".join(repr(b) for b in HONOURED_BY[name])
            p.append(
                Problem(
                    f"engines.{role}.{name}",
                    value,
                    f"backend {e.backend!r} cannot honour it (only {can} can); remove the line, "
                    f"set it to {show_value(default)}, or set engines.{role}.backend accordingly",
                )
            )
    sim_raw = (raw.get("engines") or {}).get("simulator") or {}
    if sim_raw.get("max_lora_rank", 0) != 0:
        p.append(
            Problem(
                "engines.simulator.max_lora_rank",
                sim_raw["max_lora_rank"],
                "the simulator engine never loads an adapter (only the policy is trained); remove the line or set 0",
            )
        )
    return p


def adapter_fits_the_policy_engine(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """vLLM's adapter slot must be at least the learner's LoRA rank."""
    pol = cfg.engines.policy
    if cfg.learner.mode != "full" and pol.backend == "vllm" and pol.max_lora_rank < cfg.learner.lora_rank:
        return [
            Problem(
                "engines.policy.max_lora_rank",
                pol.max_lora_rank,
                f"must be >= learner.lora_rank ({cfg.learner.lora_rank}) so vLLM can load the adapter",
            )
        ]
    return []


# ----------------------------------------------------------------------------- placement


def environment_reward(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Each environment kind scores with its own rewards (`KIND_REWARDS`)."""
    kind, reward = cfg.environment.kind, cfg.environment.reward
    rewards = KIND_REWARDS[kind]
    if reward in rewards:
        return []
    return [
        Problem(
            "environment.reward",
            reward,
            f"environment.kind = {kind!r} scores with one of {', '.join(repr(r) for r in rewards)}",
        )
    ]


def python_environment_fields(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """kind 'python' needs a factory; its fields (factory, options, uses_simulator) mean nothing to other kinds."""
    env = cfg.environment
    if env.kind == "python":
        if env.factory:
            return []
        return [
            Problem(
                "environment.factory",
                "",
                "kind 'python' needs a factory: 'my_pkg.my_env:make_env' or 'path/to/env.py:make_env'",
            )
        ]
    return [
        Problem(f"environment.{name}", value, f"only used with kind 'python' (kind is {env.kind!r})")
        for name, value, default in (
            ("factory", env.factory, ""),
            ("options", env.options, {}),
            ("uses_simulator", env.uses_simulator, False),
        )
        if value != default
    ]


def tasks_file_fields(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """[environment.tasks_file] goes with kind 'tasks_file': a path, tools from a module or the
    simulator, a reward function exactly when the reward uses one."""
    env, p = cfg.environment, []
    tf, kind, reward = env.tasks_file, env.kind, env.reward
    if kind != "tasks_file":
        if tf != TasksFileConfig():
            p.append(
                Problem(
                    "environment.tasks_file",
                    msgspec.to_builtins(tf),
                    f"only used with kind 'tasks_file' (kind is {kind!r})",
                )
            )
        return p
    if not tf.path:
        p.append(Problem("environment.tasks_file.path", "", "kind 'tasks_file' needs a JSONL file of tasks"))
    if tf.tools == "python" and not tf.tools_module:
        p.append(
            Problem(
                "environment.tasks_file.tools_module",
                "",
                "tools = 'python' needs the module of tool functions, or set tools = 'simulated'",
            )
        )
    if tf.tools == "simulated" and tf.tools_module:
        p.append(
            Problem("environment.tasks_file.tools_module", tf.tools_module, "only used with tools = 'python'")
        )
    uses_fn = reward in ("function", "function+judge")
    if uses_fn and not tf.reward_fn:
        p.append(
            Problem("environment.tasks_file.reward_fn", "", f"reward {reward!r} needs 'module:function'")
        )
    if not uses_fn and tf.reward_fn:
        p.append(
            Problem(
                "environment.tasks_file.reward_fn",
                tf.reward_fn,
                f"only used with reward 'function' or 'function+judge' (reward is {reward!r})",
            )
        )
    return p


def judge_mode_with_rubric(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """The rubric reward always judges with the rubric: a judge_mode written beside it would be ignored."""
    explicit = "judge_mode" in (raw.get("simulator") or {})
    if cfg.environment.reward == "rubric" and explicit and cfg.simulator.judge_mode != "rubric":
        return [
            Problem(
                "simulator.judge_mode",
                cfg.simulator.judge_mode,
                "environment.reward = 'rubric' always judges with the rubric; judge_mode applies with "
                "reward = 'judge'. Remove simulator.judge_mode or set environment.reward = 'judge'",
            )
        ]
    return []


def adapter_needs_an_adapter_learner(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """model.adapter needs an adapter to train (LoRA or QLoRA) in the single-process learner."""
    if not cfg.model.adapter:
        return []
    if cfg.learner.mode == "full":
        return [
            Problem(
                "model.adapter",
                cfg.model.adapter,
                "learner.mode = 'full' trains every weight and has no adapter to continue; set learner.mode = "
                "'lora' (or 'qlora'), or merge the adapter into a model directory and set model.path to it",
            )
        ]
    if cfg.placement.learner_ranks > 1:
        return [
            Problem(
                "model.adapter",
                cfg.model.adapter,
                f"starting FSDP2 ranks (placement.learner_ranks = {cfg.placement.learner_ranks}) from an adapter is "
                "not built yet; set placement.learner_ranks = 1",
            )
        ]
    return []


def simulator_on_the_policy_base(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """simulator.engine = 'policy-base' needs a base that never moves (an adapter learner) and
    leaves nothing for a simulator engine of its own to set."""
    if cfg.simulator.engine != "policy-base":
        return []
    own = "or set simulator.engine = 'own' for a simulator engine of its own"
    p: list[Problem] = []
    if cfg.learner.mode == "full":
        p.append(
            Problem(
                "simulator.engine",
                "policy-base",
                "the simulator would play on the policy's base weights, but learner.mode = 'full' trains them, so "
                f"the environment would change with the policy; set learner.mode = 'lora' (or 'qlora'), {own}",
            )
        )
    if cfg.simulator.model_path:
        p.append(
            Problem(
                "simulator.model_path",
                cfg.simulator.model_path,
                f"with simulator.engine = 'policy-base' the simulator is model.path's base; remove the line, {own}",
            )
        )
    for key in (raw.get("engines") or {}).get("simulator") or {}:
        p.append(
            Problem(
                f"engines.simulator.{key}",
                raw["engines"]["simulator"][key],
                f"with simulator.engine = 'policy-base' no simulator engine is built (the policy engine serves the "
                f"simulator's requests); remove [engines.simulator], {own}",
            )
        )
    if cfg.placement.simulator_gpus:
        p.append(
            Problem(
                "placement.simulator_gpus",
                cfg.placement.simulator_gpus,
                f"with simulator.engine = 'policy-base' the simulator runs on placement.policy_gpus; remove the line, {own}",
            )
        )
    return p


def mcp_fields(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """[environment.mcp] is checked with kind 'mcp' and refused with any other kind."""
    env = cfg.environment
    if env.kind == "mcp":
        return mcp_problems(env.mcp, env.reward)
    if env.mcp != MCPConfig():
        return [
            Problem(
                "environment.mcp",
                msgspec.to_builtins(env.mcp),
                f"only used with kind 'mcp' (kind is {env.kind!r})",
            )
        ]
    return []


SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _mcp_server_problems(where: str, s: Any, seen: set[str]) -> list[Problem]:
    """One [[environment.mcp.servers]] entry: a unique name, a command or a url (not both), and
    what a url server cannot take. `seen` collects the names so far."""
    p: list[Problem] = []
    if not SERVER_NAME.match(s.name):
        p.append(Problem(f"{where}.name", s.name, "name each server with 1-64 letters, digits, '_' or '-'"))
    elif s.name in seen:
        p.append(Problem(f"{where}.name", s.name, "server names must be unique"))
    seen.add(s.name)
    if bool(s.command) == bool(s.url):
        p.append(
            Problem(
                f"{where}.command",
                s.command,
                "give a server either command (stdio) or url (Streamable HTTP), not both or neither",
            )
        )
    if s.url and (s.args or s.env):
        p.append(
            Problem(
                f"{where}.args", s.args or s.env, "args and env are for a command; a url server takes neither"
            )
        )
    if s.url and not s.url.startswith(("http://", "https://")):
        p.append(
            Problem(f"{where}.url", s.url, "a Streamable HTTP server's URL starts with http:// or https://")
        )
    return p


def mcp_problems(m: MCPConfig, reward: str) -> list[Problem]:
    """The [environment.mcp] rules (kind 'mcp')."""
    p: list[Problem] = []
    if not m.tasks:
        p.append(
            Problem(
                "environment.mcp.tasks",
                "",
                "kind 'mcp' needs a JSONL tasks file, or 'generate' (the simulator writes tasks)",
            )
        )
    if not m.servers:
        p.append(
            Problem(
                "environment.mcp.servers",
                [],
                "kind 'mcp' needs at least one server: [[environment.mcp.servers]] with name and command (or url)",
            )
        )
    seen: set[str] = set()
    for i, server in enumerate(m.servers):
        p += _mcp_server_problems(f"environment.mcp.servers[{i}]", server, seen)
    uses_fn = reward in ("function", "function+judge")
    if reward != "function+judge" and m.judge_weight != MCPConfig().judge_weight:
        p.append(
            Problem(
                "environment.mcp.judge_weight",
                m.judge_weight,
                f"only used with reward 'function+judge' (reward is {reward!r})",
            )
        )
    if uses_fn and not m.reward_fn:
        p.append(Problem("environment.mcp.reward_fn", "", f"reward {reward!r} needs 'module:function'"))
    if not uses_fn and m.reward_fn:
        p.append(
            Problem(
                "environment.mcp.reward_fn",
                m.reward_fn,
                f"only used with reward 'function' or 'function+judge' (reward is {reward!r})",
            )
        )
    return p


RULES: tuple[Rule, ...] = (
    grpo_clip_and_correction,
    kl_metric_needs_a_reference,
    curriculum_thresholds_fit_the_reward,
    curriculum_stages,
    engine_gpus,
    remote_engines,
    backend_capabilities,
    adapter_fits_the_policy_engine,
    learner_devices,
    colocate_placement,
    offload_needs_colocate,
    shared_weights_fit,
    sync_placement,
    split_placement,
    memory_fractions,
    model_limits,
    few_shot_environments,
    environment_reward,
    python_environment_fields,
    tasks_file_fields,
    judge_mode_with_rubric,
    adapter_needs_an_adapter_learner,
    simulator_on_the_policy_base,
    mcp_fields,
)


def cross_checks(cfg: Config, raw: dict[str, Any] | None = None) -> list[Problem]:
    """Every rule's problems, in `RULES` order, all reported together."""
    return [problem for rule in RULES for problem in rule(cfg, raw or {})]
