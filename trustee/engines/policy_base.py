"""`PolicyBase`: the policy engine as the simulator sees it (simulator.engine = 'policy-base').

With LoRA or QLoRA the policy's base weights never change, so the base can play every simulator
role: one engine, one copy of the weights. This view sends each request to the policy engine
with `Sampling.adapter = False`: the vLLM engine sends it without a LoRARequest (one batch may
mix both kinds), the HF engine runs it in a batch with the adapter switched off. Whatever the
policy's version, the simulator samples from the untouched base (tests/test_sim_policy_base.py
compares its greedy outputs before and after adapter updates, bit for bit).

The view owns no memory and no lifecycle: the policy role sleeps, wakes, updates and closes the
engine (`trustee.placement`), so here those calls do nothing, and `update_weights` refuses.
It counts its own requests, so a step's `engine/simulator/*` metrics are the simulator's share
of the shared engine's work. Built by `trustee.placement.Placement`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from trustee.engines.base import Completion, EngineStats, Sampling, WeightUpdate


class PolicyBase:
    """The `Engine` contract over a policy engine, every request without the adapter."""

    version = 0  # the base never changes

    def __init__(self, policy: Any):
        self.policy = policy
        self._stats = EngineStats()

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        self._stats.requests += 1
        self._stats.prompt_tokens += len(prompt)
        out = await self.policy.generate(prompt, msgspec.structs.replace(params, adapter=False), key=key)
        self._stats.generated_tokens += len(out.token_ids)
        return msgspec.structs.replace(out, policy_version=0)

    async def sleep(self, level: int = 1) -> None:
        """Nothing: the policy role puts the shared engine to sleep."""

    async def wake(self) -> None:
        """Nothing: the policy role wakes the shared engine."""

    async def update_weights(self, update: WeightUpdate) -> None:
        raise TypeError("the simulator on the policy's base never takes weights; update the policy engine")

    def stats(self) -> EngineStats:
        return msgspec.structs.replace(self._stats)

    async def close(self) -> None:
        """Nothing: the policy role closes the shared engine."""
