"""Sim-to-real: does training only in the simulated environment help on the real one?

Run:  python -m bench.sim2real [--quick] [--out DIR]

TRUSTEE's central claim, on CPU with one model playing every role (issue 22):

1. **Train in simulation.** `python -m trustee.run configs/cpu-trustee.toml`: SmolLM2-135M-Instruct
   with a LoRA adapter is the policy; the same model's frozen base, on the same engine with the
   adapter off, writes the tasks over the toy tools as a catalog, plays the user and answers every
   tool call (no real tool is ever called while training); the scripted judge scores. The
   training reward's rise is `sim_gain` (mean reward of the last half of the steps minus the
   first half).
2. **Evaluate on the real tools.** The real toy environment's held-out tasks (real tools, exact
   rewards, the graded reward and three worked examples of configs/cpu-smollm.toml: the prompts
   bench.learning --model evaluates), played twice on one engine: by the untouched model
   (`control`: the weights the training started from; lr 0 would leave exactly these) and by the
   adapter the simulated training exported. Same tasks, same sampling keys (paired episodes).
   `real_gain` = held-out reward (sampled at the rollout temperature, as bench.learning reports)
   of the trained adapter minus the control's.
3. **The simulator's parts, checked against the real tools.**
   `task_valid_share`: generated tasks whose reference calls run on the real toy tools and use
   values the user was given (bench/sim_tasks.py's check, on tasks the same untouched base
   generates: the simulator never sees the adapter, so its tasks are the training run's kind).
   `tool_reply_match`: share of the simulated tool replies of the training run equal to the real
   tool's result on the same call (the agent's calls of each episode replayed in order on a fresh
   real store; numbers compared as numbers; two errors match whatever their text).
   `judge_agreement`: on the held-out episodes of step 2 (both arms), the scripted judge and the
   model judge (the untouched base in TRUSTEE's verdict mode) against the real exact result
   (`trustee.eval.judge_agreement.agreement`: accuracy, Cohen's kappa, the confusion, and the
   correlation of the judge's reward with the real graded reward).

Writes sim2real.json (machine, versions, config, load average, every figure, the per-step
training record), sim2real.md (a table) and sim2real.png (the simulated training reward per step;
the held-out real reward per arm) into --out (default runs/bench-sim2real; never the committed
bench/results unless asked). `--quick` is the size meant to finish within an hour on a quiet
2-core machine (bench/README.md says whether that has been measured). `--model-path DIR` runs on
another model directory (the plumbing test's tiny model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, plot_lines, write_report  # noqa: E402
from bench.learning import _curve, _mean, _model, _run  # noqa: E402
from bench.sim_tasks import TOY_TOOLS  # noqa: E402

SIM_CONFIG = "configs/cpu-trustee.toml"
REAL_CONFIG = "configs/cpu-smollm.toml"
ENDING = "the assistant gave its final answer (the real environment ends the episode there)"

SIZES = {  # simulated steps (of the config's 8 tasks x 4), held-out tasks x samples, generated tasks checked
    # quick: a simulated step of SmolLM2 cost 477 s at step 0 (niced, load ~2; its simulator calls run
    # on the same engine: ~75k prompt tokens a step); 4 steps + two held-out arms + the model judge + 8
    # generated tasks: ~2,700 s estimated on 2 quiet cores (not timed end to end)
    "quick": {"steps": 4, "heldout_tasks": 16, "heldout_samples": 2, "gen_tasks": 8},
    "full": {"steps": 8, "heldout_tasks": 32, "heldout_samples": 2, "gen_tasks": 16},
}


# ------------------------------------------------------------------ the simulated training


def sim_summary(recs: list[dict], trajectories: Path) -> dict[str, Any]:
    """The simulated run's per-step record and `sim_gain` (last half of the steps minus the first)."""
    steps = [r for r in recs if not r.get("final_eval")]
    rewards = [y for _, y in _curve(steps, "reward_mean")]
    half = max(1, len(rewards) // 2)
    per_step = [
        {
            "step": r["step"],
            "reward_mean": r.get("reward_mean", float("nan")),
            "groups_trained": r.get("groups_trained", 0.0),
            "groups_filtered": r.get("groups_filtered", 0.0),
            # trained for their reward variance, not only for malformed turns (grpo.turn_credit)
            "groups_with_variance": r.get("groups_trained", 0.0) - r.get("groups_malformed_only", 0.0),
            "tool_calls_mean": r.get("tool_calls_mean", float("nan")),
        }
        for r in steps
    ]
    calls: dict[int, list[bool]] = {}
    for line in trajectories.read_text().splitlines() if trajectories.exists() else []:
        rec = json.loads(line)
        calls.setdefault(rec["step"], []).append(rec["trajectory"]["counters"]["tool_calls"] > 0)
    for row in per_step:
        seen = calls.get(row["step"], [])
        row["tool_call_share"] = sum(seen) / len(seen) if seen else float("nan")
    return {
        "sim_gain": _mean(rewards[-half:]) - _mean(rewards[:half]) if rewards else float("nan"),
        "every_step_has_variance": bool(per_step) and all(r["groups_with_variance"] > 0 for r in per_step),
        "per_step": per_step,
    }


# ------------------------------------------------------------------ simulated tool replies vs the real tools


def _same_value(sim: Any, real: Any) -> bool:
    try:
        return math.isclose(float(sim), float(real), rel_tol=1e-6, abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(sim).strip().lower() == str(real).strip().lower()


def same_result(sim_content: str, real: dict[str, Any]) -> bool:
    """A simulated tool reply (the agent's view: canonical JSON of its fields) against the real
    tool's result: the same keys with the same values (numbers as numbers); two errors match."""
    try:
        sim = json.loads(sim_content)
    except ValueError:
        return False
    if not isinstance(sim, dict):
        return False
    if "error" in real or "error" in sim:
        return "error" in real and "error" in sim
    return sim.keys() == real.keys() and all(_same_value(sim[k], v) for k, v in real.items())


def tool_reply_match(trajectories: Path) -> tuple[float, int]:
    """(share of simulated tool replies equal to the real tool's result, replies compared), over
    the training run's episodes: each episode's calls replayed in order on a fresh real store."""
    from trustee.envs.toy import execute
    from trustee.types import Message

    hits = total = 0
    for line in trajectories.read_text().splitlines() if trajectories.exists() else []:
        messages = msgspec.convert(json.loads(line)["trajectory"]["messages"], list[Message])
        store: dict[str, str] = {}
        queue: list[Any] = []
        for m in messages:
            if m.role == "assistant":
                queue = list(m.tool_calls)
            elif m.role == "tool" and queue:
                call = queue.pop(0)
                if call.name not in TOY_TOOLS:
                    continue
                try:
                    real = execute(call, store)
                except (KeyError, TypeError, ValueError) as e:  # the tool cannot use these arguments
                    real = {"error": f"{type(e).__name__}: {e}"}
                total += 1
                hits += same_result(m.content, real)
    return (hits / total if total else float("nan")), total


# ------------------------------------------------------------------ the real environment


def real_config(model: str, size: dict[str, int], extra: list[str]) -> Any:
    from trustee.config import load_config

    return load_config(
        str(ROOT / REAL_CONFIG),
        [
            f"model.path={model}",
            "model.packaged=''",
            "model.tiny=''",
            # the model judge's prompt (the TRUSTEE verdict request) outgrows cpu-smollm's 1024; its
            # episodes stay far below either bound, so they play the same
            "model.max_model_len=4096",
            f"eval.heldout_tasks={size['heldout_tasks']}",
            f"eval.heldout_samples={size['heldout_samples']}",
            "logging.progress_bar=false",
            *extra,
        ],
    )


async def real_eval(cfg: Any, run_dir: Path, adapter: Any, judge_max_tokens: int) -> dict[str, Any]:
    """Held-out real toy episodes of the untouched model and of `adapter` on one engine, then
    both judges on every episode. Returns each arm's `eval/*` figures and the agreements."""
    from transformers import AutoTokenizer

    from trustee.chat.formats import chat_spec
    from trustee.config import resolve
    from trustee.envs import build_environment
    from trustee.placement import Placement
    from trustee.rollout.episode import EpisodeRunner
    from trustee.rollout.heldout import HeldOut

    res = resolve(cfg, run_dir)
    tok = AutoTokenizer.from_pretrained(res.policy_model)
    template = chat_spec(tok, chat_template=cfg.model.chat_template).template
    placement = await Placement.start(cfg, res)
    try:
        policy = placement.policy
        if hasattr(policy, "keyed_sampling"):
            policy.keyed_sampling = True  # samples depend on the episode id, not on batching
        env = build_environment(cfg, None, tok, template)
        runner = EpisodeRunner.from_config(cfg.rollout, cfg.model, policy, tok)
        heldout = HeldOut(
            env, runner, cfg.eval, cfg.curriculum.aspects, max_inflight=cfg.rollout.max_inflight_episodes
        )
        arms: dict[str, Any] = {}
        episodes: list[tuple[str, Any, Any]] = []
        tasks = {t.id: t for t in await heldout.tasks()}
        for arm in ("control", "trained"):
            if arm == "trained":
                await placement.push(adapter)
            t0 = time.perf_counter()
            arms[arm] = await heldout.run(0)  # the same episode ids: paired samples
            arms[arm]["wall_s"] = time.perf_counter() - t0
            arms[arm]["policy_version"] = policy.version
            episodes += [(arm, tasks[t.task_id], t) for _, t in heldout.last]
        t0 = time.perf_counter()
        judges = await judge_episodes(episodes, policy, tok, template, judge_max_tokens)
        judges["wall_s"] = time.perf_counter() - t0
    finally:
        await placement.close()
    return {"arms": arms, "judge_agreement": judges}


def judge_view(task: Any, messages: list[Any]) -> list[Any]:
    """The conversation a judge reads: from the task's own opening message on (the worked
    examples before it are prompt, not part of the episode)."""
    start = next((i for i, m in enumerate(messages) if m.role == "user" and m.content == task.first_query), 0)
    return messages[start:]


async def judge_rewards(
    judge: Any, scored: list[tuple[str, Any, Any]]
) -> tuple[list[float | None], list[str]]:
    """Each episode's reward from `judge` (None where it failed its retry budget), and the
    failures' messages. The judge reads the episode as the simulated environment logs it."""
    from trustee.sim.client import SimError
    from trustee.sim.log import SimLog

    rewards: list[float | None] = [None] * len(scored)
    errors: list[str] = []

    async def one(i: int) -> None:
        _, task, traj = scored[i]
        try:
            log = SimLog.replay(task, judge_view(task, traj.messages))
            score, _ = await judge.score(task, log, ENDING, key=f"{task.id}/{traj.episode_id}")
            rewards[i] = score.reward
        except SimError as e:
            errors.append(str(e)[:300])

    async with anyio.create_task_group() as tg:
        for i in range(len(scored)):
            tg.start_soon(one, i)
    return rewards, errors


async def judge_episodes(
    episodes: list[tuple[str, Any, Any]], policy: Any, tok: Any, template: Any, max_tokens: int
) -> dict[str, Any]:
    """The scripted judge and the model judge (the untouched base on the same engine, TRUSTEE
    verdicts) on each real episode, against its real exact result."""
    from trustee.engines.policy_base import PolicyBase
    from trustee.eval.judge_agreement import agreement, judge_passes
    from trustee.sim.client import SimClient
    from trustee.sim.judge import Judge, ScriptedJudge

    client = SimClient(PolicyBase(policy), tok, temperature=0.1, max_tokens=max_tokens, template=template)
    judges = {"scripted": ScriptedJudge(), "model": Judge(client, mode="trustee", votes=1, temperature=0.1)}
    scored = [t for t in episodes if t[2].status in ("ok", "truncated")]
    real_pass = [t.parts.get("exact", 0.0) >= 1.0 for _, _, t in scored]
    real_reward = [t.reward for _, _, t in scored]
    out: dict[str, Any] = {"episodes": len(scored), "real_pass_rate": _mean([float(x) for x in real_pass])}
    for name, judge in judges.items():
        rewards, errors = await judge_rewards(judge, scored)
        failed = {"judge_errors": len(errors), "last_error": errors[-1] if errors else ""}
        keep = [i for i, r in enumerate(rewards) if r is not None]
        if not keep:
            out[name] = {"n": 0, **failed}
            continue
        a = agreement(
            [judge_passes("trustee", float(rewards[i] or 0.0)) for i in keep],
            [real_pass[i] for i in keep],
            [float(rewards[i] or 0.0) for i in keep],
            [real_reward[i] for i in keep],
        )
        row = msgspec.to_builtins(a)
        row["confusion"] = {k.replace("bfcl", "real"): v for k, v in row["confusion"].items()}
        row["real_pass_rate"] = row.pop("bfcl_pass_rate")
        out[name] = {**row, **failed}
    return out


# ------------------------------------------------------------------ generated tasks on the real tools


def task_validity(model: str, n: int, seed: int, out: Path, sets: list[str]) -> dict[str, Any]:
    """bench/sim_tasks.py's check on `n` tasks the untouched base writes for cpu-trustee (with
    the training run's overrides `sets`, at its curriculum's start difficulty): the tasks the
    training would use, so after the generator's own checks (simulator.grounded_tasks)."""
    from bench.sim_tasks import check_task, generate
    from trustee.config import load_config, resolve

    cfg = load_config(
        str(ROOT / SIM_CONFIG), [f"model.path={model}", "model.packaged=''", "model.tiny=''", *sets]
    )
    difficulty = cfg.curriculum.start_difficulty
    tasks, failed, counts = anyio.run(generate, cfg, resolve(cfg, out / "sim_tasks-run"), n, difficulty, seed)
    checked = [check_task(t) for t in tasks]
    return {
        "tasks": n,
        "difficulty": difficulty,
        "generator_failures": failed,
        "scenarios_rejected": counts["rejected"],
        "scenarios_ungrounded": counts["ungrounded"],
        "task_valid_share": sum(c["valid"] for c in checked) / n,
        "executable_share": sum(c["executable"] for c in checked) / n,
        "grounded_share": sum(c["grounded"] for c in checked) / n,
        "examples": checked[:4],
    }


# ------------------------------------------------------------------ the benchmark


def _held_out(arm: dict[str, Any], metric: str) -> float:
    return float(arm.get(f"eval/reward_{metric}", float("nan")))


def _plot(sim: dict[str, Any], real: dict[str, Any], metric: str, path: Path) -> str | None:
    rows = sim["per_step"]
    series = {
        "simulated training reward (scripted judge)": (
            [r["step"] for r in rows],
            [r["reward_mean"] for r in rows],
        )
    }
    # Each arm was evaluated once: the control has the weights step 0 started from, the trained
    # adapter those after the last step's update; one point each, where those weights stand.
    after = rows[-1]["step"] + 1 if rows else 1
    for arm, label, x in (("control", "untouched", 0), ("trained", "after the last update", after)):
        series[f"real held-out reward ({metric}), {arm} ({label})"] = ([x], [_held_out(real["arms"][arm], metric)])
    return plot_lines(
        path,
        series,
        title="sim2real: trained in simulation, scored on real tools",
        xlabel="step",
        ylabel="reward",
    )


def _markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    f = report
    lines = [
        "# bench.sim2real",
        "",
        f"`python -m bench.sim2real{' --quick' if args.quick else ''}`: {f['config']['sim_config']} trained "
        f"{f['config']['steps']} steps in simulation, scored on {f['config']['real_config']}'s real held-out tasks.",
        "",
        "| real_gain | sim_gain | task_valid_share | tool_reply_match | judge accuracy (scripted / model) | wall_s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    ja = f["judge_agreement"]
    acc = " / ".join(f"{ja[j].get('accuracy', float('nan')):.3f}" for j in ("scripted", "model"))
    lines.append(
        f"| {f['real_gain']:+.3f} | {f['sim_gain']:+.3f} | {f['task_valid_share']:.2f} | "
        f"{f['tool_reply_match']:.2f} ({f['tool_replies_compared']} replies) | {acc} | {f['wall_s']:.0f} |"
    )
    lines += [
        "",
        "| arm | held-out reward (sampled) | (greedy) | exact (sampled) | malformed share (sampled) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in ("control", "trained"):
        a = f["real"][arm]
        lines.append(
            f"| {arm} | {_held_out(a, 'sampled'):.3f} | {_held_out(a, 'greedy'):.3f} | "
            f"{a.get('eval/sampled/exact', float('nan')):.3f} | {a.get('eval/sampled_malformed', float('nan')):.0%} |"
        )
    lines += [
        "",
        "| simulated step | reward | groups trained | with reward variance | filtered | episodes with a tool call |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in f["sim"]["per_step"]:
        lines.append(
            f"| {r['step']} | {r['reward_mean']:.3f} | {r['groups_trained']:.0f} | {r['groups_with_variance']:.0f} | "
            f"{r['groups_filtered']:.0f} | "
            f"{r['tool_call_share']:.0%} |"
        )
    load0, load1 = f["machine"]["load_avg_1_5_15"], f["load_avg_end"]
    lines.append(
        f"\nLoad average (1/5/15 min) at start {load0}, at end {load1}. Control: {f['control_form']}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.sim2real",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="the size meant to fit an hour on 2 quiet cores")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-sim2real"))
    ap.add_argument(
        "--runs", default=str(ROOT / "runs" / "bench-sim2real-runs"), help="the runs' own directories"
    )
    ap.add_argument(
        "--model", default="smollm2-135m-instruct", help="a packaged model (python -m trustee.models list)"
    )
    ap.add_argument(
        "--model-path", default="", help="a model directory instead of --model (tests: the tiny model)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-tasks", type=int, default=0, help="generated tasks checked (default: the size's)")
    ap.add_argument("--set", action="append", default=[], help="override for the simulated training run")
    ap.add_argument("--real-set", action="append", default=[], help="override for the real evaluation")
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out, runs = Path(args.out), Path(args.runs)
    t0, start = time.perf_counter(), machine()
    if runs.exists():  # a run directory left from before would resume instead of training afresh
        shutil.rmtree(runs)
    model = args.model_path or _model(SIM_CONFIG, runs, args.model)
    from trustee.eval.__main__ import trained_adapter

    sim_sets = [f"grpo.steps={size['steps']}", "checkpoint.every_steps=0", *args.set]
    recs = _run(SIM_CONFIG, runs / "sim", args.seed, model, sim_sets, os.cpu_count() or 1)
    sim = sim_summary(recs, runs / "sim" / "trajectories.jsonl")
    match, compared = tool_reply_match(runs / "sim" / "trajectories.jsonl")
    adapter = trained_adapter(runs / "sim")
    if adapter is None:
        raise SystemExit(f"the simulated run left no adapter in {runs / 'sim'}")
    judge_tokens = json.loads((runs / "sim" / "config.json").read_text())["simulator"]["max_tokens"]
    metric = "sampled" if size["heldout_samples"] else "greedy"
    real = anyio.run(
        real_eval,
        real_config(model, size, args.real_set),
        runs / "real",
        adapter,
        judge_tokens,
    )
    valid = task_validity(model, args.gen_tasks or size["gen_tasks"], args.seed, runs, sim_sets)
    arms = real["arms"]
    report = {
        "benchmark": "sim2real",
        "machine": start,
        "load_avg_end": machine()["load_avg_1_5_15"],
        "config": {
            "sim_config": SIM_CONFIG,
            "real_config": REAL_CONFIG,
            "model": model,
            "quick": args.quick,
            **size,
            "sim_overrides": sim_sets,
            "real_overrides": args.real_set,
            "seed": args.seed,
            "metric": metric,
        },
        "control_form": "the untouched model (the weights the simulated training started from) on the same "
        "held-out tasks, samples and sampling keys as the trained adapter, on the same engine",
        "real_gain": _held_out(arms["trained"], metric) - _held_out(arms["control"], metric),
        "real_gain_greedy": _held_out(arms["trained"], "greedy") - _held_out(arms["control"], "greedy"),
        "sim_gain": sim["sim_gain"],
        "task_valid_share": valid["task_valid_share"],
        "tool_reply_match": match,
        "tool_replies_compared": compared,
        "judge_agreement": real["judge_agreement"],
        "wall_s": time.perf_counter() - t0,
        "sim": sim,
        "real": arms,
        "generated_tasks": valid,
    }
    path = write_report(out, "sim2real", report, _markdown(report, args))
    why = _plot(sim, real, metric, out / "sim2real.png")
    keys = ("real_gain", "sim_gain", "task_valid_share", "tool_reply_match", "wall_s")
    print(json.dumps({k: report[k] for k in keys}))
    print(f"wrote {path}" + (f" ({why})" if why else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
