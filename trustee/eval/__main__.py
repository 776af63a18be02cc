"""`python -m trustee.eval CONFIG [--model PATH] [--run-dir DIR] [--set k=v]...`

Evaluates a policy on BFCL (see `eval/bfcl.py`): builds the policy engine from the config's
`[model]` and `[engines.policy]` sections (HF on CPU; vLLM where `trustee.engines` offers a
builder), runs the categories of `[eval]` through the episode runner, prints a Markdown
table per category and writes the JSON report. `--judge-agreement` (or
`eval.judge_agreement = true`) instead runs the sim-to-real meter (`eval/judge_agreement.py`)
on the multi-turn categories: the simulated judge of `[simulator]` (its model on
`[engines.simulator]`, or the scripted judge) against BFCL's checker; it writes
judge_agreement.json beside the report. `--run-dir` reads the run's `config.json`
(written by `trustee.run`) instead of a TOML file.

Outputs go to `--out` / `eval.out`, by default into the run directory (`--run-dir`) or
runs/eval/<model directory name>/; never into a model directory (a report path inside the
policy's model directory is refused). Exit codes: 0 ok, 2 config error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio
import msgspec

from trustee import atomic
from trustee.config import Config, ConfigError, Problem, apply_overrides, load_config
from trustee.eval.bfcl import evaluate, format_table, rollout_config, write_report
from trustee.paths import default_run_dir, runs_root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trustee.eval", description="Evaluate a policy on BFCL.")
    p.add_argument(
        "config", nargs="?", help="TOML config (its [model], [engines.policy], [environment.bfcl], [eval])"
    )
    p.add_argument("--model", help="policy model directory (overrides model.path)")
    p.add_argument(
        "--run-dir", help="a run directory: use its config.json (and its model path unless --model)"
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="K=V", help="override a config field"
    )
    p.add_argument("--limit", type=int, help="entries per category (overrides eval.limit)")
    p.add_argument("--categories", help="comma-separated categories (overrides eval.categories)")
    p.add_argument("--out", help="JSON report path (overrides eval.out)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--judge-agreement",
        action="store_true",
        help="measure the simulated judge against BFCL's checker on the multi-turn categories",
    )
    return p


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.limit is not None:
        overrides.append(f"eval.limit={args.limit}")
    if args.categories:
        overrides.append("eval.categories=" + msgspec.json.encode(args.categories.split(",")).decode())
    if args.out:
        overrides.append(f"eval.out={args.out}")
    if args.run_dir:
        return _load_run_dir(Path(args.run_dir), overrides)
    return load_config(args.config, overrides)


def _load_run_dir(run_dir: Path, overrides: list[str]) -> Config:
    """The config a run wrote (`config.json`), plus overrides."""
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(
            str(path), [Problem("(file)", str(path), "no config.json: is this a trustee run directory?")]
        )
    raw = msgspec.json.decode(path.read_bytes())
    if (run_dir / "model" / "config.json").exists():  # a full fine-tuning run's final weights
        raw["model"]["path"] = str(run_dir / "model")
    raw = apply_overrides(raw, overrides)
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(str(path), [Problem("(config)", str(path), str(e))]) from None


def report_path(cfg: Config, run_dir: Path | None) -> Path:
    """Where the JSON report goes: eval.out, else RUN/bfcl_eval.json for --run-dir, else
    runs/eval/<model directory name>/bfcl_eval.json (the model directory is never written)."""
    if cfg.eval.out:
        return Path(cfg.eval.out)
    if run_dir is not None:
        return run_dir / "bfcl_eval.json"
    return runs_root() / "eval" / (Path(cfg.model.path).resolve().name or "model") / "bfcl_eval.json"


def _inside_model_dir(cfg: Config, out: Path) -> str:
    """A config error when `out` lies inside the policy's model directory, else ''."""
    model = Path(cfg.model.path).resolve()
    if out.resolve().is_relative_to(model):
        return str(
            ConfigError(
                "--out",
                [
                    Problem(
                        "eval.out",
                        str(out),
                        f"lies inside the model directory {model}, which evaluation never modifies; "
                        "give a path outside it (default: runs/eval/<model name>/bfcl_eval.json)",
                    )
                ],
            )
        )
    return ""


def build_policy_engine(cfg: Config):
    """The policy engine, built the way training builds it (`trustee.placement.build_engine`:
    HF on CPU or one GPU, vLLM where configured)."""
    from trustee.config import resolve
    from trustee.placement import build_engine

    res = resolve(cfg, default_run_dir(cfg.name))
    return build_engine(cfg.engines.policy, cfg.model.path, cfg, res, role="policy")


def trained_adapter(run_dir: Path | None):
    """The LoRA adapter a training run exported (RUN/adapter), as a weight update, or None."""
    if run_dir is None or not (run_dir / "adapter" / "adapter_config.json").exists():
        return None
    import json

    from trustee.engines.base import LoraUpdate

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    return LoraUpdate(config=config, path=str(run_dir / "adapter"))


async def run(cfg: Config, *, progress: bool = True, run_dir: Path | None = None):
    from trustee.rollout.episode import EpisodeRunner

    if cfg.model.tiny and not (Path(cfg.model.path) / "config.json").exists():
        from trustee.models.tiny import build_tiny_model

        build_tiny_model(cfg.model.path, size=cfg.model.tiny)
    from transformers import AutoTokenizer

    engine = build_policy_engine(cfg)
    adapter = trained_adapter(run_dir)
    if adapter is not None:
        await engine.update_weights(adapter)
    runner = EpisodeRunner.from_config(
        rollout_config(cfg.eval, cfg.rollout),
        cfg.model,
        engine,
        AutoTokenizer.from_pretrained(cfg.model.path),
    )
    try:
        return await evaluate(
            runner.run, cfg.eval, bfcl_cfg=cfg.environment.bfcl, progress=progress, model=cfg.model.path
        )
    finally:
        await engine.close()


def build_judge(cfg: Config):
    """The simulated judge of `[simulator]`, as the TRUSTEE environment builds it, and the
    engine behind it (None for the scripted judge)."""
    from trustee.sim.judge import Judge, ScriptedJudge

    mode = cfg.simulator.judge_mode
    if mode == "scripted":
        return ScriptedJudge(), None
    from transformers import AutoTokenizer

    from trustee.chat.render import project_template
    from trustee.config import resolve
    from trustee.placement import build_engine
    from trustee.sim.client import SimClient

    res = resolve(cfg, default_run_dir(cfg.name))
    engine = build_engine(cfg.engines.simulator, res.simulator_model, cfg, res, role="simulator")
    client = SimClient(
        engine,
        AutoTokenizer.from_pretrained(res.simulator_model),
        temperature=cfg.simulator.temperature,
        max_tokens=cfg.simulator.max_tokens,
        max_decode_retries=cfg.simulator.max_decode_retries,
        template=project_template() if cfg.model.chat_template == "trustee" else None,
        max_model_len=cfg.model.max_model_len,
    )
    judge = Judge(
        client,
        mode=mode,
        votes=cfg.simulator.judge_votes,
        vote_rule=cfg.simulator.judge_vote_rule,
        temperature=cfg.simulator.judge_temperature,
    )
    return judge, engine


async def run_agreement(cfg: Config, *, run_dir: Path | None = None):
    """The sim-to-real meter: the policy plays BFCL multi-turn entries, the simulated judge
    and BFCL's checker both score them (`eval/judge_agreement.measure`)."""
    from transformers import AutoTokenizer

    from trustee.chat.render import project_template
    from trustee.eval.judge_agreement import measure
    from trustee.rollout.episode import EpisodeRunner

    if cfg.model.tiny and not (Path(cfg.model.path) / "config.json").exists():
        from trustee.models.tiny import build_tiny_model

        build_tiny_model(cfg.model.path, size=cfg.model.tiny)
    engine = build_policy_engine(cfg)
    judge, judge_engine = build_judge(cfg)
    try:
        adapter = trained_adapter(run_dir)
        if adapter is not None:
            await engine.update_weights(adapter)
        runner = EpisodeRunner(
            policy=engine,
            tokenizer=AutoTokenizer.from_pretrained(cfg.model.path),
            cfg=rollout_config(cfg.eval, cfg.rollout),
            max_model_len=cfg.model.max_model_len,
            template=project_template() if cfg.model.chat_template == "trustee" else None,
            enable_thinking=cfg.model.enable_thinking,
        )
        return await measure(
            runner.run,
            cfg.eval,
            judge,
            judge_mode=cfg.simulator.judge_mode,
            bfcl_cfg=cfg.environment.bfcl,
            model=cfg.model.path,
        )
    finally:
        await engine.close()
        if judge_engine is not None:
            await judge_engine.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.config and not args.run_dir:
        print("error: give a CONFIG file or --run-dir", file=sys.stderr)
        return 2
    try:
        cfg = _load(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else None
    out = report_path(cfg, run_dir)
    if problem := _inside_model_dir(cfg, out):
        print(problem, file=sys.stderr)
        return 2
    if args.judge_agreement or cfg.eval.judge_agreement:
        return _main_agreement(cfg, out, run_dir)
    report = anyio.run(lambda: run(cfg, progress=not args.no_progress, run_dir=run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, str(out))
    print(format_table(report))
    print(f"report: {out}  ({report.wall_s:.1f}s)")
    return 0


def _main_agreement(cfg: Config, base: Path, run_dir: Path | None) -> int:
    from trustee.eval.judge_agreement import format_table as agreement_table
    from trustee.eval.judge_agreement import write_report as write_agreement

    try:
        rep = anyio.run(lambda: run_agreement(cfg, run_dir=run_dir))
    except ValueError as e:  # e.g. no multi-turn category selected
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = base.with_name("judge_agreement.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_agreement(rep, str(out))
    table = agreement_table(rep)
    atomic.write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"report: {out}  ({rep.wall_s:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
