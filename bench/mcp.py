"""MCP tool calls per second through trustee's environment, against the bare SDK client.

    python -m bench.mcp [--quick] [--levels 1,16,64] [--out DIR]

Both sides talk to the same server, the example's notes server (`examples/mcp/
notes_server.py`, written with the `mcp` SDK's server API), over stdio, with the same number
of server processes (`servers`, started once per side and warmed up) and the same calls
(four read-only calls per episode: list, read, search, read, so the notes never grow):

- trustee: `MCPEnv` with the server at `scope = "shared"` and `pool_size = servers`; an
  episode is `start` (a working directory, a lease from the pool), one `step` per call
  (routing, the call with its timeout, the result as the policy's text, the messages),
  `end_episode` (the lease back, the directory removed);
- bare: the SDK's `Client` (stdio transport, `cache=None` on both sides), worker i calling on
  client i mod `servers`, nothing else.

At each level, `level` episodes (workers) run at once until `calls` calls are done; the sides
alternate (trustee, bare, trustee, bare, ...) `repeats` times and a level's figure is the
median, so both see the same machine; the ratio trustee/bare is the figure that holds under
load (`ratios`, keyed by the level). Then the start-up cost of `scope = "episode"`: an
episode's `start` (a fresh directory copied from the example's template, the process, the
handshake), sequentially, against the bare `Client` entering (process and handshake).

Writes OUT/mcp.json, .md and .png (calls/s against concurrent episodes, both sides).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "examples" / "mcp" / "notes_server.py"
TASKS = ROOT / "examples" / "mcp" / "tasks.jsonl"
TEMPLATE = ROOT / "examples" / "mcp" / "workdir"
CALLS = [
    ("list_notes", {}),
    ("read_note", {"title": "wifi"}),
    ("search_notes", {"query": "ada"}),
    ("read_note", {"title": "dentist"}),
]
QUICK = dict(levels=[1, 16, 64], calls=256, repeats=2, servers=4, startups=4)
FULL = dict(levels=[1, 16, 64], calls=1024, repeats=3, servers=4, startups=8)
GOAL_RATIO_AT_16 = 0.8


def _env(scope: str, servers: int) -> Any:
    from trustee.envs.mcp_env import MCPEnv
    from trustee.envs.reference import reference_reward
    from trustee.mcp.servers import ServerSpec, Timeouts

    spec = ServerSpec(name="notes", command="{python}", args=(str(SERVER), "--dir", "{workdir}"), scope=scope)  # type: ignore[arg-type]
    return MCPEnv(
        [spec],
        tasks_path=str(TASKS),
        reward=reference_reward,
        timeouts=Timeouts(init=120.0, call=120.0, grace=2.0),
        pool_size=servers,
        workdir_template=str(TEMPLATE),
    )


async def _run_trustee(env: Any, level: int, calls: int) -> float:
    """Calls/s of `level` concurrent episodes through `env` until `calls` calls are done."""
    from trustee.envs.base import AgentAction
    from trustee.types import Message, ToolCall

    task = env.tasks[0]
    left = calls

    async def worker(w: int) -> None:
        nonlocal left
        n = 0
        while left > 0:
            state = await env.start(task, f"w{w}-{n}")
            try:
                for name, args in CALLS:
                    if left <= 0:
                        break
                    left -= 1
                    call = ToolCall(name=name, arguments=args)
                    await env.step(
                        state, AgentAction(message=Message(role="assistant", tool_calls=[call]), calls=[call])
                    )
            finally:
                await env.end_episode(state)
            n += 1

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(level):
            tg.start_soon(worker, w)
    return calls / (time.perf_counter() - t0)


async def _run_bare(clients: list[Any], level: int, calls: int) -> float:
    left = calls

    async def worker(w: int) -> None:
        nonlocal left
        client = clients[w % len(clients)]
        while left > 0:
            for name, args in CALLS:
                if left <= 0:
                    break
                left -= 1
                result = await client.call_tool(name, args)
                assert not result.is_error, result

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(level):
            tg.start_soon(worker, w)
    return calls / (time.perf_counter() - t0)


def _bare_client(workdir: str) -> Any:
    from mcp import Client, StdioServerParameters

    return Client(
        StdioServerParameters(command=sys.executable, args=[str(SERVER), "--dir", workdir]), cache=None
    )


async def throughput(p: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: each side's calls/s over the alternating repeats."""
    from contextlib import AsyncExitStack

    from bench.common import load_avg
    from trustee.envs.base import Knobs

    runs: dict[int, dict[str, list[float]]] = {n: {"trustee": [], "bare": []} for n in p["levels"]}
    async with AsyncExitStack() as stack:
        env = await stack.enter_async_context(_env("shared", p["servers"]))
        await env.make_task(Knobs(), random.Random(0))
        workdirs = [stack.enter_context(tempfile.TemporaryDirectory()) for _ in range(p["servers"])]
        for d in workdirs:  # the same notes as the trustee side's servers
            shutil.copytree(TEMPLATE, d, dirs_exist_ok=True)
        clients = [await stack.enter_async_context(_bare_client(d)) for d in workdirs]
        # Untimed warm-up: every server of both sides started and answering.
        await _run_trustee(env, p["servers"], 8 * p["servers"])
        assert env.pool.running == p["servers"], env.pool.running
        await _run_bare(clients, p["servers"], 8 * p["servers"])
        for rep in range(p["repeats"]):
            for n in p["levels"]:
                for side in ("trustee", "bare") if rep % 2 == 0 else ("bare", "trustee"):
                    if side == "trustee":
                        r = await _run_trustee(env, n, p["calls"])
                    else:
                        r = await _run_bare(clients, n, p["calls"])
                    runs[n][side].append(r)
                    print(
                        f"run {rep + 1}/{p['repeats']} level {n:3d} {side:8s} {r:8.1f} calls/s  load {load_avg()}",
                        flush=True,
                    )
    out = []
    for n, sides in runs.items():
        t, b = statistics.median(sides["trustee"]), statistics.median(sides["bare"])
        out.append(
            dict(
                concurrent_episodes=n,
                trustee_calls_per_s=round(t, 1),
                bare_calls_per_s=round(b, 1),
                ratio=round(t / b, 3),
                runs=sides,
            )
        )
    return out


async def startup(p: dict[str, Any]) -> dict[str, Any]:
    """Seconds per episode to get a fresh server (`scope = "episode"`), trustee vs bare, in
    alternation."""
    from trustee.envs.base import Knobs

    t_trustee, t_bare = [], []
    async with _env("episode", 1) as env:
        task = await env.make_task(Knobs(), random.Random(0))
        for i in range(p["startups"]):
            t0 = time.perf_counter()
            state = await env.start(task, f"s{i}")
            t_trustee.append(time.perf_counter() - t0)
            await env.end_episode(state)
            with tempfile.TemporaryDirectory() as d:
                shutil.copytree(TEMPLATE, d, dirs_exist_ok=True)  # as trustee's start does
                client = _bare_client(d)
                t0 = time.perf_counter()
                await client.__aenter__()
                t_bare.append(time.perf_counter() - t0)
                await client.__aexit__(None, None, None)
    med_t, med_b = statistics.median(t_trustee), statistics.median(t_bare)
    return dict(
        episodes=p["startups"],
        trustee_start_s_median=round(med_t, 3),
        bare_start_s_median=round(med_b, 3),
        trustee_over_bare=round(med_t / med_b, 3),
        trustee_start_s=[round(x, 3) for x in t_trustee],
        bare_start_s=[round(x, 3) for x in t_bare],
    )


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        "# MCP calls per second: trustee's environment vs the bare SDK client",
        "",
        f"`{rep['command']}`, {rep['machine']['utc']}, {m['cpu_count']} CPUs, load average before "
        f"{rep['load_avg_before']}, after {m['load_avg_1_5_15']}; server: the example notes server "
        f"({rep['config']['servers']} processes per side), mcp {rep['mcp_version']}.",
        "",
        "| concurrent episodes | trustee calls/s | bare SDK calls/s | trustee/bare |",
        "|---|---|---|---|",
    ]
    for r in rep["levels"]:
        lines.append(
            f"| {r['concurrent_episodes']} | {r['trustee_calls_per_s']} | {r['bare_calls_per_s']} | **{r['ratio']}** |"
        )
    s = rep["startup"]
    lines += [
        "",
        f'Start-up per episode (`scope = "episode"`, median of {s["episodes"]}): trustee '
        f"{s['trustee_start_s_median']} s (fresh directory from the template, process, handshake), bare SDK "
        f"{s['bare_start_s_median']} s (process, handshake); trustee/bare {s['trustee_over_bare']}.",
        "",
        f"Goal: trustee/bare >= {GOAL_RATIO_AT_16} at 16 concurrent episodes: "
        f"{'met' if rep['goal_met'] else 'NOT met'} ({rep['ratios'].get('16')}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from importlib.metadata import version

    from bench.common import add_out_arg, load_avg, machine, plot_lines, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"{QUICK['calls']} calls per run, {QUICK['repeats']} repeats"
    )
    ap.add_argument("--levels", default=None, help="concurrent episodes, comma-separated (default 1,16,64)")
    add_out_arg(ap)
    a = ap.parse_args(argv)
    p = dict(QUICK if a.quick else FULL)
    if a.levels:
        p["levels"] = [int(x) for x in a.levels.split(",")]
    before = load_avg()
    t0 = time.perf_counter()
    levels = anyio.run(throughput, p)
    start = anyio.run(startup, p)
    ratios = {str(r["concurrent_episodes"]): r["ratio"] for r in levels}
    rep = dict(
        bench="mcp",
        command="python -m bench.mcp" + (" --quick" if a.quick else ""),
        machine=machine(),
        load_avg_before=before,
        mcp_version=version("mcp"),
        config=dict(p, server=str(SERVER.relative_to(ROOT)), calls_per_episode=[c for c, _ in CALLS]),
        levels=levels,
        ratios=ratios,
        startup=start,
        goal_ratio_at_16=GOAL_RATIO_AT_16,
        goal_met=ratios.get("16", 0.0) >= GOAL_RATIO_AT_16,
        wall_s=round(time.perf_counter() - t0, 1),
        note=(
            "ratios are trustee/bare calls/s measured in the same run, the sides alternating; absolute "
            "calls/s depend on the load average (recorded before and after)"
        ),
    )
    for r in levels:
        print(
            f"level {r['concurrent_episodes']:3d}: trustee {r['trustee_calls_per_s']:8.1f}  bare "
            f"{r['bare_calls_per_s']:8.1f}  ratio {r['ratio']}",
            flush=True,
        )
    print(
        f"start-up per episode: trustee {start['trustee_start_s_median']} s, bare {start['bare_start_s_median']} s"
    )
    path = write_report(a.out, "mcp", rep, markdown(rep))
    why = plot_lines(
        path.with_suffix(".png"),
        {
            "trustee MCPEnv": (p["levels"], [r["trustee_calls_per_s"] for r in levels]),
            "bare SDK Client": (p["levels"], [r["bare_calls_per_s"] for r in levels]),
        },
        title="MCP tool calls/s (example notes server, stdio)",
        xlabel="concurrent episodes",
        ylabel="calls/s",
        logx=True,
    )
    print(f"wrote {path}" + (f" ({why})" if why else ""))


if __name__ == "__main__":
    main()
