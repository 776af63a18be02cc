"""Scripted BFCL policies that act on `AgentAction`s directly (no model).

Owns `ScriptedBfclPolicy` (emits given calls per user turn, then answers) and the
perturbations used to test the per-turn checks: one wrong argument, one missing call, one
extra state-changing call. These are test doubles and reference points for the evaluation
(the oracle must score 100%, the silent policy 0 on every turn with ground truth). They never
touch tokens: the engine path is exercised by `eval/bfcl.py` with a real engine.
Callers: tests, `bench/bfcl_oracle.py`, `eval/bfcl.py --policy oracle`.
"""

from __future__ import annotations

import copy

from trustee.envs.base import AgentAction, EpisodeState
from trustee.envs.bfcl_data import MultiTurnInstance
from trustee.envs.bfcl_exec import oracle_calls
from trustee.types import Message, ToolCall

WRONG_VALUE = "trustee_wrong_value"

# One state-changing call per class, for the "extra call" perturbation.
EXTRA_CALLS: dict[str, ToolCall] = {
    "GorillaFileSystem": ToolCall(name="touch", arguments={"file_name": "trustee_extra_file.txt"}),
    "VehicleControlAPI": ToolCall(name="fillFuelTank", arguments={"fuelAmount": 1.5}),
}


class ScriptedBfclPolicy:
    """Plays `calls[k]` as one step in user turn k (if non-empty), then a plain answer.
    Turns beyond `calls` are answered without calls."""

    def __init__(self, calls: list[list[ToolCall]]):
        self.calls = calls
        self._pending: dict[str, tuple[int, bool]] = {}

    def act(self, state: EpisodeState) -> AgentAction:
        turn = state.data["bfcl"].turn
        last_turn, called = self._pending.get(state.episode_id, (-1, False))
        todo = self.calls[turn] if turn < len(self.calls) else []
        if todo and not (last_turn == turn and called):
            self._pending[state.episode_id] = (turn, True)
            msg = Message(role="assistant", tool_calls=list(todo))
            return AgentAction(message=msg, calls=list(todo))
        self._pending[state.episode_id] = (turn, False)
        return AgentAction(message=Message(role="assistant", content="Done."))


def oracle_policy(inst: MultiTurnInstance) -> ScriptedBfclPolicy:
    return ScriptedBfclPolicy(oracle_calls(inst))


def silent_policy() -> ScriptedBfclPolicy:
    return ScriptedBfclPolicy([])


def wrong_argument(calls: list[list[ToolCall]], turn: int) -> list[list[ToolCall]] | None:
    """The first string argument of a call in `turn` replaced by a nonsense value."""
    out = copy.deepcopy(calls)
    for i, c in enumerate(out[turn]):
        for k, v in c.arguments.items():
            if isinstance(v, str):
                out[turn][i] = ToolCall(name=c.name, arguments={**c.arguments, k: WRONG_VALUE})
                return out
    return None


def missing_call(calls: list[list[ToolCall]], turn: int) -> list[list[ToolCall]] | None:
    """The last call of `turn` dropped."""
    if not calls[turn]:
        return None
    out = copy.deepcopy(calls)
    out[turn] = out[turn][:-1]
    return out


def extra_call(
    inst: MultiTurnInstance, calls: list[list[ToolCall]], turn: int
) -> list[list[ToolCall]] | None:
    """One state-changing call appended to `turn` (when a class of the entry has one)."""
    extra = next((EXTRA_CALLS[c] for c in inst.involved_classes if c in EXTRA_CALLS), None)
    if extra is None or not calls[turn]:
        return None
    out = copy.deepcopy(calls)
    out[turn] = [*out[turn], extra]
    return out


async def play(env, task, policy, episode_id: str = "scripted", max_steps: int = 500) -> EpisodeState:
    """Run one episode of a scripted policy against an environment (no tokens)."""
    state = await env.start(task, episode_id)
    for _ in range(max_steps):
        if state.done:
            break
        await env.step(state, policy.act(state))
    return state
