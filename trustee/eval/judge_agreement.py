"""The sim-to-real meter: how often the simulated judge agrees with BFCL's own checker.

Owns `measure` (play BFCL multi-turn episodes with the policy; score each one twice: with
BFCL's `multi_turn_checker` on the executed calls, and with the simulated judge from the
trajectory alone, replayed into the simulator's log as the TRUSTEE environment would show
it), the agreement arithmetic (`agreement`: accuracy, Cohen's kappa, the confusion matrix;
`pearson`: the correlation of the judge's reward with BFCL's per-turn progress, for the
graded judge modes) and the report (`AgreementReport`, `format_table`).

The judge's task for a BFCL entry: the user's goal is the entry's user turns, the
reference calls are BFCL's ground truth (as keyword calls), the rubric's sub-goals are the
turns; the tools shown are those the reference or the agent named (BFCL's full tool docs
would not fit a small simulator's context). A verdict passes when it is the top TRUSTEE
tier (reward 1) or, for the rubric, a reward >= 0.5; an entry passes BFCL when its checker
says valid. With tiny random models both are near chance: that is a real measurement.

Called by `python -m trustee.eval --judge-agreement` (`eval/__main__.py`), and usable by a
held-out evaluation during training (`eval.judge_agreement`). It does not train anything.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import anyio
import msgspec

from trustee.config import EvalConfig
from trustee.envs.bfcl_data import MULTI_TURN_CATEGORIES, MultiTurnInstance, select
from trustee.envs.bfcl_exec import bfcl_multi_turn_check, oracle_calls
from trustee.eval.bfcl import RecordingEnv, Runner, eval_bfcl_env
from trustee.sim.client import SimError
from trustee.sim.log import SimLog
from trustee.types import Rubric, Score, Task, ToolCall

ENDING = "the user's scripted requests ran out (or the agent was stopped after too many steps in one turn)"
MAX_SUBGOALS = 8  # RubricVerdict's list bound


class JudgeLike(Protocol):
    async def score(self, task: Task, log: SimLog, ending: str, *, key: str) -> tuple[Score, int]: ...


class Agreement(msgspec.Struct, frozen=True, kw_only=True):
    """Judge vs BFCL on n entries. `confusion` counts (judge, bfcl) outcomes; `kappa` is None
    when chance agreement is 1 (both sides constant and equal: kappa is undefined);
    `reward_correlation` is Pearson's r of the judge's reward and BFCL's per-turn progress
    (None when either side has no variance)."""

    n: int
    accuracy: float
    kappa: float | None
    confusion: dict[str, int]
    judge_pass_rate: float
    bfcl_pass_rate: float
    reward_correlation: float | None = None


class AgreementEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    category: str
    bfcl_valid: bool
    bfcl_progress: float
    judge_reward: float | None
    judge_pass: bool | None
    judge_error: str = ""
    status: str = "ok"


class AgreementReport(msgspec.Struct, kw_only=True):
    model: str
    judge: str
    categories: dict[str, Agreement]
    overall: Agreement | None
    entries: list[AgreementEntry]
    judge_errors: int
    wall_s: float


# ------------------------------------------------------------------ arithmetic


def agreement(
    judge: list[bool],
    real: list[bool],
    rewards: list[float] | None = None,
    progress: list[float] | None = None,
) -> Agreement:
    """Agreement of two binary raters over the same entries (and, when given, the
    correlation of the judge's reward with the real progress)."""
    if len(judge) != len(real) or not judge:
        raise ValueError(f"agreement needs two equal, non-empty lists; got {len(judge)} and {len(real)}")
    n = len(judge)
    both = sum(j and r for j, r in zip(judge, real, strict=True))
    judge_only = sum(j and not r for j, r in zip(judge, real, strict=True))
    real_only = sum(r and not j for j, r in zip(judge, real, strict=True))
    neither = n - both - judge_only - real_only
    po = (both + neither) / n
    pj, pr = (both + judge_only) / n, (both + real_only) / n
    pe = pj * pr + (1 - pj) * (1 - pr)
    kappa = None if math.isclose(pe, 1.0) else (po - pe) / (1 - pe)
    corr = pearson(rewards, progress) if rewards is not None and progress is not None else None
    return Agreement(
        n=n,
        accuracy=po,
        kappa=kappa,
        confusion={"both_pass": both, "judge_only": judge_only, "bfcl_only": real_only, "both_fail": neither},
        judge_pass_rate=pj,
        bfcl_pass_rate=pr,
        reward_correlation=corr,
    )


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r; None when either list is constant (or shorter than 2)."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson needs equal lengths; got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def judge_passes(mode: str, reward: float) -> bool:
    """The top TRUSTEE tier (trustee, scripted), or half the rubric or more."""
    return reward >= 0.5 if mode == "rubric" else reward >= 1.0


# ------------------------------------------------------------------ the judge's task


def judge_task(inst: MultiTurnInstance, episode_task: Task, calls_made: list[ToolCall]) -> Task:
    """What the simulated judge knows about a BFCL entry (see the module docstring)."""
    expected = [c for turn in oracle_calls(inst) for c in turn]
    turns = [" ".join(t) for t in inst.turns if t]
    named = {c.name for c in expected} | {c.name for c in calls_made}
    return Task(
        id=inst.id,
        env="bfcl_judge",
        tools=[t for t in episode_task.tools if t.name in named],
        first_query=episode_task.first_query,
        domain=", ".join(inst.involved_classes),
        persona="a user of the BFCL multi-turn benchmark",
        goal=" / ".join(turns),
        expected_calls=expected,
        rubric=Rubric(subgoals=[t[:200] for t in turns[:MAX_SUBGOALS]]),
        knobs={"judge_strictness": 1.0},
    )


# ------------------------------------------------------------------ the run


def _plan(cfg: EvalConfig, env: Any) -> list[tuple[str, MultiTurnInstance]]:
    jobs = []
    for name in cfg.categories:
        if not name.startswith("multi_turn_"):
            continue
        cat = name.removeprefix("multi_turn_")
        if cat not in MULTI_TURN_CATEGORIES:
            raise ValueError(
                f"eval.categories has {name!r}; multi-turn categories: {list(MULTI_TURN_CATEGORIES)}"
            )
        rows = select([cat], cfg.multi_turn_split, env.split_seed, env.train_fraction)
        jobs += [(name, r) for r in (rows[: cfg.limit] if cfg.limit else rows)]
    if not jobs:
        raise ValueError(
            f"eval.categories = {cfg.categories}: the judge-agreement meter plays multi-turn entries only; "
            "add one of " + ", ".join(f"multi_turn_{c}" for c in MULTI_TURN_CATEGORIES)
        )
    return jobs


async def measure(
    run_episode: Runner,
    cfg: EvalConfig,
    judge: JudgeLike,
    *,
    judge_mode: str,
    bfcl_cfg: Any = None,
    model: str = "",
) -> AgreementReport:
    """Play the multi-turn entries of `cfg` with the policy (`run_episode`, as in
    `eval/bfcl.evaluate`), score each with BFCL and with `judge`, and report the agreement."""
    t0 = time.perf_counter()
    env = RecordingEnv(eval_bfcl_env(bfcl_cfg, cfg))
    jobs = _plan(cfg, env.env)
    entries: list[AgreementEntry | None] = [None] * len(jobs)
    limiter = anyio.CapacityLimiter(cfg.concurrency)

    async def one(i: int) -> None:
        category, inst = jobs[i]
        async with limiter:
            entries[i] = await _one(run_episode, env, judge, judge_mode, category, inst)

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    done = [e for e in entries if e is not None]
    return report(done, judge=judge_mode, model=model, wall_s=time.perf_counter() - t0)


async def _one(
    run_episode: Runner,
    env: RecordingEnv,
    judge: JudgeLike,
    mode: str,
    category: str,
    inst: MultiTurnInstance,
) -> AgreementEntry:
    eid = f"{inst.id}/0"
    task = env.env.task_for(inst)
    traj = await run_episode(env, task, eid)
    state = env.states.pop(eid)
    res = await anyio.to_thread.run_sync(bfcl_multi_turn_check, inst, env.env.checker_steps(state))
    scored = [v for v in env.env.verdicts(state) if v is not None]
    progress = sum(scored) / len(scored) if scored else 0.0
    conversation = traj.messages  # the runner's record of the whole conversation
    calls = [c for m in conversation if m.role == "assistant" for c in m.tool_calls]
    jt = judge_task(inst, task, calls)
    reward: float | None = None
    error = ""
    try:
        score, _ = await judge.score(jt, SimLog.replay(jt, conversation), ENDING, key=inst.id)
        reward = score.reward
    except SimError as e:
        error = str(e)[:300]
    return AgreementEntry(
        id=inst.id,
        category=category,
        bfcl_valid=bool(res["valid"]),
        bfcl_progress=progress,
        judge_reward=reward,
        judge_pass=None if reward is None else judge_passes(mode, reward),
        judge_error=error,
        status=traj.status,
    )


def report(entries: list[AgreementEntry], *, judge: str, model: str, wall_s: float) -> AgreementReport:
    """Per category and overall, over the entries the judge scored."""

    def over(rows: list[AgreementEntry]) -> Agreement | None:
        rows = [e for e in rows if e.judge_pass is not None]
        if not rows:
            return None
        return agreement(
            [bool(e.judge_pass) for e in rows],
            [e.bfcl_valid for e in rows],
            [float(e.judge_reward or 0.0) for e in rows],
            [e.bfcl_progress for e in rows],
        )

    cats = {}
    for name in dict.fromkeys(e.category for e in entries):
        a = over([e for e in entries if e.category == name])
        if a is not None:
            cats[name] = a
    return AgreementReport(
        model=model,
        judge=judge,
        categories=cats,
        overall=over(entries),
        entries=entries,
        judge_errors=sum(e.judge_pass is None for e in entries),
        wall_s=wall_s,
    )


def format_table(rep: AgreementReport) -> str:
    """Markdown: one row per category and the overall row."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"Judge agreement: simulated judge ({rep.judge}) vs BFCL's checker, model {rep.model}",
        "",
        "| category | n | accuracy | kappa | both pass | judge only | BFCL only | both fail | judge pass | BFCL pass | r(reward, progress) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(rep.categories.items()) + ([("**overall**", rep.overall)] if rep.overall else [])
    for name, a in rows:
        c = a.confusion
        lines.append(
            f"| {name} | {a.n} | {a.accuracy:.3f} | {f(a.kappa)} | {c['both_pass']} | {c['judge_only']} | "
            f"{c['bfcl_only']} | {c['both_fail']} | {a.judge_pass_rate:.3f} | {a.bfcl_pass_rate:.3f} | "
            f"{f(a.reward_correlation)} |"
        )
    if rep.judge_errors:
        lines.append(f"\n{rep.judge_errors} entr(ies) the judge could not score (left out; see judge_error).")
    return "\n".join(lines)


def write_report(rep: AgreementReport, path: str) -> None:
    """The JSON report, written atomically (a killed run leaves the previous one)."""
    from trustee import atomic

    atomic.write_bytes(path, msgspec.json.format(msgspec.json.encode(rep), indent=2))
