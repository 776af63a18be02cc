"""`--set section.key=value` overrides: parsed, typed by the field they name, applied to the raw table."""

from __future__ import annotations

import tomllib
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from trustee.config.problems import MISSING, ConfigError, Problem, struct_type
from trustee.config.schema import Config


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(
            "--set", [Problem(item, MISSING, "expected section.key=value, e.g. --set grpo.group_size=8")]
        )
    key, value = item.split("=", 1)
    return key.strip().split("."), value.strip()


def _field_type(path: list[str]) -> Any:
    """The declared type at a dotted path, or None if the path does not exist."""
    cls: Any = Config
    tp: Any = None
    for part in path:
        sub = struct_type(cls)
        if sub is None:
            return None
        fields = {f.encode_name: f for f in msgspec.structs.fields(sub)}
        if part not in fields:
            return None
        tp = fields[part].type
        cls = tp
    return tp


def _coerce(raw: str, tp: Any) -> Any:
    """Turn an override's text into a value of the field's type where the text allows."""
    base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
    if base is str or (get_origin(base) is Literal and all(isinstance(a, str) for a in get_args(base))):
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        tp = _field_type(path)
        node = raw
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[path[-1]] = _coerce(value, tp) if tp is not None else _coerce(value, Any)
    return raw
