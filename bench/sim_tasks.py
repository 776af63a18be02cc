"""What share of the simulator's generated tasks a real environment could answer.

    python -m bench.sim_tasks [--config configs/cpu-trustee.toml] [--tasks 8] [--difficulty 1]

Builds the run's placement and simulated environment from the config (with simulator.engine =
'policy-base': the policy engine with the adapter off, the untouched base), asks the task
generator for `--tasks` tasks at one curriculum difficulty (all in flight together, as a step
asks), and checks each generated task against the real toy tools (`trustee/envs/toy.py`, the
tools of configs/catalogs/toy-tools.jsonl):

- `generated`: the generator produced a task within its retry budget (schema-valid JSON whose
  reference calls pass the tools' schemas: the checks `sim/taskgen.py` already makes);
- `executable`: every reference call names a toy tool and runs on the real tools, in order,
  from an empty store, without an error result;
- `grounded`: every argument value of the reference calls appears in what the user is given
  (the opening query and the hidden information), so a policy could make those calls
  (`sim/taskgen.py`'s `ungrounded_values`, which `simulator.grounded_tasks` applies while generating);
- `valid` (the figure `task_valid_share` reports): executable and grounded.

Also the generator's rejections (scenarios regenerated: `rejected_share` of all scenarios
written) and, with `--tool-replies`, `tool_reply_match`: the tool role asked each generated
task's reference calls (one episode per task, as a policy making the right calls would see
it), its replies compared with the real toy tools' results (bench/sim2real.py's comparison;
executable tasks only).

Writes OUT/sim_tasks.json and .md with the shares, the first tasks as written (query, calls,
real results) and the wall time with the load average. Nothing is trained.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import add_out_arg, machine, write_report  # noqa: E402
from trustee.envs.toy_teacher import KIND_OF_TOOL  # noqa: E402

TOY_TOOLS = frozenset(KIND_OF_TOOL)  # the toy tools, each with the one-call kind that calls it


def check_task(task: Any) -> dict[str, Any]:
    """The real-tools verdict on one generated task (see the module docstring)."""
    from trustee.envs.toy import execute
    from trustee.sim.taskgen import ungrounded_values

    store: dict[str, str] = {}
    results, executable = [], bool(task.expected_calls)
    for call in task.expected_calls:
        if call.name not in TOY_TOOLS:
            executable = False
            results.append({"error": f"{call.name} is not a toy tool"})
            continue
        try:
            out = execute(call, store)
        except (
            KeyError,
            TypeError,
            ValueError,
        ) as e:  # arguments the schema let through but the tool cannot use
            out = {"error": f"{type(e).__name__}: {e}"}
        results.append(out)
        executable = executable and "error" not in out
    grounded = not ungrounded_values(task.expected_calls, f"{task.first_query} {task.hidden_info}")
    return {
        "first_query": task.first_query,
        "hidden_info": task.hidden_info,
        "calls": [{"name": c.name, "arguments": c.arguments} for c in task.expected_calls],
        "real_results": results,
        "executable": executable,
        "grounded": grounded,
        "valid": executable and grounded,
    }


async def generate(
    cfg: Any, res: Any, n: int, difficulty: float, seed: int, *, tool_replies: bool = False
) -> tuple[list[Any], int, dict]:
    """(tasks, generator failures, the simulator's counts) from the run's own pieces. The
    counts hold the generator's rejections and, with `tool_replies`, per task made, the tool
    role's replies to its reference calls (one episode each, as the policy would make them)."""
    from transformers import AutoTokenizer

    from trustee.chat.formats import chat_spec
    from trustee.curriculum import knobs_at
    from trustee.envs import build_environment
    from trustee.placement import Placement
    from trustee.sim.client import SimError

    tok = AutoTokenizer.from_pretrained(res.simulator_model)
    template = chat_spec(tok, chat_template=cfg.model.chat_template).template
    placement = await Placement.start(cfg, res)
    tasks: list[Any] = [None] * n
    try:
        env = build_environment(cfg, placement.simulator, tok, template)
        knobs = knobs_at(cfg.curriculum.aspects, difficulty)

        async def one(i: int) -> None:
            try:
                tasks[i] = await env.make_task(knobs, random.Random(seed * 1000 + i))
            except SimError as e:
                print(f"task {i}: generator failed: {e}", file=sys.stderr)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        made = [t for t in tasks if t is not None]
        replies: list[list[str]] = [[] for _ in made]

        async def answer(i: int) -> None:
            state = await env.start(made[i], f"probe-{i}")
            ep = state.data["sim"]
            try:
                replies[i] = [m.content for m in await ep.tools.run_turn(ep.log, list(made[i].expected_calls))]
            except SimError as e:
                print(f"task {i}: tool role failed: {e}", file=sys.stderr)

        if tool_replies:
            async with anyio.create_task_group() as tg:
                for i in range(len(made)):
                    tg.start_soon(answer, i)
        stats = placement.simulator.stats()
    finally:
        await placement.close()
    counts = {
        "requests": stats.requests,
        "generated_tokens": stats.generated_tokens,
        "rejected": env.taskgen.rejected,
        "ungrounded": env.taskgen.ungrounded,
        "tool_replies": replies,
    }
    return made, n - len(made), counts


def reply_match(checked: list[dict[str, Any]], replies: list[list[str]]) -> tuple[float, int]:
    """(share of the tool role's replies to executable reference calls equal to the real
    result, replies compared): bench/sim2real.py's comparison."""
    from bench.sim2real import same_result

    pairs = [
        (r, real)
        for c, rs in zip(checked, replies, strict=True)
        if c["executable"]
        for r, real in zip(rs, c["real_results"], strict=False)
    ]
    return (sum(same_result(r, real) for r, real in pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def main(argv: list[str] | None = None) -> int:
    from trustee.config import load_config, resolve

    ap = argparse.ArgumentParser(prog="python -m bench.sim_tasks", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/cpu-trustee.toml")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument(
        "--tool-replies", action="store_true", help="also ask the tool role each task's reference calls"
    )
    add_out_arg(ap)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    load_before = machine()["load_avg_1_5_15"]
    t0 = time.perf_counter()
    run_dir = resolve(cfg, Path(args.out) / "sim_tasks-run")
    tasks, failed, counts = anyio.run(
        lambda: generate(cfg, run_dir, args.tasks, args.difficulty, args.seed, tool_replies=args.tool_replies)
    )
    wall = time.perf_counter() - t0
    checked = [check_task(t) for t in tasks]
    replies = counts.pop("tool_replies")
    match, compared = reply_match(checked, replies)
    for c, r in zip(checked, replies, strict=True):
        c["tool_replies"] = r
    n = args.tasks
    share = {k: sum(c[k] for c in checked) / n for k in ("executable", "grounded", "valid")}
    report = {
        "config": args.config,
        "simulator_engine": cfg.simulator.engine,
        "model": cfg.model.path,
        "tasks": n,
        "difficulty": args.difficulty,
        "generated_share": len(tasks) / n,
        "executable_share": share["executable"],
        "grounded_share": share["grounded"],
        "task_valid_share": share["valid"],
        "generator_failures": failed,
        "rejected_share": counts["rejected"] / (counts["rejected"] + len(tasks)) if tasks else float("nan"),
        "tool_reply_match": match,
        "tool_replies_compared": compared,
        "simulator": counts,
        "wall_s": round(wall, 1),
        "load_avg_before": load_before,
        "machine": machine(),
        "examples": checked[:8],
    }
    md = (
        f"# Generated tasks against the real toy tools ({args.config})\n\n"
        f"{n} tasks at difficulty {args.difficulty}: generated {len(tasks)}, executable "
        f"{share['executable']:.2f}, grounded {share['grounded']:.2f}, valid {share['valid']:.2f}; "
        f"scenarios rejected {counts['rejected']} ({counts['ungrounded']} ungrounded); "
        f"tool replies equal to the real result {match:.2f} of {compared}; "
        f"{wall:.0f} s, load {load_before} before.\n"
    )
    path = write_report(args.out, "sim_tasks", report, md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
