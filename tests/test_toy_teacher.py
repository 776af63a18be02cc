"""The toy teacher (`envs/toy_teacher.py`) and the simulator's SFT data.

What is checked: the toy catalog file is the toy tools; every teacher answer is in the
language the engines' grammar allows for its role and decodes to the role's Struct; the
prompts the teacher trains on are, token for token, the prompts the live roles send (an
episode of `SimulatedEnv` driven with the teacher's agent turns, on `LookupEngine`, a test
double that answers a prompt only if the teacher has an answer for exactly those ids); the
task role's prompt is `TaskGenerator`'s; the simulator's SFT examples mask the answer only.
The real path (SFT-warming a tiny simulator and running the simulated environment on it) is
in test_sim_train.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anyio
import msgspec
import pytest
import xgrammar.testing

from trustee.chat.render import ChatFormat
from trustee.engines.base import Completion
from trustee.engines.grammar import json_grammar
from trustee.envs.base import AgentAction
from trustee.envs.simulated import SimulatedEnv
from trustee.envs.toy_teacher import (
    catalog_entries,
    episode_examples,
    examples,
    teach_task,
    toy_catalog,
)
from trustee.sim.client import SimClient, bounded_schema, decode_json
from trustee.sim.fakes import FakeJsonEngine
from trustee.sim.taskgen import (
    ScenarioDraft,
    TaskGenerator,
    ToolCatalog,
    catalog_history,
    scenario_messages,
    task_problems,
)
from trustee.sim.tools import ToolReply
from trustee.sim.user import UserReply
from trustee.types import Knobs, Message, ToolCall

TOY_CATALOG = Path(__file__).resolve().parents[1] / "configs" / "catalogs" / "toy-tools.jsonl"
OUT_TYPES = {"task": ScenarioDraft, "tool": ToolReply, "user": UserReply}


def test_toy_catalog_file_is_the_toy_tools():
    from trustee.envs.toy import TOOLS

    in_file = [msgspec.json.decode(line) for line in TOY_CATALOG.read_text().splitlines() if line.strip()]
    assert in_file == [msgspec.to_builtins(e) for e in catalog_entries()]
    assert [e["name"] for e in in_file] == list(TOOLS)
    assert ToolCatalog.from_jsonl(TOY_CATALOG).read_only == {"add", "multiply", "convert_units", "kv_get"}


def test_teacher_answers_are_in_the_engine_grammar_and_decode():
    seen = set()
    for ex in examples(60, seed=3):
        seen.add(ex.role)
        grammar = json_grammar(json.dumps(bounded_schema(ex.schema)))
        assert xgrammar.testing._is_grammar_accept_string(grammar, ex.answer), (ex.role, ex.answer)
        value = decode_json(ex.answer, OUT_TYPES[ex.role])
        if ex.role == "task":
            tools = ex.schema["properties"]["expected_calls"]["items"]["anyOf"]
            names = {t["properties"]["name"]["const"] for t in tools}
            assert {c.name for c in value.expected_calls} <= names
    assert seen == {"task", "tool", "user"}
    # the compact form (no spaces) is NOT in the grammar: the teacher must write what the engine allows
    compact = msgspec.json.encode(msgspec.json.decode(examples(1, seed=3)[0].answer)).decode()
    grammar = json_grammar(json.dumps(bounded_schema(examples(1, seed=3)[0].schema)))
    assert not xgrammar.testing._is_grammar_accept_string(grammar, compact)


def test_teacher_tasks_are_valid_tasks():
    rng, catalog = random.Random(0), toy_catalog()
    for _ in range(30):
        task, _, payload = teach_task(Knobs(n_tools=rng.choice([1, 2, 3]), n_expected_calls=2), rng, catalog)
        assert task_problems(task.tools, task.expected_calls) == []
        assert task.first_query and ("answer" in payload or "set" in payload)


class LookupEngine:
    """Engine double: answers a prompt only when `answers` holds exactly its ids (else it
    fails the test), so a role whose prompt drifts from the teacher's is caught."""

    version = 0

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str]):
        self.tok, self.answers, self.asked = tokenizer, answers, 0
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    async def generate(self, prompt, params, *, key=None):
        text = self.answers.get(tuple(prompt))
        assert text is not None, (
            "a role sent a prompt the teacher never trained on:\n" + self.tok.decode(prompt)[-600:]
        )
        self.asked += 1
        ids = self.tok.encode(text, add_special_tokens=False) + [self.eos]
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


@pytest.mark.parametrize("guess", [False, True])
def test_teacher_prompts_are_what_the_live_roles_send(tiny_tokenizer, guess):
    fmt = ChatFormat(tiny_tokenizer, [], enable_thinking=False)
    rng = random.Random(7)
    task, _, payload = teach_task(Knobs(n_tools=2, n_expected_calls=2), rng, toy_catalog())
    taught = episode_examples(task, payload, random.Random(1), guess=guess)
    engine = LookupEngine(tiny_tokenizer, {tuple(fmt.prompt_ids(ex.messages)): ex.answer for ex in taught})
    env = SimulatedEnv(SimClient(engine, tiny_tokenizer), judge_mode="scripted")
    final = (
        next(ex for ex in taught if ex.role == "user")
        .messages[-1]
        .content.split("\n")[0]
        .removeprefix("AGENT: ")
    )

    async def episode():
        state = await env.start(task, "e0")
        for call in [] if guess else task.expected_calls:
            await env.step(
                state, AgentAction(message=Message(role="assistant", tool_calls=[call]), calls=[call])
            )
        await env.step(state, AgentAction(message=Message(role="assistant", content=final)))
        return state, await env.score(state)

    state, score = anyio.run(episode)
    assert engine.asked == len(taught) and state.done and not state.sim_error
    assert score.reward == (-1.0 if guess else 1.0)  # scripted judge: no call vs every reference call


def test_task_role_prompt_is_the_generators(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer, [], enable_thinking=False)
    engine = FakeJsonEngine(tiny_tokenizer, seed=0)
    gen = TaskGenerator(SimClient(engine, tiny_tokenizer), catalog=toy_catalog(), max_tokens=3072)
    knobs = Knobs(n_tools=2, n_expected_calls=1)
    task = anyio.run(gen.generate, knobs, random.Random(0))
    assert (
        fmt.prompt_ids(scenario_messages(knobs, catalog_history(task.domain, task.tools)))
        == engine.prompts[0]
    )


def test_simulator_sft_examples_train_on_the_answer_only(tiny_tokenizer):
    from trustee.models.sft import _sim_examples

    fmt = ChatFormat(tiny_tokenizer, [], enable_thinking=False)
    taught = examples(4, seed=0)
    for (ids, mask), ex in zip(_sim_examples(tiny_tokenizer, 4, seed=0), taught, strict=False):
        n = sum(mask)
        assert mask == [0] * (len(ids) - n) + [1] * n
        assert ids[: len(ids) - n] == fmt.prompt_ids(ex.messages)
        assert ids[-1] == fmt.eos_id and tiny_tokenizer.decode(ids[len(ids) - n : -1]) == ex.answer


def test_calls_in_teacher_scenarios_match_toy_tools():
    rng, catalog = random.Random(1), toy_catalog()
    for _ in range(20):
        task, ex, _ = teach_task(Knobs(n_tools=1), rng, catalog)
        value = decode_json(ex.answer, ScenarioDraft)
        assert [
            ToolCall(name=c.name, arguments=c.arguments) for c in value.expected_calls
        ] == task.expected_calls
