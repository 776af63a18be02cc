"""One typed call to the simulator model, shared by every simulator role.

Owns `SimClient.ask`: render a role's messages to token ids with the simulator's chat
template (no tools), ask the engine for JSON of the role's msgspec Struct
(`Sampling(json_schema=...)`), decode leniently (control characters inside strings are
allowed, as a random or weak model writes them), run the role's own check, and retry within
a budget. After the budget it raises `SimError`, which the episode runner turns into status
`sim_error` (the episode is left out of training, never scored 0).

Also owns `bounded_schema` (tighten a JSON schema so a constrained random model terminates)
and the prompt recorder hook used by `bench/prefix.py`. It does not decide what a role
says: the roles in `sim/` build the messages and read the Struct.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import anyio
import msgspec

from trustee.chat.render import ChatFormat
from trustee.engines.base import Engine, RecoverableEngineError, Sampling
from trustee.types import Message

T = TypeVar("T")

# Used where a tool schema leaves a string / array / number unbounded (constraint only; the
# original schema still validates).
STRING_CAP = 64
ARRAY_CAP = 4
NUMBER_CAP = 1_000_000


class SimError(RuntimeError):
    """A simulator role could not produce a usable output within its retry budget."""

    def __init__(self, role: str, attempts: int, last: str):
        self.role, self.attempts, self.last = role, attempts, last
        super().__init__(
            f"simulator role {role!r} failed {attempts} time(s); last problem: {last}. "
            "Raise simulator.max_decode_retries or use a stronger simulator model."
        )


class OutputRejected(ValueError):
    """Raised by a role's check when a decoded output is well-typed but unusable."""


def load_prompt(name: str) -> str:
    """The text of `trustee/sim/prompts/<name>.txt` (trailing whitespace stripped)."""
    return resources.files("trustee.sim").joinpath(f"prompts/{name}.txt").read_text().rstrip() + "\n"


def decode_json(raw: str, out_type: type[T]) -> T:
    """JSON text -> `out_type`, lenient about control characters inside strings; raises
    ValueError (json or msgspec) on anything else, and on non-finite numbers."""
    obj = json.loads(raw, strict=False, parse_constant=_reject_constant)
    return msgspec.convert(obj, type=out_type)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in simulator output")


def schema_of(out_type: type) -> dict[str, Any]:
    """The JSON schema of a msgspec Struct with `$ref`s inlined (some grammar compilers
    handle a flat schema better; it is also easier to edit per task)."""
    schema = msgspec.json.schema(out_type)
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` where every free string, array, number and object is bounded
    (maxLength, maxItems, minimum/maximum, additionalProperties false), so constrained
    decoding of any model terminates. Validation keeps using the original schema."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _bound_child(k, v) for k, v in schema.items()}
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "string" in types and not ({"enum", "const", "maxLength"} & out.keys()):
        out["maxLength"] = STRING_CAP
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(ARRAY_CAP, int(out.get("minItems", 0)))
    if types & {"number", "integer"} and not ({"enum", "const"} & out.keys()):
        out.setdefault("minimum", -NUMBER_CAP)
        out.setdefault("maximum", NUMBER_CAP)
    if "object" in types and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _bound_child(key: str, value: Any) -> Any:
    if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
        return {k: bounded_schema(v) for k, v in value.items()}
    if key in ("items", "additionalProperties", "not") and isinstance(value, dict):
        return bounded_schema(value)
    if key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
        return [bounded_schema(v) for v in value]
    return value


PromptRecorder = Callable[[str, str, list[int]], None]
"""Called with (role, scope key, prompt ids) before each simulator request (bench hook)."""


@dataclass
class SimStats:
    """Cumulative counts of one client, for metrics."""

    calls: int = 0
    retries: int = 0
    failures: int = 0
    decoded: int = 0
    by_role: dict[str, int] = field(default_factory=dict)
    recent_problems: list[str] = field(default_factory=list)
    """The last few decode problems (role, finish reason, error), newest last."""

    def note(self, problem: str, keep: int = 20) -> None:
        self.recent_problems.append(problem)
        del self.recent_problems[:-keep]


@dataclass
class SimClient:
    """Asks the simulator engine for typed outputs.

    `ask` returns `(value, retries)`; the caller adds `retries` to the episode's counters.
    `key` is the sticky routing key (the group id, so a group's calls share a replica and
    its prefix cache); it never enters the prompt.
    """

    engine: Engine
    tokenizer: Any
    temperature: float = 0.7
    max_tokens: int = 512
    max_decode_retries: int = 3
    template: str | None = None
    recorder: PromptRecorder | None = None
    stats: SimStats = field(default_factory=SimStats)

    def __post_init__(self) -> None:
        self.fmt = ChatFormat(self.tokenizer, [], enable_thinking=False, template=self.template)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self.fmt.prompt_ids(messages)

    async def ask(
        self,
        role: str,
        messages: list[Message],
        out_type: type[T],
        *,
        schema: dict[str, Any] | None = None,
        check: Callable[[T], None] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        key: str | None = None,
    ) -> tuple[T, int]:
        """One typed answer from the simulator. `schema` overrides the Struct's schema (a
        per-task tightening of it); `check` raises OutputRejected for unusable values."""
        ids = self.prompt_ids(messages)
        params = Sampling(
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            temperature=self.temperature if temperature is None else temperature,
            json_schema=schema if schema is not None else schema_of(out_type),
        )
        self.stats.by_role[role] = self.stats.by_role.get(role, 0) + 1
        last = ""
        for attempt in range(self.max_decode_retries + 1):
            if self.recorder is not None:
                self.recorder(role, key or "", ids)
            self.stats.calls += 1
            try:
                out = await self.engine.generate(ids, params, key=key)
            except RecoverableEngineError as e:
                last = f"engine error: {e}"
                self.stats.retries += 1
                continue
            text = self.tokenizer.decode(
                _strip_eos(out.token_ids, self.fmt.eos_id), skip_special_tokens=False
            )
            try:
                value = decode_json(text, out_type)
                if check is not None:
                    check(value)
            except (ValueError, msgspec.ValidationError) as e:
                cut = " (output hit max_tokens)" if out.finish_reason == "length" else ""
                last = f"{type(e).__name__}: {e}{cut} in {text[:160]!r}"
                self.stats.note(f"{role}: {last}")
                if attempt < self.max_decode_retries:
                    self.stats.retries += 1
                continue
            self.stats.decoded += 1
            return value, attempt
        self.stats.failures += 1
        raise SimError(role, self.max_decode_retries + 1, last)


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def as_json(value: Any) -> str:
    """Compact JSON of a Struct/value, the form a role's past outputs take in its history."""
    return msgspec.json.encode(value).decode()


async def gather_first_error(fns: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the coroutine functions concurrently; results in order. If any fails, the others
    still finish (their work, e.g. memoised tool results, is kept) and the first error is
    re-raised as itself, not wrapped in an ExceptionGroup, so callers catch SimError."""
    results: list[Any] = [None] * len(fns)
    errors: list[Exception] = []

    async def one(i: int) -> None:
        try:
            results[i] = await fns[i]()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the siblings finish
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for i in range(len(fns)):
            tg.start_soon(one, i)
    if errors:
        raise errors[0]
    return results
