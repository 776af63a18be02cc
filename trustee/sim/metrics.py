"""Per-step figures of the simulator: what it was asked, how it answered, what it reused.

Owns `BlockPrefixMeter` (a model of a block-hash prefix cache: the share of prompt tokens
an unbounded-enough vLLM-style cache would serve, computed in-process from the token ids)
and `SimMeter` (turns the cumulative `SimStats` of a `SimClient` and the `EngineStats` of
its engine into one step's `sim/*` record: requests, prompt tokens, retries and cut
outputs per role, latency percentiles, the engine-measured prefix-cache hit rate where the
engine counts it, and the block-model estimate). Called by `envs/simulated.py` (which the
training loop asks for `step_metrics()` once per step) and `bench/prefix.py`. It does not
talk to an engine beyond `stats()`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from trustee.engines.base import Engine

BLOCK = 16
"""Tokens per cache block in the model (vLLM's default on GPU; only full blocks are cached)."""


class BlockPrefixMeter:
    """A prefix cache modelled on vLLM's: each full block of `block` tokens is keyed by the
    hash of (parent key, its tokens); a prompt hits its leading blocks already seen; after a
    request the full blocks of prompt + output are kept (least recently used dropped past
    `capacity` blocks). Counts per role, in tokens."""

    def __init__(self, block: int = BLOCK, capacity: int = 1 << 18):
        self.block, self.capacity = block, capacity
        self._seen: OrderedDict[int, None] = OrderedDict()
        self.queries: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    def _keys(self, ids: list[int]) -> list[int]:
        keys, parent = [], 0
        for i in range(0, len(ids) - len(ids) % self.block, self.block):
            parent = hash((parent, tuple(ids[i : i + self.block])))
            keys.append(parent)
        return keys

    def record(self, role: str, prompt: list[int], output: list[int]) -> int:
        """Count one request; returns its hit tokens."""
        hit = 0
        for k in self._keys(prompt):
            if k not in self._seen:
                break
            self._seen.move_to_end(k)
            hit += self.block
        hit = min(hit, max(0, len(prompt) - 1))  # the last prompt token is always computed
        self.queries[role] = self.queries.get(role, 0) + len(prompt)
        self.hits[role] = self.hits.get(role, 0) + hit
        for k in self._keys(prompt + output):
            self._seen[k] = None
            self._seen.move_to_end(k)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return hit

    def rate(self, role: str | None = None) -> float:
        q = sum(self.queries.values()) if role is None else self.queries.get(role, 0)
        h = sum(self.hits.values()) if role is None else self.hits.get(role, 0)
        return h / q if q else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class SimMeter:
    """Differences of the client's and engine's counters between two `step()` calls."""

    client: object  # SimClient (not imported: client.py imports this module's neighbours)
    engine: Engine | None = None
    _prev: dict[str, float] = field(default_factory=dict)

    def _totals(self) -> dict[str, float]:
        st = self.client.stats  # type: ignore[attr-defined]
        meter: BlockPrefixMeter = self.client.prefix  # type: ignore[attr-defined]
        t: dict[str, float] = {
            "sim/requests": st.calls,
            "sim/retries": st.retries,
            "sim/failures": st.failures,
            "sim/refused": st.refused,
            "est/q": sum(meter.queries.values()),
            "est/h": sum(meter.hits.values()),
        }
        for role, r in st.roles.items():
            t[f"sim/requests/{role}"] = r.requests
            t[f"sim/retries/{role}"] = r.retries
            t[f"sim/cut/{role}"] = r.cut
            t[f"sim/prompt_tokens/{role}"] = r.prompt_tokens
            t[f"sim/output_tokens/{role}"] = r.output_tokens
            t[f"cached/{role}"] = r.cached_tokens
        if self.engine is not None:
            es = self.engine.stats()
            t["engine/q"], t["engine/h"] = es.prefix_queries, es.prefix_hits
        return t

    def step(self) -> dict[str, float]:
        """This step's `sim/*` record (every counter as this step's increase)."""
        now = self._totals()
        d = {k: float(v - self._prev.get(k, 0)) for k, v in now.items()}
        self._prev = now
        out = {k: v for k, v in d.items() if k.startswith("sim/")}
        out["sim/prompt_tokens"] = sum(v for k, v in d.items() if k.startswith("sim/prompt_tokens/"))
        out["sim/output_tokens"] = sum(v for k, v in d.items() if k.startswith("sim/output_tokens/"))
        out["sim/cut"] = sum(v for k, v in d.items() if k.startswith("sim/cut/"))
        out["sim/prefix_share_est"] = d["est/h"] / d["est/q"] if d["est/q"] else 0.0
        if d.get("engine/q"):  # only an engine with a prefix cache that counts it (vLLM)
            out["sim/prefix_hit_rate"] = d["engine/h"] / d["engine/q"]
            for k, v in d.items():
                if k.startswith("cached/"):
                    role = k.removeprefix("cached/")
                    q = d.get(f"sim/prompt_tokens/{role}", 0.0)
                    out[f"sim/prefix_hit_rate/{role}"] = v / q if q else 0.0
        lat = self.client.stats.drain_latencies()  # type: ignore[attr-defined]
        out["sim/latency_p50_s"] = percentile(lat, 0.5)
        out["sim/latency_p95_s"] = percentile(lat, 0.95)
        return out
