"""The toy environment: real deterministic tools and exact rewards (no simulator model).

Owns `ToyEnv`: five programmatic tools (add, multiply, unit conversion, a small key-value
store with get and set), a task generator driven by the curriculum knobs (more expected
calls -> chained arithmetic; more tools -> distractor tools), exact scoring (reward 1.0 when
the final answer or the final store state is right, else 0.0; 'graded' adds partial credit
for clean finished episodes: `graded_reward`),
a fixed held-out split (`heldout_tasks`: about 1 in 8 queries, chosen by a stable hash of
the text and never drawn for training), optional worked examples before the task (`few_shot`:
N queries of training-split one-call tasks of distinct kinds with their reference calls, so a
pretrained model that has never called a tool sees the call syntax without SFT) and `sft_messages`, the
reference conversation of a task (for warming a tiny model until it emits well-formed tool
calls; see `trustee/models/sft.py`). It is the CPU learning demo's environment and the ground truth
for runner tests. It is not a simulation of anything: every result is computed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

from trustee.chat.parse import ToolCallParser, canonical_json, error_observation
from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score, example_rng, worked_turns
from trustee.types import Message, Task, ToolCall, ToolSpec

SYSTEM_PROMPT = (
    "You are a helpful assistant. Use the tools to get exact results, then answer in one short sentence."
)

_NUM = {"type": "number"}
UNITS: dict[str, tuple[str, float]] = {  # unit -> (dimension, factor to the base unit)
    "m": ("length", 1.0),
    "km": ("length", 1000.0),
    "mi": ("length", 1609.344),
    "ft": ("length", 0.3048),
    "g": ("mass", 0.001),
    "kg": ("mass", 1.0),
    "lb": ("mass", 0.45359237),
}
TOOLS: dict[str, ToolSpec] = {
    t.name: t
    for t in [
        ToolSpec(
            name="add",
            description="Add two numbers.",
            parameters={"type": "object", "properties": {"a": _NUM, "b": _NUM}, "required": ["a", "b"]},
        ),
        ToolSpec(
            name="multiply",
            description="Multiply two numbers.",
            parameters={"type": "object", "properties": {"a": _NUM, "b": _NUM}, "required": ["a", "b"]},
        ),
        ToolSpec(
            name="convert_units",
            description="Convert a value between units of length (m, km, mi, ft) or mass (g, kg, lb).",
            parameters={
                "type": "object",
                "properties": {
                    "value": _NUM,
                    "from_unit": {"type": "string", "enum": list(UNITS)},
                    "to_unit": {"type": "string", "enum": list(UNITS)},
                },
                "required": ["value", "from_unit", "to_unit"],
            },
        ),
        ToolSpec(
            name="kv_get",
            description="Read the value stored under a key.",
            parameters={"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
        ),
        ToolSpec(
            name="kv_set",
            description="Store a value under a key.",
            parameters={
                "type": "object",
                "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                "required": ["key", "value"],
            },
        ),
    ]
}
HELDOUT_SEED = 0x5EED
ONE_CALL_KINDS = ("add", "convert", "kv_get", "kv_set")
_KEYS = ["color", "city", "pet", "fruit", "team", "code", "song", "planet"]
_VALUES = ["blue", "paris", "cat", "mango", "red", "x42", "jazz", "mars", "green", "oslo"]


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 4)


def execute(call: ToolCall, store: dict[str, str]) -> dict[str, Any]:
    """Run one (schema-valid) call; mutates `store` for kv_set. Errors are returned values."""
    a = call.arguments
    if call.name == "add":
        return {"result": _num(a["a"] + a["b"])}
    if call.name == "multiply":
        return {"result": _num(a["a"] * a["b"])}
    if call.name == "convert_units":
        (d1, f1), (d2, f2) = UNITS[a["from_unit"]], UNITS[a["to_unit"]]
        if d1 != d2:
            return {"error": f"cannot convert {a['from_unit']} ({d1}) to {a['to_unit']} ({d2})"}
        return {"result": round(a["value"] * f1 / f2, 4), "unit": a["to_unit"]}
    if call.name == "kv_get":
        if a["key"] not in store:
            return {"error": f"key {a['key']!r} not found; keys: {sorted(store)}"}
        return {"key": a["key"], "value": store[a["key"]]}
    if call.name == "kv_set":
        store[a["key"]] = str(a["value"])
        return {"ok": True}
    raise AssertionError(f"unknown toy tool {call.name}")  # the parser rejects unknown names first


def number_digits(difficulty: float) -> int:
    """Digits of the numbers in a task: 1 up to D = 33, 2 up to D = 66, then 3 (copying a
    number exactly is the hard part for a tiny model, so it grows with the difficulty)."""
    return 1 + int(difficulty > 33) + int(difficulty > 66)


def make_query(kind: str, rng: random.Random, digits: int = 2) -> tuple[str, list[ToolCall], dict[str, Any]]:
    """(query, expected calls, payload) of one task of `kind`, numbers of `digits` digits."""
    lo, hi = (2, 9) if digits <= 1 else (10, 99) if digits == 2 else (100, 999)
    if kind == "add":
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"What is {a} plus {b}?", [ToolCall(name="add", arguments={"a": a, "b": b})], {"answer": a + b}
    if kind == "chain":
        span = (2, 9) if digits <= 1 else (10, 30)  # the product stays small enough to copy
        a, b, c = rng.randint(*span), rng.randint(*span), rng.randint(2, 9)
        calls = [
            ToolCall(name="add", arguments={"a": a, "b": b}),
            ToolCall(name="multiply", arguments={"a": a + b, "b": c}),
        ]
        return f"What is ({a} plus {b}) times {c}?", calls, {"answer": (a + b) * c}
    if kind == "convert":
        dim = rng.choice(["length", "mass"])
        units = [u for u, (d, _) in UNITS.items() if d == dim]
        src, dst = rng.sample(units, 2)
        v = rng.randint(max(1, lo - 1), min(hi, 500))
        call = ToolCall(name="convert_units", arguments={"value": v, "from_unit": src, "to_unit": dst})
        return f"Convert {v} {src} to {dst}.", [call], {"answer": execute(call, {})["result"]}
    store = dict(zip(rng.sample(_KEYS, 3), rng.sample(_VALUES, 3), strict=True))
    if kind == "kv_get":
        key = rng.choice(sorted(store))
        call = ToolCall(name="kv_get", arguments={"key": key})
        return f"What is stored under the key '{key}'?", [call], {"answer": store[key], "store": store}
    key, value = rng.choice([k for k in _KEYS if k not in store]), rng.choice(_VALUES)
    call = ToolCall(name="kv_set", arguments={"key": key, "value": value})
    return f"Save the value '{value}' under the key '{key}'.", [call], {"set": [key, value], "store": store}


MAX_ANSWER_NUMBERS = 3  # a final answer naming more numbers than this is a list of guesses


def answer_correct(text: str, answer: Any) -> bool:
    """Exact match: a number in the text that is the answer rounded to the decimals it is
    written with, within 1% (so "6.21" answers 6.2137 but "0.0" does not answer 0.0088), or
    the string answer as a word. A text naming more than MAX_ANSWER_NUMBERS numbers, or
    more than one of the store's values, is not an answer (a policy must not earn the reward
    by listing guesses)."""
    if isinstance(answer, str):
        named = [v for v in _VALUES if re.search(rf"\b{re.escape(v)}\b", text, re.IGNORECASE)]
        return (
            answer.lower() in named and len(named) <= 1
            if answer in _VALUES
            else (re.search(rf"\b{re.escape(answer)}\b", text, re.IGNORECASE) is not None)
        )
    numbers = list(re.finditer(r"-?\d+(?:\.(\d+))?", text.replace(",", "")))
    if len(numbers) > MAX_ANSWER_NUMBERS:
        return False
    want = float(answer)
    for m in numbers:
        x, decimals = float(m.group(0)), len(m.group(1) or "")
        if x == want or (round(want, decimals) == x and abs(x - want) <= 0.01 * abs(want)):
            return True
    return False


# The graded reward's partial credit (`graded_reward`): a clean finished episode that is not
# correct earns FINISH_CREDIT, plus TOOL_CREDIT for the right tools and ARG_CREDIT for the right
# argument values; at most 0.9, below the 1.0 of a correct answer.
FINISH_CREDIT = 0.1
TOOL_CREDIT = 0.3
ARG_CREDIT = 0.5


def graded_reward(
    *, correct: bool, finished: bool, well_formed: float, tool_names: float, arguments: float
) -> float:
    """The 'graded' reward, in [0, 1], ordered: correct > right tool, finished > guess (a clean
    finished episode with no call) > malformed or truncated (0).

    Only a finished episode earns anything: an episode the turn limit cut earns 0, so rambling
    until cut never pays. A correct one earns its share of well-formed calls (1.0 when every
    call parsed). Partial credit goes only to a finished episode whose every call was well
    formed: one malformed call (bad JSON, unknown tool, arguments outside the schema) and the
    wrong answer earn 0, less than a clean guess. Without these gates a tiny model learned to
    name the right tool and then emit broken calls until the turn limit (issue 26: the old
    graded reward paid 0.3 for that, and 81% of late episodes were malformed)."""
    if not finished:
        return 0.0
    if correct:
        return well_formed
    if well_formed < 1.0:
        return 0.0
    return FINISH_CREDIT + TOOL_CREDIT * tool_names + ARG_CREDIT * arguments


HELDOUT_MOD = 8  # a task whose query hashes to 0 mod this is held out: never trained on


def is_heldout(query: str) -> bool:
    """The fixed held-out split: about 1 in HELDOUT_MOD queries, by a stable hash of the text."""
    return int.from_bytes(hashlib.blake2b(query.encode(), digest_size=4).digest(), "big") % HELDOUT_MOD == 0


class ToyEnv:
    name = "toy"
    reward_range = (0.0, 1.0)

    def __init__(
        self,
        *,
        kinds: tuple[str, ...] = ("add", "convert", "kv_get", "kv_set", "chain"),
        reward: str = "exact",
        few_shot: int = 0,
    ):
        if reward not in ("exact", "graded"):
            raise ValueError(f"toy reward {reward!r}: choose 'exact' or 'graded' (environment.reward)")
        if not 0 <= few_shot <= len(ONE_CALL_KINDS) - 1:
            raise ValueError(
                f"toy few_shot {few_shot}: choose 0 to {len(ONE_CALL_KINDS) - 1} (environment.few_shot)"
            )
        self.kinds = kinds
        self.reward = reward
        self.few_shot = few_shot

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        return self.task(knobs, rng)

    async def heldout_tasks(self, n: int, knobs: Knobs) -> list[Task]:
        """`n` fixed tasks from the held-out split (the same for every call and run):
        `make_task` never draws one of them."""
        rng = random.Random(HELDOUT_SEED)
        return [self.task(knobs, rng, heldout=True) for _ in range(n)]

    def task(self, knobs: Knobs, rng: random.Random, *, heldout: bool = False) -> Task:
        """Synchronous `make_task` (SFT data, tests): a task of the training split, or of the
        held-out split with `heldout`."""
        allowed = [k for k in self.kinds if k != "chain" or knobs.n_expected_calls >= 2] or list(self.kinds)
        while True:
            kind = rng.choice(allowed)
            query, calls, payload = make_query(kind, rng, number_digits(knobs.difficulty))
            if is_heldout(query) == heldout:
                break
        needed = list(dict.fromkeys(c.name for c in calls))
        extra = [n for n in TOOLS if n not in needed]
        rng.shuffle(extra)
        names = needed + extra[: max(0, min(len(TOOLS), knobs.n_tools) - len(needed))]
        rng.shuffle(names)
        return Task(
            id=f"toy-{rng.getrandbits(48):012x}",
            env="toy",
            tools=[TOOLS[n] for n in names],
            first_query=query,
            system_prompt=SYSTEM_PROMPT,
            goal=query,
            expected_calls=calls,
            knobs=knobs.as_dict(),
            payload={"kind": kind, **payload},
        )

    def examples(self, task: Task) -> list[Message]:
        """`few_shot` worked examples for `task`, as earlier turns (`envs.base.worked_turns`):
        each the query of a training-split one-call task of a different kind (so N = 3 of the
        4 one-call kinds: the task's own kind is among them 3 times in 4, and choosing which
        example fits is left to the policy) and the assistant turn with its reference call.
        Chosen by a hash of the task's id (`example_rng`); never a held-out or chained task.
        Any task over the toy tools can ask: the simulated environment over the toy catalog
        shows its policy these same examples (environment.few_shot there)."""
        if not self.few_shot:
            return []
        rng = example_rng(task)
        knobs = Knobs(difficulty=task.knobs.get("difficulty", 0.0), n_tools=len(TOOLS), n_expected_calls=1)
        kinds = rng.sample(list(ONE_CALL_KINDS), self.few_shot)
        return worked_turns([ToyEnv(kinds=(kind,)).task(knobs, rng) for kind in kinds])

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        messages = [
            Message(role="system", content=task.system_prompt),
            *self.examples(task),
            Message(role="user", content=task.first_query),
        ]
        store = dict(task.payload.get("store", {}))
        return EpisodeState(
            episode_id=episode_id,
            task=task,
            messages=messages,
            group=group,
            data={"store": store, "calls": []},
        )

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        state.messages.append(action.message)
        if not action.calls and not action.errors:
            state.data["final"] = action.message.content
            state.done = True
            return []
        out = []
        # A call that did not run (bad JSON, unknown tool, arguments outside the schema, over
        # the per-turn limit): counted for the reward's well-formed share.
        state.data["bad_calls"] = state.data.get("bad_calls", 0) + len(action.errors)
        for call in action.calls:
            state.data["calls"].append(call)
            result = execute(call, state.data["store"])
            state.data["tool_errors"] = state.data.get("tool_errors", 0) + ("error" in result)
            out.append(Message(role="tool", content=canonical_json(result), name=call.name))
        out += [error_observation(e) for e in action.errors]
        state.messages.extend(out)
        return out

    async def score(self, state: EpisodeState) -> Score:
        p = state.task.payload
        made = state.data["calls"]
        expected = state.task.expected_calls
        hit = sum(any(_same(c, m) for m in made) for c in expected) / len(expected)
        if "set" in p:
            key, value = p["set"]
            correct = state.data["store"].get(key) == value
        else:
            correct = state.done and answer_correct(state.data.get("final", ""), p["answer"])
        exact = 1.0 if correct else 0.0
        names = {m.name for m in made}
        name_hit = sum(c.name in names for c in expected) / len(expected)
        args = sum(_arg_credit(c, made) for c in expected) / len(expected)
        attempts = len(made) + state.data.get("bad_calls", 0)
        well_formed = len(made) / attempts if attempts else 1.0
        reward = exact
        if self.reward == "graded":
            # Partial credit for a tiny model that cannot copy arguments yet, dense enough to
            # learn from, and gated so that it cannot be gamed (see graded_reward).
            reward = graded_reward(
                correct=correct,
                finished=state.done,
                well_formed=well_formed,
                tool_names=name_hit,
                arguments=args,
            )
        return Score(
            reward=reward,
            parts={
                "exact": exact,
                "expected_calls": hit,
                "tool_names": name_hit,
                "arguments": args,
                "finished": float(state.done),
                "well_formed": well_formed,
            },
        )

    def sft_messages(
        self, task: Task, *, guess: random.Random | None = None, slip: random.Random | None = None
    ) -> list[Message]:
        """The reference conversation: the expected calls one per turn, their real results,
        then a one-sentence answer. With `guess` (a seeded rng), the conversation of a
        demonstrator that skips the tools and states a wrong answer in the same words (exact
        reward 0, graded FINISH_CREDIT): the imperfect half of the warm-up data that RL has to
        learn to beat. With `slip` (a seeded rng) and a task whose tool can refuse a call
        (`slipped_calls`), the demonstrator's first calls are wrong ones the tool rejects, and it
        recovers with the right call: the warm-up trains on the recovery only
        (`models/sft.encode_conversation` masks a call the tool answered with an error)."""
        store = dict(task.payload.get("store", {}))
        msgs = [
            Message(role="system", content=task.system_prompt),
            Message(role="user", content=task.first_query),
        ]
        p = task.payload
        if guess is not None:
            msgs.append(Message(role="assistant", content=final_text(p, wrong_answer(p, guess))))
            return msgs
        for wrong in slipped_calls(task.expected_calls[0], store, slip) if slip is not None else []:
            msgs.append(Message(role="assistant", tool_calls=[wrong]))
            msgs.append(Message(role="tool", content=canonical_json(execute(wrong, store)), name=wrong.name))
        for call in task.expected_calls:
            msgs.append(Message(role="assistant", tool_calls=[call]))
            msgs.append(Message(role="tool", content=canonical_json(execute(call, store)), name=call.name))
        msgs.append(Message(role="assistant", content=final_text(p, p.get("answer"))))
        return msgs


MAX_SLIPS = 2  # a slipped demonstration's wrong calls: with the recovery and the answer, 4 turns


def slipped_calls(call: ToolCall, store: dict[str, str], rng: random.Random) -> list[ToolCall]:
    """1 to MAX_SLIPS distinct well-formed calls like `call` that its tool refuses (a unit of
    the other dimension, or a key the store does not hold), each further one with chance
    0.4. Empty for a call no tool refuses (add, kv_set, chain)."""
    a = call.arguments
    if call.name == "convert_units":
        dim = UNITS[a["to_unit"]][0]
        options = [{**a, "to_unit": u} for u, (d, _) in UNITS.items() if d != dim]
    elif call.name == "kv_get":
        options = [{"key": k} for k in _KEYS if k not in store]
    else:
        return []
    n = 1
    while n < MAX_SLIPS and rng.random() < 0.4:
        n += 1
    return [ToolCall(name=call.name, arguments=args) for args in rng.sample(options, min(n, len(options)))]


def final_text(payload: dict[str, Any], answer: Any) -> str:
    """The demonstrator's one-sentence answer."""
    if "set" in payload:
        return f"Done: '{payload['set'][1]}' is saved under '{payload['set'][0]}'."
    return f"The answer is {answer}."


def wrong_answer(payload: dict[str, Any], rng: random.Random) -> Any:
    """A guessed answer that is not the task's (a store task's guess is the claim alone)."""
    answer = payload.get("answer")
    if answer is None:
        return None
    if isinstance(answer, str):
        return rng.choice([v for v in _VALUES if v != answer])
    while (x := rng.randint(2, 99)) == answer:
        pass
    return x


def _norm_value(v: Any) -> Any:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _arg_credit(expected: ToolCall, made: list[ToolCall]) -> float:
    """Share of `expected`'s argument values matched by the best call of the same name."""
    want = {k: _norm_value(v) for k, v in expected.arguments.items()}
    best = 0.0
    for m in made:
        if m.name == expected.name and want:
            got = sum(_norm_value(m.arguments.get(k)) == v for k, v in want.items())
            best = max(best, got / len(want))
    return best


def _same(a: ToolCall, b: ToolCall) -> bool:
    """Same call, numbers compared by value (3 == 3.0)."""

    def norm(args: dict[str, Any]) -> str:
        return json.dumps(
            {
                k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for k, v in args.items()
            },
            sort_keys=True,
        )

    return a.name == b.name and norm(a.arguments) == norm(b.arguments)


def check_tools() -> None:
    """The toy tool schemas are valid (raises otherwise); used by tests."""
    ToolCallParser(list(TOOLS.values()))
