"""Cross-field rules: each returns the problems it finds in a decoded `Config`, naming the field,
the value and the fix. `cross_checks` and `unhonoured` are what `load_config` runs."""

from __future__ import annotations

from typing import Any

import msgspec

from trustee.config.backends import ENGINE_FIELD_BACKENDS, unhonoured_fields
from trustee.config.problems import Problem, show_value
from trustee.config.schema import (
    Config,
    CurriculumConfig,
    EngineConfig,
    EnginesConfig,
    EnvironmentConfig,
    TasksFileConfig,
)

# Reward range of each built-in (environment.kind, environment.reward); the curriculum's
# thresholds are derived from it when curriculum.low / high are not set.
REWARD_RANGES: dict[str, tuple[float, float]] = {
    "judge": (-1.0, 1.0),
    "rubric": (0.0, 1.0),
    "progress": (0.0, 1.0),
    "syntax": (0.0, 1.0),
    "exact": (0.0, 1.0),
    "graded": (0.0, 1.0),
}


def curriculum_thresholds(cfg: CurriculumConfig, reward_range: tuple[float, float]) -> tuple[float, float]:
    """(low, high) of the adaptive curriculum: the configured values, or, when unset, the
    points at 1/2 and 3/4 of the reward range (TRUSTEE's 0.0 and 0.5 on its [-1, 1] judge)."""
    lo, hi = reward_range
    low = cfg.low if cfg.low is not None else lo + 0.5 * (hi - lo)
    high = cfg.high if cfg.high is not None else lo + 0.75 * (hi - lo)
    return low, high


def _grpo_checks(cfg: Config) -> list[Problem]:
    """Training-control rules: clip ranges, the curriculum's thresholds against the reward."""
    p: list[Problem] = []
    g = cfg.grpo
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
    if cfg.learner.mode == "full" and g.kl_metric and g.beta == 0:
        p.append(
            Problem(
                "grpo.kl_metric",
                True,
                "with learner.mode = 'full' the KL metric needs a reference copy of the model; set grpo.beta > 0 "
                "(which loads it) or kl_metric = false",
            )
        )
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
    return p


def cross_checks(cfg: Config) -> list[Problem]:
    """Rules that involve more than one field. One place, all reported together."""
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
    p += _grpo_checks(cfg)
    cl, ch = cfg.curriculum.low, cfg.curriculum.high
    if cl is not None and ch is not None and ch < cl:
        p.append(Problem("curriculum.high", ch, f"must be >= curriculum.low ({cl})"))
    if cfg.curriculum.kind == "staged" and not cfg.curriculum.stages:
        p.append(
            Problem(
                "curriculum.stages", [], "curriculum.kind = 'staged' needs at least one [[curriculum.stages]]"
            )
        )
    p += _placement_problems(cfg)
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
    if cfg.model.enable_thinking and cfg.model.chat_format in ("llama3", "mistral"):
        p.append(
            Problem(
                "model.enable_thinking",
                True,
                f"the {cfg.model.chat_format} chat format has no reasoning block; set it to false or use chat_format 'qwen'",
            )
        )
    p += environment_problems(cfg.environment)
    return p


def needs_simulator(env: EnvironmentConfig) -> bool:
    """Whether the run must start the simulator engine for this environment (the simulated
    environment, a tasks file with simulated tools or a judged reward, a Python environment
    that says it uses one). Re-exported by `trustee.envs`."""
    if env.kind == "simulated":
        return True
    if env.kind == "tasks_file":
        return env.tasks_file.tools == "simulated" or env.reward in ("judge", "rubric", "function+judge")
    if env.kind == "python":
        return env.uses_simulator
    return False


def _placement_problems(cfg: Config) -> list[Problem]:
    """Engine and placement rules that need no model sizes (the memory plan, which does, is
    checked at start-up by `trustee.memory.check_memory`)."""
    p: list[Problem] = []
    pl, eng = cfg.placement, cfg.engines
    for role in ("policy", "simulator"):
        e: EngineConfig = getattr(eng, role)
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
        if e.backend == "openai" and not e.base_url:
            p.append(
                Problem(
                    f"engines.{role}.base_url",
                    "",
                    "backend 'openai' needs a server URL, e.g. http://127.0.0.1:8000/v1",
                )
            )
        for name, value, want in unhonoured_fields(e):
            p.append(
                Problem(
                    f"engines.{role}.{name}",
                    value,
                    f"backend {e.backend!r} cannot honour it (only {show_value(want)}); remove the line, "
                    f"set it to {show_value(want)}, or use a backend that supports it",
                )
            )
        if e.backend == "openai" and gpus:
            p.append(
                Problem(
                    f"placement.{role}_gpus", gpus, "a remote (openai) engine runs on no local GPU; set []"
                )
            )
    if len(set(pl.learner_gpus)) != len(pl.learner_gpus):
        p.append(Problem("placement.learner_gpus", pl.learner_gpus, "lists a GPU twice"))
    if eng.policy.backend == "openai":
        p.append(
            Problem(
                "engines.policy.backend",
                "openai",
                "the policy engine must load new weights; use 'vllm' or 'hf'",
            )
        )
    if (
        cfg.learner.mode != "full"
        and eng.policy.backend == "vllm"
        and eng.policy.max_lora_rank < cfg.learner.lora_rank
    ):
        p.append(
            Problem(
                "engines.policy.max_lora_rank",
                eng.policy.max_lora_rank,
                f"must be >= learner.lora_rank ({cfg.learner.lora_rank}) so vLLM can load the adapter",
            )
        )
    if cfg.learner.mode == "qlora" and not pl.learner_gpus:
        p.append(
            Problem(
                "learner.mode",
                "qlora",
                "QLoRA (bitsandbytes 4-bit) needs CUDA; set placement.learner_gpus or use mode 'lora'",
            )
        )
    built = ("policy", "simulator") if needs_simulator(cfg.environment) else ("policy",)
    local = [r for r in built if getattr(eng, r).backend != "openai"]
    gpus_of = {"policy": set(pl.policy_gpus), "simulator": set(pl.simulator_gpus)}
    learner = set(pl.learner_gpus)
    # Engines on the learner's devices: on CPU every local engine shares the host with it.
    beside = [r for r in local if (gpus_of[r] & learner) or (not gpus_of[r] and not learner)]
    if pl.mode == "colocate":
        for r in beside:
            if not getattr(eng, r).enable_sleep_mode:
                p.append(
                    Problem(
                        f"engines.{r}.enable_sleep_mode",
                        False,
                        f"placement 'colocate' puts the learner beside the {r} engine "
                        f"({_where(sorted(gpus_of[r]))}), which must sleep while it trains; set "
                        f"engines.{r}.enable_sleep_mode = true, or use placement.mode = 'overlap'",
                    )
                )
        stray = sorted(learner - gpus_of["policy"] - gpus_of["simulator"])
        if stray:
            p.append(
                Problem(
                    "placement.learner_gpus",
                    pl.learner_gpus,
                    f"'colocate' shares the engines' GPUs, but {stray} run no engine; list only engine GPUs "
                    "or use placement.mode = 'split'",
                )
            )
    if pl.mode == "sync" and pl.learner_gpus:
        for r in local:
            shared = sorted(gpus_of[r] & learner)
            if shared:
                p.append(
                    Problem(
                        "placement.learner_gpus",
                        pl.learner_gpus,
                        f"'sync' keeps the {r} engine resident on GPU(s) {shared} while the learner trains "
                        "there (out of memory); use placement.mode = 'colocate' (engines sleep) or move the learner",
                    )
                )
    if pl.learner_ranks > 1 and pl.learner_gpus and len(pl.learner_gpus) != pl.learner_ranks:
        p.append(
            Problem(
                "placement.learner_ranks",
                pl.learner_ranks,
                f"each learner rank needs its own GPU, but placement.learner_gpus = {pl.learner_gpus}; "
                f"list {pl.learner_ranks} GPUs or set learner_ranks = {len(pl.learner_gpus)}",
            )
        )
    if pl.learner_ranks > 1 and cfg.learner.mode == "qlora":
        p.append(
            Problem(
                "placement.learner_ranks",
                pl.learner_ranks,
                "QLoRA's 4-bit base is not sharded by the FSDP2 learner; use learner_ranks = 1, or mode 'lora' / 'full'",
            )
        )
    if pl.mode == "split":
        if not learner:
            p.append(
                Problem(
                    "placement.learner_gpus",
                    [],
                    "'split' puts the learner on GPUs no engine uses; list them, or use placement.mode = "
                    "'overlap' to train beside the engines on the CPU",
                )
            )
        for r in local:
            shared = sorted(gpus_of[r] & learner)
            if shared:
                p.append(
                    Problem(
                        "placement.learner_gpus",
                        pl.learner_gpus,
                        f"placement.mode = 'split' needs GPU sets disjoint from the engines' (the {r} engine "
                        f"is on {shared}); move the learner or use placement.mode = 'colocate'",
                    )
                )
    # Memory fractions of the engines resident together on one GPU (kv_cache_gib engines are
    # sized in bytes and checked by the memory plan).
    for gpu in sorted(gpus_of["policy"] | gpus_of["simulator"]):
        on = [r for r in local if gpu in gpus_of[r] and getattr(eng, r).kv_cache_gib == 0]
        total = sum(getattr(eng, r).gpu_memory_utilization for r in on)
        if total > 1.0:
            shares = " + ".join(
                f"engines.{r}.gpu_memory_utilization ({getattr(eng, r).gpu_memory_utilization})" for r in on
            )
            p.append(
                Problem(
                    f"engines.{on[-1]}.gpu_memory_utilization",
                    getattr(eng, on[-1]).gpu_memory_utilization,
                    f"on GPU {gpu}, {shares} = {total:.2f} > 1; lower them so they add up to at most 1 "
                    "(less the learner's share when it trains beside them)",
                )
            )
            break
    return p


def unhonoured(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Settings the chosen components cannot honour (each would otherwise be silently ignored)."""
    p: list[Problem] = []
    defaults, plain = EnginesConfig(), EngineConfig()
    for role in ("policy", "simulator"):
        e, d = getattr(cfg.engines, role), getattr(defaults, role)
        placed = {name for name, _, _ in unhonoured_fields(e)}  # refused by _placement_problems already
        for name, backends in ENGINE_FIELD_BACKENDS.items():
            if name == "base_url" or name in placed or (role, name) == ("simulator", "max_lora_rank"):
                continue  # checked with a more specific message in cross_checks / below
            v = getattr(e, name)
            if e.backend not in backends and v != getattr(d, name) and v != getattr(plain, name):
                p.append(
                    Problem(
                        f"engines.{role}.{name}",
                        v,
                        f"the {e.backend!r} backend cannot honour it (only {', '.join(repr(b) for b in backends)} "
                        f"does); remove it or set engines.{role}.backend accordingly",
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
    explicit_judge = "judge_mode" in (raw.get("simulator") or {})
    if cfg.environment.reward == "rubric" and explicit_judge and cfg.simulator.judge_mode != "rubric":
        p.append(
            Problem(
                "simulator.judge_mode",
                cfg.simulator.judge_mode,
                "environment.reward = 'rubric' always judges with the rubric; judge_mode applies with "
                "reward = 'judge'. Remove simulator.judge_mode or set environment.reward = 'judge'",
            )
        )
    if cfg.curriculum.kind == "staged" and cfg.environment.kind != "bfcl":
        p.append(
            Problem(
                "curriculum.kind",
                "staged",
                f"stages switch BFCL's reward, hints and data split; environment.kind = {cfg.environment.kind!r} "
                "has none of them to switch. Use curriculum.kind = 'adaptive' or 'fixed'",
            )
        )
    if cfg.curriculum.stages and cfg.curriculum.kind != "staged":
        p.append(
            Problem(
                "curriculum.stages",
                f"{len(cfg.curriculum.stages)} stage(s)",
                f"only used with curriculum.kind = 'staged' (kind is {cfg.curriculum.kind!r}); remove them or set the kind",
            )
        )
    return p


def _where(ids: list[int]) -> str:
    return f"GPUs {ids}" if ids else "the CPU"


def environment_problems(env: EnvironmentConfig) -> list[Problem]:
    """The [environment] rules that involve more than one field (called by cross_checks)."""
    p: list[Problem] = []
    kind, reward = env.kind, env.reward
    rewards = {
        "bfcl": ("progress", "syntax"),
        "toy": ("exact", "graded"),
        "simulated": ("judge", "rubric"),
        "tasks_file": ("function", "judge", "rubric", "function+judge"),
        "python": ("custom",),
    }[kind]
    if reward not in rewards:
        p.append(
            Problem(
                "environment.reward",
                reward,
                f"environment.kind = {kind!r} scores with one of {', '.join(repr(r) for r in rewards)}",
            )
        )
    if kind == "python" and not env.factory:
        p.append(
            Problem(
                "environment.factory",
                "",
                "kind 'python' needs a factory: 'my_pkg.my_env:make_env' or 'path/to/env.py:make_env'",
            )
        )
    if kind != "python":
        for name, value, default in (
            ("factory", env.factory, ""),
            ("options", env.options, {}),
            ("uses_simulator", env.uses_simulator, False),
        ):
            if value != default:
                p.append(
                    Problem(f"environment.{name}", value, f"only used with kind 'python' (kind is {kind!r})")
                )
    tf = env.tasks_file
    if kind == "tasks_file":
        if not tf.path:
            p.append(
                Problem("environment.tasks_file.path", "", "kind 'tasks_file' needs a JSONL file of tasks")
            )
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
                Problem(
                    "environment.tasks_file.tools_module", tf.tools_module, "only used with tools = 'python'"
                )
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
    elif tf != TasksFileConfig():
        p.append(
            Problem(
                "environment.tasks_file",
                msgspec.to_builtins(tf),
                f"only used with kind 'tasks_file' (kind is {kind!r})",
            )
        )
    return p
