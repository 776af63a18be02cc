"""Test doubles for the simulator engine (named Fake, as such).

`FakeJsonEngine` answers every request with random JSON valid for the request's
`json_schema` (the subset of JSON Schema the roles use), encoded with a tokenizer, so role,
environment and runner code can be exercised without a model. It is not a model: the real
path (a tiny random-weight model through a real engine with constrained decoding) is tested
separately. `garbage_every` makes every n-th answer undecodable, to exercise retries.
Callers: tests and `bench/prefix.py` (when asked for the fake).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from trustee.engines.base import Completion, EngineStats, Sampling
from trustee.sim.budget import TEXT_CLASS

_WORDS = "alpha beta gamma delta order city date price booking user account total status item note".split()


def random_json(schema: dict[str, Any], rng: random.Random, depth: int = 0) -> Any:
    """A random value valid for `schema` (object/array/string/number/integer/boolean,
    enum/const/anyOf, min/max bounds; `pattern` only in the identifier form the roles use)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return random_json(rng.choice(schema["anyOf"]), rng, depth + 1)
    t = schema.get("type", "object")
    if isinstance(t, list):
        t = rng.choice(t)
    if t == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return {
            k: random_json(v, rng, depth + 1) for k, v in props.items() if k in required or rng.random() < 0.5
        }
    if t == "array":
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", 3)
        return [random_json(schema.get("items", {}), rng, depth + 1) for _ in range(rng.randint(lo, hi))]
    if t == "string":
        return _string(schema, rng)
    if t == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(min(schema.get("maximum", 100), 100)))
    if t == "number":
        return round(rng.uniform(schema.get("minimum", 0.0), min(schema.get("maximum", 100.0), 100.0)), 2)
    if t == "boolean":
        return rng.random() < 0.5
    return None


def _string(schema: dict[str, Any], rng: random.Random) -> str:
    pattern = schema.get("pattern")
    lo, hi = schema.get("minLength", 1), schema.get("maxLength", 40)
    if pattern and pattern.startswith("^" + TEXT_CLASS):  # the roles' text: words within the bound
        bounds = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", pattern)]
        lo, hi = (sum(a for a, _ in bounds), sum(b for _, b in bounds)) if bounds else (0, 40)
    elif pattern:  # identifier form
        m = re.search(r"\{(\d+),(\d+)\}", pattern)
        lo = int(m.group(1)) if m else 2
        return rng.choice("abcdefgh") + "".join(rng.choice("abcdefghij") for _ in range(lo + 2))
    words = []
    while len(" ".join(words)) < max(lo, 1) or (rng.random() < 0.6 and len(" ".join(words)) < hi - 10):
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:hi]


class FakeJsonEngine:
    """Engine double: schema-valid random JSON for every request (see module docstring)."""

    def __init__(self, tokenizer: Any, *, seed: int = 0, garbage_every: int = 0, eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.garbage_every = garbage_every
        self.eos_id = eos_id if eos_id is not None else tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.version = 0
        self.prompts: list[list[int]] = []
        self._stats = EngineStats()

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        self.prompts.append(list(prompt))
        self._stats.requests += 1
        if self.garbage_every and self._stats.requests % self.garbage_every == 0:
            text = '{"not json'
        else:
            text = json.dumps(random_json(params.json_schema or {"type": "string"}, self.rng))
        ids = list(self.tokenizer.encode(text, add_special_tokens=False)) + [self.eos_id]
        self._stats.generated_tokens += len(ids)
        self._stats.prompt_tokens += len(prompt)
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)

    async def sleep(self, level: int = 1) -> None:
        return None

    async def wake(self) -> None:
        return None

    async def update_weights(self, update: Any) -> None:
        raise NotImplementedError("FakeJsonEngine has no weights")

    def stats(self) -> EngineStats:
        return self._stats

    async def close(self) -> None:
        return None
