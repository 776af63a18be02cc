"""BFCL's AST matching rules for single-turn categories, written for trustee.

Owns `check_ast` (does a list of calls match an entry's possible answers?), `oracle_calls_ast`
(the calls a perfect policy emits for an entry) and `check_relevance`. The rules follow
`bfcl_eval/eval_checker/ast_eval/ast_checker.py` (Python entries), which we read but do not
import (it pulls every model handler):

- simple: exactly one call; multiple: as many calls as answers, the first checked against
  the first answer; parallel (and parallel_multiple): as many calls as answers, each answer
  (in order) takes the first not-yet-matched call that passes.
- a call passes when: the expected name is the call's name; every required parameter is
  given; every given parameter is documented and appears in the answer; each value has the
  documented type (ints accepted for floats; a value whose type matches the answer's type
  where that differs from the documented one is a "variable" and compared as is; list items
  are type-checked one level deep); each value is among the answer's options (strings and
  strings inside lists and dicts compared after dropping spaces and `,./-_*^`, lowercasing
  and turning ' into "; dicts key by key; lists of dicts element by element); and every
  answer parameter not given has "" (optional) among its options.

Callers: `eval/bfcl.py`, tests.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from trustee.types import ToolCall

_PY_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
_NESTED = ("array", "tuple")
_STRIP = re.compile(r"[ ,./\-_*^]")

Answer = dict[str, dict[str, list[Any]]]  # {function name: {param: [options]}}


class AstVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """Whether the calls match; on failure, `error_type` (BFCL's names) and a message."""

    valid: bool
    error_type: str = ""
    error: str = ""


OK = AstVerdict(valid=True)


def _fail(kind: str, msg: str) -> AstVerdict:
    return AstVerdict(valid=False, error_type=kind, error=msg)


def standardize(s: str) -> str:
    return _STRIP.sub("", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return standardize(v) if type(v) is str else v


def _answer_type(options: list[Any]) -> type | None:
    """The type of the first non-optional option (None when all are optional)."""
    return next((type(o) for o in options if o != ""), None)


def _type_ok(value: Any, options: list[Any], expected: type, nested: type | None) -> tuple[bool, bool]:
    """(valid, is_variable) for one value, BFCL's type rules."""
    answer_t = _answer_type(options)
    is_variable = answer_t is not None and answer_t is not expected
    if type(value) is expected:
        if nested is None:
            return True, is_variable
        for opt in options:
            if type(opt) is list:
                if all(_type_ok(item, opt, nested, None)[0] for item in value):
                    return True, is_variable
            else:  # an optional "" (or non-list) option places no constraint on the items
                return True, is_variable
        return False, False
    if answer_t is not None and type(value) is answer_t:
        return True, True
    return False, False


def _dict_ok(value: dict, options: list[Any]) -> bool:
    for opt in options:
        if opt == "" or not isinstance(opt, dict):
            continue
        good = all(k in opt and _std(v) in [_std(o) for o in opt[k]] for k, v in value.items())
        good = good and all(k in value or "" in v for k, v in opt.items())
        if good:
            return True
    return False


def _list_dict_ok(value: list, options: list[Any]) -> bool:
    for opt in options:
        if not isinstance(opt, list) or len(opt) != len(value):
            continue
        if all(isinstance(v, dict) and _dict_ok(v, [o]) for v, o in zip(value, opt, strict=True)):
            return True
    return False


def _list_ok(value: list, options: list[Any]) -> bool:
    mine = [_std(v) for v in value]
    # BFCL iterates each option with len()/indexing, so an optional "" behaves as [].
    return any(mine == [_std(x) for x in opt] for opt in options if isinstance(opt, list | str))


def check_call(doc: dict[str, Any], call: ToolCall, answer: Answer) -> AstVerdict:
    """One call against one function doc and its answer (BFCL's simple-function rules)."""
    name = doc["name"]
    options_by_param = next(iter(answer.values()))
    if call.name != name:
        return _fail("simple_function_checker:wrong_func_name", f"expected {name!r}, got {call.name!r}")
    props = doc["parameters"].get("properties", {})
    for p in doc["parameters"].get("required", []):
        if p not in call.arguments:
            return _fail("simple_function_checker:missing_required", f"missing required parameter {p!r}")
    for p, value in call.arguments.items():
        if p not in props or p not in options_by_param:
            return _fail("simple_function_checker:unexpected_param", f"unexpected parameter {p!r}")
        verdict = _check_value(p, value, props[p], options_by_param[p])
        if not verdict.valid:
            return verdict
    for p, options in options_by_param.items():
        if p not in call.arguments and "" not in options:
            return _fail(
                "simple_function_checker:missing_optional", f"parameter {p!r} not given and not optional"
            )
    return OK


def _check_value(p: str, value: Any, prop: dict[str, Any], options: list[Any]) -> AstVerdict:
    desc = prop.get("type", "any")
    expected = _PY_TYPES.get(desc, str)
    nested = _PY_TYPES.get(prop.get("items", {}).get("type", "any"), str) if desc in _NESTED else None
    if desc == "tuple" and type(value) is tuple:
        value = list(value)
    if desc == "float" and type(value) is int:
        value = float(value)
    ok, is_variable = _type_ok(value, options, expected, nested)
    if not ok:
        return _fail("type_error:simple", f"wrong type for {p!r}: {type(value).__name__} (expected {desc})")
    if not is_variable:
        if expected is dict:
            return (
                OK
                if _dict_ok(value, options)
                else _fail("value_error:dict", f"invalid value for {p!r}: {value!r}")
            )
        if expected is list and nested is dict:
            return (
                OK
                if _list_dict_ok(value, options)
                else _fail("value_error:list_dict", f"invalid value for {p!r}")
            )
        if expected is str:
            good = standardize(value) in [standardize(o) for o in options if type(o) is str]
            return OK if good else _fail("value_error:string", f"invalid value for {p!r}: {value!r}")
        if expected is list:
            return (
                OK
                if _list_ok(value, options)
                else _fail("value_error:list/tuple", f"invalid value for {p!r}: {value!r}")
            )
    if value not in options:
        return _fail("value_error:others", f"invalid value for {p!r}: {value!r}; expected one of {options!r}")
    return OK


def _doc(functions: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((f for f in functions if f["name"] == name), None)


def check_ast(
    functions: list[dict[str, Any]], calls: list[ToolCall], answers: list[Answer], category: str
) -> AstVerdict:
    """Do `calls` match the entry's possible `answers`? (BFCL's rules per category.)"""
    if "parallel" in category:
        return _check_parallel(functions, calls, answers)
    if "multiple" in category:
        if len(calls) != len(answers):
            return _fail(
                "multiple_function_checker:wrong_count", f"{len(calls)} calls, expected {len(answers)}"
            )
        doc = _doc(functions, next(iter(answers[0])))
        if doc is None:
            return _fail("multiple_function_checker:no_doc", "answer names an undocumented function")
        return check_call(doc, calls[0], answers[0])
    if len(calls) != 1:
        return _fail("simple_function_checker:wrong_count", f"{len(calls)} calls, expected 1")
    return check_call(functions[0], calls[0], answers[0])


def _check_parallel(
    functions: list[dict[str, Any]], calls: list[ToolCall], answers: list[Answer]
) -> AstVerdict:
    if len(calls) != len(answers):
        return _fail(
            "parallel_function_checker_no_order:wrong_count", f"{len(calls)} calls, expected {len(answers)}"
        )
    matched: set[int] = set()
    for i, answer in enumerate(answers):
        doc = _doc(functions, next(iter(answer)))
        if doc is None:
            return _fail("parallel_function_checker_no_order:no_doc", "answer names an undocumented function")
        hit = next(
            (j for j, c in enumerate(calls) if j not in matched and check_call(doc, c, answer).valid), None
        )
        if hit is None:
            return _fail(
                "parallel_function_checker_no_order:cannot_find_match", f"no call matches answer {i}"
            )
        matched.add(hit)
    return OK


def check_relevance(calls: list[ToolCall], category: str) -> AstVerdict:
    """Irrelevance categories pass with no call; live_relevance passes with at least one."""
    if "irrelevance" in category:
        return OK if not calls else _fail("irrelevance_error:decoder_success", f"{len(calls)} call(s) made")
    return OK if calls else _fail("relevance_error:decoder_failed", "no call made")


# --- oracle ------------------------------------------------------------------------------


def _first(options: list[Any]) -> tuple[bool, Any]:
    for o in options:
        if o != "":
            return True, o
    return False, None


def _oracle_value(prop: dict[str, Any], value: Any) -> Any:
    """Dict options hold option lists per key; pick the first real option recursively."""
    if prop.get("type") == "dict" and isinstance(value, dict):
        return {k: _first(v)[1] for k, v in value.items() if _first(v)[0]}
    if (
        prop.get("type") in _NESTED
        and prop.get("items", {}).get("type") == "dict"
        and isinstance(value, list)
    ):
        return [{k: _first(v)[1] for k, v in d.items() if _first(v)[0]} for d in value]
    return value


def oracle_calls_ast(functions: list[dict[str, Any]], answers: list[Answer]) -> list[ToolCall]:
    """The calls a perfect policy emits: per answer, optional parameters ("" among the
    options) left out unless the doc requires them, every other one at its first option."""
    out = []
    for answer in answers:
        name, options_by_param = next(iter(answer.items()))
        params = (_doc(functions, name) or {"parameters": {}})["parameters"]
        props, required = params.get("properties", {}), set(params.get("required", []))
        args = {}
        for p, options in options_by_param.items():
            has, value = _first(options)
            if has and ("" not in options or p in required):
                args[p] = _oracle_value(props.get(p, {}), value)
        out.append(ToolCall(name=name, arguments=args))
    return out
