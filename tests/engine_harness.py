"""Helpers shared by the engine tests: an event loop in a background thread (vLLM's AsyncLLM
binds to the loop it first runs on, so one engine per module needs one loop per module) and
transformers references (teacher-forced log-probs, plain greedy decoding) that the engines are
checked against."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class LoopThread:
    """A private asyncio loop in a daemon thread; `run(coro)` blocks until it finishes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@torch.no_grad()
def teacher_logprobs(model: Any, prompt: list[int], ids: list[int], temperature: float) -> torch.Tensor:
    """log p(ids[i] | prompt + ids[:i]) after temperature, one full forward pass in fp32. [len(ids)]"""
    seq = torch.tensor([prompt + ids])  # [1, T]
    logits = model(seq).logits[0, len(prompt) - 1 : -1].float()  # [len(ids), V]
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(1, torch.tensor(ids)[:, None])[:, 0]


@torch.no_grad()
def reference_greedy(model: Any, prompt: list[int], max_tokens: int, stops: set[int]) -> list[int]:
    """Greedy decoding by repeated full forward passes (no cache): the plainest reference."""
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt + out])).logits[0, -1]  # [V]
        t = int(logits.argmax())
        out.append(t)
        if t in stops:
            break
    return out


def load_reference(path: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturbed_state(model: Any, seed: int, scale: float = 0.5) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight, each with seeded noise added: 'new weights'. Tied
    weights (lm_head = embed_tokens) are sent once, under the first name, as a learner would."""
    g = torch.Generator().manual_seed(seed)
    out, seen = [], set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        noise = torch.randn(t.shape, generator=g) * t.float().std().clamp(min=1e-3) * scale
        out.append((name, (t.float() + noise).to(t.dtype)))
    return out
