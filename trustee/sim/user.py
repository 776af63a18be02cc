"""The user simulator role: speaks as the task's persona across an episode.

Owns `UserSimulator` and its output Struct `UserReply`. The prompt is laid out for the KV
cache: static rules (system) + the task block shared by the whole GRPO group (persona, goal,
hidden info, opening query) in the system message, then this episode's append-only history
(each assistant message the user saw, and the user's own past replies as JSON), then the new
assistant message. Hidden information is revealed only when asked (prompt rule); tool names
are never spoken (prompt rule, plus a redaction in code counted as `leaks`). The user's
`status` is the explicit stop signal. Called by `envs/simulated.py`, which caps user turns.
"""

from __future__ import annotations

import re
from string import Template
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from trustee.sim.client import SimClient, as_json, load_prompt
from trustee.types import Message, Task

UserStatus = Literal["continue", "goal_met", "gave_up"]


class UserReply(msgspec.Struct, kw_only=True):
    """What the user says next, and whether the conversation should go on."""

    message: Annotated[str, Meta(max_length=300)]
    status: UserStatus


def user_system_message(task: Task) -> Message:
    """Static rules then the group's task block: identical for every episode of a group."""
    block = Template(load_prompt("user_task")).substitute(
        persona=task.persona or "an ordinary user",
        goal=task.goal or task.first_query,
        hidden=task.hidden_info or "- (none)",
        first_query=task.first_query,
    )
    return Message(role="system", content=load_prompt("user_system") + "\n" + block)


class UserSimulator:
    """Plays the user of one episode; keeps that episode's history (append-only)."""

    def __init__(self, client: SimClient, task: Task, *, key: str):
        self.client = client
        self.task = task
        self.key = key
        self.history: list[Message] = [user_system_message(task)]
        self.leaks = 0
        self._tool_names = sorted((t.name for t in task.tools), key=len, reverse=True)

    async def reply(self, assistant_text: str) -> tuple[UserReply, int]:
        """The user's answer to the assistant's latest message, and the decode retries."""
        seen = Message(role="user", content=f"Assistant: {assistant_text.strip() or '(no message)'}")
        value, retries = await self.client.ask("user", self.history + [seen], UserReply, key=self.key)
        value = UserReply(message=self._redact(value.message), status=value.status)
        self.history += [seen, Message(role="assistant", content=as_json(value))]
        return value, retries

    def _redact(self, text: str) -> str:
        """Replace tool names the user must never say (the policy must find tools itself)."""
        for name in self._tool_names:
            text, n = re.subn(rf"\b{re.escape(name)}\b", "that", text)
            self.leaks += n
        return text
