"""The `reference` reward: an episode graded against its task's answer and expected calls.

Owns `reference_reward`, a reward function of `EpisodeView` (so the tasks-file and MCP
environments both use it, `environment.reward = "reference"`), graded exactly as the toy
environment grades its own episodes (`toy.graded_reward`): a finished episode with the right
final answer (for a task without an answer: every expected call made exactly) earns its share
of well-formed calls (1.0 when every call parsed); a clean finished episode that is not
correct earns 0.1, plus 0.3 for the expected tools and up to 0.5 for their argument values;
an episode with a malformed call and a wrong answer, or one a limit cut, earns 0 (a policy
must not earn credit by naming a tool and then rambling until it is cut). Every part is
logged: `exact`, `expected_calls` (share made exactly), `tool_names`, `arguments`,
`finished`, `well_formed`.

It runs no tools and reads nothing but the view. Callers: `envs/tasks_file.py`,
`envs/mcp_env.py`.
"""

from __future__ import annotations

import re
from typing import Any

from trustee.envs.base import Score
from trustee.envs.tasks_file import EpisodeView
from trustee.envs.toy import _arg_credit, _same, answer_correct, graded_reward


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
    attempts = len(made) + ep.call_errors
    well_formed = len(made) / attempts if attempts else 1.0
    reward = graded_reward(
        correct=correct, finished=ep.finished, well_formed=well_formed, tool_names=name_hit, arguments=args
    )
    return Score(
        reward=reward,
        parts={
            "exact": float(correct),
            "expected_calls": exact_calls if expected else 0.0,
            "tool_names": name_hit if expected else 0.0,
            "arguments": args if expected else 0.0,
            "finished": float(ep.finished),
            "well_formed": well_formed,
        },
    )
