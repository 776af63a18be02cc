"""Entry point: `python -m trustee.run CONFIG [--set section.key=value]... [--out DIR] [--dry-run]`.

Owns argument parsing, turning config errors into a clean exit (status 2, message on
stderr, no traceback), the run directory (resolved config written beside the run), the
start-up checks (model directories, tiny-model build, chat template prefix-preservation)
and printing the run plan. The training loop itself is composed from rollout/, learn/ and
placement; until it lands, a run stops after the plan and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from trustee.config import Config, ConfigError, Resolved, load_config, resolve

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
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument(
        "--dry-run", action="store_true", help="validate, resolve and print the plan; write nothing"
    )
    return p


def _build_tiny(cfg: Config, path: Path) -> list[str]:
    """Build (and SFT-warm) the config's tiny model in a temporary directory, then move it to
    `path`: an interrupted build or warm-up never leaves a half-made model behind."""
    import shutil

    from trustee.tiny import build_tiny_model

    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    build_tiny_model(tmp, size=cfg.model.tiny, seed=cfg.seed)
    notes = [f"built tiny model ({cfg.model.tiny}) at {path}"]
    if cfg.model.tiny_sft_steps:
        from trustee.sft import sft_warm

        print(f"SFT warm-up of the tiny model: {cfg.model.tiny_sft_steps} steps on toy tool calls ...", flush=True)
        rep = sft_warm(tmp, cfg.model.tiny_sft_steps, seed=cfg.seed)
        notes.append(
            f"SFT-warmed it {rep.steps} steps ({rep.wall_s:.0f}s): loss {rep.loss_first:.2f} -> {rep.loss_last:.2f}, "
            f"well-formed tool calls {rep.well_formed_rate:.0%}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return notes


def _model_checks(cfg: Config, build: bool) -> list[str]:
    """Start-up checks on the model directory; builds a tiny model when the config names one
    that does not exist yet (an existing directory is never modified). Returns notes."""
    notes: list[str] = []
    path = Path(cfg.model.path)
    if not (path / "config.json").exists():
        if cfg.model.tiny and build:
            notes += _build_tiny(cfg, path)
        elif cfg.model.tiny:
            notes.append(f"tiny model ({cfg.model.tiny}) will be built at {path}")
            return notes
        else:
            notes.append(f"model directory {path} not found: a real run needs it locally (no hub downloads)")
            return notes
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from trustee.chat.render import check_prefix_preserving, project_template

        tok = AutoTokenizer.from_pretrained(path)
        template = project_template() if cfg.model.chat_template == "trustee" else None
        problems = check_prefix_preserving(tok, template)
        if problems:
            notes.append(
                "WARNING: the chat template is not prefix-preserving, so multi-turn token ids cannot be "
                "extended in place: " + "; ".join(problems) + ". Set model.chat_template = 'trustee'."
            )
        else:
            notes.append(f"chat template ({cfg.model.chat_template}) is prefix-preserving")
    return notes


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


def format_plan(cfg: Config, res: Resolved, notes: list[str]) -> str:
    g, r = cfg.grpo, cfg.rollout
    lines = [
        f"trustee run '{cfg.name}' -> {res.run_dir}",
        f"  policy     {res.policy_model}  ({res.engines['policy']}, thinking {'on' if cfg.model.enable_thinking else 'off'})",
        f"  simulator  {res.simulator_model}  ({res.engines['simulator']})",
        f"  env        {cfg.environment.kind}, reward {cfg.environment.reward}, curriculum {cfg.curriculum.kind}",
        f"  steps      {g.steps} x {g.tasks_per_step} tasks x {g.group_size} episodes = {res.total_episodes} episodes",
        f"  rollout    <= {r.max_turns} turns, {r.max_tokens_per_turn} tokens/turn, {r.max_inflight_episodes} in flight",
        f"  loss       {g.loss_type}, clip [{1 - g.clip_low:.2f}, {1 + g.clip_high:.2f}], beta {g.beta}, IS {g.is_level}/{g.is_mode}",
        f"  learner    {res.learner}, lr {cfg.learner.lr}, {cfg.learner.schedule}",
        f"  placement  {cfg.placement.mode}, {res.gpus_required} GPU(s)",
    ]
    lines += [f"  note       {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(args.out or Path("runs") / cfg.name)
    res = resolve(cfg, run_dir)
    notes = _model_checks(cfg, build=not args.dry_run)
    print(format_plan(cfg, res, notes))
    if args.dry_run:
        print("dry run: config valid, nothing written")
        return 0
    if not (Path(cfg.model.path) / "config.json").exists():
        print(f"error: model directory {cfg.model.path} not found", file=sys.stderr)
        return EXIT_CONFIG
    problem = _hardware_problem(cfg, res)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(cfg)))
    (run_dir / "resolved.json").write_bytes(msgspec.json.format(msgspec.json.encode(res)))
    import anyio

    from trustee.train import train

    last = anyio.run(train, cfg, res, backend="asyncio")
    summary = {k: last[k] for k in ("reward_mean", "curriculum/difficulty", "policy_version") if k in last}
    print(json.dumps({"run_dir": str(run_dir), "status": "finished", **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
