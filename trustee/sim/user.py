"""The user simulator role: speaks as the task's persona across an episode.

Owns `UserSimulator` and its output Struct `UserReply`. The prompt is the episode's
`SimLog` (run-wide rules, the group's task block with persona, goal, hidden facts and
opening query, then this episode's events) plus one request carrying the agent's latest
message; the request and the answer, as the model wrote it, join the log. Hidden facts are
revealed only when asked (prompt rule); tool names are never spoken (prompt rule, plus a
redaction in code counted as `leaks`). The user's `status` is the explicit stop signal.
Called by `envs/simulated.py`, which caps user turns.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from trustee.sim.client import SimClient
from trustee.sim.log import SimLog
from trustee.types import Task

UserStatus = Literal["continue", "goal_met", "gave_up"]


class UserReply(msgspec.Struct, kw_only=True):
    """What the user says next, and whether the conversation should go on."""

    message: Annotated[str, Meta(max_length=300)]
    status: UserStatus


class UserSimulator:
    """Plays the user of one episode, on the episode's log."""

    def __init__(self, client: SimClient, task: Task, *, key: str):
        self.client = client
        self.task = task
        self.key = key
        self.leaks = 0
        self._tool_names = sorted((t.name for t in task.tools), key=len, reverse=True)

    async def reply(self, log: SimLog, agent_text: str) -> tuple[UserReply, int]:
        """The user's answer to the agent's latest message, and the decode retries."""
        request = SimLog.user_request(agent_text)
        answer = await self.client.ask_raw("user", log.prompt(request), UserReply, key=self.key)
        log.answered(request, answer.text)
        value = answer.value
        return UserReply(message=self._redact(value.message), status=value.status), answer.retries

    def _redact(self, text: str) -> str:
        """Replace tool names the user must never say (the policy must find tools itself)."""
        for name in self._tool_names:
            text, n = re.subn(rf"\b{re.escape(name)}\b", "that", text)
            self.leaks += n
        return text
