"""Deterministic learner inputs shared by the tests/test_learn_*.py modules (not a test module)."""

from __future__ import annotations

import random

from trustee.learn.packing import Sample


def make_samples(n: int, seed: int = 0, vocab: int = 1000) -> list[Sample]:
    """Multi-turn-like samples: a prompt, then sampled segments separated by masked turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mask = [0] * rng.randint(3, 8)
        for _ in range(rng.randint(1, 3)):
            mask += [1] * rng.randint(2, 9) + [0] * rng.randint(0, 5)
        toks = [rng.randrange(vocab) for _ in mask]
        lps = [rng.uniform(-8.0, -5.5) if m else 0.0 for m in mask]
        out.append(
            Sample(tokens=toks, loss_mask=mask, sampler_logprobs=lps, advantage=rng.choice([-1.2, 0.4, 1.0]))
        )
    return out
