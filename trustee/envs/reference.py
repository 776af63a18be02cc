"""The `reference` reward: an episode graded against its task's answer and expected calls.

Owns `reference_reward`, a reward function of `EpisodeView` (so the tasks-file and MCP
environments both use it, `environment.reward = "reference"`), graded as the toy
environment grades its own episodes: reward 1.0 when the final answer is right (for a task
without an answer: when every expected call was made exactly), else partial credit for the
right tools (0.3) and the right argument values (up to 0.5), paid only to an episode that
finished with no malformed call (a policy must not earn credit by naming a tool and then
rambling until a limit cuts it). Every part is logged: `exact`, `expected_calls` (share
made exactly), `tool_names`, `arguments`, `finished`, `clean`.

It runs no tools and reads nothing but the view. Callers: `envs/tasks_file.py`,
`envs/mcp_env.py`.
"""

from __future__ import annotations

import re
from typing import Any

from trustee.envs.base import Score
from trustee.envs.tasks_file import EpisodeView
from trustee.envs.toy import _arg_credit, _same, answer_correct

NAME_CREDIT = 0.3
ARGUMENT_CREDIT = 0.5


def answered(text: str, answer: Any) -> bool:
    """Whether `text` states `answer`: numbers and strings as the toy environment checks
    them (a number within its written precision, a string as a whole word); a list when it
    states every element; a bool as 'yes'/'true' or 'no'/'false'; an object when it states
    every value."""
    if isinstance(answer, bool):
        words = ("yes", "true") if answer else ("no", "false")
        return any(re.search(rf"\b{w}\b", text, re.IGNORECASE) for w in words)
    if isinstance(answer, int | float | str):
        return answer_correct(text, answer)
    if isinstance(answer, list):
        return bool(answer) and all(answered(text, a) for a in answer)
    if isinstance(answer, dict):
        return bool(answer) and all(answered(text, a) for a in answer.values())
    return False


def reference_reward(ep: EpisodeView) -> Score:
    """See the module docstring."""
    expected = ep.task.expected_calls
    made = ep.calls
    n = max(1, len(expected))
    exact_calls = sum(any(_same(c, m) for m in made) for c in expected) / n
    names = {m.name for m in made}
    name_hit = sum(c.name in names for c in expected) / n
    args = sum(_arg_credit(c, made) for c in expected) / n
    if ep.answer is not None:
        correct = ep.finished and answered(ep.final, ep.answer)
    else:
        correct = ep.finished and bool(expected) and exact_calls == 1.0
    clean = ep.finished and ep.call_errors == 0
    reward = 1.0 if correct else (NAME_CREDIT * name_hit + ARGUMENT_CREDIT * args if clean else 0.0)
    return Score(
        reward=reward,
        parts={
            "exact": float(correct),
            "expected_calls": exact_calls if expected else 0.0,
            "tool_names": name_hit if expected else 0.0,
            "arguments": args if expected else 0.0,
            "finished": float(ep.finished),
            "clean": float(clean),
        },
    )
