"""Executing tool calls against BFCL's classes, and BFCL's per-turn checks.

Owns `BfclWorld` (fresh instances of an entry's involved classes, loaded from its initial
config; calls run by method lookup with keyword arguments, never `eval` of a string), the
parsing of BFCL's ground-truth call strings (`ast.literal_eval` of each argument), the state
check and the response check (the same attributes and the same multiset cover BFCL's
`multi_turn_checker` uses), and `bfcl_multi_turn_check`, a thin wrapper that runs BFCL's own
checker on a trajectory's calls.

BFCL's checker `eval()`s the call strings it is given, so a call string is the one place model
text could become code. `to_call_string` builds it only from plain identifiers (the function's
name and, for its arguments, parameters the method declares) and values written as Python
literals; anything else is an `UnsafeCall`, which the environment turns into an error the policy
sees (nothing runs, nothing is recorded). `bfcl_multi_turn_check` re-checks every string before
BFCL sees it. Execution results are rendered exactly as BFCL renders them
(str as is, dict as JSON, anything else `str()`, exceptions as "Error during execution: ..."),
so the response check compares the same strings BFCL compares.

It does not decide turns, rewards or hints (`envs/bfcl.py`, `envs/bfcl_hints.py`).
Callers: `envs/bfcl.py`, `eval/bfcl.py`, tests.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import itertools
import json
import keyword
import math
from collections.abc import Collection
from typing import Any

import msgspec

from trustee.envs.bfcl_data import MultiTurnInstance
from trustee.types import ToolCall

# BFCL refuses these names before evaluating a call (its executor's safety list).
BLOCKED = frozenset({"kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run"})


class UnsafeCall(ValueError):
    """A call that cannot be written as a BFCL call string made of declared identifiers and
    literal values (the message says which part and why)."""


class ExecResult(msgspec.Struct, frozen=True, kw_only=True):
    """One executed call: the text BFCL would record (`text`), the raw return value when
    the method returned (`value`, for hints), the owning class, and whether it failed
    (an exception, or a returned object with an "error" key)."""

    call: ToolCall
    text: str
    error: bool
    class_name: str | None = None
    value: Any = None


def render_result(value: Any) -> str:
    """BFCL's rendering of a return value."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _is_error_value(value: Any) -> bool:
    if isinstance(value, dict):
        return "error" in value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "error" in value[0]
    return False


class BfclWorld:
    """The live instances of one entry's classes for one episode (model or ground truth)."""

    def __init__(self, instance: MultiTurnInstance):
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES

        self.instances: dict[str, Any] = {}
        self.owner: dict[str, str] = {}  # method name -> class name (later classes win, as in BFCL)
        for cls_name in instance.involved_classes:
            module = importlib.import_module(CLASS_FILE_PATH_MAPPING[cls_name])
            obj = getattr(module, cls_name)()
            if cls_name not in STATELESS_CLASSES:
                cfg = copy.deepcopy(instance.initial_config.get(cls_name, {}))
                obj._load_scenario(cfg, long_context=instance.long_context)
            self.instances[cls_name] = obj
            for name, _ in inspect.getmembers(obj, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self.owner[name] = cls_name

    def has(self, name: str) -> bool:
        return name in self.owner

    def method(self, name: str) -> Any:
        return getattr(self.instances[self.owner[name]], name)

    def execute(self, call: ToolCall) -> ExecResult:
        """Run one call with keyword arguments; failures become BFCL's error text."""
        if call.name in BLOCKED:
            return ExecResult(
                call=call,
                text=f"Error during execution: Function call {call.name} is not allowed.",
                error=True,
            )
        if call.name not in self.owner:
            # BFCL evaluates an unknown bare name and records the NameError.
            return ExecResult(
                call=call, text=f"Error during execution: name '{call.name}' is not defined", error=True
            )
        cls_name = self.owner[call.name]
        try:
            value = self.method(call.name)(**call.arguments)
        except Exception as e:  # noqa: BLE001 - any failure of the tool is an observation, as in BFCL
            return ExecResult(call=call, text=f"Error during execution: {e}", error=True, class_name=cls_name)
        return ExecResult(
            call=call,
            text=render_result(value),
            error=_is_error_value(value),
            class_name=cls_name,
            value=value,
        )

    def parameters(self, name: str) -> frozenset[str]:
        """The keyword names method `name` declares (its signature; no `**kwargs` catch-all)."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(self.method(name)).parameters.values()
        return frozenset(p.name for p in params if p.kind in kinds)

    def refusal(self, call: ToolCall) -> str:
        """Why `call` may not run and be recorded for BFCL's checker ('' when it may): its
        argument keys must be parameters its method declares, its values literals."""
        try:
            to_call_string(call, self.parameters(call.name) if self.has(call.name) else frozenset())
        except UnsafeCall as e:
            return str(e)
        return ""

    def bind(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> ToolCall:
        """A call with positional arguments turned into keywords (the method's signature)."""
        if args:
            if name not in self.owner:
                raise ValueError(f"cannot bind positional arguments of unknown function {name!r}")
            bound = inspect.signature(self.method(name)).bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
        return ToolCall(name=name, arguments=dict(kwargs))

    def public_state(self, cls_name: str) -> dict[str, Any]:
        return {k: v for k, v in vars(self.instances[cls_name]).items() if not k.startswith("_")}


def parse_call_string(text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """A BFCL ground-truth call `name(a, k=v)` as (name, positional, keyword) values.
    Arguments must be Python literals (they all are in BFCL's data)."""
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a simple function call: {text!r}")
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    return node.func.id, args, kwargs


def _identifier(name: Any) -> bool:
    """A plain ASCII Python identifier that names no keyword and no private or dunder name."""
    return (
        isinstance(name, str)
        and name.isascii()
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("_")
    )


def literal(value: Any) -> str:
    """`value` (JSON data, or a ground truth's tuples) written as a Python literal, which
    `ast.literal_eval` reads back equal. Raises UnsafeCall for anything else (NaN and infinity
    included: they have no literal)."""
    t = type(value)
    if value is None or t in (bool, int, str):
        return repr(value)
    if t is float:
        if not math.isfinite(value):
            raise UnsafeCall(f"the value {value!r} is not a finite number")
        return repr(value)
    if t is list:
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if t is tuple:
        return "(" + ", ".join(literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if t is dict:
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    raise UnsafeCall(f"a value of type {t.__name__} is not JSON data")


def to_call_string(call: ToolCall, declared: Collection[str] | None = None) -> str:
    """A ToolCall as BFCL's executable call string (what its checker evaluates): the name and
    each argument key a plain identifier (and a member of `declared` when given), each value a
    literal. Raises UnsafeCall otherwise."""
    if not _identifier(call.name):
        raise UnsafeCall(f"{call.name!r} is not a function name")
    for key in call.arguments:
        if not _identifier(key):
            raise UnsafeCall(f"argument {key!r} of {call.name} is not a parameter name")
        if declared is not None and key not in declared:
            raise UnsafeCall(
                f"argument {key!r} is not a parameter of {call.name}; its parameters: {sorted(declared)}"
            )
    args = ", ".join(f"{k}={literal(v)}" for k, v in call.arguments.items())
    return f"{call.name}({args})"


def check_call_string(text: str) -> None:
    """Raise UnsafeCall unless `text` is `name(k=literal, ...)` with plain identifiers: the
    only shape handed to BFCL's checker, which evaluates it."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise UnsafeCall(f"{text!r} is not a call") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or not _identifier(node.func.id):
        raise UnsafeCall(f"{text!r} is not a call of a plain function name")
    for value in [*node.args, *(k.value for k in node.keywords)]:
        try:
            ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise UnsafeCall(f"{text!r} has an argument that is not a literal") from None
    if any(not _identifier(k.arg) for k in node.keywords):
        raise UnsafeCall(f"{text!r} has an argument key that is not a plain identifier")


def state_diff(model: BfclWorld, truth: BfclWorld) -> dict[str, list[str]]:
    """Per class, the public attributes whose values differ (BFCL's `state_checker`: the
    ground-truth instance's non-underscore attributes compared with `!=`). Empty: equal."""
    diff: dict[str, list[str]] = {}
    for cls_name, gt in truth.instances.items():
        mine = model.instances[cls_name]
        bad = [a for a in vars(gt) if not a.startswith("_") and getattr(mine, a) != getattr(gt, a)]
        if bad:
            diff[cls_name] = bad
    return diff


def missing_results(model_results: list[str], truth_results: list[str]) -> list[str]:
    """Ground-truth results not covered by the model's (multiset, any order): BFCL's
    `response_checker`. Empty: covered."""
    pool = list(model_results)
    missing = []
    for r in truth_results:
        try:
            pool.remove(r)
        except ValueError:
            missing.append(r)
    return missing


def oracle_calls(instance: MultiTurnInstance) -> list[list[ToolCall]]:
    """The ground truth of each turn as keyword ToolCalls (what a perfect policy emits)."""
    world = BfclWorld(instance)
    out = []
    for turn in instance.ground_truth:
        calls = []
        for s in turn:
            name, args, kwargs = parse_call_string(s)
            calls.append(world.bind(name, args, kwargs))
        out.append(calls)
    return out


_RUN_IDS = itertools.count()


def bfcl_multi_turn_check(
    instance: MultiTurnInstance, steps_per_turn: list[list[list[str]]], *, turns: int | None = None
) -> dict[str, Any]:
    """Run BFCL's own `multi_turn_checker` on a trajectory.

    `steps_per_turn[k]` lists, per step of turn k that executed at least one call, the call
    strings of that step (BFCL's decoded model result). Returns BFCL's verdict dict
    (`valid`, and on failure `error_type`, `error_message`). A turn count that differs from
    the ground truth's is BFCL's "force terminated" failure. `turns` checks only the first
    `turns` turns (BFCL's verdict on a prefix of the conversation). Raises UnsafeCall when a
    string is not a plain call with literal arguments (`check_call_string`).
    """
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    for step in (s for turn in steps_per_turn for s in turn):
        for text in step:
            check_call_string(text)  # BFCL's checker eval()s these strings
    truth = instance.ground_truth
    if turns is not None:
        truth, steps_per_turn = truth[:turns], steps_per_turn[:turns]
    if len(steps_per_turn) != len(truth):
        return {
            "valid": False,
            "error_type": "multi_turn:force_terminated",
            "error_message": "turn count differs",
        }
    # BFCL caches instances in its module globals under names built from the model name and
    # entry id; a fresh name per run keeps runs independent, and we drop them afterwards.
    model_name = f"trustee_check_{next(_RUN_IDS)}"
    entry = {
        "id": instance.id,
        "initial_config": instance.initial_config,
        "involved_classes": instance.involved_classes,
    }
    try:
        return multi_turn_checker(steps_per_turn, truth, entry, instance.id.rsplit("_", 1)[0], model_name)
    finally:
        g = vars(multi_turn_utils)
        for key in [k for k in g if k.startswith(model_name + "_")]:
            del g[key]
