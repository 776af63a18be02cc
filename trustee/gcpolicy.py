"""The garbage collector's settings while a run's episodes go on.

Owns `QuietCollector`: once set-up is done (models, tokenizer, engines and environment
built), `start()` collects once, moves every object then alive into the permanent
generation (`gc.freeze`: the collector never scans them again) and lets the youngest
generation grow to `GEN0` new container objects between collections (CPython's default is
700); `stop()` puts both back. Why: an agent turn allocates a few dozen short-lived objects
and every live episode holds token-id lists of thousands of items, which each collection
walks; with the default threshold the collector took 10-20% of the rollout process's CPU
(`bench/orchestrator.py`), most of it re-scanning objects that live for the whole run
(imported modules, the tokenizer, the model). Reference counting still frees everything
that is not in a cycle at once; only cyclic garbage waits for the larger threshold.

It does not disable the collector nor tune anything else. Callers: `train.train` (after
set-up, for the whole loop) and `bench/orchestrator.py` (the same, around each level).
"""

from __future__ import annotations

import gc

# New container objects between youngest-generation collections. Each collection walks the
# token-id lists of every episode still young, so fewer, larger ones cost less: at 512
# episodes in flight, 50,000 gave 7-17% more turns/s than 20,000 and 100,000 no more than
# 50,000 (bench/orchestrator.py, alternating A/B runs in one process, 2026-12-02).
GEN0 = 50_000


class QuietCollector:
    """`start()` after set-up, `stop()` at the end (safe to call without a start); also a
    context manager. Not re-entrant: one per run."""

    def __init__(self, gen0: int = GEN0):
        if gen0 < 1:
            raise ValueError(f"gen0 = {gen0}: the collector's threshold must be at least 1")
        self.gen0 = gen0
        self._before: tuple[int, int, int] | None = None

    def start(self) -> None:
        if self._before is not None:
            return
        self._before = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(max(self.gen0, self._before[0]), *self._before[1:])

    def stop(self) -> None:
        if self._before is None:
            return
        gc.set_threshold(*self._before)
        gc.unfreeze()  # the frozen objects join the oldest generation again
        self._before = None

    def __enter__(self) -> QuietCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
