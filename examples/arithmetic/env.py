"""A complete trustee environment: arithmetic word problems with two executable tools.

Train it (from the repository root):
    python -m trustee.run examples/arithmetic/config.toml
Its tasks live in tasks.jsonl; the tools and the reward are the functions below. The same
file also serves `tasks_file.toml`, which builds the environment from the config alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from trustee.envs import EnvContext
from trustee.envs.tasks_file import EpisodeView, TasksFileEnv, load_tasks


def add(a: float, b: float) -> dict:
    """Tool 'add': its name and arguments match the schema in tasks.jsonl."""
    return {"result": a + b}


def multiply(a: float, b: float) -> dict:
    return {"result": a * b}


def reward(ep: EpisodeView) -> float:
    """1.0 for the right number in the final answer; partial credit for using the tools."""
    numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", ep.final)]
    if ep.finished and any(abs(x - ep.answer) < 1e-6 for x in numbers):
        return 1.0
    used = {c.name for c in ep.calls}
    needed = {c.name for c in ep.task.expected_calls}
    return 0.5 * len(used & needed) / max(1, len(needed))


def make_env(ctx: EnvContext) -> TasksFileEnv:
    """The factory named by `environment.factory`; ctx.options is [environment.options]."""
    tasks = load_tasks(Path(__file__).with_name(ctx.options.get("tasks", "tasks.jsonl")))
    return TasksFileEnv(tasks, tools={"add": add, "multiply": multiply}, reward=reward, name="arithmetic")
