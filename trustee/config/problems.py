"""`Problem` and `ConfigError`, and the structural check of a raw TOML table against the schema
(unknown keys with a near match, missing required fields, wrong types, out-of-range values)."""

from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
from functools import cache
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Meta


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a config: where, what value, and how to fix it."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "(missing)" if self.value is MISSING else show_value(self.value)
        return f"{self.path} = {shown}: {self.message}"


class ConfigError(ValueError):
    """All problems found in a config, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = [f"config error in {source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


MISSING = object()


def show_value(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else msgspec.json.encode(v).decode() if _jsonable(v) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _jsonable(v: Any) -> bool:
    try:
        msgspec.json.encode(v)
        return True
    except (TypeError, msgspec.EncodeError):
        return False


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if (
                isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = b.value.value.strip()
    return docs


def struct_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _type_hint(tp: Any) -> str:
    """A short, user-facing name of a field's type."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_hint(get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_hint(get_args(tp)[0])}s" if get_args(tp) else "a list"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _example(tp: Any, path: str) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metas = get_args(tp)
        for m in metas:
            if isinstance(m, Meta):
                for bound in ("ge", "gt", "le", "lt"):
                    b = getattr(m, bound, None)
                    if b is not None:
                        op = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound]
                        return f"set {path} to {_type_hint(base)} {op} {b}"
        return _example(base, path)
    if origin is Literal:
        return f"set {path} to one of {', '.join(repr(a) for a in get_args(tp))}"
    return f"set {path} to {_type_hint(tp)}"


def check_table(raw: Any, cls: type, prefix: str, problems: list[Problem]) -> None:
    """Collect every problem in `raw` against Struct `cls` (does not stop at the first)."""
    if not isinstance(raw, dict):
        problems.append(
            Problem(prefix.rstrip(".") or "(root)", raw, f"expected a table [{prefix.rstrip('.')}]")
        )
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    docs = field_docs(cls)
    for key, value in raw.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            problems.append(
                Problem(f"{prefix}{key}", value, f"unknown key; {hint}known keys here: {', '.join(fields)}")
            )
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.required:
                problems.append(
                    Problem(path, MISSING, f"required: {docs.get(name, '')} ({_example(f.type, path)})")
                )
            continue
        value = raw[name]
        sub = struct_type(f.type)
        if sub is not None:
            check_table(value, sub, path + ".", problems)
            continue
        if get_origin(f.type) is list and (inner := struct_type(get_args(f.type)[0])) is not None:
            if not isinstance(value, list):
                problems.append(Problem(path, value, f"expected a list of tables ([[{path}]])"))
                continue
            for i, item in enumerate(value):
                check_table(item, inner, f"{path}[{i}].", problems)
            continue
        try:
            msgspec.convert(value, f.type)
        except msgspec.ValidationError as e:
            what = str(e).split(" - at ")[0]
            doc = docs.get(name, "")
            problems.append(
                Problem(path, value, f"{what}. {doc} Fix: {_example(f.type, path)}".replace("  ", " "))
            )
