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
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Generic, TypeVar

import anyio
import msgspec

from trustee.chat.render import ChatFormat
from trustee.engines.base import Completion, Engine, RecoverableEngineError, Sampling
from trustee.sim.budget import text_pattern, worst_case_tokens
from trustee.sim.metrics import BlockPrefixMeter
from trustee.types import EpisodeFailure, Message

T = TypeVar("T")

# Used where a tool schema leaves a string / array / number unbounded (constraint only; the
# original schema still validates).
STRING_CAP = 40
ARRAY_CAP = 4
NUMBER_CAP = 1_000_000


class SimError(EpisodeFailure):
    """A simulator role could not produce a usable output within its retry budget."""

    def __init__(self, role: str, attempts: int, last: str):
        self.role, self.attempts, self.last = role, attempts, last
        if attempts == 0:  # refused before sending: `last` names the fix
            super().__init__(f"simulator role {role!r}: request not sent: {last}")
            return
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
    """A copy of `schema` that a constrained model can only fill with bounded output
    (`sim/budget.py` computes the bound): every free string becomes printable ASCII of at
    most its maxLength (default STRING_CAP) characters, every array gets maxItems, every
    number becomes a bounded integer (a float's digits are unbounded), every object
    additionalProperties false. Values of the result are valid for the original schema,
    which validation keeps using."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _bound_child(k, v) for k, v in schema.items()}
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    fixed = {"enum", "const"} & out.keys()
    if "string" in types and not fixed and "pattern" not in out:
        lo, hi = int(out.pop("minLength", 0)), int(out.pop("maxLength", STRING_CAP))
        out["pattern"] = text_pattern(hi, lo)
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(ARRAY_CAP, int(out.get("minItems", 0)))
    if types & {"number", "integer"} and not fixed:
        if "number" in types:
            out["type"] = "integer" if len(types) == 1 else ["integer" if t == "number" else t for t in types]
            for k in ("minimum", "maximum"):
                if k in out:
                    out[k] = math.ceil(out[k]) if k == "minimum" else math.floor(out[k])
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


PromptRecorder = Callable[[str, str, list[int], Completion], None]
"""Called with (role, routing key, prompt ids, completion) after each simulator request
(bench hook: a prefix cache also keeps the blocks of generated tokens, and a backend that
can tell reports the prompt's cached tokens in the completion)."""


@dataclass
class RoleStats:
    """Cumulative counts of one role's requests."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the engine served from its prefix cache (backends that report it)."""
    cut: int = 0
    """Outputs that hit the token budget (finish reason 'length')."""


@dataclass
class SimStats:
    """Cumulative counts of one client, for metrics (`sim/metrics.py` turns them into
    per-step figures). `latencies_s` holds the request latencies since the last `drain`."""

    calls: int = 0
    retries: int = 0
    failures: int = 0
    refused: int = 0
    """Requests never sent: their longest output could not fit the budget or the context."""
    decoded: int = 0
    by_role: dict[str, int] = field(default_factory=dict)
    roles: dict[str, RoleStats] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    recent_problems: list[str] = field(default_factory=list)
    """The last few decode problems (role, finish reason, error), newest last."""

    def note(self, problem: str, keep: int = 20) -> None:
        self.recent_problems.append(problem)
        del self.recent_problems[:-keep]

    def role(self, name: str) -> RoleStats:
        return self.roles.setdefault(name, RoleStats())

    def drain_latencies(self) -> list[float]:
        out, self.latencies_s = self.latencies_s, []
        return out


class SimAnswer(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """A decoded answer, the decode retries it took, and the text the model wrote (what
    joins a role's log, so the output's cached tokens are reused by the next prompt)."""

    value: T
    retries: int
    text: str


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
    max_model_len: int = 0
    """The simulator's context; 0 = unchecked."""
    recorder: PromptRecorder | None = None
    stats: SimStats = field(default_factory=SimStats)
    prefix: BlockPrefixMeter = field(default_factory=BlockPrefixMeter)
    """The block-cache model of this client's requests (`sim/prefix_share_est`)."""

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
        """One typed answer from the simulator and its decode retries (see `ask_raw`)."""
        a = await self.ask_raw(
            role,
            messages,
            out_type,
            schema=schema,
            check=check,
            temperature=temperature,
            max_tokens=max_tokens,
            key=key,
        )
        return a.value, a.retries

    async def ask_raw(
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
    ) -> SimAnswer[T]:
        """One typed answer from the simulator. `schema` overrides the Struct's schema (a
        per-task tightening of it); `check` raises OutputRejected for unusable values.
        Raises `SimError` when the constraint's longest output cannot fit the budget or the
        context (never sent: it could be cut), or after the retry budget."""
        ids = self.prompt_ids(messages)
        schema = bounded_schema(schema if schema is not None else schema_of(out_type))
        budget = self.max_tokens if max_tokens is None else max_tokens
        stats = self.stats.role(role)
        need = self._check_fits(role, schema, budget, len(ids))
        params = Sampling(
            max_tokens=need,  # the longest output the constraint allows: it can never be cut
            temperature=self.temperature if temperature is None else temperature,
            json_schema=schema,
        )
        self.stats.by_role[role] = self.stats.by_role.get(role, 0) + 1
        last = ""
        for attempt in range(self.max_decode_retries + 1):
            self.stats.calls += 1
            stats.requests += 1
            stats.prompt_tokens += len(ids)
            t0 = time.perf_counter()
            try:
                out = await self.engine.generate(ids, params, key=key)
            except RecoverableEngineError as e:
                last = f"engine error: {e}"
                self.stats.retries += 1
                stats.retries += 1
                continue
            finally:
                self.stats.latencies_s.append(time.perf_counter() - t0)
            stats.output_tokens += len(out.token_ids)
            stats.cached_tokens += out.prompt_cached_tokens or 0
            stats.cut += out.finish_reason == "length"
            self.prefix.record(role, ids, list(out.token_ids))
            if self.recorder is not None:
                self.recorder(role, key or "", ids, out)
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
                    stats.retries += 1
                continue
            self.stats.decoded += 1
            return SimAnswer(value=value, retries=attempt, text=text)
        self.stats.failures += 1
        stats.failures += 1
        raise SimError(role, self.max_decode_retries + 1, last)

    def _check_fits(self, role: str, schema: dict[str, Any], budget: int, n_prompt: int) -> int:
        """The request's output bound in tokens; SimError when it does not fit."""
        need = worst_case_tokens(schema)
        if need > budget:
            self.stats.refused += 1
            raise SimError(
                role,
                0,
                f"the longest output its schema allows is {need} tokens, over its budget of {budget}; "
                "raise simulator.max_tokens / simulator.task_max_tokens (checked at start-up for the "
                "curriculum's hardest knobs; this request is larger)",
            )
        if self.max_model_len and n_prompt + need > self.max_model_len:
            self.stats.refused += 1
            raise SimError(
                role,
                0,
                f"prompt of {n_prompt} tokens + the longest output ({need}) exceed model.max_model_len = "
                f"{self.max_model_len}; raise model.max_model_len or shorten episodes (rollout.max_turns)",
            )
        return int(need)


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
