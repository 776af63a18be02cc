"""The BFCL multi-turn executable environment, with Environment Tuning's pieces.

Owns `BfclEnv` (the `Environment` contract over BFCL's multi-turn entries), the per-turn
verdicts (state check + response check against a ground-truth replay, BFCL's rules), the
rules for turns with a missing function or parameter, the per-turn step cap, and the two
rewards of Environment Tuning: the syntax reward (stage 1) and the progress reward (share of
scored user turns that pass). Hints come from `envs/bfcl_hints.py`; execution and the
checks themselves from `envs/bfcl_exec.py`; data from `envs/bfcl_data.py`.

Turn flow. The episode opens with the tool block (the tools available at the start) and the
first user turn. Each assistant message with tool calls is one step: the calls run against
the policy's own instances and the results come back (one tool message per call or call
error). A message without calls ends the user turn; so does the step cap. At the end of a
turn with ground truth, the ground-truth calls of that turn run on a parallel set of
instances and the turn passes when the policy executed at least one call in it, the two
sets of instances have equal public state, and the policy's results so far cover the
ground truth's results of the turn (BFCL's `multi_turn_checker`, turn by turn). Turns
where BFCL adds held-out functions carry those functions' docs in the user message
(the chat template's tool block is fixed at the start of a token-level conversation).

Stage settings (reward, hints, data subset) arrive through `Knobs.extra` from the staged
curriculum and are frozen into the task, so every episode of a group sees the same ones.
Callers: the episode runner (`rollout/episode.py`), `eval/bfcl.py`, tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score
from trustee.envs.bfcl_data import (
    ADDED_FUNCTIONS_PROMPT,
    MULTI_TURN_CATEGORIES,
    MultiTurnInstance,
    load_multi_turn,
    select,
    to_tool_spec,
    tool_specs,
)
from trustee.envs.bfcl_exec import BfclWorld, ExecResult, missing_results, state_diff, to_call_string
from trustee.envs.bfcl_hints import augment
from trustee.types import Message, Task, ToolCall, ToolCallError

BfclReward = Literal["progress", "syntax"]

# Parse failures that are format errors (the syntax reward's R_format); unknown tools and
# schema violations are call errors instead (R_tool), as a wrong call is not a format slip.
FORMAT_ERROR_KINDS = frozenset({"invalid_json", "not_an_object", "missing_name", "unclosed"})

MISS_TURN_WARNING = (
    "(SYSTEM WARNING: the previous turn could not be solved because a function or a parameter it needed was "
    "missing, so no function should have been called there. That turn was ended and its calls were not "
    "executed.) Next question: "
)
NOT_EXECUTED = json.dumps({"error": "not executed: this turn lacks a function or parameter it needs"})


@dataclass
class TurnRecord:
    """What happened in one user turn. `steps` lists, per step that executed at least one
    call, the BFCL call strings of that step (the checker's decoded model result)."""

    steps: list[list[str]] = field(default_factory=list)
    called: bool = False
    verdict: bool | None = None
    state_diff: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    forced_end: bool = False


@dataclass
class BfclRun:
    """An episode's live state (kept in `EpisodeState.data["bfcl"]`)."""

    instance: MultiTurnInstance
    reward: BfclReward
    hints: bool
    world: BfclWorld
    truth: BfclWorld
    turn: int = 0
    steps_in_turn: int = 0
    results: list[str] = field(default_factory=list)  # every raw result of the policy's calls, in order
    turns: list[TurnRecord] = field(default_factory=list)
    warn_next: bool = False
    force_quit: bool = False
    # syntax-reward counters
    n_steps: int = 0
    n_format_error_steps: int = 0
    n_calls: int = 0
    n_ok_calls: int = 0
    hints_fired: dict[str, int] = field(default_factory=dict)

    @property
    def record(self) -> TurnRecord:
        return self.turns[self.turn]


def _category(name: str) -> str:
    c = name.removeprefix("multi_turn_")
    if c not in MULTI_TURN_CATEGORIES:
        raise ValueError(
            f"BFCL category {name!r} unknown; choose from {['multi_turn_' + x for x in MULTI_TURN_CATEGORIES]}"
        )
    return c


def recover_call(err: ToolCallError) -> ToolCall | None:
    """The call behind an `unknown_tool` or `schema` parse error (its `raw` is the call as
    JSON). BFCL executes such calls (the classes check their own inputs), so we do too."""
    if err.kind not in ("unknown_tool", "schema"):
        return None
    try:
        obj = json.loads(err.raw)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict):
        return ToolCall(name=obj["name"], arguments=obj["arguments"])
    return None


class BfclEnv:
    """BFCL multi-turn entries as an `Environment`. Plain keyword arguments mirror
    `BfclConfig` (see `from_config`); `reward` is the default when no stage says otherwise."""

    name = "bfcl"

    def __init__(
        self,
        *,
        categories: list[str] | tuple[str, ...] = tuple("multi_turn_" + c for c in MULTI_TURN_CATEGORIES),
        split: Literal["train", "heldout", "all"] = "train",
        split_seed: int = 0,
        train_fraction: float = 0.5,
        hints: bool = True,
        reward: BfclReward = "progress",
        max_steps_per_turn: int = 5,
        force_quit_ends_episode: bool = False,
        miss_turn_warning: bool = True,
        syntax_instances: int = 75,
        system_prompt: str = "",
    ):
        if reward not in ("progress", "syntax"):
            raise ValueError(f"reward {reward!r}: the BFCL environment scores 'progress' or 'syntax'")
        if max_steps_per_turn < 1:
            raise ValueError(f"max_steps_per_turn = {max_steps_per_turn}: must be >= 1")
        self.categories = [_category(c) for c in categories]
        self.split = split
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        self.hints = hints
        self.reward = reward
        self.max_steps_per_turn = max_steps_per_turn
        self.force_quit_ends_episode = force_quit_ends_episode
        self.miss_turn_warning = miss_turn_warning
        self.syntax_instances = syntax_instances
        self.system_prompt = system_prompt
        self._pools: dict[tuple[str, str], list[MultiTurnInstance]] = {}
        self._by_id: dict[str, MultiTurnInstance] = {}

    @classmethod
    def from_config(cls, cfg: Any, reward: BfclReward = "progress") -> BfclEnv:
        """Build from a `BfclConfig` section (and the environment's reward)."""
        return cls(
            categories=list(cfg.categories),
            split=cfg.split,
            split_seed=cfg.split_seed,
            train_fraction=cfg.train_fraction,
            hints=cfg.hints,
            reward=reward,
            max_steps_per_turn=cfg.max_steps_per_turn,
            force_quit_ends_episode=cfg.force_quit_ends_episode,
            miss_turn_warning=cfg.miss_turn_warning,
            syntax_instances=cfg.syntax_instances,
            system_prompt=cfg.system_prompt,
        )

    # ------------------------------------------------------------------ tasks

    def pool(self, subset: str = "all", reward: BfclReward = "progress") -> list[MultiTurnInstance]:
        """The instances a stage draws from: `subset` 'all' (the configured categories) or
        'base' (multi_turn_base only); the syntax stage keeps the first `syntax_instances`
        of a fixed-seed shuffle."""
        key = (subset, reward)
        if key not in self._pools:
            if subset == "all":
                cats = self.categories
            elif subset in ("base", *MULTI_TURN_CATEGORIES):
                cats = [subset]
            else:
                raise ValueError(
                    f"stage split {subset!r} unknown; use 'base', 'all' or one multi-turn category"
                )
            rows = select(cats, self.split, self.split_seed, self.train_fraction)
            if reward == "syntax" and self.syntax_instances:
                rows = list(rows)
                random.Random(self.split_seed + 1).shuffle(rows)
                rows = rows[: self.syntax_instances]
            if not rows:
                raise ValueError(f"no BFCL instances for split {self.split!r}, subset {subset!r}")
            self._pools[key] = rows
        return self._pools[key]

    def instance(self, instance_id: str) -> MultiTurnInstance:
        if instance_id not in self._by_id:
            category = instance_id.removeprefix("multi_turn_").rsplit("_", 1)[0]
            for row in load_multi_turn(_category(category)):
                self._by_id[row.id] = row
        return self._by_id[instance_id]

    def task_for(
        self, inst: MultiTurnInstance, *, reward: BfclReward | None = None, hints: bool | None = None
    ) -> Task:
        """The task of one instance with the given stage settings (defaults: the env's)."""
        self._by_id[inst.id] = inst
        return Task(
            id=inst.id,
            env=self.name,
            tools=tool_specs(inst.functions),
            first_query="\n".join(inst.turns[0]),
            system_prompt=self.system_prompt,
            payload={
                "instance": inst.id,
                "category": inst.category,
                "reward": reward or self.reward,
                "hints": self.hints if hints is None else hints,
            },
        )

    async def heldout_tasks(self, n: int, knobs: Knobs) -> list[Task]:
        """The first `n` instances of the held-out half of the configured split (every
        category), in BFCL's order: what training never draws when environment.bfcl.split is
        'train'. Scored with the env's reward, hints off."""
        rows = select(self.categories, "heldout", self.split_seed, self.train_fraction)
        if not rows:
            raise ValueError(
                "no held-out BFCL instances for this split; lower environment.bfcl.train_fraction"
            )
        return [
            msgspec.structs.replace(self.task_for(inst, hints=False), knobs=knobs.as_dict())
            for inst in rows[:n]
        ]

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        """One instance of the current stage's subset. Stage settings come from
        `knobs.extra` ('reward', 'hints', 'split'); missing keys fall back to the env's."""
        stage = knobs.extra or {}
        reward = stage.get("reward", self.reward)
        if reward not in ("progress", "syntax"):
            raise ValueError(f"stage reward {reward!r}: the BFCL environment scores 'progress' or 'syntax'")
        inst = rng.choice(self.pool(stage.get("split", "all"), reward))
        task = self.task_for(inst, reward=reward, hints=bool(stage.get("hints", self.hints)))
        return msgspec.structs.replace(task, knobs=knobs.as_dict())

    # ------------------------------------------------------------------ episode

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        inst = self.instance(task.payload["instance"])
        run = BfclRun(
            instance=inst,
            reward=task.payload.get("reward", self.reward),
            hints=bool(task.payload.get("hints", self.hints)),
            world=BfclWorld(inst),
            truth=BfclWorld(inst),
            turns=[TurnRecord() for _ in inst.ground_truth],
        )
        messages = [Message(role="system", content=task.system_prompt)] if task.system_prompt else []
        messages.append(Message(role="user", content=task.first_query))
        return EpisodeState(
            episode_id=episode_id, task=task, messages=messages, group=group, data={"bfcl": run}
        )

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        run: BfclRun = state.data["bfcl"]
        if state.done:
            return []
        run.n_steps += 1
        if any(e.kind in FORMAT_ERROR_KINDS for e in action.errors):
            run.n_format_error_steps += 1
        items = self._items(action, run)
        if not items:
            return self._end_turn(state, run, [])
        run.record.called = True
        if not run.instance.ground_truth[run.turn] and self.miss_turn_warning:
            return self._refuse_miss_turn(state, run, items)
        out = self._execute(run, items)
        run.steps_in_turn += 1
        if run.steps_in_turn >= self.max_steps_per_turn:
            run.record.forced_end = True
            if self.force_quit_ends_episode:
                run.force_quit = True
                self._close_turn(run)
                state.done = True
                return out
            return self._end_turn(state, run, out)
        return out

    @staticmethod
    def _ordered(action: AgentAction) -> list[ToolCall | ToolCallError]:
        """Calls and errors in block order: errors carry their block index; the calls fill
        the other positions in order (calls the runner cut over its limit come last)."""
        placed = {e.index: e for e in action.errors if e.index >= 0}
        calls = iter(action.calls)
        out: list[ToolCall | ToolCallError] = []
        for i in range(len(action.calls) + len(placed)):
            item = placed.get(i) or next(calls, None)
            if item is not None:
                out.append(item)
        out += list(calls)
        out += [e for e in action.errors if e.index < 0]
        return out

    def _items(self, action: AgentAction, run: BfclRun) -> list[ToolCall | ToolCallError]:
        """What to execute or report, in block order. Calls the parser rejected for an
        unknown name or a schema violation still run when the name is a method of the
        entry's classes (BFCL's rule: e.g. a held-out function, once announced in the user
        message, is unknown to the parser built from the opening tool block) and its argument
        keys are parameters the method declares (an undeclared key stays the parser's error)."""
        out: list[ToolCall | ToolCallError] = []
        for item in self._ordered(action):
            if isinstance(item, ToolCallError):
                c = recover_call(item)
                if c is not None and run.world.has(c.name) and not run.world.refusal(c):
                    item = c
            out.append(item)
        return out

    def _execute(self, run: BfclRun, items: list[ToolCall | ToolCallError]) -> list[Message]:
        out: list[Message] = []
        executed: list[str] = []
        for item in items:
            run.n_calls += 1
            if isinstance(item, ToolCallError):
                out.append(Message(role="tool", content=json.dumps({"error": item.message}), name=item.name))
                continue
            if refused := run.world.refusal(item):  # BFCL's checker would evaluate its call string
                out.append(Message(role="tool", content=json.dumps({"error": refused}), name=item.name))
                continue
            res = run.world.execute(item)
            run.results.append(res.text)
            executed.append(to_call_string(item))
            run.n_ok_calls += not res.error
            out.append(Message(role="tool", content=self._observe(run, res), name=item.name))
        if executed:
            run.record.steps.append(executed)
        return out

    def _observe(self, run: BfclRun, res: ExecResult) -> str:
        if not run.hints:
            return res.text
        text, rule = augment(res, run.world)
        if rule is not None:
            run.hints_fired[rule] = run.hints_fired.get(rule, 0) + 1
        return text

    def _refuse_miss_turn(
        self, state: EpisodeState, run: BfclRun, items: list[ToolCall | ToolCallError]
    ) -> list[Message]:
        """Environment Tuning's rule for a tool call on a turn that cannot be solved: the
        turn fails, nothing runs, and the next question starts with a warning."""
        run.n_calls += len(items)
        run.record.verdict = False
        run.warn_next = True
        out = [Message(role="tool", content=NOT_EXECUTED, name=x.name) for x in items]
        return self._end_turn(state, run, out)

    def _close_turn(self, run: BfclRun) -> None:
        """Replay the turn's ground truth and record the verdict."""
        rec = run.record
        truth_calls = run.instance.ground_truth[run.turn]
        truth_results = [run.truth.execute(c).text for c in self._truth_calls(run, truth_calls)]
        if rec.verdict is not None:  # already failed (tool call on a turn that cannot be solved)
            return
        if not truth_calls:
            rec.verdict = (not rec.called) if self.miss_turn_warning else None
            return
        rec.state_diff = state_diff(run.world, run.truth)
        rec.missing = missing_results(run.results, truth_results)
        rec.verdict = bool(rec.steps) and not rec.state_diff and not rec.missing

    @staticmethod
    def _truth_calls(run: BfclRun, strings: list[str]) -> list[ToolCall]:
        from trustee.envs.bfcl_exec import parse_call_string

        out = []
        for s in strings:
            name, args, kwargs = parse_call_string(s)
            out.append(run.truth.bind(name, args, kwargs))
        return out

    def _end_turn(self, state: EpisodeState, run: BfclRun, out: list[Message]) -> list[Message]:
        self._close_turn(run)
        run.turn += 1
        run.steps_in_turn = 0
        if run.turn >= len(run.instance.ground_truth):
            state.done = True
            return out
        return [*out, Message(role="user", content=self._next_question(run))]

    def _next_question(self, run: BfclRun) -> str:
        inst = run.instance
        if run.turn in inst.held_out:
            docs = [to_tool_spec(d).to_openai() for d in inst.held_out[run.turn]]
            text = "\n".join(json.dumps(d) for d in docs) + "\n" + ADDED_FUNCTIONS_PROMPT
        else:
            text = "\n".join(inst.turns[run.turn])
        if run.warn_next:
            run.warn_next = False
            text = MISS_TURN_WARNING + text
        return text

    # ------------------------------------------------------------------ scoring

    def verdicts(self, state: EpisodeState) -> list[bool | None]:
        """Per user turn: True/False when scored, None when not scored (BFCL's rule for a
        turn without ground truth when `miss_turn_warning` is off). Turns the episode never
        reached count as failed."""
        run: BfclRun = state.data["bfcl"]
        out: list[bool | None] = []
        for k, rec in enumerate(run.turns):
            if k < run.turn or (k == run.turn and rec.verdict is not None):
                out.append(rec.verdict)
            elif run.instance.ground_truth[k] or self.miss_turn_warning:
                out.append(False)
            else:
                out.append(None)
        return out

    def checker_steps(self, state: EpisodeState) -> list[list[list[str]]]:
        """The executed calls per turn and step, shaped for BFCL's `multi_turn_checker`
        (turns the episode did not reach are absent: BFCL's force-terminated case)."""
        run: BfclRun = state.data["bfcl"]
        played = run.turn + (1 if run.force_quit else 0)
        return [list(r.steps) for r in run.turns[:played]]

    async def score(self, state: EpisodeState) -> Score:
        run: BfclRun = state.data["bfcl"]
        verdicts = self.verdicts(state)
        scored = [v for v in verdicts if v is not None]
        progress = sum(scored) / len(scored) if scored else 0.0
        syntax = syntax_reward(run.n_steps, run.n_format_error_steps, run.n_calls, run.n_ok_calls)
        parts = {
            "progress": progress,
            "syntax": syntax,
            "turns_passed": float(sum(bool(v) for v in scored)),
            "turns_scored": float(len(scored)),
            "all_turns_passed": float(bool(scored) and all(scored)),
            "steps": float(run.n_steps),
            "format_error_steps": float(run.n_format_error_steps),
            "calls": float(run.n_calls),
            "ok_calls": float(run.n_ok_calls),
            "hints": float(sum(run.hints_fired.values())),
            "force_quit": float(run.force_quit),
        }
        reward = progress if run.reward == "progress" else syntax
        return Score(reward=reward, parts=parts)


def syntax_reward(steps: int, format_error_steps: int, calls: int, ok_calls: int) -> float:
    """Environment Tuning's stage-1 reward, rescaled to [0, 1].

    R = I_tool * (R_format + R_tool) with I_tool = 1 iff the policy made any call,
    R_format = (steps - steps with a format error) / steps, R_tool = successful calls / calls.
    R lies in [0, 2]; we return R / 2 so it shares the progress reward's [0, 1] range (a
    stage change then does not rescale the advantages of GRPO variants without std
    normalisation).
    """
    if calls == 0 or steps == 0:
        return 0.0
    r_format = (steps - format_error_steps) / steps
    r_tool = ok_calls / calls
    return (r_format + r_tool) / 2.0


def build_bfcl_env(env_cfg: Any, seed: int = 0) -> BfclEnv:
    """The training environment from `[environment]` (its `bfcl` section and reward). The
    split has its own seed (`bfcl.split_seed`), so `seed` changes nothing here: the held-out
    half must not move when a run's seed does."""
    del seed
    return BfclEnv.from_config(env_cfg.bfcl, env_cfg.reward)
