"""An environment from a file of tasks: your prompts and tool schemas, your tools, your reward.

Owns `TaskRecord` (one JSONL line: prompt, tools as JSON schemas, optional system prompt,
reference answer, expected calls, rubric, difficulty), `load_tasks`, `EpisodeView` (what a
reward function sees), `TasksFileEnv` and `build_tasks_file_env` (from `[environment.
tasks_file]`). Tools are either executable Python functions (called with the call's
arguments as keywords; sync functions run in a worker thread) or simulated by the
simulator model (`sim/tools.py`, with the group-consistency memo). The reward is a user
function of the episode, the simulator's judge, or a weighted mix of both.

An episode: system prompt (if any) and the task's prompt; each assistant turn with calls
gets one tool result per call (a raised exception becomes an `{"error": ...}` result) then
one per malformed call; a turn without calls is the final answer and ends the episode.
Tasks are drawn uniformly among those whose `difficulty` is at most the curriculum's
current difficulty (the easiest ones when none is). Called through `envs.BUILDERS`
(kind 'tasks_file') or directly from a user's factory (kind 'python').
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from trustee.chat.parse import ToolCallParser, canonical_json, error_observation
from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score, example_rng, worked_turns
from trustee.types import Message, Rubric, Task, ToolCall, ToolSpec

if TYPE_CHECKING:
    from trustee.config import TasksFileConfig
    from trustee.envs import EnvContext
    from trustee.sim.client import SimClient
    from trustee.sim.judge import Judge


class TaskRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One line of a tasks file.

    `tools` are OpenAI function schemas (`{"name", "description", "parameters"}`, or wrapped
    as `{"type": "function", "function": {...}}`), or, for an MCP environment, names of the
    servers' tools (absent there: all of them); `answer` is any JSON value your reward
    function compares against (the judge sees it as the expected outcome); `difficulty` in
    [1, 100] gates when the curriculum may draw the task; `hidden_info` is what a simulated
    tool knows that the prompt does not say.
    """

    prompt: str
    tools: list[dict[str, Any] | str] | None = None
    id: str = ""
    system: str = ""
    answer: Any = None
    expected_calls: list[ToolCall] = msgspec.field(default_factory=list)
    rubric: Rubric = msgspec.field(default_factory=Rubric)
    difficulty: float = 1.0
    hidden_info: str = ""
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


class TasksFileError(ValueError):
    """A tasks file that cannot be used; the message names the file, the line and the fix."""


def _tool(raw: dict[str, Any], where: str) -> ToolSpec:
    fn = raw.get("function", raw) if raw.get("type") == "function" else raw
    try:
        return msgspec.convert(fn, ToolSpec)
    except msgspec.ValidationError as e:
        raise TasksFileError(f"{where}: tool {fn.get('name', '?')!r} is not a function schema: {e}") from None


def load_tasks(
    path: str | Path, catalog: dict[str, ToolSpec] | None = None, *, env: str = "tasks_file"
) -> list[Task]:
    """Every task of a JSONL tasks file, validated (schemas compile, ids unique). With a
    `catalog` (an MCP environment's tools by name), `tools` are names from it, all of them
    when absent, and expected calls must name the task's tools."""
    path = Path(path)
    tasks: list[Task] = []
    seen: set[str] = set()
    for n, where, rec in read_records(path):
        tools = _task_tools(rec, catalog, where)
        try:
            ToolCallParser(tools)  # schemas compile, names unique
        except Exception as e:  # noqa: BLE001 - jsonschema raises several types; all are user input errors
            raise TasksFileError(f"{where}: invalid tool schemas: {e}") from None
        task_id = rec.id or f"{path.stem}-{n}"
        if task_id in seen:
            raise TasksFileError(f"{where}: task id {task_id!r} appears twice; ids must be unique")
        seen.add(task_id)
        if not 1.0 <= rec.difficulty <= 100.0:
            raise TasksFileError(f"{where}: difficulty = {rec.difficulty}: use a value in [1, 100]")
        if catalog is not None:
            unknown = sorted({c.name for c in rec.expected_calls} - {t.name for t in tools})
            if unknown:
                raise TasksFileError(
                    f"{where}: expected_calls name {unknown}, which are not among the task's tools "
                    f"{[t.name for t in tools]}"
                )
        tasks.append(
            Task(
                id=task_id,
                env=env,
                tools=tools,
                first_query=rec.prompt,
                system_prompt=rec.system,
                goal=rec.prompt
                if rec.answer is None
                else f"{rec.prompt}\nExpected answer: {canonical_json(rec.answer)}",
                hidden_info=rec.hidden_info,
                expected_calls=rec.expected_calls,
                rubric=rec.rubric,
                payload={"answer": rec.answer, "difficulty": rec.difficulty, **rec.payload},
            )
        )
    if not tasks:
        raise TasksFileError(f"tasks file {path} holds no tasks")
    return tasks


def _task_tools(rec: TaskRecord, catalog: dict[str, ToolSpec] | None, where: str) -> list[ToolSpec]:
    if catalog is None:
        if rec.tools is None:
            raise TasksFileError(f"{where}: 'tools' is required: a list of function schemas")
        named = [t for t in rec.tools if isinstance(t, str)]
        if named:
            raise TasksFileError(
                f"{where}: tools {named} are given by name; a tasks file gives each tool's JSON schema "
                "(names are for kind 'mcp', whose servers define the tools)"
            )
        return [_tool(t, where) for t in rec.tools if isinstance(t, dict)]
    if rec.tools is None:
        return list(catalog.values())
    out = []
    for t in rec.tools:
        if not isinstance(t, str):
            raise TasksFileError(
                f"{where}: tool {t.get('name', t)!r} is a schema; MCP tasks name their servers' tools "
                f"(known: {sorted(catalog)})"
            )
        if t not in catalog:
            raise TasksFileError(
                f"{where}: tool {t!r} is not offered by any server; known: {sorted(catalog)}"
            )
        out.append(catalog[t])
    return out


def read_records(path: str | Path) -> list[tuple[int, str, TaskRecord]]:
    """(line number, 'file:line', record) of every task line of a JSONL tasks file, decoded;
    TasksFileError naming the file and the line when one is not a task."""
    path = Path(path)
    if not path.exists():
        raise TasksFileError(f"tasks file {path} not found (relative paths start at {Path.cwd()})")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        where = f"{path}:{n}"
        try:
            out.append((n, where, msgspec.json.decode(line, type=TaskRecord)))
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise TasksFileError(
                f"{where}: {e}; each line is a JSON object with 'prompt' and 'tools' "
                "(optional: id, system, answer, expected_calls, rubric, difficulty, hidden_info, payload)"
            ) from None
    return out


class EpisodeView(msgspec.Struct, frozen=True, kw_only=True):
    """What a reward function sees of one finished episode.

    `calls` are the well-formed calls in order, `results` the tool results the policy saw
    (same order, JSON text); `final` is the last assistant message's text; `finished` is
    False when a limit cut the episode before a final answer; `call_errors` counts calls
    that did not parse or validate (bad JSON, unknown tool, schema violation, over the
    per-turn limit); `answer` is the task's reference answer (None when the file gives none).
    """

    task: Task
    messages: list[Message]
    calls: list[ToolCall]
    results: list[str]
    final: str
    finished: bool
    call_errors: int

    @property
    def answer(self) -> Any:
        return self.task.payload.get("answer")


ToolFn = Callable[..., Any]
RewardFn = Callable[[EpisodeView], "float | Score | Awaitable[float | Score]"]


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@dataclass
class _Group:
    """What the episodes of one task share (the simulated tools' consistency memo)."""

    memo: Any = None


class TasksFileEnv:
    """Tasks from a list (see `load_tasks`); tools run as Python or by the simulator; reward
    from `reward` (a function of `EpisodeView`), `judge`, or both (`judge_weight` is the
    judge's share)."""

    def __init__(
        self,
        tasks: list[Task],
        *,
        tools: dict[str, ToolFn] | None = None,
        simulator: SimClient | None = None,
        reward: RewardFn | None = None,
        judge: Judge | None = None,
        judge_weight: float = 0.5,
        name: str = "tasks_file",
        few_shot: int = 0,
    ):
        if (tools is None) == (simulator is None):
            raise ValueError(
                "give either Python `tools` or a `simulator` client to play them, not both or neither"
            )
        if reward is None and judge is None:
            raise ValueError("give a `reward` function, a `judge`, or both")
        if not 0.0 <= judge_weight <= 1.0:
            raise ValueError(f"judge_weight = {judge_weight}: use a share in [0, 1]")
        if tools is not None:
            for t in tasks:
                missing = sorted({s.name for s in t.tools} - set(tools))
                if missing:
                    raise ValueError(
                        f"task {t.id!r} uses tools {missing} that have no Python function; "
                        f"functions given: {sorted(tools)}"
                    )
        self.name = name
        self.tasks = sorted(tasks, key=lambda t: t.payload.get("difficulty", 1.0))
        self.tools = tools
        self.simulator = simulator
        self.reward = reward
        self.judge = judge
        self.judge_weight = judge_weight if (reward is not None and judge is not None) else None
        self.few_shot = few_shot

    def examples(self, task: Task) -> list[Message]:
        """`few_shot` worked examples for `task`, as earlier turns: the prompts of other tasks
        of the file that have `expected_calls` using only tools this task offers, each followed
        by the assistant turn making those calls (the form toy's examples take; toy.py says
        why they stop at the call). Chosen by a hash of the task's id, so a task always gets
        the same ones; never the task itself."""
        if not self.few_shot:
            return []
        offered = {t.name for t in task.tools}
        pool = [
            t
            for t in self.tasks
            if t.id != task.id and t.expected_calls and {c.name for c in t.expected_calls} <= offered
        ]
        return worked_turns(example_rng(task).sample(pool, min(self.few_shot, len(pool))))

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        easiest = self.tasks[0].payload.get("difficulty", 1.0)
        ok = [t for t in self.tasks if t.payload.get("difficulty", 1.0) <= max(knobs.difficulty, easiest)]
        return msgspec.structs.replace(rng.choice(ok), knobs=knobs.as_dict())

    def new_group(self, task: Task) -> _Group:
        if self.simulator is None:
            return _Group()
        from trustee.sim.tools import ConsistencyMemo

        return _Group(memo=ConsistencyMemo())

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        group = group if isinstance(group, _Group) else self.new_group(task)
        messages = [Message(role="system", content=task.system_prompt)] if task.system_prompt else []
        messages += self.examples(task)
        messages.append(Message(role="user", content=task.first_query))
        data: dict[str, Any] = {"calls": [], "results": [], "call_errors": 0}
        if self.simulator is not None:
            from trustee.sim.tools import ToolSimulator

            rate = float(task.knobs.get("tool_error_rate", 0.0))
            from trustee.sim.log import SimLog

            data["sim_tools"] = ToolSimulator(self.simulator, task, group.memo, key=task.id, error_rate=rate)
            data["sim_log"] = SimLog(task)  # the episode's append-only simulator log (KV-cache layout)
        return EpisodeState(episode_id=episode_id, task=task, messages=messages, group=group, data=data)

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        if final_answer(state, action):
            return []
        if self.simulator is not None:
            from trustee.sim.client import SimError

            sim = state.data["sim_tools"]
            try:
                out = await sim.run_turn(state.data["sim_log"], action.calls, action.message.content or "")
            except SimError as e:
                state.sim_error, state.done = str(e), True
                return []
            finally:
                state.sim_retries = sim.retries
        else:
            out = [await self._run_python(call) for call in action.calls]
        return record_turn(state, action, out)

    async def _run_python(self, call: ToolCall) -> Message:
        assert self.tools is not None
        try:
            result = await _call(self.tools[call.name], **call.arguments)
        except Exception as e:  # noqa: BLE001 - a tool that raises is an observation, as a real API error is
            result = {"error": f"{type(e).__name__}: {e}"}
        text = result if isinstance(result, str) else canonical_json(result)
        return Message(role="tool", content=text, name=call.name)

    async def score(self, state: EpisodeState) -> Score:
        return await score_episode(
            state, reward=self.reward, judge=self.judge, judge_weight=self.judge_weight
        )


def final_answer(state: EpisodeState, action: AgentAction) -> bool:
    """Record the assistant turn; a turn without calls is the final answer, which ends the
    episode (True). Shared with the MCP environment."""
    state.messages.append(action.message)
    if action.calls or action.errors:
        return False
    state.data["final"] = action.message.content
    state.done = True
    return True


def record_turn(state: EpisodeState, action: AgentAction, results: list[Message]) -> list[Message]:
    """Record a turn's well-formed calls and their `results` (one tool message each, in call
    order) and its malformed calls; the reply is the results, then one error observation per
    malformed call. Shared with the MCP environment."""
    state.data["calls"] += action.calls
    state.data["results"] += [m.content for m in results]
    state.data["call_errors"] += len(action.errors)
    out = results + [error_observation(e) for e in action.errors]
    state.messages.extend(out)
    return out


def episode_view(state: EpisodeState) -> EpisodeView:
    """The reward function's view of an episode whose `state.data` holds `calls`,
    `results`, `call_errors` and (once answered) `final`, as this environment keeps them."""
    return EpisodeView(
        task=state.task,
        messages=list(state.messages),
        calls=list(state.data["calls"]),
        results=list(state.data["results"]),
        final=state.data.get("final", ""),
        finished=state.done,
        call_errors=state.data["call_errors"],
    )


async def score_episode(
    state: EpisodeState, *, reward: RewardFn | None, judge: Judge | None, judge_weight: float | None
) -> Score:
    """The episode's score from a reward function of its `EpisodeView`, the judge, or both
    (`judge_weight`: the judge's share); a judge failure marks the episode `sim_error`.
    Shared with the MCP environment."""
    parts: dict[str, float] = {}
    view = episode_view(state)
    fn_reward = judge_reward = None
    if reward is not None:
        out = reward(view)
        out = await out if inspect.isawaitable(out) else out
        fn_score = out if isinstance(out, Score) else Score(reward=float(out))
        _check_reward(fn_score.reward, reward)
        fn_reward = fn_score.reward
        parts.update(fn_score.parts)
        parts["function"] = fn_reward
    if judge is not None:
        from trustee.sim.client import SimError

        ending = (
            "the assistant gave its final answer" if state.done else "cut off by the turn or length limit"
        )
        try:
            score, retries = await judge.score(state.task, state.messages, ending, key=state.task.id)
        except SimError as e:
            state.sim_error, state.done = str(e), True
            return Score(reward=0.0)
        state.sim_retries += retries
        judge_reward = score.reward
        parts.update({f"judge/{k}": v for k, v in score.parts.items()})
        parts["judge"] = judge_reward
    if fn_reward is not None and judge_reward is not None:
        w = judge_weight if judge_weight is not None else 0.5
        return Score(reward=(1 - w) * fn_reward + w * judge_reward, parts=parts)
    value = fn_reward if fn_reward is not None else judge_reward
    assert value is not None, "a reward function or a judge is required"
    return Score(reward=value, parts=parts)


def _check_reward(value: float, fn: Any) -> None:
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(f"reward function {name} returned {value}; return a float in [-1, 1] (or a Score)")


# ----------------------------------------------------------------------------- from the config


def python_tools(module_spec: str, tasks: list[Task]) -> dict[str, ToolFn]:
    """The functions of `module_spec` ('pkg.module' or 'path/to/file.py') named like the tools."""
    from trustee.envs.python import FactoryError, load_object

    names = sorted({s.name for t in tasks for s in t.tools})
    out = {}
    for n in names:
        try:
            out[n] = load_object(f"{module_spec}:{n}", "environment.tasks_file.tools_module")
        except FactoryError as e:
            raise FactoryError(f"{e}; define one function per tool, named like the tool") from None
    return out


def check_tasks_file(cfg: TasksFileConfig, reward: str) -> list[str]:
    """Start-up checks (also run by --dry-run): the file loads, the tool functions and the
    reward function import."""
    from trustee.envs.python import FactoryError, load_object

    try:
        tasks = load_tasks(cfg.path)
    except TasksFileError as e:
        return [f"environment.tasks_file.path: {e}"]
    problems = []
    try:
        if cfg.tools == "python":
            python_tools(cfg.tools_module, tasks)
        if reward in ("function", "function+judge"):
            load_object(cfg.reward_fn, "environment.tasks_file.reward_fn")
    except FactoryError as e:
        problems.append(str(e))
    return problems


def judge_for(ctx: EnvContext) -> Judge | None:
    """The simulator's judge when `environment.reward` asks for one ('judge', 'rubric',
    'function+judge'), else None. Shared with the MCP environment."""
    env = ctx.config
    if env.reward not in ("judge", "rubric", "function+judge"):
        return None
    from trustee.sim.judge import Judge

    sim = ctx.sim_config
    assert ctx.simulator is not None, "needs_simulator() is true for a judged reward"
    return Judge(
        ctx.simulator,
        mode="rubric" if env.reward == "rubric" else sim.judge_mode,
        votes=sim.judge_votes,
        vote_rule=sim.judge_vote_rule,
        temperature=sim.judge_temperature,
    )


def reward_function(reward: str, reward_fn: str, field: str) -> RewardFn | None:
    """The reward function `environment.reward` names: the user's (`reward_fn`, from the
    config field `field`) for 'function' and 'function+judge', the reference grading for
    'reference', else None (the judge alone)."""
    from trustee.envs.python import load_object

    if reward in ("function", "function+judge"):
        return load_object(reward_fn, field)
    if reward == "reference":
        from trustee.envs.reference import reference_reward

        return reference_reward
    return None


def build_tasks_file_env(ctx: EnvContext) -> TasksFileEnv:
    """`environment.kind = 'tasks_file'`: everything from the config."""
    env, cfg = ctx.config, ctx.config.tasks_file
    tasks = load_tasks(cfg.path)
    return TasksFileEnv(
        tasks,
        tools=python_tools(cfg.tools_module, tasks) if cfg.tools == "python" else None,
        simulator=ctx.simulator if cfg.tools == "simulated" else None,
        reward=reward_function(env.reward, cfg.reward_fn, "environment.tasks_file.reward_fn"),
        judge=judge_for(ctx),
        judge_weight=cfg.judge_weight,
        name=f"tasks_file:{Path(cfg.path).stem}",
        few_shot=env.few_shot,
    )
