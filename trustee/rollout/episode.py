"""The episode runner: one multi-turn episode on token ids, and one GRPO group of them.

Owns `EpisodeRunner.run` (policy turn -> parse -> environment step -> render the reply to
ids -> ... -> score) and `run_group` (the G episodes of one task, concurrently, sharing the
environment's group state). The loop works on a `Conversation` (TITO): sampled ids are
appended exactly as the engine returned them (mask 1), environment turns are rendered and
appended (mask 0), nothing is re-rendered.

Limits: policy turns (`max_turns`), tool calls per turn (extra calls become
`too_many_calls` error observations, never executed), tokens per turn, total tokens
(`max_model_len`: an episode that would outgrow it ends as `truncated`), tool-result length
(cut with a marker). Statuses: `ok` (the environment ended it), `truncated` (a limit ended
it; still scored and trained), `sim_error` (the simulator failed its budget; not scored,
never trained), `error` (an exception: logged with the episode id, counted, never raised to
sibling episodes). Cancellation propagates.

Tool calls of one turn are handed to the environment together (`env.step`); environments
run them concurrently. Callers: the scheduler, `bench/prefix.py`, tests. It does not build
tasks (the scheduler asks `env.make_task`) nor compute advantages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio
import msgspec

from trustee.chat.formats import chat_spec
from trustee.chat.parse import ToolCallParser, canonical_json
from trustee.chat.render import ChatFormat, Conversation
from trustee.config import ModelConfig, RolloutConfig
from trustee.engines.base import Completion, Engine, FatalEngineError, Sampling
from trustee.envs.base import AgentAction, Environment, EpisodeState
from trustee.rollout.turns import TurnRenderer
from trustee.types import (
    Counters,
    EpisodeFailure,
    EpisodeStatus,
    Message,
    Task,
    ToolCallError,
    ToolSpec,
    Trajectory,
)

log = logging.getLogger("trustee.rollout")

FORMAT_ERROR_KINDS = frozenset({"invalid_json", "not_an_object", "missing_name", "unclosed"})
MALFORMED_KINDS = FORMAT_ERROR_KINDS | {"schema", "unknown_tool"}
"""Error kinds of a call that did not run (`Counters.malformed_calls`): its turn is flagged in
`Trajectory.malformed_turns`."""


@runtime_checkable
class GroupedEnvironment(Protocol):
    """An environment whose episodes of one task share state (e.g. a tool memo)."""

    def new_group(self, task: Task) -> Any: ...


class EnvironmentStuck(RuntimeError):
    """The environment neither replied nor ended the episode (an environment bug)."""


@dataclass
class _Episode:
    """What one run accumulates; turned into a Trajectory at the end."""

    episode_id: str
    task: Task
    started: float = field(default_factory=time.perf_counter)
    counters: Counters = field(default_factory=Counters)
    state: EpisodeState | None = None
    conv: Conversation | None = None
    malformed_turns: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class EpisodeRunner:
    """Runs episodes of any `Environment` with one policy engine.

    `template`: the chat template text (None: the tokenizer's own); `chat_format`: the
    family whose call syntax the parser reads ('auto': from the tokenizer); `max_model_len`:
    the longest token sequence an episode may reach.
    """

    policy: Engine
    tokenizer: Any
    cfg: RolloutConfig = field(default_factory=RolloutConfig)
    max_model_len: int = 8192
    template: str | None = None
    enable_thinking: bool = False
    chat_format: str = "auto"
    tool_set_cache: int = 1024
    _formats: OrderedDict[bytes, tuple[ChatFormat, ToolCallParser, TurnRenderer]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    # The tool list last looked up, a copy of its items and its entry: the episodes of a
    # group ask with the same list object, which skips encoding the key.
    _last_tools: tuple[list[ToolSpec], tuple[ToolSpec, ...], Any] | None = field(
        default=None, init=False, repr=False
    )

    @classmethod
    def from_config(
        cls, rollout: RolloutConfig, model: ModelConfig, policy: Engine, tokenizer: Any
    ) -> EpisodeRunner:
        """The runner for a run: limits from [rollout], template/thinking/length from [model]."""
        spec = chat_spec(
            tokenizer,
            chat_format=model.chat_format,
            chat_template=model.chat_template,
            enable_thinking=model.enable_thinking,
        )
        return cls(
            policy,
            tokenizer,
            cfg=rollout,
            max_model_len=model.max_model_len,
            template=spec.template,
            enable_thinking=model.enable_thinking,
            chat_format=spec.family,
        )

    async def run(self, env: Environment, task: Task, episode_id: str, *, group: Any = None) -> Trajectory:
        """One episode. Never raises for a failure inside it (see module docstring)."""
        ep = _Episode(episode_id=episode_id, task=task)
        status: EpisodeStatus = "error"
        error, reward, parts = "", 0.0, {}
        try:
            status = await self._play(env, ep, group)
            if status in ("ok", "truncated"):
                score = await env.score(ep.state)
                reward, parts = score.reward, dict(score.parts)
            if ep.state.sim_error:
                status, error = "sim_error", ep.state.sim_error
        except EpisodeFailure as e:
            status, error = "sim_error", str(e)
        except FatalEngineError:
            raise  # a dead engine stops the run (checkpoint, exit with the reason), not one episode
        except Exception as e:  # noqa: BLE001 - invariant 8: one bad episode never stops a run
            log.exception("episode %s (task %s) failed", episode_id, task.id)
            status, error = "error", f"{type(e).__name__}: {e}"
        finally:
            await _end_episode(env, ep)
        if status in ("sim_error", "error"):
            reward, parts = 0.0, {}
        return self._trajectory(ep, status, error, reward, parts)

    async def _play(self, env: Environment, ep: _Episode, group: Any) -> EpisodeStatus:
        ep.state = state = await env.start(ep.task, ep.episode_id, group)
        fmt, parser, turns = self.for_tools(ep.task.tools)
        ep.conv = conv = Conversation.start(fmt, state.messages, ids=turns.prompt_ids(state.messages))
        c = ep.counters
        while True:
            # One position stays free for the end-of-turn id `append_sampled` adds after a
            # sample cut by max_tokens.
            room = self.max_model_len - len(conv.ids) - 1
            if c.turns >= self.cfg.max_turns or room < 1:
                return "truncated"
            comp = await self._sample(conv, fmt, room, ep.episode_id)
            start = len(conv.ids)
            conv.append_sampled(comp.token_ids, comp.logprobs, comp.policy_version)
            c.turns += 1
            action = self._action(comp, parser, turns, c)
            if any(e.kind in MALFORMED_KINDS for e in action.errors):
                ep.malformed_turns.append((start, len(conv.ids)))
            conv.add_assistant(action.message)
            replies = await env.step(state, action)
            c.sim_retries = state.sim_retries
            if state.sim_error:
                return "sim_error"
            if state.done:
                return "ok"
            if not replies:
                raise EnvironmentStuck(
                    f"environment {env.name!r} returned no reply and did not end the episode"
                )
            replies = self._cut_results(replies, turns, c)  # counts user turns too
            ids = turns.continuation_ids(replies)
            if len(conv.ids) + len(ids) >= self.max_model_len:
                return "truncated"
            conv.append_env(replies, ids=ids)

    def for_tools(self, tools: list[ToolSpec]) -> tuple[ChatFormat, ToolCallParser, TurnRenderer]:
        """The chat format, the parser (schemas checked and compiled) and the turn renderer
        of one tool set, built once per distinct tool set and shared by every episode that
        uses it: a group's G episodes share one task, and environments draw tasks from a
        limited set of tool sets. Keyed by the tool specs' JSON; the `tool_set_cache` most
        recent sets are kept. The format and parser are read-only after construction and the
        renderer only memoises, so sharing them is safe."""
        last = self._last_tools
        if last is not None and last[0] is tools and _same_items(tools, last[1]):
            return last[2]  # the same list of the same specs: a group's episodes share their task's
        key = msgspec.json.encode(tools)
        hit = self._formats.get(key)
        if hit is not None:
            self._formats.move_to_end(key)
            self._last_tools = (tools, tuple(tools), hit)
            return hit
        fmt = ChatFormat(
            self.tokenizer,
            tools,
            enable_thinking=self.enable_thinking,
            template=self.template,
            family=self.chat_format,
        )
        hit = (fmt, ToolCallParser(tools, format=fmt.family), TurnRenderer(fmt))
        self._formats[key] = hit
        self._last_tools = (tools, tuple(tools), hit)
        if len(self._formats) > self.tool_set_cache:
            self._formats.popitem(last=False)
        return hit

    async def _sample(self, conv: Conversation, fmt: ChatFormat, room: int, key: str) -> Completion:
        params = Sampling(
            max_tokens=min(self.cfg.max_tokens_per_turn, room),
            temperature=self.cfg.temperature,
            stop_token_ids=(fmt.eos_id,),
        )
        return await self.policy.generate(list(conv.ids), params, key=key)

    def _action(
        self, comp: Completion, parser: ToolCallParser, turns: TurnRenderer, c: Counters
    ) -> AgentAction:
        """Decode and parse one turn; calls over the per-turn limit become errors."""
        parsed = parser.parse(turns.decode(comp.token_ids))
        limit = self.cfg.max_tool_calls_per_turn
        calls, errors = parsed.calls[:limit], list(parsed.errors)
        for call in parsed.calls[limit:]:
            errors.append(
                ToolCallError(
                    kind="too_many_calls",
                    message=f"not executed: at most {limit} tool calls per turn",
                    raw=canonical_json({"name": call.name, "arguments": call.arguments}),
                    name=call.name,
                )
            )
        c.tool_calls += len(calls)
        if errors:
            c.format_errors += sum(e.kind in FORMAT_ERROR_KINDS for e in errors)
            c.schema_errors += sum(e.kind == "schema" for e in errors)
            c.unknown_tools += sum(e.kind == "unknown_tool" for e in errors)
        return AgentAction(
            message=parsed.message, calls=calls, errors=errors, truncated=comp.finish_reason == "length"
        )

    def _cut_results(self, replies: list[Message], turns: TurnRenderer, c: Counters) -> list[Message]:
        """Tool results longer than `max_tool_result_tokens` are cut, with a marker; user
        turns are counted."""
        out = []
        cap = self.cfg.max_tool_result_tokens
        for m in replies:
            if m.role == "user":
                c.user_turns += 1
            elif m.role == "tool":
                c.tool_errors += _is_error(m.content)
                # Byte-level BPE and SentencePiece with byte fallback make at most one token
                # per UTF-8 byte (plus a possible leading-space token), and a character is at
                # most 4 UTF-8 bytes: short results skip encoding.
                if len(m.content) * 4 + 1 <= cap or len(m.content.encode()) + 1 <= cap:
                    out.append(m)
                    continue
                ids = turns.encode(m.content)
                if len(ids) > cap:
                    c.truncated_results += 1
                    text = self.tokenizer.decode(ids[:cap]) + f"\n...[truncated {len(ids) - cap} tokens]"
                    m = Message(role="tool", content=text, name=m.name)
            out.append(m)
        return out

    def _trajectory(
        self, ep: _Episode, status: EpisodeStatus, error: str, reward: float, parts: dict
    ) -> Trajectory:
        conv = ep.conv
        ep.counters.wall_s = time.perf_counter() - ep.started
        if ep.state is not None:
            ep.counters.sim_retries = ep.state.sim_retries
        # The conversation ends with its episode: the trajectory takes its lists, uncopied.
        traj = Trajectory(
            episode_id=ep.episode_id,
            task_id=ep.task.id,
            tokens=conv.ids if conv else [],
            loss_mask=conv.mask if conv else [],
            logprobs=conv.logprobs if conv else [],
            versions=conv.versions if conv else [],
            prompt_len=conv.prompt_len if conv else 0,
            reward=reward,
            parts=parts,
            counters=ep.counters,
            status=status,
            error=error,
            messages=conv.messages if conv else [],
            knobs=dict(ep.task.knobs),
            malformed_turns=ep.malformed_turns if conv else [],
        )
        traj.check()
        return traj


def _same_items(items: list[Any], before: tuple[Any, ...]) -> bool:
    return len(items) == len(before) and all(a is b for a, b in zip(items, before, strict=True))


async def _end_episode(env: Environment, ep: _Episode) -> None:
    """The environment's optional `end_episode(state)`: called once per started episode however
    it ended (scored, failed, cancelled), shielded, so what the episode holds (an MCP server,
    a working directory) is given back. Its own failure is logged, never raised."""
    end = getattr(env, "end_episode", None)
    if end is None or ep.state is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await end(ep.state)
        except Exception:  # noqa: BLE001 - a failed clean-up must not turn a scored episode into an error
            log.exception("episode %s: end_episode failed", ep.episode_id)


def _is_error(content: str) -> bool:
    # A JSON object with an "error" key spells the key out, or escapes a letter of it (\u...);
    # any other text needs no parse.
    if "error" not in content and "\\u" not in content:
        return False
    try:
        obj = json.loads(content)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "error" in obj


async def run_group(
    env: Environment, task: Task, group_size: int, runner: EpisodeRunner, *, group_id: str | None = None
) -> list[Trajectory]:
    """The `group_size` episodes of one task, run concurrently with one shared group state
    (from `env.new_group` when the environment has one). Results in episode order."""
    if group_size < 1:
        raise ValueError(f"group_size = {group_size}: a group needs at least 1 episode")
    group = env.new_group(task) if isinstance(env, GroupedEnvironment) else None
    gid = group_id or task.id
    # asyncio's own task group (trustee runs on the asyncio backend; the engines need it):
    # the same structure as anyio's (siblings cancelled on a failure, errors raised as an
    # ExceptionGroup, cancellation of the caller reaches every episode), at a third of the
    # cost per task, which matters at one group per task sampled.
    async with asyncio.TaskGroup() as tg:
        runs = [tg.create_task(runner.run(env, task, f"{gid}/{i}", group=group)) for i in range(group_size)]
    return [r.result() for r in runs]
