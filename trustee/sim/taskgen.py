"""The task generator role: a data-free task from curriculum knobs and a domain.

Owns `TaskGenerator`, its output Structs and `ToolCatalog`. Simulator calls per task are
laid out as one growing chat, so each repeats the previous prompt and answer as its prefix:

1. tools (skipped when a user-supplied catalog supplies them): one `ToolDraft` per request,
   each appended to the chat before the next is asked (so no single output has to hold a
   whole tool set, and each prompt extends the last), typed so every generated tool becomes
   a valid OpenAI function schema by construction, and declaring whether it changes the
   world's state (the tool simulator's memo keys on it);
2. scenario: `ScenarioDraft` (persona, goal, opening query, hidden info known only to the
   user, expected calls, rubric). Its schema is tightened per task: `expected_calls` may
   only name the task's tools with arguments of each tool's own (bounded) schema.

Then validates in code (unique names, valid schemas, every expected call passes
`ToolCallParser.validate`; optionally every reference-call value appears in the opening
message or hidden information, `ungrounded_values`) and regenerates on failure within a
budget. No tool is ever run to check a task. Called by
`envs/simulated.py`; does not run episodes or score them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from string import Template
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from trustee.chat.parse import ToolCallParser
from trustee.sim.client import OutputRejected, SimClient, SimError, bounded_schema, load_prompt, schema_of
from trustee.sim.log import tools_block
from trustee.types import Knobs, Message, Rubric, Task, ToolCall, ToolSpec

Ident = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{2,31}$")]
Word = Annotated[str, Meta(min_length=1, max_length=16)]
Short = Annotated[str, Meta(min_length=1, max_length=60)]
Text = Annotated[str, Meta(min_length=1, max_length=160)]

GENERIC_SYSTEM_PROMPT = "You are a helpful assistant."
STATE_CHANGING = "state_changing"
"""`Task.payload` key: names of the tools whose calls change state (absent: all of them)."""


ParamText = Annotated[str, Meta(min_length=1, max_length=48)]


class ParamDraft(msgspec.Struct, kw_only=True):
    name: Ident
    type: Literal["string", "integer", "number", "boolean"]
    description: ParamText
    required: bool
    enum: Annotated[list[Word], Meta(max_length=3)]


class ToolDraft(msgspec.Struct, kw_only=True):
    """Stage 1 output, one per request. `changes_state`: calling it changes what later
    calls see (a booking, an update); false for look-ups."""

    name: Ident
    description: Annotated[str, Meta(min_length=1, max_length=100)]
    changes_state: bool
    params: Annotated[list[ParamDraft], Meta(max_length=4)]


class CallDraft(msgspec.Struct, kw_only=True):
    name: str
    arguments: dict[str, Any]


class ScenarioDraft(msgspec.Struct, kw_only=True):
    """Stage 2 output. `expected_calls` is constrained per task to the task's tools.

    The field order is the order the model writes under the grammar: the reference calls
    first (the grammar holds them to the task's tools and their schemas), then the persona,
    the goal, what the user withholds and the opening message, so the text is written about
    calls already fixed (their values are a few tokens back) instead of calls made to fit a
    request that may need a tool the task does not have."""

    expected_calls: Annotated[list[CallDraft], Meta(min_length=1, max_length=3)]
    persona: Annotated[str, Meta(min_length=1, max_length=100)]
    goal: Text
    hidden_info: Annotated[list[Short], Meta(max_length=3)]
    first_query: Text
    system_prompt: Annotated[str, Meta(max_length=200)]
    subgoals: Annotated[list[Short], Meta(min_length=1, max_length=3)]
    required_interactions: Annotated[list[Short], Meta(max_length=2)]
    forbidden: Annotated[list[Short], Meta(max_length=2)]


# ------------------------------------------------------------------ knob words


def expertise_words(x: float) -> str:
    if x >= 2 / 3:
        return "expert: precise, uses the domain's terms"
    if x >= 1 / 3:
        return "beginner: knows what they want, not the terms"
    return "novice: vague, unsure what is possible, needs guidance"


def ambiguity_words(x: float) -> str:
    if x < 1 / 3:
        return "clear: states exactly what is wanted"
    if x < 2 / 3:
        return "somewhat ambiguous: the request needs one clarification"
    return "highly ambiguous: the request is vague and needs several clarifications"


def specificity_words(x: float) -> str:
    if x >= 2 / 3:
        return "detailed: the assistant's role, the domain's policies and how to use the tools"
    return "brief: one or two sentences naming the assistant's role"


def gap_words(n_turns: int) -> str:
    if n_turns <= 1:
        return "none needed: the opening message holds everything; hidden_info may be empty"
    return f"leave {n_turns - 1} detail(s) the assistant needs out of the opening message; put them in hidden_info"


# ------------------------------------------------------------------ catalog


class CatalogEntry(msgspec.Struct, kw_only=True):
    """One JSONL line of a tool catalog: a ToolSpec plus an optional category and whether
    the tool changes state (unknown = treated as changing it, the safe side for the memo)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    category: str = ""
    changes_state: bool | None = None


class ToolCatalog:
    """User-supplied tools; tasks draw tools from one category first (coherent tasks)."""

    def __init__(self, entries: list[CatalogEntry]):
        if not entries:
            raise ValueError("tool catalog is empty; give a JSONL file with one tool spec per line")
        self.by_category: dict[str, list[ToolSpec]] = {}
        self.read_only = {e.name for e in entries if e.changes_state is False}
        for e in entries:
            spec = ToolSpec(name=e.name, description=e.description, parameters=e.parameters)
            self.by_category.setdefault(e.category or "general", []).append(spec)
        for tools in self.by_category.values():
            ToolCallParser(_unique(tools))  # raises on invalid schemas now, not mid-run

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ToolCatalog:
        dec = msgspec.json.Decoder(CatalogEntry)
        entries = []
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                try:
                    entries.append(dec.decode(line))
                except msgspec.DecodeError as e:
                    raise ValueError(
                        f"{path}:{i}: not a tool spec ({e}); expected {{name, description, parameters}}"
                    ) from e
        return cls(entries)

    def sample(self, n: int, rng: random.Random) -> tuple[str, list[ToolSpec]]:
        category = rng.choice(sorted(self.by_category))
        own = list(self.by_category[category])
        rng.shuffle(own)
        tools = own[:n]
        others = [t for c, ts in sorted(self.by_category.items()) if c != category for t in ts]
        rng.shuffle(others)
        tools += others[: n - len(tools)]
        return category, _unique(tools)


def _unique(tools: list[ToolSpec]) -> list[ToolSpec]:
    seen: dict[str, ToolSpec] = {}
    for t in tools:
        seen.setdefault(t.name, t)
    return list(seen.values())


def load_domains() -> list[str]:
    text = resources.files("trustee.sim").joinpath("domains.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------ conversion and checks


def draft_to_spec(d: ToolDraft) -> ToolSpec:
    props: dict[str, Any] = {}
    for p in d.params:
        prop: dict[str, Any] = {"type": p.type, "description": p.description}
        if p.enum and p.type == "string":
            prop["enum"] = list(dict.fromkeys(p.enum))
        props[p.name] = prop
    required = [p.name for p in d.params if p.required]
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return ToolSpec(name=d.name, description=d.description, parameters=schema)


def check_tool(draft: ToolDraft, earlier: list[str]) -> None:
    """OutputRejected if the tool is unusable (a name already taken, a repeated parameter)."""
    if draft.name in earlier:
        raise OutputRejected(f"tool name {draft.name!r} is already used by an earlier tool: {earlier}")
    params = [p.name for p in draft.params]
    if len(set(params)) != len(params):
        raise OutputRejected(f"tool {draft.name!r} repeats a parameter name: {params}")


def value_texts(v: Any) -> list[str]:
    """How an argument value may be written in a user's message (lower case)."""
    if isinstance(v, bool):
        return [str(v).lower()]
    if isinstance(v, int | float):
        f = float(v)
        return [str(int(f))] if f.is_integer() else [str(v), f"{f:g}"]
    return [str(v).lower()]


def ungrounded_values(calls: list[ToolCall], given: str) -> list[str]:
    """The reference calls' argument values that the user's text `given` (opening message and
    hidden information) does not hold as a whole word, number or phrase, so no policy could
    make those calls from what it is told. Booleans are left out (a flag is rarely said in
    words)."""
    text = given.lower()
    out = []
    for call in calls:
        for name, v in call.arguments.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                continue
            if not any(re.search(rf"(?<![\w.]){re.escape(t)}(?![\w])", text) for t in value_texts(v)):
                out.append(f"{call.name}.{name} = {v!r} is not in the opening message or hidden information")
    return out


def task_problems(tools: list[ToolSpec], calls: list[ToolCall]) -> list[str]:
    """Everything wrong with a generated task (empty list: valid)."""
    try:
        parser = ToolCallParser(tools)
    except Exception as e:  # noqa: BLE001 - jsonschema raises several types for a bad schema
        return [f"invalid tool set: {e}"]
    problems = [err.message for c in calls if (err := parser.validate(c)) is not None]
    if not calls:
        problems.append("no expected calls")
    return problems


def scenario_schema(tools: list[ToolSpec], n_calls: int, focus: str = "") -> dict[str, Any]:
    """ScenarioDraft's schema with `expected_calls` restricted to the task's tools (to the
    `focus` tool alone when the task has one reference call and a focus)."""
    schema = schema_of(ScenarioDraft)
    if focus and n_calls <= 1:
        tools = [t for t in tools if t.name == focus] or tools
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": bounded_schema(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    calls = {"type": "array", "items": {"anyOf": variants}, "minItems": 1, "maxItems": max(1, n_calls)}
    schema["properties"]["expected_calls"] = calls
    return schema


def catalog_history(domain: str, tools: list[ToolSpec]) -> list[Message]:
    """The task generator's chat before the scenario request when a catalog supplies the
    tools: its rules, then the drawn tools (the scenario request joins this user turn)."""
    text = Template(load_prompt("task_catalog")).substitute(domain=domain, tools=tools_block(tools))
    return [Message(role="system", content=load_prompt("task_system")), Message(role="user", content=text)]


def scenario_messages(knobs: Knobs, history: list[Message]) -> list[Message]:
    """The scenario request's messages: the chat so far (invented tools, or a catalog draw)
    plus the request worded from the knobs. Also what `envs/toy_teacher.py` teaches a tiny
    simulator to answer, so both build it here."""
    ask = Template(load_prompt("task_scenario")).substitute(
        expertise=expertise_words(knobs.persona_expertise),
        ambiguity=ambiguity_words(knobs.query_ambiguity),
        gap=gap_words(knobs.n_turns),
        n_calls=max(1, knobs.n_expected_calls),
        specificity=specificity_words(knobs.prompt_specificity),
    )
    if history[-1].role == "user":  # catalog: tools and request in one user turn
        return history[:-1] + [Message(role="user", content=history[-1].content + "\n" + ask)]
    return history + [Message(role="user", content=ask)]


# ------------------------------------------------------------------ the role


class TaskGenerator:
    """Invents (or draws) tools, then a scenario; validates; regenerates on failure.

    With `examples` (catalog draws only) each task first picks a focus: one of its drawn
    tools, evenly, which a one-call task's reference call is held to; the worked turns are
    asked for that tool's kind over the task's own draw. With `grounded`, a scenario whose
    reference-call values are not in the user's text is rejected and regenerated too."""

    def __init__(
        self,
        client: SimClient,
        *,
        domains: list[str] | None = None,
        catalog: ToolCatalog | None = None,
        max_regenerations: int = 3,
        max_tokens: int = 2048,
        examples: Callable[..., list[Message]] | None = None,
        grounded: bool = False,
    ):
        self.client = client
        self.examples = examples
        """Catalog draws only: `examples(knobs, rng, (domain, tools), focus)` gives worked
        (request, answer) turns put before the scenario request."""
        self.grounded = grounded
        self.max_tokens = max_tokens
        self.domains = domains or load_domains()
        self.catalog = catalog
        self.max_regenerations = max_regenerations
        self.system = Message(role="system", content=load_prompt("task_system"))
        self.rejected = 0
        """Generated scenarios rejected by the checks (each one regenerated)."""
        self.ungrounded = 0
        """Of those, rejected for reference-call values the user's text does not hold."""

    async def generate(self, knobs: Knobs, rng: random.Random) -> Task:
        """One validated task; SimError after `max_regenerations` failed attempts."""
        task_id = f"sim-{rng.getrandbits(48):012x}"
        last: list[str] = []
        for _ in range(self.max_regenerations + 1):
            domain, history, tools, writes = await self._tools(knobs, rng, key=task_id)
            focus = ""
            if self.examples is not None and self.catalog is not None:  # [system, *worked turns, request]
                focus = rng.choice(tools).name
                history = [history[0], *self.examples(knobs, rng, (domain, tools), focus), *history[1:]]
            scenario = await self._scenario(knobs, history, tools, key=task_id, focus=focus)
            calls = [ToolCall(name=c.name, arguments=c.arguments) for c in scenario.expected_calls]
            last = task_problems(tools, calls)
            if not last and self.grounded:
                last = ungrounded_values(calls, f"{scenario.first_query}\n" + "\n".join(scenario.hidden_info))
                self.ungrounded += bool(last)
            if not last:
                return build_task(task_id, domain, tools, scenario, calls, knobs, writes)
            self.rejected += 1
        raise SimError("task", self.max_regenerations + 1, "; ".join(last))

    async def _tools(
        self, knobs: Knobs, rng: random.Random, *, key: str
    ) -> tuple[str, list[Message], list[ToolSpec], list[str]]:
        """(domain, the chat so far, the tools, the names of tools that change state)."""
        n_tools, n_calls = max(1, knobs.n_tools), max(1, knobs.n_expected_calls)
        if self.catalog is not None:
            domain, tools = self.catalog.sample(n_tools, rng)
            writes = [t.name for t in tools if t.name not in self.catalog.read_only]
            return domain, catalog_history(domain, tools), tools, writes
        domain = rng.choice(self.domains)
        ask = Template(load_prompt("task_tools")).substitute(domain=domain, n_tools=n_tools, n_calls=n_calls)
        history = [self.system]
        drafts: list[ToolDraft] = []
        for i in range(n_tools):
            if i:
                ask = f"Tool {i + 1} of {n_tools}: a different tool of the same service."
            history.append(Message(role="user", content=ask))
            names = [d.name for d in drafts]
            answer = await self.client.ask_raw(
                "task",
                history,
                ToolDraft,
                check=lambda d, names=names: check_tool(d, names),
                max_tokens=self.max_tokens,
                key=key,
            )
            history.append(Message(role="assistant", content=answer.text))
            drafts.append(answer.value)
        return (
            domain,
            history,
            [draft_to_spec(d) for d in drafts],
            [d.name for d in drafts if d.changes_state],
        )

    async def _scenario(
        self, knobs: Knobs, history: list[Message], tools: list[ToolSpec], *, key: str, focus: str = ""
    ) -> ScenarioDraft:
        schema = scenario_schema(tools, max(1, knobs.n_expected_calls), focus)
        value, _ = await self.client.ask(
            "task",
            scenario_messages(knobs, history),
            ScenarioDraft,
            schema=schema,
            max_tokens=self.max_tokens,
            key=key,
        )
        return value


def build_task(
    task_id: str,
    domain: str,
    tools: list[ToolSpec],
    s: ScenarioDraft,
    calls: list[ToolCall],
    knobs: Knobs,
    writes: list[str],
) -> Task:
    """The validated scenario as a `Task` (the generic system prompt at low specificity)."""
    generic = knobs.prompt_specificity < 1 / 3 or not s.system_prompt.strip()
    return Task(
        id=task_id,
        env="simulated",
        tools=tools,
        first_query=s.first_query,
        system_prompt=GENERIC_SYSTEM_PROMPT if generic else s.system_prompt,
        domain=domain,
        persona=s.persona,
        goal=s.goal,
        hidden_info="\n".join(f"- {h}" for h in s.hidden_info),
        expected_calls=calls,
        rubric=Rubric(
            subgoals=s.subgoals, required_interactions=s.required_interactions, forbidden=s.forbidden
        ),
        knobs=knobs.as_dict(),
        payload={STATE_CHANGING: sorted(writes)},
    )
