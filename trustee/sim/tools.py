"""The tool simulator role and the group's state-aware consistency memo.

Owns `ToolSimulator` (one per episode), `ConsistencyMemo` (one per GRPO group) and the
output Struct `ToolReply`. A call is first validated against the tool's JSON schema in code
(`ToolCallParser.validate`): a schema error is a deterministic error observation and costs
no model call. A valid call is keyed by its canonical JSON (name + arguments) *and the
episode's state*: the ordered list of the episode's earlier state-changing calls that went
through (a tool's read/write nature is declared by the task generator, `Task.payload
['state_changing']`; a task without the declaration counts every tool as state-changing).
So the same call in the same state gets the same answer across the whole group, and a call
after a state change is answered from that episode's own log, never from an episode in
another state. Concurrent askers of one key share a single simulator call. Whether a call
fails by error injection is decided in code from a hash of (task id, key), so it too is
the same across the group.

The prompt is the episode's `SimLog` plus the call (see `log.py`). Called by
`envs/simulated.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated

import anyio
import msgspec
from msgspec import Meta

from trustee.chat.parse import ToolCallParser, canonical_json
from trustee.sim.client import SimClient, gather_first_error
from trustee.sim.log import SimLog, call_text
from trustee.sim.taskgen import STATE_CHANGING
from trustee.types import Message, Task, ToolCall

Key = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Value = Annotated[str, Meta(max_length=60)] | Annotated[int, Meta(ge=-1_000_000_000, le=1_000_000_000)] | bool


class ResultField(msgspec.Struct, kw_only=True):
    key: Key
    value: Value


class ToolReply(msgspec.Struct, kw_only=True):
    """A tool result as a flat list of fields (bounded, so a constrained model terminates
    within simulator.max_tokens)."""

    fields: Annotated[list[ResultField], Meta(min_length=1, max_length=4)]

    def as_object(self) -> dict[str, str | int | bool]:
        return {f.key: f.value for f in self.fields}


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """A memoised tool result: what the agent sees (canonical JSON of the fields) and what
    the simulator wrote (joins every log of the group in the same form)."""

    content: str
    raw: str


class ConsistencyMemo:
    """Memo key -> `Result`, shared by the episodes of one group.

    Concurrency-safe on one event loop: the first asker computes, later askers of the same
    key wait for it. If the computation fails, one waiter computes again.
    """

    def __init__(self) -> None:
        self._done: dict[str, Result] = {}
        self._pending: dict[str, anyio.Event] = {}
        self.hits = 0
        self.computed = 0

    def __len__(self) -> int:
        return len(self._done)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[Result]]) -> Result:
        while key not in self._done:
            event = self._pending.get(key)
            if event is None:
                return await self._compute(key, compute)
            await event.wait()
        self.hits += 1
        return self._done[key]

    async def _compute(self, key: str, compute: Callable[[], Awaitable[Result]]) -> Result:
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
    return call_text(call)


def memo_key(call: ToolCall, state: list[str]) -> str:
    """A call in a state: the call's normal form plus the episode's earlier state-changing
    calls (their normal forms, in order)."""
    return canonical_json({"call": call_key(call), "after": state})


def injected_failure(task_id: str, key: str, rate: float) -> bool:
    """Deterministic per (task, call): the same call fails in every episode of the group."""
    if rate <= 0.0:
        return False
    h = hashlib.sha256(f"{task_id}\x00{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < rate


class ToolSimulator:
    """Answers the tool calls of one episode, on the episode's log."""

    def __init__(
        self, client: SimClient, task: Task, memo: ConsistencyMemo, *, key: str, error_rate: float = 0.0
    ):
        self.client = client
        self.task = task
        self.memo = memo
        self.key = key
        self.error_rate = error_rate
        self.parser = ToolCallParser(task.tools)
        declared = task.payload.get(STATE_CHANGING)
        self.writers = set(declared) if declared is not None else {t.name for t in task.tools}
        self.state: list[str] = []
        """This episode's state-changing calls that went through, in order."""
        self.retries = 0
        self.schema_errors = 0
        self.injected = 0

    async def run_turn(self, log: SimLog, calls: list[ToolCall], agent_text: str = "") -> list[Message]:
        """Results of one turn's calls, computed concurrently, in call order. The calls see
        the log and the state as they were at the turn's start; the requests and results
        join the log in call order, and the calls that change state join the state."""
        base = list(self.state)
        requests = [self._request(call, agent_text if i == 0 else "") for i, call in enumerate(calls)]
        out = await gather_first_error(
            [lambda c=c, r=r: self._result(log, base, c, r) for c, r in zip(calls, requests, strict=True)]
        )
        for call, request, (_, raw) in zip(calls, requests, out, strict=True):
            log.agent_calls.append((call, raw is not None))
            if raw is not None:
                log.answered(request, raw)
                if call.name in self.writers and not self._fails(call):
                    self.state.append(call_key(call))
            else:
                log.note(request)
        return [msg for msg, _ in out]

    def _fails(self, call: ToolCall) -> bool:
        return injected_failure(self.task.id, call_key(call), self.error_rate)

    def _request(self, call: ToolCall, agent_text: str) -> str:
        err = self.parser.validate(call)
        if err is not None:
            return SimLog.rejected_call(call, err.message, agent_text)
        return SimLog.tool_request(call, self._fails(call), agent_text)

    async def _result(
        self, log: SimLog, state: list[str], call: ToolCall, request: str
    ) -> tuple[Message, str | None]:
        """(the tool message, the simulator's answer as written; None: no simulator call)."""
        err = self.parser.validate(call)
        if err is not None:  # deterministic, no model call
            self.schema_errors += 1
            return Message(role="tool", content=canonical_json({"error": err.message}), name=call.name), None
        fails = self._fails(call)
        prompt = log.prompt(request)

        async def compute() -> Result:
            answer = await self.client.ask_raw("tool", prompt, ToolReply, key=self.key)
            self.retries += answer.retries
            return Result(content=canonical_json(answer.value.as_object()), raw=answer.text)

        if fails:
            self.injected += 1
        result = await self.memo.get_or_compute(memo_key(call, state), compute)
        return Message(role="tool", content=result.content, name=call.name), result.raw
