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
  (the opening query and the hidden information), so a policy could make those calls;
- `valid` (the figure `task_valid_share` reports): executable and grounded.

Writes OUT/sim_tasks.json and .md with the shares, the first tasks as written (query, calls,
real results) and the wall time with the load average. Nothing is trained.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import add_out_arg, machine, write_report  # noqa: E402

TOY_TOOLS = {"add", "multiply", "convert_units", "kv_get", "kv_set"}


def _value_texts(v: Any) -> list[str]:
    """How a value may be written in a user's message."""
    if isinstance(v, bool):
        return [str(v).lower()]
    if isinstance(v, int | float):
        f = float(v)
        return [str(int(f))] if f.is_integer() else [str(v), f"{f:g}"]
    return [str(v).lower()]


def check_task(task: Any) -> dict[str, Any]:
    """The real-tools verdict on one generated task (see the module docstring)."""
    from trustee.envs.toy import execute

    given = f"{task.first_query} {task.hidden_info}".lower()
    store: dict[str, str] = {}
    results, executable, grounded = [], bool(task.expected_calls), True
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
        for v in call.arguments.values():
            texts = _value_texts(v)
            if not any(re.search(rf"(?<![\w.]){re.escape(t)}(?![\w])", given) for t in texts):
                grounded = False
    return {
        "first_query": task.first_query,
        "hidden_info": task.hidden_info,
        "calls": [{"name": c.name, "arguments": c.arguments} for c in task.expected_calls],
        "real_results": results,
        "executable": executable,
        "grounded": grounded,
        "valid": executable and grounded,
    }


async def generate(cfg: Any, res: Any, n: int, difficulty: float, seed: int) -> tuple[list[Any], int, dict]:
    """(tasks, generator failures, the simulator's request counts) from the run's own pieces."""
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
        stats = placement.simulator.stats()
    finally:
        await placement.close()
    made = [t for t in tasks if t is not None]
    counts = {"requests": stats.requests, "generated_tokens": stats.generated_tokens}
    return made, n - len(made), counts


def main(argv: list[str] | None = None) -> int:
    from trustee.config import load_config, resolve

    ap = argparse.ArgumentParser(prog="python -m bench.sim_tasks", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/cpu-trustee.toml")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    load_before = machine()["load_avg_1_5_15"]
    t0 = time.perf_counter()
    tasks, failed, counts = anyio.run(
        generate, cfg, resolve(cfg, Path(args.out) / "sim_tasks-run"), args.tasks, args.difficulty, args.seed
    )
    wall = time.perf_counter() - t0
    checked = [check_task(t) for t in tasks]
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
        f"{wall:.0f} s, load {load_before} before.\n"
    )
    path = write_report(args.out, "sim_tasks", report, md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
