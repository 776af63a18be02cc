"""Model text never reaches `eval()` through BFCL's checker.

BFCL's `multi_turn_checker` evaluates the call strings recorded for each executed call. A
policy that writes an argument key such as `x=__import__('os').system('...'),y` must not get
code into those strings: tool schemas allow only declared parameters, the environment refuses
an undeclared key (the policy sees the error, nothing runs or is recorded), values are written
as literals, and the checker wrapper re-checks every string. Each case below goes through the
parser, the environment and BFCL's own checker, and a sentinel file must never appear.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("bfcl_eval", reason="needs bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23 mpmath)")

from trustee.chat.parse import ToolCallParser
from trustee.envs.base import AgentAction
from trustee.envs.bfcl import BfclEnv
from trustee.envs.bfcl_data import load_multi_turn
from trustee.envs.bfcl_exec import bfcl_multi_turn_check
from trustee.types import Message, ToolCall


def _payload(sentinel) -> str:
    return f"__import__('os').system('touch {sentinel}')"


def _bad_keys(sentinel) -> list[str]:
    code = _payload(sentinel)
    return [
        f"x={code},y",  # the issue's injection: '=', parentheses, a comma
        f"folder={code}",
        f"({code})",
        f"a,b={code}",
        "__class__",  # dunder
        "__import__",
        "ｆｏｌｄｅｒ",  # non-ASCII (NFKC-normalises to a declared name)
        "＿＿import＿＿",  # non-ASCII that NFKC-normalises to a dunder
        "folder ",  # whitespace
        "if",  # a keyword
    ]


def _play(env: BfclEnv, inst, first_turn: list[AgentAction]):
    """The injected actions in the first turn, then an empty action per turn to the end, so the
    checker sees every turn (a short trajectory would stop it before it evaluates anything)."""

    async def go():
        state = await env.start(env.task_for(inst), "inj")
        seen = []
        for action in first_turn:
            seen += await env.step(state, action)
        while not state.done:
            await env.step(state, AgentAction(message=Message(role="assistant", content="done")))
        return state, seen

    return asyncio.run(go())


def _calls_text(calls: list[tuple[str, dict]]) -> str:
    return "".join(
        "<tool_call>\n" + json.dumps({"name": n, "arguments": a}) + "\n</tool_call>" for n, a in calls
    )


def test_injected_keys_and_values_never_execute(tmp_path):
    sentinel = tmp_path / "pwned"
    env = BfclEnv(split="all", hints=False, max_steps_per_turn=100)  # every case in turn 0
    inst = load_multi_turn("base")[0]
    task = env.task_for(inst)
    parser = ToolCallParser(task.tools)
    actions, parsed_calls = [], []
    for key in _bad_keys(sentinel):
        parsed = parser.parse(_calls_text([("cd", {key: "documents"}), ("ls", {key: True})]))
        parsed_calls.append(parsed)
        actions.append(AgentAction(message=parsed.message, calls=parsed.calls, errors=parsed.errors))
        # the same call handed to the environment as if it had parsed (a parser without the schema)
        actions.append(
            AgentAction(message=parsed.message, calls=[ToolCall(name="cd", arguments={key: "documents"})])
        )
    # a value that tries to close its quote stays one string literal
    quote = f"'); {_payload(sentinel)}; ('"
    actions.append(
        AgentAction(
            message=Message(role="assistant"), calls=[ToolCall(name="cd", arguments={"folder": quote})]
        )
    )
    # a function name that is code: not a method, so never recorded
    actions.append(
        AgentAction(
            message=Message(role="assistant"),
            calls=[ToolCall(name=f"ls(a={_payload(sentinel)}) or ls", arguments={})],
        )
    )
    state, seen = _play(env, inst, actions)
    steps = env.checker_steps(state)
    verdict = bfcl_multi_turn_check(inst, steps)  # BFCL's own checker evaluates the recorded calls
    assert not sentinel.exists(), "model text ran inside BFCL's checker"
    assert verdict["valid"] is False
    assert all(t.parameters.get("additionalProperties") is False for t in task.tools)
    for parsed in parsed_calls:
        assert not parsed.calls and len(parsed.errors) == 2 and all(e.kind == "schema" for e in parsed.errors)
    tool_texts = [m.content for m in seen if m.role == "tool"]
    assert sum("not a parameter" in t or "Additional properties" in t for t in tool_texts) >= 2 * len(
        _bad_keys(sentinel)
    )
    recorded = [s for turn in steps for step in turn for s in step]
    assert recorded == ["cd(folder=" + repr(quote) + ")"], recorded  # the only call that ran


def test_the_checker_door_refuses_strings_that_are_not_plain_calls(tmp_path):
    from trustee.envs.bfcl_exec import UnsafeCall, check_call_string

    sentinel = tmp_path / "pwned"
    inst = load_multi_turn("base")[0]
    for text in (
        f"cd(x={_payload(sentinel)},y='a')",
        f"cd(folder={_payload(sentinel)})",
        "cd(**{'folder': 'a'})",
        f"__import__('os').system('touch {sentinel}')",
        f"cd(folder='a') or {_payload(sentinel)}",
    ):
        with pytest.raises(UnsafeCall):
            check_call_string(text)
        steps = [[[text]]] + [[] for _ in inst.ground_truth[1:]]
        with pytest.raises(UnsafeCall):
            bfcl_multi_turn_check(inst, steps)
    assert not sentinel.exists()
    check_call_string("cd(folder='a', n=[1, 2.5, {'k': None}], t=(1,), b=True)")


def test_call_strings_are_literals_of_declared_keys():
    from trustee.envs.bfcl_exec import UnsafeCall, literal, to_call_string

    call = ToolCall(name="f", arguments={"a": [1, "x'y"], "b": {"k": (2,)}, "c": None, "d": -1.5})
    assert to_call_string(call, {"a", "b", "c", "d"}) == "f(a=[1, \"x'y\"], b={'k': (2,)}, c=None, d=-1.5)"
    with pytest.raises(UnsafeCall, match="'e' is not a parameter of f; its parameters: \\['a'\\]"):
        to_call_string(ToolCall(name="f", arguments={"e": 1}), {"a"})
    for bad in (float("nan"), float("inf"), object(), {1: 2}.keys()):
        with pytest.raises(UnsafeCall):
            literal(bad)
