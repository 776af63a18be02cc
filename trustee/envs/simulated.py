"""The simulated (TRUSTEE) environment: tasks, user, tools and judge all played by a model.

Owns `SimulatedEnv` (the `Environment` contract over the roles in `trustee/sim/`),
`SimGroup` (what the episodes of one GRPO group share: the tool consistency memo),
`build_simulated_env` (from the config sections) and `check_budgets` (the start-up refusal of
a token budget under which some role's JSON could be cut). Each episode keeps one `SimLog`,
the append-only simulator chat every role extends (see `sim/log.py` for the KV-cache
layout); `step_metrics` gives the training loop the step's `sim/*` figures.

Episode flow: the policy's turn with tool calls gets one tool message per call (computed
concurrently) then one per call error; a turn without calls goes to the user simulator,
whose `status` or the user-turn cap ends the episode. The judge (a model, or the
`ScriptedJudge` named as such) scores the episode's log at the end.

A simulator failure after its retry budget (`SimError`) is caught here: the episode gets
`state.sim_error` and `state.done`, and the runner marks it `sim_error` (never trained on).
This module records every assistant message and reply in `state.messages` and the
simulator's view of them in the episode's log. It does not tokenize or sample the policy (`rollout/episode.py` does).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from trustee.chat.parse import error_observation
from trustee.config import EnvironmentConfig, SimulatorConfig
from trustee.engines.base import Engine
from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score
from trustee.sim.budget import worst_case_tokens
from trustee.sim.client import SimClient, SimError, bounded_schema, schema_of
from trustee.sim.judge import Judge, JudgeMode, ScriptedJudge, TrusteeVerdict, VoteRule, rubric_schema
from trustee.sim.log import SimLog
from trustee.sim.metrics import SimMeter
from trustee.sim.taskgen import TaskGenerator, ToolCatalog, ToolDraft, scenario_schema
from trustee.sim.tools import ConsistencyMemo, ToolReply, ToolSimulator
from trustee.sim.user import UserReply, UserSimulator
from trustee.types import Message, Rubric, Task, ToolSpec

MAX_PARAMS = 4
"""Most parameters of a generated tool (`ToolDraft.params`); a catalog tool may have more,
and its requests are then checked one by one."""
MIN_PROMPT = 512
"""Context a role's prompt needs at least, beside its longest output (start-up check)."""

Ending = Literal["goal_met", "gave_up", "user_turn_cap", "cut_off"]

ENDINGS: dict[str, str] = {
    "goal_met": "the user said the goal was met",
    "gave_up": "the user ended it: the assistant gave up, refused or went in circles",
    "user_turn_cap": "the user ran out of turns before the goal was met",
    "cut_off": "cut off by the turn or length limit before the user ended it",
}


@dataclass
class SimGroup:
    """State shared by the episodes of one task (one GRPO group)."""

    task_id: str
    memo: ConsistencyMemo = field(default_factory=ConsistencyMemo)


@dataclass
class SimEpisode:
    """The roles of one episode, its simulator log, and what happened (kept in
    `state.data['sim']`)."""

    log: SimLog
    user: UserSimulator
    tools: ToolSimulator
    user_turns: int = 0
    ending: Ending = "cut_off"
    retries: int = 0


class SimulatedEnv:
    name = "simulated"

    def __init__(
        self,
        client: SimClient,
        *,
        judge_mode: JudgeMode | Literal["scripted"] = "trustee",
        judge_votes: int = 1,
        judge_vote_rule: VoteRule = "mean",
        judge_temperature: float = 0.1,
        max_user_turns: int = 4,
        max_task_regenerations: int = 3,
        task_max_tokens: int = 3072,
        catalog: ToolCatalog | None = None,
        domains: list[str] | None = None,
        judge_client: SimClient | None = None,
        task_examples: Any = None,
        policy_examples: Callable[[Task], list[Message]] | None = None,
        tool_examples: list[Message] | None = None,
        grounded_tasks: bool = False,
    ):
        self.client = client
        self.tool_examples = tool_examples or []
        """simulator.tool_few_shot: worked tool-role turns put in every episode's log before
        the task block (the same for every task, so prefix-cached once)."""
        self.policy_examples = policy_examples
        """environment.few_shot: worked turns put between the task's system prompt and its
        opening query (the policy's prompt only: the simulator's log never holds them)."""
        self.taskgen = TaskGenerator(
            client,
            domains=domains,
            catalog=catalog,
            max_regenerations=max_task_regenerations,
            max_tokens=task_max_tokens,
            examples=task_examples,
            grounded=grounded_tasks,
        )
        self.judge: Judge | ScriptedJudge = (
            ScriptedJudge()
            if judge_mode == "scripted"
            else Judge(
                judge_client or client,
                mode=judge_mode,
                votes=judge_votes,
                vote_rule=judge_vote_rule,
                temperature=judge_temperature,
            )
        )
        self.max_user_turns = max_user_turns
        self.sim_errors = 0
        self._rejected = (0, 0)  # the task generator's counters at the last step_metrics
        self.meter = SimMeter(client, client.engine)

    def step_metrics(self) -> dict[str, float]:
        """This step's simulator figures (`sim/*`; see `sim/metrics.py`); the training loop
        calls it once per step."""
        out = self.meter.step()
        out["sim/episode_errors"] = float(self.sim_errors)
        now = (self.taskgen.rejected, self.taskgen.ungrounded)
        out["sim/tasks_rejected"] = float(now[0] - self._rejected[0])
        out["sim/tasks_ungrounded"] = float(now[1] - self._rejected[1])
        self._rejected = now
        return out

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        """One generated task; raises SimError when the generator fails its budget (the
        caller draws another task)."""
        return await self.taskgen.generate(knobs, rng)

    def new_group(self, task: Task) -> SimGroup:
        return SimGroup(task_id=task.id)

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        group = group if isinstance(group, SimGroup) else self.new_group(task)
        rate = float(task.knobs.get("tool_error_rate", 0.0))
        episode = SimEpisode(
            log=SimLog(task, self.tool_examples),
            user=UserSimulator(self.client, task, key=task.id),
            tools=ToolSimulator(self.client, task, group.memo, key=task.id, error_rate=rate),
        )
        messages = [Message(role="system", content=task.system_prompt)] if task.system_prompt else []
        messages += self.policy_examples(task) if self.policy_examples else []
        messages.append(Message(role="user", content=task.first_query))
        return EpisodeState(
            episode_id=episode_id, task=task, messages=messages, group=group, data={"sim": episode}
        )

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        ep: SimEpisode = state.data["sim"]
        state.messages.append(action.message)
        if state.done:
            return []
        try:
            if action.calls or action.errors:
                text = action.message.content
                out = await ep.tools.run_turn(ep.log, action.calls, text)
                if not action.calls and text.strip():
                    ep.log.note(SimLog.agent_says(text))
                for e in action.errors:
                    out.append(error_observation(e))
                    ep.log.note(SimLog.malformed(out[-1].content))
            else:
                out = await self._user_turn(state, ep, action.message.content)
        except SimError as e:
            self._fail(state, e)
            return []
        finally:
            state.sim_retries = ep.retries + ep.tools.retries
        state.messages.extend(out)
        return out

    async def _user_turn(self, state: EpisodeState, ep: SimEpisode, text: str) -> list[Message]:
        if ep.user_turns >= self.max_user_turns:
            ep.ending, state.done = "user_turn_cap", True
            ep.log.note(SimLog.agent_says(text))
            return []
        reply, retries = await ep.user.reply(ep.log, text)
        ep.retries += retries
        ep.user_turns += 1
        if reply.status != "continue":
            ep.ending, state.done = reply.status, True
            state.messages.append(Message(role="user", content=reply.message))
            return []
        return [Message(role="user", content=reply.message)]

    async def score(self, state: EpisodeState) -> Score:
        ep: SimEpisode = state.data["sim"]
        ending = ENDINGS[ep.ending if state.done else "cut_off"]
        last = state.messages[-1] if state.messages else None
        if not state.done and last is not None and last.role == "assistant" and not last.tool_calls:
            ep.log.note(SimLog.agent_says(last.content))  # the turn cut off before anyone answered
        try:
            score, retries = await self.judge.score(state.task, ep.log, ending, key=state.task.id)
        except SimError as e:
            self._fail(state, e)
            return Score(reward=0.0, parts={})
        ep.retries += retries
        state.sim_retries = ep.retries + ep.tools.retries
        parts = dict(score.parts)
        parts.update(
            user_turns=float(ep.user_turns),
            user_leaks=float(ep.user.leaks),
            tool_schema_errors=float(ep.tools.schema_errors),
            tool_injected_errors=float(ep.tools.injected),
        )
        return Score(reward=score.reward, parts=parts)

    def _fail(self, state: EpisodeState, e: SimError) -> None:
        self.sim_errors += 1
        state.sim_error = str(e)
        state.done = True


def judge_mode_for(sim: SimulatorConfig, env: EnvironmentConfig) -> JudgeMode | Literal["scripted"]:
    """environment.reward picks judge vs rubric; simulator.judge_mode must agree with it."""
    if env.reward == "rubric":
        if sim.judge_mode == "scripted":
            raise ValueError(
                "simulator.judge_mode = 'scripted' with environment.reward = 'rubric': the scripted judge "
                "gives TRUSTEE verdicts only; set environment.reward = 'judge' or a model judge_mode"
            )
        return "rubric"
    if env.reward == "judge":
        return sim.judge_mode
    raise ValueError(
        f"environment.reward = {env.reward!r}: the simulated environment scores with 'judge' or 'rubric'; "
        "set environment.reward to one of them"
    )


def role_budgets(max_expected_calls: int) -> dict[str, tuple[str, int]]:
    """Each role's longest possible output in tokens (`sim/budget.py`) at the hardest task
    the curriculum can ask for, with the config field that budgets it."""
    params = {f"p{i}_{'x' * 28}": {"type": "string"} for i in range(MAX_PARAMS)}
    widest = ToolSpec(
        name="t" * 32,
        parameters={"type": "object", "properties": params, "additionalProperties": False},
    )
    rubric = Rubric(subgoals=["x"] * 8, required_interactions=["x"] * 8, forbidden=["x"] * 8)
    task = Task(id="budget", env="simulated", tools=[widest], first_query="", rubric=rubric)

    def worst(schema: dict[str, Any]) -> int:
        return int(worst_case_tokens(bounded_schema(schema)))

    return {
        "user": ("simulator.max_tokens", worst(schema_of(UserReply))),
        "tool": ("simulator.max_tokens", worst(schema_of(ToolReply))),
        "judge (trustee)": ("simulator.max_tokens", worst(schema_of(TrusteeVerdict))),
        "judge (rubric)": ("simulator.max_tokens", worst(rubric_schema(task))),
        "task (one tool)": ("simulator.task_max_tokens", worst(schema_of(ToolDraft))),
        "task (scenario)": (
            "simulator.task_max_tokens",
            worst(scenario_schema([widest], max(1, max_expected_calls))),
        ),
    }


def check_budgets(sim: SimulatorConfig, max_expected_calls: int, max_model_len: int = 0) -> None:
    """Refuse, at start-up, a budget under which some role's JSON could be cut: every role's
    longest output (strings at their bound, one token per byte) must fit its budget and
    leave room for a prompt in the context. Per request, `SimClient` checks the real prompt."""
    budgets = {"simulator.max_tokens": sim.max_tokens, "simulator.task_max_tokens": sim.task_max_tokens}
    problems = []
    for role, (name, need) in role_budgets(max_expected_calls).items():
        if need > budgets[name]:
            problems.append(
                f"{name} = {budgets[name]}: the {role} role's longest output is {need} tokens, so its JSON "
                f"could be cut; set {name} >= {need}"
            )
        if max_model_len and need + MIN_PROMPT > max_model_len:
            problems.append(
                f"model.max_model_len = {max_model_len}: the {role} role's longest output ({need} tokens) "
                f"leaves less than {MIN_PROMPT} tokens of prompt; set model.max_model_len >= {need + MIN_PROMPT}"
            )
    if problems:
        raise ValueError("simulator budgets do not fit:\n  " + "\n  ".join(problems))


def build_simulated_env(
    sim: SimulatorConfig,
    env: EnvironmentConfig,
    engine: Engine,
    tokenizer: Any,
    *,
    template: str | None = None,
    max_expected_calls: int = 3,
    max_model_len: int = 0,
) -> SimulatedEnv:
    """The simulated environment from its config sections, on one simulator engine.
    `max_expected_calls`: the most reference calls the curriculum can ask for (the top of
    curriculum.aspects.n_expected_calls); `max_model_len`: the simulator's context."""
    check_budgets(sim, max_expected_calls, max_model_len)
    client = SimClient(
        engine,
        tokenizer,
        temperature=sim.temperature,
        max_tokens=sim.max_tokens,
        max_decode_retries=sim.max_decode_retries,
        template=template,
        max_model_len=max_model_len,
    )
    catalog = ToolCatalog.from_jsonl(sim.tool_catalog) if sim.tool_catalog else None
    return SimulatedEnv(
        client,
        judge_mode=judge_mode_for(sim, env),
        judge_votes=sim.judge_votes,
        judge_vote_rule=sim.judge_vote_rule,
        judge_temperature=sim.judge_temperature,
        max_user_turns=sim.max_user_turns,
        max_task_regenerations=sim.max_task_regenerations,
        task_max_tokens=sim.task_max_tokens,
        catalog=catalog,
        task_examples=_worked_scenarios(sim.few_shot) if sim.few_shot else None,
        policy_examples=_toy_examples(env.few_shot, catalog, sim.tool_catalog) if env.few_shot else None,
        tool_examples=_worked_tool_calls(sim.tool_few_shot),
        grounded_tasks=sim.grounded_tasks,
    )


def _worked_scenarios(n: int) -> Any:
    """simulator.few_shot: the toy teacher's worked scenarios (envs/toy_teacher.py) per request."""
    from trustee.envs.toy_teacher import worked_scenarios

    return lambda knobs, rng, draw=None, focus="": worked_scenarios(n, knobs, rng, draw, focus)


def _worked_tool_calls(n: int) -> list[Message]:
    """simulator.tool_few_shot: the toy teacher's worked tool calls with their real results."""
    from trustee.envs.toy_teacher import worked_tool_calls

    return worked_tool_calls(n) if n else []


def _toy_examples(n: int, catalog: ToolCatalog | None, path: str) -> Callable[[Task], list[Message]]:
    """environment.few_shot: the toy environment's worked examples (envs/toy.py, the same ones
    configs/cpu-smollm.toml's policy sees), for a catalog that holds the toy tools they call."""
    from trustee.envs.toy import ONE_CALL_KINDS, ToyEnv
    from trustee.envs.toy_teacher import KIND_OF_TOOL

    called = [tool for tool, kind in KIND_OF_TOOL.items() if kind in ONE_CALL_KINDS]
    names = {t.name for tools in (catalog.by_category.values() if catalog else []) for t in tools}
    if missing := [t for t in called if t not in names]:
        raise ValueError(
            f"environment.few_shot = {n} with simulator.tool_catalog = {path!r}: the worked examples call the "
            f"toy tools {called}, and this catalog lacks {missing}; use configs/catalogs/toy-tools.jsonl "
            "or set environment.few_shot = 0"
        )
    return ToyEnv(few_shot=n).examples
