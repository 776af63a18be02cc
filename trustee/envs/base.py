"""The environment contract: what the policy talks to during an episode.

Owns `EpisodeState`, `AgentAction`, the `Environment` protocol and the worked-example helpers
(`example_rng`, `worked_turns`: environment.few_shot, shared by the toy, tasks-file and
simulated environments); re-exports `Knobs` and `Score`, which live in `trustee/types.py` (the simulator roles use them without importing envs).
Simulated (LLM-played), BFCL (executable) and toy (programmatic) environments implement it
and are interchangeable in the episode runner (`rollout/episode.py`), which is the only
caller of `start`/`step`/`score`; the scheduler calls `make_task` once per GRPO group.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import msgspec

from trustee.types import Knobs, Message, Score, Task, ToolCall, ToolCallError

__all__ = ["AgentAction", "Environment", "EpisodeState", "Knobs", "Score", "example_rng", "worked_turns"]


class EpisodeState(msgspec.Struct, kw_only=True):
    """Mutable per-episode state owned by the environment.

    `messages` is the full conversation (system and first user turn included); `done` is set
    by the environment when the episode must end (user stop signal, last BFCL turn, ...).
    `group` holds state shared by the episodes of one GRPO group (e.g. the tool simulator's
    consistency memo); `data` is the environment's own scratch space.
    """

    episode_id: str
    task: Task
    messages: list[Message]
    done: bool = False
    sim_retries: int = 0
    sim_error: str = ""
    group: Any = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class AgentAction(msgspec.Struct, frozen=True, kw_only=True):
    """One assistant turn as the environment sees it: the parsed message, the calls that
    parsed, and the ones that did not (each error is shown to the policy as a tool result)."""

    message: Message
    calls: list[ToolCall] = msgspec.field(default_factory=list)
    errors: list[ToolCallError] = msgspec.field(default_factory=list)
    truncated: bool = False


@runtime_checkable
class Environment(Protocol):
    name: str

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        """One task for a GRPO group."""
        ...

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        """System prompt, tools and the first user turn."""
        ...

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        """The environment's reply to one assistant turn: tool results (role `tool`, one per
        call or call error, in order) and/or a user message. An empty list with
        `state.done` set ends the episode."""
        ...

    async def score(self, state: EpisodeState) -> Score: ...


def example_rng(task: Task) -> random.Random:
    """The generator that picks `task`'s worked examples (environment.few_shot): seeded by a
    hash of its id, so the same task always gets the same examples and held-out scores
    compare across evaluations."""
    return random.Random(int.from_bytes(hashlib.blake2b(task.id.encode(), digest_size=8).digest(), "big"))


def worked_turns(shots: Iterable[Task]) -> list[Message]:
    """Worked examples as earlier turns: each shot's opening query, then the assistant turn
    that makes its reference calls. They stop at the call: with the tool's result and an
    answer after it, SmolLM2-135M copied the answer pattern and never called a tool (0 of 16
    samples; bench/README). The chat template renders the calls as the policy must write them
    (Hermes <tool_call> JSON for ChatML models)."""
    out: list[Message] = []
    for shot in shots:
        out += [
            Message(role="user", content=shot.first_query),
            Message(role="assistant", tool_calls=list(shot.expected_calls)),
        ]
    return out
