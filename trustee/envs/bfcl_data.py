"""BFCL data, read from the installed `bfcl-eval` package.

Owns the typed records for BFCL entries (`MultiTurnInstance`, `AstEntry`), their loaders,
the conversion of BFCL function docs ("gorilla" parameter types) to `ToolSpec` JSON
Schemas, and the fixed-seed train/held-out split of the multi-turn categories. It does not
execute anything (`envs/bfcl_exec.py`) nor score (`envs/bfcl.py`, `eval/`).

Install without BFCL's model-handler dependency tree (nothing here imports a handler):
    pip install --no-deps bfcl-eval==2026.3.23 && pip install mpmath
Callers: `envs/bfcl.py`, `eval/bfcl.py`, the tests and `bench/bfcl_oracle.py`.
"""

from __future__ import annotations

import copy
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import msgspec

from trustee.config import BFCL_AST_CATEGORIES, BFCL_RELEVANCE_CATEGORIES
from trustee.types import ToolSpec

INSTALL_HINT = "pip install --no-deps bfcl-eval==2026.3.23 && pip install mpmath"

MULTI_TURN_CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
# Non-live and live single-turn categories checked by the AST checker (Python only).
AST_CATEGORIES = BFCL_AST_CATEGORIES
# Single-turn categories scored only by whether a call was made.
RELEVANCE_CATEGORIES = BFCL_RELEVANCE_CATEGORIES

_AST_FILES = {"simple": "simple_python"}

# BFCL's text for the turn that adds held-out functions (its prompting-mode wording).
ADDED_FUNCTIONS_PROMPT = "I have updated some more functions you can choose from. What about now?"


class MultiTurnInstance(msgspec.Struct, frozen=True, kw_only=True):
    """One BFCL multi-turn entry with its ground truth.

    `turns[k]` holds the user messages of turn k; it is empty exactly on the turns where
    held-out functions are added (`missed_function[k]` names them; BFCL shows their docs and
    a fixed prompt there). `ground_truth[k]` are BFCL call strings (`name(arg=...)`); an
    empty list marks a turn that cannot be solved (missing function or parameter).
    `functions` are the docs shown at the start (held-out ones removed).
    """

    id: str
    category: str
    turns: list[list[str]]
    initial_config: dict[str, Any]
    involved_classes: list[str]
    ground_truth: list[list[str]]
    missed_function: dict[int, list[str]] = msgspec.field(default_factory=dict)
    functions: list[dict[str, Any]] = msgspec.field(default_factory=list)
    held_out: dict[int, list[dict[str, Any]]] = msgspec.field(default_factory=dict)

    @property
    def long_context(self) -> bool:
        return self.category == "long_context"

    @property
    def index(self) -> int:
        return int(self.id.rsplit("_", 1)[1])


class AstEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One single-turn BFCL entry: the opening messages, the function docs, and the
    possible answers (`None` for relevance categories, which have none)."""

    id: str
    category: str
    messages: list[dict[str, str]]
    functions: list[dict[str, Any]]
    ground_truth: list[dict[str, dict[str, list[Any]]]] | None = None


def data_dir() -> Path:
    try:
        import bfcl_eval
    except ImportError as e:
        raise ImportError(f"BFCL data needs the bfcl-eval package; install it with: {INSTALL_HINT}") from e
    return Path(bfcl_eval.__file__).parent / "data"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@cache
def class_docs(class_name: str) -> tuple[dict[str, Any], ...]:
    """BFCL's function docs for one executable class, in file order."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    if class_name not in MULTI_TURN_FUNC_DOC_FILE_MAPPING:
        raise ValueError(
            f"unknown BFCL class {class_name!r}; known: {sorted(MULTI_TURN_FUNC_DOC_FILE_MAPPING)}"
        )
    path = data_dir() / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return tuple(_read_jsonl(path))


def _instance(row: dict[str, Any], answer: dict[str, Any], category: str) -> MultiTurnInstance:
    docs = [copy.deepcopy(d) for c in row["involved_classes"] for d in class_docs(c)]
    missed = {int(k): list(v) for k, v in row.get("missed_function", {}).items()}
    held_out: dict[int, list[dict[str, Any]]] = {}
    for turn, names in missed.items():
        # Same rule as BFCL: the first doc with that name moves from the start set to the turn.
        for name in names:
            i = next((i for i, d in enumerate(docs) if d["name"] == name), None)
            if i is not None:
                held_out.setdefault(turn, []).append(docs.pop(i))
    turns = [[m["content"] for m in turn if m["role"] == "user"] for turn in row["question"]]
    return MultiTurnInstance(
        id=row["id"],
        category=category,
        turns=turns,
        initial_config=row.get("initial_config", {}),
        involved_classes=list(row["involved_classes"]),
        ground_truth=answer["ground_truth"],
        missed_function=missed,
        functions=docs,
        held_out=held_out,
    )


@cache
def load_multi_turn(category: str) -> tuple[MultiTurnInstance, ...]:
    """All entries of one multi-turn category (`base`, `miss_func`, `miss_param`,
    `long_context`), in BFCL's order."""
    if category not in MULTI_TURN_CATEGORIES:
        raise ValueError(f"multi-turn category {category!r} unknown; choose from {MULTI_TURN_CATEGORIES}")
    d = data_dir()
    rows = _read_jsonl(d / f"BFCL_v4_multi_turn_{category}.json")
    answers = _read_jsonl(d / "possible_answer" / f"BFCL_v4_multi_turn_{category}.json")
    by_id = {a["id"]: a for a in answers}
    return tuple(_instance(r, by_id[r["id"]], category) for r in rows)


@cache
def load_ast(category: str) -> tuple[AstEntry, ...]:
    """All entries of one single-turn category (AST or relevance), in BFCL's order."""
    if category not in AST_CATEGORIES + RELEVANCE_CATEGORIES:
        raise ValueError(
            f"single-turn category {category!r} unknown; choose from {AST_CATEGORIES + RELEVANCE_CATEGORIES}"
        )
    d = data_dir()
    name = _AST_FILES.get(category, category)
    rows = _read_jsonl(d / f"BFCL_v4_{name}.json")
    answers: dict[str, Any] = {}
    if category in AST_CATEGORIES:
        answers = {
            a["id"]: a["ground_truth"] for a in _read_jsonl(d / "possible_answer" / f"BFCL_v4_{name}.json")
        }
    out = []
    for r in rows:
        # Single-turn entries have one turn; a few live ones carry a system message in it.
        msgs = [{"role": m["role"], "content": m["content"]} for m in r["question"][0]]
        out.append(
            AstEntry(
                id=r["id"],
                category=category,
                messages=msgs,
                functions=r["function"],
                ground_truth=answers[r["id"]] if answers else None,
            )
        )
    return tuple(out)


# --- function docs -> JSON Schema -------------------------------------------------------

_JSON_TYPES = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "double": "number",
    "string": "string",
    "char": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
}


def _schema(prop: dict[str, Any]) -> dict[str, Any]:
    """One BFCL parameter description as JSON Schema. `any` (and unknown types) become an
    unconstrained schema: BFCL's own OpenAI conversion turns them into strings, which would
    make the parser reject values the executable classes accept."""
    out: dict[str, Any] = {}
    t = prop.get("type")
    if t in _JSON_TYPES:
        out["type"] = _JSON_TYPES[t]
    for key in ("description", "enum", "default"):
        if key in prop:
            out[key] = prop[key]
    if "items" in prop and isinstance(prop["items"], dict):
        out["items"] = _schema(prop["items"])
    if "properties" in prop and isinstance(prop["properties"], dict):
        out["properties"] = {k: _schema(v) for k, v in prop["properties"].items()}
        if prop.get("required"):
            out["required"] = list(prop["required"])
    return out


def to_tool_spec(doc: dict[str, Any]) -> ToolSpec:
    """A BFCL function doc as a ToolSpec (names kept as they are, dots included). Only the
    declared parameters are allowed (`additionalProperties: false`): an argument key becomes a
    keyword in the call string BFCL's checker evaluates, so an undeclared one is a schema error."""
    params = doc.get("parameters", {})
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {k: _schema(v) for k, v in params.get("properties", {}).items()},
        "additionalProperties": False,
    }
    if params.get("required"):
        schema["required"] = list(params["required"])
    return ToolSpec(name=doc["name"], description=doc.get("description", ""), parameters=schema)


def tool_specs(docs: list[dict[str, Any]]) -> list[ToolSpec]:
    """ToolSpecs for a doc list; a repeated name keeps its first doc (BFCL's method lookup
    also resolves a name to one method)."""
    seen: dict[str, ToolSpec] = {}
    for d in docs:
        seen.setdefault(d["name"], to_tool_spec(d))
    return list(seen.values())


# --- split ----------------------------------------------------------------------------


def split_indices(n: int, seed: int, train_fraction: float = 0.5) -> tuple[frozenset[int], frozenset[int]]:
    """A fixed-seed split of entry indices 0..n-1 into (train, held-out).

    The same index split applies to every multi-turn category: BFCL builds miss_func,
    miss_param and long_context entry i from the same scenario as base entry i, so variants
    of one scenario always land on the same side (no scenario leaks into the held-out set).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(
            f"train_fraction = {train_fraction}: must be in (0, 1), e.g. 0.5 for a 100/100 split"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = round(n * train_fraction)
    return frozenset(order[:k]), frozenset(order[k:])


def select(
    categories: list[str] | tuple[str, ...], part: str, seed: int, train_fraction: float = 0.5
) -> list[MultiTurnInstance]:
    """The `part` ("train", "heldout" or "all") entries of the given categories."""
    if part not in ("train", "heldout", "all"):
        raise ValueError(f"split part {part!r} unknown; choose 'train', 'heldout' or 'all'")
    out: list[MultiTurnInstance] = []
    for c in categories:
        rows = load_multi_turn(c)
        if part == "all":
            out.extend(rows)
            continue
        train, held = split_indices(len(rows), seed, train_fraction)
        keep = train if part == "train" else held
        out.extend(r for r in rows if r.index in keep)
    return out
