"""The toy teacher: warm-up data that teaches a tiny simulator its roles, named as such.

A random tiny model constrained to a role's JSON schema writes valid JSON with nothing in
it (tasks whose opening message is a run of digits), so no policy can act on its tasks and
every episode of the CPU variant scores the same. A real simulator is an 8B model that was
instruction-tuned; on CPU we stand in for that tuning with supervised examples from a
teacher that knows the toy domain: over the toy tools as a catalog
(`configs/catalogs/toy-tools.jsonl` in the repository; a test keeps it equal to
`catalog_entries`), it writes what a competent simulator answers in each model role:

- task: a scenario for a catalog draw (a toy question over the drawn tools, its reference
  calls, a persona and a rubric), asked exactly as `TaskGenerator` asks it;
- tool: the toy tool's real result as `ToolReply` fields, for the reference calls;
- user: "goal met" after the agent's final answer (the user cannot check an answer; the
  judge does).

Every prompt is built by the roles' own code (`catalog_history`, `scenario_messages`,
`SimLog`), so the trained ids are what the roles send at run time; every answer is the
compact JSON the engines' grammar allows (separators ", " and ": ", no free whitespace).
The judge is not taught: the CPU variant scores with `ScriptedJudge`.

Called by `sft.sft_warm(..., data="simulator")` (and so by `trustee.run` when
`simulator.tiny_sft_steps` is set) and by tests. It does not train anything itself.
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

import msgspec

from trustee.envs.toy import (
    SYSTEM_PROMPT,
    TOOLS,
    execute,
    final_text,
    make_query,
    number_digits,
    wrong_answer,
)
from trustee.sim.client import schema_of
from trustee.sim.log import SimLog
from trustee.sim.taskgen import (
    CatalogEntry,
    ScenarioDraft,
    ToolCatalog,
    build_task,
    catalog_history,
    scenario_messages,
    scenario_schema,
)
from trustee.sim.tools import ToolReply
from trustee.sim.user import UserReply
from trustee.types import Knobs, Message, Task, ToolCall, ToolSpec

CATEGORIES = {
    "add": "arithmetic",
    "multiply": "arithmetic",
    "convert_units": "units",
    "kv_get": "store",
    "kv_set": "store",
}
"""The toy tools' catalog categories (a task draws its tools from one category first)."""

GOALS = {
    "add": "get the sum of two numbers",
    "multiply": "get the product of two numbers",
    "chain": "add two numbers, then multiply the sum",
    "convert": "convert a measurement to another unit",
    "kv_get": "read a value from the key-value store",
    "kv_set": "save a value in the key-value store",
}
PERSONAS = [
    "a student checking homework",
    "an engineer who needs a quick figure",
    "a shop owner keeping notes",
    "a traveller planning a trip",
]

USER_DONE = {"message": "Thanks, that is all I needed.", "status": "goal_met"}


class Example(NamedTuple):
    """One role request: the role, the messages it sends, the answer text to learn, and the
    JSON schema the engine constrains that answer to at run time."""

    role: str
    messages: list[Message]
    answer: str
    schema: dict[str, Any]


def catalog_entries() -> list[CatalogEntry]:
    return [
        CatalogEntry(
            name=t.name,
            description=t.description,
            parameters=t.parameters,
            category=CATEGORIES[name],
            changes_state=name == "kv_set",
        )
        for name, t in TOOLS.items()
    ]


def toy_catalog() -> ToolCatalog:
    return ToolCatalog(catalog_entries())


def answer_json(value: Any) -> str:
    """JSON as the engines' grammar writes it (`engines/grammar.py`: separators ', ' and ': ')."""
    return json.dumps(value, ensure_ascii=False)


def _kinds(tools: list[ToolSpec], n_calls: int) -> list[str]:
    names = {t.name for t in tools}
    kinds = [
        k
        for k, tool in (
            ("add", "add"),
            ("multiply", "multiply"),
            ("convert", "convert_units"),
            ("kv_get", "kv_get"),
            ("kv_set", "kv_set"),
        )
        if tool in names
    ]
    if n_calls >= 2 and {"add", "multiply"} <= names:
        kinds.append("chain")
    return kinds


def _query(kind: str, rng: random.Random, digits: int) -> tuple[str, list[ToolCall], dict[str, Any]]:
    if kind == "multiply":
        lo, hi = (2, 9) if digits <= 1 else (10, 99)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return (
            f"What is {a} times {b}?",
            [ToolCall(name="multiply", arguments={"a": a, "b": b})],
            {"answer": a * b},
        )
    return make_query(kind, rng, digits)


KIND_OF_TOOL = {"add": "add", "multiply": "multiply", "convert_units": "convert", "kv_get": "kv_get", "kv_set": "kv_set"}
"""The one-call task kind whose reference call is this toy tool."""


def scenario(
    tools: list[ToolSpec], knobs: Knobs, rng: random.Random, *, focus: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the scenario JSON a competent task generator writes for this tool draw, the toy
    payload behind it: the store and the answer). `focus`: a toy tool name; the scenario is
    then the one-call task of that tool."""
    kind = KIND_OF_TOOL[focus] if focus else rng.choice(_kinds(tools, knobs.n_expected_calls))
    query, calls, payload = _query(kind, rng, number_digits(knobs.difficulty))
    value = {  # in ScenarioDraft's field order, which the grammar enforces
        "expected_calls": [{"name": c.name, "arguments": c.arguments} for c in calls],
        "persona": rng.choice(PERSONAS),
        "goal": GOALS[kind],
        "hidden_info": [],
        "first_query": query,
        "system_prompt": SYSTEM_PROMPT,
        "subgoals": ["give the exact result in one sentence"],
        "required_interactions": [],
        "forbidden": ["guessing instead of calling a tool"],
    }
    return value, payload


def _tool_reply(result: dict[str, Any]) -> str:
    fields = [
        {"key": k, "value": v if isinstance(v, (bool, int, str)) else str(v)} for k, v in result.items()
    ]
    return answer_json({"fields": fields[:4]})


def teach_task(
    knobs: Knobs,
    rng: random.Random,
    catalog: ToolCatalog,
    *,
    draw: tuple[str, list[ToolSpec]] | None = None,
    focus: str = "",
) -> tuple[Task, Example, dict[str, Any]]:
    """One catalog draw (or the given `draw`: domain and tools), the teacher's scenario for
    it (of the `focus` tool's kind when given) as the task role's example, the `Task` the
    generator would build from that answer, and the toy payload behind it."""
    domain, tools = draw if draw is not None else catalog.sample(knobs.n_tools, rng)
    value, payload = scenario(tools, knobs, rng, focus=focus)
    schema = scenario_schema(tools, max(1, knobs.n_expected_calls))
    example = Example(
        "task", scenario_messages(knobs, catalog_history(domain, tools)), answer_json(value), schema
    )
    draft = msgspec.convert(value, ScenarioDraft)
    calls = [ToolCall(name=c.name, arguments=c.arguments) for c in draft.expected_calls]
    writes = [t.name for t in tools if t.name not in catalog.read_only]
    task = build_task(f"teach-{rng.getrandbits(32):08x}", domain, tools, draft, calls, knobs, writes)
    return task, example, payload


def episode_examples(
    task: Task, payload: dict[str, Any], rng: random.Random, *, guess: bool
) -> list[Example]:
    """The tool and user roles' requests of one episode in which the agent makes the
    reference calls one per turn and then answers (or, with `guess`, answers at once with a
    wrong value), each with the teacher's answer, on the log the live roles keep."""
    log, store, out = SimLog(task), dict(payload.get("store", {})), []
    for call in [] if guess else task.expected_calls:
        request = SimLog.tool_request(call, False)
        answer = _tool_reply(execute(call, store))
        out.append(Example("tool", log.prompt(request), answer, schema_of(ToolReply)))
        log.answered(request, answer)
    final = final_text(payload, wrong_answer(payload, rng) if guess else payload.get("answer"))
    request = SimLog.user_request(final)
    out.append(Example("user", log.prompt(request), answer_json(USER_DONE), schema_of(UserReply)))
    return out


def examples(n: int, seed: int, guess_share: float = 0.5) -> list[Example]:
    """At least `n` role requests with the teacher's answers: per task, the scenario, each
    reference call's result and the user's reply to the final answer. In `guess_share` of
    the tasks the agent skips the tools and guesses (as the warmed policy often does), so
    the user role also learns to close that conversation."""
    rng, catalog, out = random.Random(seed), toy_catalog(), []
    while len(out) < n:
        d = rng.choice([1.0, 1.0, 1.0, 25.0, 50.0])
        knobs = Knobs(difficulty=d, n_tools=rng.choice([1, 1, 2, 3]), n_expected_calls=rng.choice([1, 1, 2]))
        task, example, payload = teach_task(knobs, rng, catalog)
        out.append(example)
        out += episode_examples(task, payload, rng, guess=rng.random() < guess_share)
    return out


def worked_scenarios(
    n: int,
    knobs: Knobs,
    rng: random.Random,
    draw: tuple[str, list[ToolSpec]] | None = None,
    focus: str = "",
) -> list[Message]:
    """`n` worked task-generator turns for few-shot prompting (simulator.few_shot): the
    scenario request as the generator sends it and the teacher's answer, as (user, assistant)
    pairs to put after the generator's system prompt. Without `draw`, each over another draw
    from the toy catalog; with it (the task's own domain and tools) and `focus` (the tool the
    task is about), each is a task of that tool's kind with other values, so the question's
    wording the model copies fits the reference call it is held to."""
    catalog, out = toy_catalog(), []
    for _ in range(n):
        _, example, _ = teach_task(knobs, rng, catalog, draw=draw, focus=focus if focus in KIND_OF_TOOL else "")
        out += [example.messages[-1], Message(role="assistant", content=example.answer)]
    return out


def worked_tool_calls(n: int, seed: int = 0) -> list[Message]:
    """`n` worked tool-role turns for few-shot prompting (simulator.tool_few_shot), named as
    such: a call of a toy tool as the tool role is asked it (`SimLog.tool_request`) and the
    real tool's result as `ToolReply` fields, cycling add, multiply, convert_units, kv_set and
    kv_get (the get reads the set's key). Put once before every episode's task block, so a
    small simulator sees results computed, not arguments echoed."""
    rng, store, out = random.Random(seed), {}, []
    order = ["add", "multiply", "convert_units", "kv_set", "kv_get"]
    for i in range(n):
        name = order[i % len(order)]
        if name == "kv_get" and store:
            call = ToolCall(name="kv_get", arguments={"key": rng.choice(sorted(store))})
        else:
            _, calls, _ = _query(KIND_OF_TOOL[name], rng, 1)
            call = calls[0]
        request = SimLog.tool_request(call, False)
        if i == 0:
            request = "Worked examples of the TOOL part (other tasks, real results):\n" + request
        out += [Message(role="user", content=request), Message(role="assistant", content=_tool_reply(execute(call, store)))]
    return out
