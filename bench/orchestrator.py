"""The orchestrator's ceiling: agent turns/s of the asyncio process alone, on one core.

    python -m bench.orchestrator [--quick] [--inflight 64,512,2048] [--out DIR]

The engine and the environment are test doubles that answer at once (`InstantEngine`,
`InstantEnv`), so what is measured is everything trustee's own process does per turn: the
real `GroupScheduler` (task sampling, slots, the bounded stream), the real `EpisodeRunner`
(chat rendering of each environment turn to ids, decoding and parsing each sampled turn
against the task's tool schemas, length checks, building the `Trajectory`), a consumer that
takes finished groups and logs every trajectory to a `RunLog` (JSONL, as training does), under
the garbage-collector settings training runs its loop with (`trustee.gcpolicy`). The
process is pinned to one core (`sched_setaffinity`). Each in-flight level runs for a fixed
number of groups after a warm-up, `repeats` times, the levels interleaved (64, 512, 2048, 64,
...); a level's figures are the medians of its runs, and every run is kept in the JSON. Why:
on a shared virtual machine one core's speed drifts by up to 1.8x from one second to the
next (the same level, same process, nothing else running: 4,900 to 8,900 turns/s over 15
back-to-back runs on 2026-12-02), so one run of a second or two is a draw, not a figure.
The per-turn cost is then split: decoding, parsing and schema validation, rendering and
encoding, building trajectories and logging, each timed alone on the real objects (a real
episode's trajectory, its prompt carrying its tool list); the runner's other work and the
doubles, from the same episodes at the same number in flight driven round-robin by hand
with no event loop; and the event loop and scheduler, as the measured time less that.
Beside it: the turns/s an 8-GPU rollout needs, from published decode rates (cited in the
JSON), so the margin is a ratio.

Writes OUT/orchestrator.json, .md and .png (turns/s against episodes in flight).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

QUICK = dict(inflight=[64, 512, 2048], groups=256, warmup_groups=32, repeats=5)
FULL = dict(inflight=[64, 512, 2048], groups=512, warmup_groups=64, repeats=7)
GROUP_SIZE = 8
TURNS_PER_EPISODE = 4  # 3 tool-calling turns, then a final answer

# The arithmetic of what 8 GPUs ask of the orchestrator. Each figure says where it comes from.
NEED = {
    "decode_tok_s_per_gpu": 12000.0,
    "decode_tok_s_per_gpu_source": (
        "ASSUMPTION, not verified here: aggregate decode throughput of vLLM serving a Llama-3-8B-class "
        "model on one H100 at high concurrency, of the order reported on the vLLM blog's v0.6.0 "
        "performance update (blog.vllm.ai, 2024-09-05: throughput benchmarks on ShareGPT, 8B on "
        "1xH100). Treat as an order of magnitude; replace with a measured figure on the target GPU."
    ),
    "gpus_for_rollout": 8,
    "tokens_per_turn": 256,
    "tokens_per_turn_source": (
        "configs: rollout.max_tokens_per_turn is 1024 (trustee/config/schema.py RolloutConfig); "
        "tool-calling turns are mostly short calls, 256 sampled tokens per turn is an assumption"
    ),
}


def _tool_specs() -> list[Any]:
    from trustee.envs.toy import TOOLS

    return list(TOOLS.values())


@dataclass
class InstantEngine:
    """Test double: an engine that answers at once with canned ids. Turn k < TURNS-1 of an
    episode is a schema-valid tool call, the last turn a final answer. Yields to the event
    loop once per request (as any awaited engine does)."""

    tokenizer: Any
    turns: int = TURNS_PER_EPISODE
    # True: yield with a bare `asyncio.sleep(0)`, which needs no running loop (episodes driven
    # by hand, `loop_free_us`); False: anyio's checkpoint, as an engine awaited in the loop.
    bare_yield: bool = False
    version: int = 0
    requests: int = 0
    _turn: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Imported here, once, not per request (and not at module import: `--help` stays light).
        import asyncio
        from functools import partial

        import anyio

        from trustee.engines.base import Completion

        self._yield = partial(asyncio.sleep, 0) if self.bare_yield else anyio.lowlevel.checkpoint
        self._completion = Completion
        call = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>'
        final = "The answer is 42, computed with the add tool.<|im_end|>"
        enc = self.tokenizer.encode
        self._call = enc(call, add_special_tokens=False)
        self._final = enc(final, add_special_tokens=False)
        self._call_lp = [-0.5] * len(self._call)
        self._final_lp = [-0.5] * len(self._final)

    async def generate(self, prompt: list[int], params: Any, *, key: str | None = None) -> Any:
        await self._yield()
        self.requests += 1
        k = self._turn.get(key, 0)
        last = k + 1 >= self.turns
        if last:
            self._turn.pop(key, None)
        else:
            self._turn[key] = k + 1
        ids, lps = (self._final, self._final_lp) if last else (self._call, self._call_lp)
        return self._completion(
            token_ids=ids, logprobs=lps, finish_reason="stop", policy_version=self.version
        )

    async def sleep(self, level: int = 1) -> None:
        return None

    async def wake(self) -> None:
        return None

    async def update_weights(self, update: Any) -> None:
        self.version += 1

    def stats(self) -> Any:
        from trustee.engines.base import EngineStats

        return EngineStats(requests=self.requests)

    async def close(self) -> None:
        return None


class InstantEnv:
    """Test double: an environment whose tools answer at once. Tasks draw their tool set from
    a small pool (as the toy and BFCL environments' tasks share tool sets), with a query of
    its own; every tool call gets a short JSON result that differs from call to call (so no
    cache can answer it); a turn without calls ends the episode, reward 1."""

    name = "instant"

    def __init__(self, pool: int = 8):
        from trustee.envs.base import EpisodeState, Score
        from trustee.types import Message, Task

        self._state, self._score, self._message, self._task = EpisodeState, Score, Message, Task
        self.calls = 0
        tools = _tool_specs()
        rng = random.Random(0)
        self.tool_sets = [rng.sample(tools, rng.randint(2, len(tools))) for _ in range(pool)]
        for ts in self.tool_sets:  # every set carries the tool the engine double calls
            if all(t.name != "add" for t in ts):
                ts.append(next(t for t in tools if t.name == "add"))

    async def make_task(self, knobs: Any, rng: random.Random) -> Any:
        a, b = rng.randrange(1000), rng.randrange(1000)
        return self._task(
            id=f"instant-{rng.getrandbits(32):08x}",
            env="instant",
            tools=self.tool_sets[rng.randrange(len(self.tool_sets))],
            first_query=f"What is {a} plus {b}? Then tell me the result in one sentence.",
            system_prompt="You are a helpful assistant. Use the tools.",
        )

    async def start(self, task: Any, episode_id: str, group: Any = None) -> Any:
        msgs = [
            self._message(role="system", content=task.system_prompt),
            self._message(role="user", content=task.first_query),
        ]
        return self._state(episode_id=episode_id, task=task, messages=msgs, group=group)

    async def step(self, state: Any, action: Any) -> list[Any]:
        if not action.calls and not action.errors:
            state.done = True
            return []
        # A fresh result each call, as real tools give: nothing downstream may memoise it.
        self.calls += 1
        return [
            self._message(role="tool", content=f'{{"result": {self.calls}}}', name=c.name)
            for c in action.calls
        ]

    async def score(self, state: Any) -> Any:
        return self._score(reward=1.0, parts={})


def _rollout(tok: Any, *, bare_yield: bool = False, cfg: Any = None) -> tuple[InstantEngine, InstantEnv, Any]:
    """The engine and environment doubles and the real `EpisodeRunner` every measurement here
    runs episodes with (`cfg`: the runner's RolloutConfig, default when None)."""
    from trustee.chat.render import project_template
    from trustee.rollout.episode import EpisodeRunner

    engine = InstantEngine(tok, bare_yield=bare_yield)
    env = InstantEnv()
    kw = {} if cfg is None else {"cfg": cfg}
    runner = EpisodeRunner(engine, tok, max_model_len=4096, template=project_template(), **kw)
    return engine, env, runner


def _pin_one_core() -> int | None:
    """Pin this process to one core (the last one it may use). Returns it, or None."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return cpus[-1]
    except (AttributeError, OSError):
        return None


def _tokenizer() -> Any:
    from pathlib import Path

    from transformers import AutoTokenizer

    from trustee.models.tiny import build_tiny_model

    d = build_tiny_model(Path(".cache") / "tiny-test", size="test", seed=0)
    return AutoTokenizer.from_pretrained(d)


async def _drive(inflight: int, groups: int, warmup: int, tok: Any, log_dir: str) -> dict[str, Any]:
    """Run the real scheduler + runner until `warmup + groups` groups are consumed; time the
    last `groups`."""
    import anyio

    from trustee.config import CurriculumConfig, LoggingConfig, RolloutConfig
    from trustee.curriculum import Curriculum
    from trustee.metrics import RunLog
    from trustee.rollout.scheduler import GroupScheduler

    engine, env, runner = _rollout(tok, cfg=RolloutConfig(max_inflight_episodes=inflight))
    sched = GroupScheduler(
        env=env,
        runner=runner,
        curriculum=Curriculum(CurriculumConfig()),
        group_size=GROUP_SIZE,
        max_inflight_groups=max(1, inflight // GROUP_SIZE),
        max_staleness=1,
        version=lambda: engine.version,
        rng=random.Random(0),
        buffer=16,
    )
    runlog = RunLog(log_dir, LoggingConfig(progress_bar=False), total_steps=1, run_name="bench")
    t0, c0 = time.perf_counter(), time.process_time()
    turns0 = 0
    episodes = 0
    peak = 0
    async with anyio.create_task_group() as tg:
        sched.start(tg)
        for i in range(warmup + groups):
            if i == warmup:
                t0, c0, turns0, episodes = time.perf_counter(), time.process_time(), engine.requests, 0
            (item,) = await sched.take(1)
            runlog.trajectories(0, item.group.trajectories)
            episodes += len(item.group.trajectories)
            bad = [t for t in item.group.trajectories if t.status != "ok"]
            assert not bad, f"episode failed in the benchmark: {bad[0].status} {bad[0].error}"
            peak = max(peak, sched.inflight)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        turns = engine.requests - turns0  # includes turns of groups still in flight
        tg.cancel_scope.cancel()
    runlog.close()
    return dict(
        inflight_episodes=inflight,
        groups=groups,
        episodes=episodes,
        turns=turns,
        wall_s=round(wall, 3),
        cpu_s=round(cpu, 3),
        turns_per_s=round(turns / wall, 1),
        turns_per_cpu_s=round(turns / cpu, 1),
        episodes_per_s=round(episodes / wall, 1),
        peak_inflight_groups=sched.peak_inflight,
    )


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures: the median of its runs for each rate, the spread of turns/s, and
    every run."""
    med = statistics.median
    tps = [r["turns_per_s"] for r in runs]
    return dict(
        inflight_episodes=runs[0]["inflight_episodes"],
        groups=runs[0]["groups"],
        repeats=len(runs),
        turns_per_s=round(med(tps), 1),
        turns_per_cpu_s=round(med(r["turns_per_cpu_s"] for r in runs), 1),
        episodes_per_s=round(med(r["episodes_per_s"] for r in runs), 1),
        turns_per_s_min=min(tps),
        turns_per_s_max=max(tps),
        wall_s=round(med(r["wall_s"] for r in runs), 3),
        peak_inflight_groups=max(r["peak_inflight_groups"] for r in runs),
        load_avg_after=runs[-1]["load_avg_after"],
        runs=runs,
    )


def run_level(inflight: int, groups: int, warmup: int, tok: Any) -> dict[str, Any]:
    import anyio

    from trustee.gcpolicy import QuietCollector

    # The collector's settings training runs its loop under (train.train, after set-up).
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as d, QuietCollector():
        return anyio.run(_drive, inflight, groups, warmup, tok, d)


def _run_now(coro: Any) -> Any:
    """Run a coroutine that never waits on the event loop (only bare yields, which are
    ignored) to its end, with no loop."""
    while True:
        try:
            coro.send(None)
        except StopIteration as e:
            return e.value


def loop_free_us(tok: Any, inflight: int, groups: int = 256) -> float:
    """CPU-us per turn of the same episodes, `inflight` at a time, driven round-robin by hand
    instead of by the event loop and the scheduler (the engine double's yield is a bare
    `asyncio.sleep(0)`, which needs no loop): everything an episode does, with its memory
    effects at that many live episodes, less scheduling, asyncio and logging."""
    from collections import deque

    from trustee.gcpolicy import QuietCollector

    engine, env, runner = _rollout(tok, bare_yield=True)
    rng = random.Random(1)

    def run(groups: int) -> float:
        tasks = [_run_now(env.make_task(None, rng)) for _ in range(groups)]
        # a group's episodes start together, as the scheduler starts them
        pending = deque(
            runner.run(env, tasks[g], f"g{g}/{i}") for g in range(groups) for i in range(GROUP_SIZE)
        )
        live: deque[Any] = deque()
        turns0, c0 = engine.requests, time.process_time()
        while pending or live:
            while pending and len(live) < inflight:
                live.append(pending.popleft())
            coro = live.popleft()
            try:
                coro.send(None)
                live.append(coro)
            except StopIteration as e:
                assert e.value.status == "ok", e.value.error
        return (time.process_time() - c0) / (engine.requests - turns0) * 1e6

    with QuietCollector():
        run(max(8, groups // 4))  # warm-up: parsers, renderers and memos built, as in a level's warm-up
        return run(groups)


def cost_breakdown(tok: Any, per_turn_us: float, inflight: int, reps: int = 400) -> dict[str, Any]:
    """Per-turn microseconds of each part, each timed alone (timeit on the real objects, no
    profiler overhead) and weighted by how often an episode does it; then, from the episodes
    run without the event loop (`loop_free_us`, median of three), the runner's other work
    and the doubles, and the event loop and scheduler as what remains of the measured time."""
    import timeit

    import msgspec

    from trustee.types import Message, Trajectory

    engine, env, runner = _rollout(tok, bare_yield=True)
    task = _run_now(env.make_task(None, random.Random(2)))
    fmt, parser, turns = runner.for_tools(task.tools)
    # one real episode's trajectory: its prompt carries its tool list, as every episode's does
    traj = _run_now(runner.run(env, task, "g0/0"))
    fields = {f: getattr(traj, f) for f in traj.__struct_fields__}
    msgs = traj.messages[:2]
    reply = [Message(role="tool", content='{"result": 42}', name="add")]
    call_text = turns.decode(engine._call)
    enc = msgspec.json.Encoder()

    def us(fn: Any) -> float:  # CPU microseconds of this process per call (load-robust)
        fn()
        return timeit.Timer(fn, timer=time.process_time).timeit(number=reps) / reps * 1e6

    per_episode = TURNS_PER_EPISODE
    tool_turns = TURNS_PER_EPISODE - 1
    key_prompts = [msgspec.structs.replace(msgs[1], content=f"q{i}") for i in range(reps + 1)]
    it = iter(key_prompts)
    # a fresh result each time, as in the run (the renderer memoises repeated text pieces)
    replies = iter([[msgspec.structs.replace(reply[0], content=f'{{"result": {i}}}')] for i in range(reps + 1)])
    parts = {
        "decode sampled ids": us(lambda: turns.decode(engine._call)),
        "parse + schema-validate": us(lambda: parser.parse(call_text)) * tool_turns / per_episode
        + us(lambda: parser.parse("The answer is 42.")) / per_episode,
        "render + encode env turn": us(lambda: turns.continuation_ids(next(replies))) * tool_turns / per_episode,
        "render + encode prompt (1 of 8 per group)": us(lambda: turns.prompt_ids([msgs[0], next(it)]))
        / per_episode
        / GROUP_SIZE,
        "trajectory build + check": us(lambda: Trajectory(**fields).check()) / per_episode,
    }
    logging_us = us(lambda: enc.encode({"step": 0, "trajectory": traj})) / per_episode
    free = statistics.median(loop_free_us(tok, inflight) for _ in range(3))
    parts["episode runner's other work, env/engine doubles, memory effects (loop-free rest)"] = max(
        0.0, free - sum(parts.values())
    )
    parts["logging (JSONL encode)"] = logging_us
    parts["event loop and scheduler (measured less loop-free less logging)"] = max(
        0.0, per_turn_us - free - logging_us
    )
    parts = {k: round(v, 2) for k, v in parts.items()}
    return dict(
        measured_us_per_turn=round(per_turn_us, 2),
        loop_free_us_per_turn=round(free, 2),
        trajectory_tokens=len(traj.tokens),
        us_per_turn=parts,
        share={k: round(v / per_turn_us, 3) for k, v in parts.items()},
        note=(
            "parts timed alone; 'loop-free' is the same episodes at the same number in flight "
            "driven round-robin without the event loop (loop_free_us); the host's speed drifts "
            "between measurements, so the last two rows are differences of medians and can be off "
            "by that drift (a row that would be negative is shown as 0)"
        ),
        template_renders=turns.template_renders,
    )


def need() -> dict[str, Any]:
    n = NEED
    turns = n["decode_tok_s_per_gpu"] * n["gpus_for_rollout"] / n["tokens_per_turn"]
    return dict(NEED, turns_per_s_needed=round(turns, 1))


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        "# Orchestrator ceiling (one core, instant engine and environment)",
        "",
        f"`{rep['command']}`; {m['cpu']} ({m['cpu_count']} cores, pinned to core {rep['config']['core']}); "
        f"load average {rep['load_avg_before']} before, {m['load_avg_1_5_15']} after (shared machine).",
        f"Episodes: {GROUP_SIZE}-episode groups, {TURNS_PER_EPISODE} policy turns each "
        f"({TURNS_PER_EPISODE - 1} tool calls, then an answer); tiny byte-level BPE tokenizer; every "
        "trajectory logged to JSONL.",
        "",
        f"Each level ran {rep['config']['repeats']} times, interleaved with the others; figures are medians "
        "over the runs (one core's speed drifts on a shared machine), with the slowest and fastest run.",
        "",
        "| episodes in flight | peak groups in flight | turns/s (wall, median) | slowest-fastest run | turns per CPU-s | episodes/s | groups timed per run | wall s per run | load avg after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rep["levels"]:
        lines.append(
            f"| {r['inflight_episodes']} | {r['peak_inflight_groups']} | {r['turns_per_s']:.0f} | "
            f"{r['turns_per_s_min']:.0f}-{r['turns_per_s_max']:.0f} | {r['turns_per_cpu_s']:.0f} | {r['episodes_per_s']:.0f} | "
            f"{r['groups']} | {r['wall_s']} | {r['load_avg_after']} |"
        )
    nd = rep["need"]
    lines += [
        "",
        f"8-GPU need: {nd['gpus_for_rollout']} GPUs x {nd['decode_tok_s_per_gpu']:.0f} decode tok/s / "
        f"{nd['tokens_per_turn']} tokens per turn = **{nd['turns_per_s_needed']:.0f} turns/s**; "
        f"measured at 512 in flight: {rep['turns_per_s']:.0f} turns/s wall ({rep['turns_per_cpu_s']:.0f} per CPU-s), "
        f"margin **{rep['margin_over_need']:.1f}x** "
        "(decode rate is an assumption, see the JSON).",
        "",
        f"Per-turn CPU cost at {rep['turns_per_s_at']} in flight ({rep['profile']['measured_us_per_turn']:.0f} CPU-us/turn "
        "measured; each part timed alone on the real objects in CPU time, weighted by how often an episode does it):",
        "",
        "| part | CPU-us/turn | share |",
        "|---|---:|---:|",
    ]
    for k, v in rep["profile"]["us_per_turn"].items():
        lines.append(f"| {k} | {v:.1f} | {rep['profile']['share'][k]:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, load_avg, machine, plot_lines, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help=f"fewer groups per level ({QUICK['groups']})")
    ap.add_argument(
        "--inflight", default=None, help="episodes in flight, comma-separated (default 64,512,2048)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"runs of each level, interleaved; the median is reported (default {FULL['repeats']}, quick {QUICK['repeats']})",
    )
    ap.add_argument("--no-profile", action="store_true", help="skip the per-part cost breakdown")
    add_out_arg(ap)
    a = ap.parse_args(argv)
    p = dict(QUICK if a.quick else FULL)
    if a.inflight:
        p["inflight"] = [int(x) for x in a.inflight.split(",")]
    if a.repeats is not None:
        if a.repeats < 1:
            ap.error(f"--repeats {a.repeats}: at least 1")
        p["repeats"] = a.repeats
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    before = load_avg()
    core = _pin_one_core()
    tok = _tokenizer()
    # Untimed: the first run imports modules and compiles the chat template, which the
    # first level would otherwise pay for.
    run_level(p["inflight"][0], 8, 8, tok)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in p["inflight"]}
    for rep in range(p["repeats"]):
        for n in p["inflight"]:
            r = run_level(n, p["groups"], p["warmup_groups"], tok)
            r["load_avg_after"] = load_avg()
            print(
                f"run {rep + 1}/{p['repeats']}, in flight {n:5d}: {r['turns_per_s']:9.0f} turns/s "
                f"({r['turns_per_cpu_s']:.0f} per CPU-s)  {r['episodes_per_s']:8.0f} episodes/s  "
                f"load {r['load_avg_after']}",
                flush=True,
            )
            runs[n].append(r)
    levels = [summarize(rs) for rs in runs.values()]
    for r in levels:
        print(
            f"in flight {r['inflight_episodes']:5d}: median {r['turns_per_s']:9.0f} turns/s "
            f"(runs {r['turns_per_s_min']:.0f}-{r['turns_per_s_max']:.0f})",
            flush=True,
        )
    at512 = next((r for r in levels if r["inflight_episodes"] == 512), levels[len(levels) // 2])
    prof = {} if a.no_profile else cost_breakdown(tok, 1e6 / at512["turns_per_cpu_s"], at512["inflight_episodes"])
    nd = need()
    rep = dict(
        bench="orchestrator",
        command="python -m bench.orchestrator" + (" --quick" if a.quick else ""),
        machine=machine(),
        load_avg_before=before,
        config=dict(p, core=core, group_size=GROUP_SIZE, turns_per_episode=TURNS_PER_EPISODE),
        levels=levels,
        turns_per_s=at512["turns_per_s"],
        turns_per_cpu_s=at512["turns_per_cpu_s"],
        note=(
            "turns_per_s is wall-clock on one pinned core; on a loaded machine the core is shared, so "
            "turns_per_cpu_s (turns per second of this process's CPU time) is the closer figure for what "
            "one core does; compare both with the load average"
        ),
        turns_per_s_at=at512["inflight_episodes"],
        goal_turns_per_s=5000,
        need=nd,
        margin_over_need=round(at512["turns_per_s"] / nd["turns_per_s_needed"], 2),
        profile=prof,
    )
    md = markdown(rep) if prof else ""
    path = write_report(a.out, "orchestrator", rep, md)
    why = plot_lines(
        path.with_suffix(".png"),
        {
            "turns/s (median)": ([r["inflight_episodes"] for r in levels], [r["turns_per_s"] for r in levels]),
            "slowest run": ([r["inflight_episodes"] for r in levels], [r["turns_per_s_min"] for r in levels]),
        },
        title="Orchestrator turns/s on one core (instant engine/env)",
        xlabel="episodes in flight",
        ylabel="agent turns / s",
        logx=True,
        hline=(nd["turns_per_s_needed"], "8-GPU need (assumed decode rate)"),
    )
    if why:
        print(why)
    print(md)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
