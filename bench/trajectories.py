"""Realistic trajectory shapes for the learner benchmarks: token ids and loss masks of whole
episodes from trustee's three environments, with no policy model.

Owns `realistic_samples(tokenizer, n, max_len, seed)`: conversations played to the end by
scripted policies and rendered token-exactly with the project chat template (assistant turns
are the sampled, mask-1 spans; everything else is prompt or environment, mask 0):

- toy: the reference conversation of a `ToyEnv` task (`sft_messages`: the expected calls one
  per turn with their real results, then an answer), tasks drawn over the curriculum knobs;
- simulated: `SimulatedEnv` with `FakeJsonEngine` as the simulator (a test double: schema-valid
  random JSON for tool results and user replies), the policy playing the task's expected
  calls, then answering, for up to 3 user turns;
- bfcl: BFCL multi-turn entries replayed with their ground-truth calls (`ScriptedBfclPolicy`),
  every user turn to the end, tool results executed by BFCL's own classes.

Sequences longer than `max_len` are cut there (as `max_model_len` cuts an episode). What it
does not model: a learning policy's own wording (lengths of sampled turns are the reference
answers'). Called by `bench/learner.py` and `bench/vs_trl.py`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import anyio

from trustee.chat.render import ChatFormat, project_template
from trustee.envs.base import AgentAction, Knobs
from trustee.types import Message


def episode_tokens(fmt: ChatFormat, msgs: list[Message]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a finished conversation, as the episode runner would have built it."""
    first = next(i for i, m in enumerate(msgs) if m.role == "assistant")
    ids = fmt.prompt_ids(msgs[:first])
    mask = [0] * len(ids)
    i = first
    while i < len(msgs):
        if msgs[i].role == "assistant":
            before = fmt.render_text(msgs[:i], generation_prompt=True)
            full = fmt.render_text(msgs[: i + 1], generation_prompt=False)
            text = full[len(before) :]
            end = text.find("<|im_end|>")
            sampled = fmt.encode(text[: end + len("<|im_end|>")] if end >= 0 else text)
            ids += sampled
            mask += [1] * len(sampled)
            i += 1
            continue
        j = i
        while j < len(msgs) and msgs[j].role != "assistant":
            j += 1
        env = fmt.continuation_ids(msgs[i:j], generation_prompt=j < len(msgs))
        ids += env
        mask += [0] * len(env)
        i = j
    return ids, mask


def _toy(n: int, rng: random.Random) -> list[tuple[list, list[Message]]]:
    from trustee.envs.toy import ToyEnv

    env = ToyEnv()
    out = []
    for _ in range(n):
        knobs = Knobs(n_tools=rng.randint(1, 5), n_expected_calls=rng.randint(1, 3))
        task = env.task(knobs, rng)
        out.append((task.tools, env.sft_messages(task)))
    return out


class _ExpectedCalls:
    """Scripted policy: the task's expected calls in one turn, then an answer each turn."""

    def __init__(self) -> None:
        self.done: set[str] = set()

    def act(self, state: Any) -> AgentAction:
        if state.episode_id not in self.done and state.task.expected_calls:
            self.done.add(state.episode_id)
            calls = list(state.task.expected_calls)
            return AgentAction(message=Message(role="assistant", tool_calls=calls), calls=calls)
        return AgentAction(message=Message(role="assistant", content="Here is what I found; anything else?"))


def _simulated(n: int, rng: random.Random, tokenizer: Any) -> list[tuple[list, list[Message]]]:
    from trustee.envs.bfcl_scripted import play
    from trustee.envs.simulated import SimulatedEnv
    from trustee.sim.client import SimClient
    from trustee.sim.fakes import FakeJsonEngine

    env = SimulatedEnv(
        SimClient(FakeJsonEngine(tokenizer, seed=rng.randrange(1 << 30)), tokenizer), max_user_turns=3
    )
    out = []

    async def go() -> None:
        for k in range(n):
            knobs = Knobs(n_tools=rng.randint(1, 4), n_expected_calls=rng.randint(1, 3))
            task = await env.make_task(knobs, random.Random(rng.randrange(1 << 30)))
            state = await play(env, task, _ExpectedCalls(), f"sim{k}", max_steps=12)
            out.append((task.tools, list(state.messages)))

    anyio.run(go)
    return out


def _bfcl(n: int, rng: random.Random) -> list[tuple[list, list[Message]]]:
    from trustee.envs.bfcl import BfclEnv
    from trustee.envs.bfcl_data import MULTI_TURN_CATEGORIES, load_multi_turn
    from trustee.envs.bfcl_exec import oracle_calls
    from trustee.envs.bfcl_scripted import ScriptedBfclPolicy

    env = BfclEnv(split="all", miss_turn_warning=False)
    pool = [inst for c in MULTI_TURN_CATEGORIES[:1] for inst in load_multi_turn(c)]
    out = []

    async def go() -> None:
        for inst in rng.sample(pool, min(n, len(pool))):
            task = env.task_for(inst)
            policy = ScriptedBfclPolicy(oracle_calls(inst))
            state = await env.start(task, inst.id)
            msgs = list(state.messages)  # BfclEnv keeps no transcript: record it here
            for _ in range(200):
                if state.done:
                    break
                action = policy.act(state)
                msgs.append(action.message)
                msgs += await env.step(state, action)
            out.append((task.tools, msgs))

    anyio.run(go)
    return out


def realistic_samples(
    tokenizer: Any,
    n: int,
    max_len: int,
    seed: int = 0,
    sources: tuple[str, ...] = ("toy", "simulated", "bfcl"),
) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
    """`n` (ids, loss_mask) pairs drawn evenly from `sources`, shuffled, each cut at
    `max_len`, plus a summary (per-source counts and length percentiles)."""
    rng = random.Random(seed)
    per = -(-n // len(sources))
    convs: list[tuple[str, list, list[Message]]] = []
    for src in sources:
        if src == "toy":
            got = _toy(per, rng)
        elif src == "simulated":
            got = _simulated(per, rng, tokenizer)
        elif src == "bfcl":
            got = _bfcl(per, rng)
        else:
            raise ValueError(f"source {src!r}: choose from toy, simulated, bfcl")
        convs += [(src, tools, msgs) for tools, msgs in got]
    rng.shuffle(convs)
    template = project_template()
    out, lens, by_src = [], [], Counter()
    for src, tools, msgs in convs[:n]:
        if not any(m.role == "assistant" for m in msgs):
            by_src[f"{src}: no policy turn (skipped)"] += 1
            continue
        ids, mask = episode_tokens(ChatFormat(tokenizer, tools, template=template), msgs)
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):  # a prompt longer than max_len: nothing sampled would fit
            continue
        out.append((ids, mask))
        lens.append(len(ids))
        by_src[src] += 1
    s = sorted(lens)
    pct = {f"p{q}": s[min(len(s) - 1, int(q / 100 * len(s)))] for q in (0, 10, 50, 90, 100)}
    return out, dict(sources=dict(by_src), length_percentiles=pct, spread=round(s[-1] / max(1, s[0]), 1))
