"""BFCL evaluation through the engine contract and the episode runner.

Owns `evaluate` (run a policy engine on BFCL categories, concurrently, with a progress bar),
the single-turn environment used for AST and relevance entries, the recording wrapper that
keeps each multi-turn episode's state for BFCL's checker, and the report (`EvalReport`,
`format_table`).

Scoring. Single-turn AST categories use `eval/ast_checker.py` (BFCL's matching rules, our
code); relevance categories count whether a call was made. Multi-turn categories run in
`envs/bfcl.BfclEnv` with BFCL's own rules (no hints, calls on unsolvable turns executed and
not scored, 21 steps per turn then the entry is force-quit) and are scored by BFCL's own
`multi_turn_checker` on the executed calls, so the numbers mean what BFCL's mean; the
environment's own verdict is reported beside it (`env_agrees`).

Prompt format: the trustee chat format (Qwen3/Hermes tool block in the system turn,
`<tool_call>` JSON blocks); docs/bfcl.md lists how it differs from BFCL's prompting.
Callers: `python -m trustee.eval` (`eval/__main__.py`), tests, bench scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from trustee.config import EvalConfig, RolloutConfig
from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score
from trustee.envs.bfcl import BfclEnv, recover_call
from trustee.envs.bfcl_data import (
    AST_CATEGORIES,
    MULTI_TURN_CATEGORIES,
    RELEVANCE_CATEGORIES,
    AstEntry,
    load_ast,
    select,
    tool_specs,
)
from trustee.envs.bfcl_exec import bfcl_multi_turn_check
from trustee.eval.ast_checker import check_ast, check_relevance
from trustee.types import Message, Task, ToolCall


class EntryResult(msgspec.Struct, frozen=True, kw_only=True):
    """One evaluated entry. `env_valid` is the environment's own verdict (multi-turn only)."""

    id: str
    category: str
    valid: bool
    error_type: str = ""
    env_valid: bool | None = None
    progress: float | None = None
    status: str = "ok"


class CategoryResult(msgspec.Struct, frozen=True, kw_only=True):
    category: str
    n: int
    correct: int
    accuracy: float
    env_agrees: int | None = None
    mean_progress: float | None = None
    errors: dict[str, int] = msgspec.field(default_factory=dict)


class EvalReport(msgspec.Struct, kw_only=True):
    """What `python -m trustee.eval` writes: per category, summaries, and every entry."""

    model: str
    config: dict[str, Any]
    categories: list[CategoryResult]
    summary: dict[str, float]
    entries: list[EntryResult]
    wall_s: float
    versions: dict[str, str] = msgspec.field(default_factory=dict)


def _split_category(name: str) -> tuple[str, str]:
    """('multi', 'base') or ('single', 'simple'); errors name the known categories."""
    if name.startswith("multi_turn_") and name.removeprefix("multi_turn_") in MULTI_TURN_CATEGORIES:
        return "multi", name.removeprefix("multi_turn_")
    if name in AST_CATEGORIES + RELEVANCE_CATEGORIES:
        return "single", name
    known = list(AST_CATEGORIES + RELEVANCE_CATEGORIES) + [f"multi_turn_{c}" for c in MULTI_TURN_CATEGORIES]
    raise ValueError(f"BFCL category {name!r} unknown; choose from {known}")


# ---------------------------------------------------------------------- environments


class SingleTurnEnv:
    """One BFCL single-turn entry per episode: the opening messages, one policy turn, done.
    The calls made (including ones the parser rejected for a schema violation or an unknown
    name: BFCL's checker judges those itself) are kept in `state.data["calls"]`."""

    name = "bfcl_single"

    def __init__(self, entries: list[AstEntry]):
        self.entries = {e.id: e for e in entries}

    def task_for(self, entry: AstEntry) -> Task:
        system = "\n\n".join(m["content"] for m in entry.messages if m["role"] == "system")
        users = [m for m in entry.messages if m["role"] != "system"]
        return Task(
            id=entry.id,
            env=self.name,
            tools=tool_specs(entry.functions),
            first_query=users[0]["content"] if users else "",
            system_prompt=system,
            payload={"entry": entry.id, "category": entry.category},
        )

    async def make_task(self, knobs: Knobs, rng: Any) -> Task:
        return self.task_for(rng.choice(list(self.entries.values())))

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        entry = self.entries[task.payload["entry"]]
        msgs = [Message(role="system", content=task.system_prompt)] if task.system_prompt else []
        # A few live entries carry earlier turns (user/assistant); keep them in order.
        msgs += [
            Message(role=m["role"], content=m["content"]) for m in entry.messages if m["role"] != "system"
        ]
        return EpisodeState(episode_id=episode_id, task=task, messages=msgs, data={"calls": []})

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        calls: list[ToolCall] = list(action.calls)
        calls += [c for c in (recover_call(e) for e in action.errors) if c is not None]
        state.data["calls"] = calls
        state.done = True
        return []

    async def score(self, state: EpisodeState) -> Score:
        entry = self.entries[state.task.payload["entry"]]
        verdict = judge_single(entry, state.data["calls"])
        return Score(reward=float(verdict.valid), parts={"valid": float(verdict.valid)})


def judge_single(entry: AstEntry, calls: list[ToolCall]):
    if entry.category in RELEVANCE_CATEGORIES:
        return check_relevance(calls, entry.category)
    return check_ast(entry.functions, calls, entry.ground_truth or [], entry.category)


class RecordingEnv:
    """Delegates to an environment and keeps every episode's state (for BFCL's checker)."""

    def __init__(self, env: Any):
        self.env = env
        self.name = env.name
        self.states: dict[str, EpisodeState] = {}

    async def make_task(self, knobs: Knobs, rng: Any) -> Task:
        return await self.env.make_task(knobs, rng)

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        state = await self.env.start(task, episode_id, group)
        self.states[episode_id] = state
        return state

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        return await self.env.step(state, action)

    async def score(self, state: EpisodeState) -> Score:
        return await self.env.score(state)


def eval_bfcl_env(bfcl_cfg: Any, cfg: EvalConfig) -> BfclEnv:
    """The multi-turn environment under BFCL's own rules (what its leaderboard measures)."""
    return BfclEnv(
        split=cfg.multi_turn_split,
        split_seed=bfcl_cfg.split_seed if bfcl_cfg is not None else 0,
        train_fraction=bfcl_cfg.train_fraction if bfcl_cfg is not None else 0.5,
        hints=False,
        max_steps_per_turn=cfg.max_steps_per_turn,
        force_quit_ends_episode=True,
        miss_turn_warning=False,
        system_prompt=bfcl_cfg.system_prompt if bfcl_cfg is not None else "",
    )


# ---------------------------------------------------------------------- running

Runner = Callable[[Any, Task, str], Any]  # async (env, task, episode_id) -> Trajectory


def _plan(cfg: EvalConfig, mt_env: BfclEnv) -> list[tuple[str, str, Any]]:
    """(category, kind, entry) for every entry to evaluate, in category order."""
    jobs: list[tuple[str, str, Any]] = []
    for name in cfg.categories:
        kind, cat = _split_category(name)
        if kind == "single":
            rows: list[Any] = list(load_ast(cat))
        else:
            rows = select([cat], cfg.multi_turn_split, mt_env.split_seed, mt_env.train_fraction)
        if cfg.limit:
            rows = rows[: cfg.limit]
        jobs += [(name, kind, r) for r in rows]
    return jobs


async def evaluate(
    run_episode: Runner,
    cfg: EvalConfig,
    *,
    bfcl_cfg: Any = None,
    progress: bool = True,
    model: str = "",
) -> EvalReport:
    """Evaluate one policy on BFCL. `run_episode(env, task, episode_id)` plays one episode
    (normally `EpisodeRunner.run` with the policy engine) and returns its Trajectory."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    mt_env = RecordingEnv(eval_bfcl_env(bfcl_cfg, cfg))
    jobs = _plan(cfg, mt_env.env)
    single = RecordingEnv(SingleTurnEnv([e for _, kind, e in jobs if kind == "single"]))
    results: list[EntryResult | None] = [None] * len(jobs)
    limiter = anyio.CapacityLimiter(cfg.concurrency)
    bar = tqdm(total=len(jobs), desc="bfcl eval", disable=not progress)

    async def one(i: int) -> None:
        category, kind, entry = jobs[i]
        async with limiter:
            if kind == "single":
                results[i] = await _run_single(run_episode, single, category, entry)
            else:
                results[i] = await _run_multi(run_episode, mt_env, category, entry)
        bar.update(1)

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    bar.close()
    entries = [r for r in results if r is not None]
    return _report(entries, cfg, model, time.perf_counter() - t0)


async def _run_single(run_episode: Runner, env: RecordingEnv, category: str, entry: AstEntry) -> EntryResult:
    eid = f"{entry.id}/0"
    traj = await run_episode(env, env.env.task_for(entry), eid)
    state = env.states.pop(eid)
    verdict = judge_single(entry, state.data.get("calls", []))
    return EntryResult(
        id=entry.id, category=category, valid=verdict.valid, error_type=verdict.error_type, status=traj.status
    )


async def _run_multi(run_episode: Runner, env: RecordingEnv, category: str, inst: Any) -> EntryResult:
    eid = f"{inst.id}/0"
    traj = await run_episode(env, env.env.task_for(inst), eid)
    state = env.states.pop(eid)
    res = await anyio.to_thread.run_sync(bfcl_multi_turn_check, inst, env.env.checker_steps(state))
    verdicts = env.env.verdicts(state)
    scored = [v for v in verdicts if v is not None]
    env_valid = bool(scored) and all(scored)
    return EntryResult(
        id=inst.id,
        category=category,
        valid=bool(res["valid"]),
        error_type=res.get("error_type", ""),
        env_valid=env_valid,
        progress=sum(scored) / len(scored) if scored else 0.0,
        status=traj.status,
    )


def _report(entries: list[EntryResult], cfg: EvalConfig, model: str, wall: float) -> EvalReport:
    cats = []
    for name in cfg.categories:
        rows = [e for e in entries if e.category == name]
        if not rows:
            continue
        errors: dict[str, int] = {}
        for e in rows:
            if not e.valid:
                errors[e.error_type or "unknown"] = errors.get(e.error_type or "unknown", 0) + 1
        multi = name.startswith("multi_turn_")
        cats.append(
            CategoryResult(
                category=name,
                n=len(rows),
                correct=sum(e.valid for e in rows),
                accuracy=sum(e.valid for e in rows) / len(rows),
                env_agrees=sum(e.env_valid == e.valid for e in rows) if multi else None,
                mean_progress=sum(e.progress or 0.0 for e in rows) / len(rows) if multi else None,
                errors=errors,
            )
        )
    return EvalReport(
        model=model,
        config=msgspec.to_builtins(cfg),
        categories=cats,
        summary=_summary(cats),
        entries=entries,
        wall_s=wall,
        versions=_versions(),
    )


def _summary(cats: list[CategoryResult]) -> dict[str, float]:
    """Unweighted means over category groups (BFCL's leaderboard averages categories)."""
    groups = {
        "non_live_ast": ["simple", "multiple", "parallel", "parallel_multiple"],
        "live_ast": ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple"],
        "multi_turn": [f"multi_turn_{c}" for c in MULTI_TURN_CATEGORIES],
        "relevance": list(RELEVANCE_CATEGORIES),
    }
    acc = {c.category: c.accuracy for c in cats}
    return {
        g: sum(acc[n] for n in names if n in acc) / sum(n in acc for n in names)
        for g, names in groups.items()
        if any(n in acc for n in names)
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("bfcl-eval", "torch", "transformers", "trustee"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def format_table(report: EvalReport) -> str:
    """A Markdown table: one row per category, then the summaries."""
    lines = [
        "| category | n | correct | accuracy | env agrees | mean progress |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in report.categories:
        agree = "" if c.env_agrees is None else f"{c.env_agrees}/{c.n}"
        prog = "" if c.mean_progress is None else f"{c.mean_progress:.3f}"
        lines.append(f"| {c.category} | {c.n} | {c.correct} | {100 * c.accuracy:.2f}% | {agree} | {prog} |")
    for k, v in report.summary.items():
        lines.append(f"| **{k}** (mean) | | | {100 * v:.2f}% | | |")
    return "\n".join(lines)


def write_report(report: EvalReport, path: str) -> None:
    """The JSON report, written atomically (a killed evaluation leaves the previous one)."""
    from trustee import atomic

    atomic.write_bytes(path, msgspec.json.format(msgspec.json.encode(report), indent=2))


def rollout_config(cfg: EvalConfig, base: RolloutConfig | None = None) -> RolloutConfig:
    """The runner's limits for evaluation: the eval's temperature and token budget, and
    enough policy turns for every user turn to use its full step allowance."""
    base = base or RolloutConfig()
    return msgspec.structs.replace(
        base,
        temperature=cfg.temperature,
        max_tokens_per_turn=cfg.max_tokens_per_turn,
        max_turns=max(base.max_turns, 8 * (cfg.max_steps_per_turn + 1)),
        max_tool_calls_per_turn=max(base.max_tool_calls_per_turn, 32),
    )


def dumps(obj: Any) -> str:
    return json.dumps(msgspec.to_builtins(obj), indent=2)
