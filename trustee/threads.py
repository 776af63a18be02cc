"""How many threads torch's CPU kernels use in a trustee process.

Owns `cpu_threads` (the choice and its reason, for the plan) and `cpu_threads_applied` (set
it for a block, then put torch's setting back). Callers: `trustee/run.py` (a run on CPU),
`bench/vs_trl.py` (its trustee side builds the engine and learner itself).

Why: on CPU a small model's step is fixed costs (Python, dispatch, kernels over a few hundred
numbers), not arithmetic, and the engine's decode thread and the learner share one intra-op
pool: a second intra-op thread adds a hand-off to every kernel and buys nothing. Measured on 2
cores with the 426k-parameter test model (`bench.vs_trl --side trustee --quick`, the same
steps): 0.115 s per optimiser step on one thread, 0.218 s with torch's default of one thread
per core. A model whose matmuls are real work (SmolLM2-135M) gains from every core, so only
models below `SMALL_MODEL_PARAMS` are put on one thread. `OMP_NUM_THREADS` (or
`TRUSTEE_CPU_THREADS`), when set, always wins: the user's choice is never overridden.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

SMALL_MODEL_PARAMS = 20_000_000
"""Below this many parameters a model runs on one CPU thread (see the module docstring)."""


def cpu_threads(model_path: str | Path) -> tuple[int | None, str]:
    """(threads to set, or None for torch's default; the reason in words) for a run whose
    policy is the model in `model_path`, on CPU."""
    from trustee.memory import model_shape

    for var in ("TRUSTEE_CPU_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            if value.isdigit() and int(value) > 0:
                return int(value), f"{var}={value} (set by you)"
            return None, f"{var}={value!r} is not a positive integer: ignored, torch's default kept"
    try:
        shape = model_shape(model_path)
    except (KeyError, ValueError):  # a config.json this reader cannot size (msgspec's errors are ValueErrors)
        shape = None
    if shape is None:
        return None, "torch's default (one per core): the model's size is unknown"
    if shape.params < SMALL_MODEL_PARAMS:
        return 1, (
            f"1 ({shape.params / 1e6:.1f}M parameters: below {SMALL_MODEL_PARAMS / 1e6:.0f}M a second "
            "thread costs more than it computes; OMP_NUM_THREADS overrides)"
        )
    return None, f"torch's default, one per core ({shape.params / 1e6:.0f}M parameters)"


@contextlib.contextmanager
def cpu_threads_applied(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: left alone) for the block, then restored."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
