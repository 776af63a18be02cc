"""The config rules about where things run: which engines a run builds (`needs_simulator`),
which devices the learner and the engines use, and what each placement mode (colocate, sync,
split) allows. Part of `RULES`
(`trustee/config/rules.py`); each rule is `(cfg, raw) -> list[Problem]` with cases in
tests/test_config_rules.py."""

from __future__ import annotations

from typing import Any

from trustee.config.problems import Problem
from trustee.config.schema import Config, EnvironmentConfig


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
    if env.kind == "mcp":
        return env.mcp.tasks == "generate" or env.reward in ("judge", "rubric", "function+judge")
    return False


# ----------------------------------------------------------------------------- training controls


def _devices(cfg: Config) -> tuple[list[str], dict[str, set[int]], set[int]]:
    """(the local engine roles this run builds, each role's GPU ids, the learner's GPU ids)."""
    pl, eng = cfg.placement, cfg.engines
    built = ("policy", "simulator") if needs_simulator(cfg.environment) else ("policy",)
    local = [r for r in built if getattr(eng, r).backend != "openai"]
    return local, {"policy": set(pl.policy_gpus), "simulator": set(pl.simulator_gpus)}, set(pl.learner_gpus)


def _where(ids: list[int]) -> str:
    return f"GPUs {ids}" if ids else "the CPU"


def learner_devices(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """QLoRA needs CUDA and one rank; several ranks need one GPU each."""
    p: list[Problem] = []
    pl = cfg.placement
    if cfg.learner.mode == "qlora" and not pl.learner_gpus:
        p.append(
            Problem(
                "learner.mode",
                "qlora",
                "QLoRA (bitsandbytes 4-bit) needs CUDA; set placement.learner_gpus or use mode 'lora'",
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
    return p


def colocate_placement(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """'colocate': every engine beside the learner can sleep, and the learner uses only engine GPUs."""
    if cfg.placement.mode != "colocate":
        return []
    p: list[Problem] = []
    local, gpus_of, learner = _devices(cfg)
    # Engines on the learner's devices: on CPU every local engine shares the host with it.
    beside = [r for r in local if (gpus_of[r] & learner) or (not gpus_of[r] and not learner)]
    for r in beside:
        if not getattr(cfg.engines, r).enable_sleep_mode:
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
                cfg.placement.learner_gpus,
                f"'colocate' shares the engines' GPUs, but {stray} run no engine; list only engine GPUs "
                "or use placement.mode = 'split'",
            )
        )
    return p


def weight_transport(cfg: Config) -> str:
    """The transport a multi-rank full learner's weights take to the policy engine, 'bytes' or
    'shared' (`learn/transport.py`): learner.weight_transport, with 'auto' = 'shared' for a
    colocated vLLM policy engine whose every GPU holds a learner rank (each worker then finds a
    bucket on its own GPU), else 'bytes'."""
    lt = cfg.learner.weight_transport
    if lt != "auto":
        return lt
    pl = cfg.placement
    shared = (
        pl.mode == "colocate"
        and cfg.learner.mode == "full"
        and pl.learner_ranks > 1
        and cfg.engines.policy.backend == "vllm"
        and bool(pl.learner_gpus)
        and set(pl.policy_gpus) <= set(pl.learner_gpus)
    )
    return "shared" if shared else "bytes"


def shared_weights_fit(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """learner.weight_transport = 'shared' needs what the route is built on: a multi-rank full
    learner, a vLLM policy engine, and (on GPUs) a learner rank on every policy GPU."""
    if cfg.learner.weight_transport != "shared":
        return []
    pl, why = cfg.placement, []
    if cfg.learner.mode != "full":
        why.append(f"learner.mode = '{cfg.learner.mode}' sends an adapter, not full weights")
    if pl.learner_ranks < 2:
        why.append("placement.learner_ranks = 1: the single-process learner shares CUDA tensors by itself")
    if cfg.engines.policy.backend != "vllm":
        why.append(f"engines.policy.backend = '{cfg.engines.policy.backend}' cannot open shared buckets")
    bare = sorted(set(pl.policy_gpus) - set(pl.learner_gpus)) if pl.learner_gpus else []
    if bare:
        why.append(f"policy GPUs {bare} hold no learner rank, so their workers would get no bucket")
    if not why:
        return []
    return [
        Problem(
            "learner.weight_transport",
            "shared",
            "the shared weight route needs a multi-rank full learner and a vLLM policy engine with a "
            f"learner rank on each of its GPUs, but {'; '.join(why)}; set learner.weight_transport = 'bytes' "
            "(or 'auto')",
        )
    ]


def offload_needs_colocate(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """learner.offload frees memory for engines that wake beside the learner: only 'colocate'."""
    if not cfg.learner.offload or cfg.placement.mode == "colocate":
        return []
    return [
        Problem(
            "learner.offload",
            True,
            f"offload moves the learner's state to host RAM while engines wake on its devices, but "
            f"placement.mode = '{cfg.placement.mode}' never puts engines to sleep beside it; set "
            "placement.mode = 'colocate' or learner.offload = false",
        )
    ]


def sync_placement(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """'sync': engines stay resident while the learner trains, so they cannot share its GPUs."""
    pl = cfg.placement
    if pl.mode != "sync" or not pl.learner_gpus:
        return []
    local, gpus_of, learner = _devices(cfg)
    return [
        Problem(
            "placement.learner_gpus",
            pl.learner_gpus,
            f"'sync' keeps the {r} engine resident on GPU(s) {sorted(gpus_of[r] & learner)} while the learner "
            "trains there (out of memory); use placement.mode = 'colocate' (engines sleep) or move the learner",
        )
        for r in local
        if gpus_of[r] & learner
    ]


def split_placement(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """'split': the learner has GPUs of its own, disjoint from every engine's."""
    pl = cfg.placement
    if pl.mode != "split":
        return []
    local, gpus_of, learner = _devices(cfg)
    p: list[Problem] = []
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
    return p


def memory_fractions(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """The memory fractions of the engines resident together on one GPU add up to at most 1
    (kv_cache_gib engines are sized in bytes and checked by the memory plan)."""
    local, gpus_of, _ = _devices(cfg)
    eng = cfg.engines
    for gpu in sorted(gpus_of["policy"] | gpus_of["simulator"]):
        on = [r for r in local if gpu in gpus_of[r] and getattr(eng, r).kv_cache_gib == 0]
        total = sum(getattr(eng, r).gpu_memory_utilization for r in on)
        if total > 1.0:
            shares = " + ".join(
                f"engines.{r}.gpu_memory_utilization ({getattr(eng, r).gpu_memory_utilization})" for r in on
            )
            return [
                Problem(
                    f"engines.{on[-1]}.gpu_memory_utilization",
                    getattr(eng, on[-1]).gpu_memory_utilization,
                    f"on GPU {gpu}, {shares} = {total:.2f} > 1; lower them so they add up to at most 1 "
                    "(less the learner's share when it trains beside them)",
                )
            ]
    return []


# ----------------------------------------------------------------------------- environment
