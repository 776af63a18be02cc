"""The tool simulator role and the group's consistency memo.

Owns `ToolSimulator` (one per episode), `ConsistencyMemo` (one per GRPO group) and the
output Struct `ToolReply`. A call is first validated against the tool's JSON schema in code
(`ToolCallParser.validate`): a schema error is a deterministic error observation and costs
no model call. A valid call is keyed by its canonical JSON (name + arguments); the memo
returns the same result for the same key across the whole group, and concurrent askers of
one key share a single simulator call. Whether a call fails by error injection is decided
in code from a hash of (task id, key), so it too is the same across the group.

Prompt layout (KV cache): static rules + the group's task block (domain, goal, hidden
facts, tool schemas) as the system message, then this episode's earlier calls and results
(append-only), then the new call. Called by `envs/simulated.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from string import Template
from typing import Annotated

import anyio
import msgspec
from msgspec import Meta

from trustee.chat.parse import ToolCallParser, canonical_json
from trustee.sim.client import SimClient, gather_first_error, load_prompt
from trustee.sim.taskgen import tools_block
from trustee.types import Message, Task, ToolCall

Key = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Value = Annotated[str, Meta(max_length=80)] | Annotated[int, Meta(ge=-1_000_000_000, le=1_000_000_000)] | bool


class ResultField(msgspec.Struct, kw_only=True):
    key: Key
    value: Value


class ToolReply(msgspec.Struct, kw_only=True):
    """A tool result as a flat list of fields (bounded, so a constrained model terminates)."""

    fields: Annotated[list[ResultField], Meta(min_length=1, max_length=6)]

    def as_object(self) -> dict[str, str | int | bool]:
        return {f.key: f.value for f in self.fields}


class ConsistencyMemo:
    """Canonical call -> result text, shared by the episodes of one group.

    Concurrency-safe on one event loop: the first asker computes, later askers of the same
    key wait for it. If the computation fails, one waiter computes again.
    """

    def __init__(self) -> None:
        self._done: dict[str, str] = {}
        self._pending: dict[str, anyio.Event] = {}
        self.hits = 0
        self.computed = 0

    def __len__(self) -> int:
        return len(self._done)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[str]]) -> str:
        while key not in self._done:
            event = self._pending.get(key)
            if event is None:
                return await self._compute(key, compute)
            await event.wait()
        self.hits += 1
        return self._done[key]

    async def _compute(self, key: str, compute: Callable[[], Awaitable[str]]) -> str:
        event = self._pending[key] = anyio.Event()
        try:
            value = await compute()
            self._done[key] = value
            self.computed += 1
            return value
        finally:
            del self._pending[key]
            event.set()


def call_key(call: ToolCall) -> str:
    """The normal form of a call: canonical JSON of name and arguments."""
    return canonical_json({"name": call.name, "arguments": call.arguments})


def injected_failure(task_id: str, key: str, rate: float) -> bool:
    """Deterministic per (task, call): the same call fails in every episode of the group."""
    if rate <= 0.0:
        return False
    h = hashlib.sha256(f"{task_id}\x00{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < rate


def tool_system_message(task: Task) -> Message:
    block = Template(load_prompt("tool_task")).substitute(
        domain=task.domain or "general",
        goal=task.goal or task.first_query,
        hidden=" ".join(line.removeprefix("- ") for line in task.hidden_info.splitlines()) or "(none)",
        tools=tools_block(task.tools),
    )
    return Message(role="system", content=load_prompt("tool_system") + "\n" + block)


class ToolSimulator:
    """Answers the tool calls of one episode."""

    def __init__(
        self, client: SimClient, task: Task, memo: ConsistencyMemo, *, key: str, error_rate: float = 0.0
    ):
        self.client = client
        self.task = task
        self.memo = memo
        self.key = key
        self.error_rate = error_rate
        self.parser = ToolCallParser(task.tools)
        self.history: list[Message] = [tool_system_message(task)]
        self.retries = 0
        self.schema_errors = 0
        self.injected = 0

    async def run_turn(self, calls: list[ToolCall]) -> list[Message]:
        """Results of one turn's calls, computed concurrently, in call order. The calls see
        the history of earlier turns only; their results join the history in order."""
        base = list(self.history)
        out = await gather_first_error([lambda c=c: self._result(base, c) for c in calls])
        for call, msg in zip(calls, out, strict=True):
            self.history += [
                _call_message(call, self._fails(call)),
                Message(role="assistant", content=msg.content),
            ]
        return out

    def _fails(self, call: ToolCall) -> bool:
        return injected_failure(self.task.id, call_key(call), self.error_rate)

    async def _result(self, base: list[Message], call: ToolCall) -> Message:
        err = self.parser.validate(call)
        if err is not None:  # deterministic, no model call
            self.schema_errors += 1
            return Message(role="tool", content=canonical_json({"error": err.message}), name=call.name)
        key = call_key(call)
        fails = self._fails(call)

        async def compute() -> str:
            reply, retries = await self.client.ask(
                "tool", base + [_call_message(call, fails)], ToolReply, key=self.key
            )
            self.retries += retries
            return canonical_json(reply.as_object())

        if fails:
            self.injected += 1
        return Message(role="tool", content=await self.memo.get_or_compute(key, compute), name=call.name)


def _call_message(call: ToolCall, fails: bool) -> Message:
    outcome = "this call FAILS (return an error)" if fails else "this call succeeds"
    return Message(role="user", content=f"Call: {call_key(call)}\nOutcome: {outcome}")
