"""The simulated (TRUSTEE) environment: tasks, user, tools and judge all played by a model.

Owns `SimulatedEnv` (the `Environment` contract over the roles in `trustee/sim/`),
`SimGroup` (what the episodes of one GRPO group share: the tool consistency memo) and
`build_simulated_env` (from the config sections). Episode flow: the policy's turn with tool
calls gets one tool message per call (computed concurrently) then one per call error; a
turn without calls goes to the user simulator, whose `status` or the user-turn cap ends the
episode. The judge scores the recorded conversation at the end.

A simulator failure after its retry budget (`SimError`) is caught here: the episode gets
`state.sim_error` and `state.done`, and the runner marks it `sim_error` (never trained on).
This module records every assistant message and reply in `state.messages` (the judge reads
them). It does not tokenize or sample the policy (`rollout/episode.py` does).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from trustee.chat.parse import error_observation
from trustee.config import EnvironmentConfig, SimulatorConfig
from trustee.engines.base import Engine
from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score
from trustee.sim.client import SimClient, SimError
from trustee.sim.judge import Judge, JudgeMode, VoteRule
from trustee.sim.taskgen import TaskGenerator, ToolCatalog
from trustee.sim.tools import ConsistencyMemo, ToolSimulator
from trustee.sim.user import UserSimulator
from trustee.types import Message, Task

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
    """The roles of one episode and what happened (kept in `state.data['sim']`)."""

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
        judge_mode: JudgeMode = "trustee",
        judge_votes: int = 1,
        judge_vote_rule: VoteRule = "mean",
        judge_temperature: float = 0.1,
        max_user_turns: int = 4,
        max_task_regenerations: int = 3,
        task_max_tokens: int = 2048,
        catalog: ToolCatalog | None = None,
        domains: list[str] | None = None,
        judge_client: SimClient | None = None,
    ):
        self.client = client
        self.taskgen = TaskGenerator(
            client,
            domains=domains,
            catalog=catalog,
            max_regenerations=max_task_regenerations,
            max_tokens=task_max_tokens,
        )
        self.judge = Judge(
            judge_client or client,
            mode=judge_mode,
            votes=judge_votes,
            vote_rule=judge_vote_rule,
            temperature=judge_temperature,
        )
        self.max_user_turns = max_user_turns
        self.sim_errors = 0

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
            user=UserSimulator(self.client, task, key=task.id),
            tools=ToolSimulator(self.client, task, group.memo, key=task.id, error_rate=rate),
        )
        messages = [Message(role="system", content=task.system_prompt)] if task.system_prompt else []
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
                out = await ep.tools.run_turn(action.calls)
                out += [error_observation(e) for e in action.errors]
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
            return []
        reply, retries = await ep.user.reply(text)
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
        try:
            score, retries = await self.judge.score(state.task, state.messages, ending, key=state.task.id)
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


def judge_mode_for(sim: SimulatorConfig, env: EnvironmentConfig) -> JudgeMode:
    """environment.reward picks judge vs rubric; simulator.judge_mode must agree with it."""
    if env.reward == "rubric":
        return "rubric"
    if env.reward == "judge":
        return sim.judge_mode
    raise ValueError(
        f"environment.reward = {env.reward!r}: the simulated environment scores with 'judge' or 'rubric'; "
        "set environment.reward to one of them"
    )


def build_simulated_env(
    sim: SimulatorConfig,
    env: EnvironmentConfig,
    engine: Engine,
    tokenizer: Any,
    *,
    template: str | None = None,
) -> SimulatedEnv:
    """The simulated environment from its config sections, on one simulator engine."""
    client = SimClient(
        engine,
        tokenizer,
        temperature=sim.temperature,
        max_tokens=sim.max_tokens,
        max_decode_retries=sim.max_decode_retries,
        template=template,
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
    )
