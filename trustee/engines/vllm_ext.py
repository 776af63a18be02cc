"""Methods mixed into vLLM's worker class (`worker_extension_cls`), called by name through
`AsyncLLM.collective_rpc`.

Owns the worker side of full-weight streaming: each call receives one chunk of
(HF checkpoint name, CPU tensor) and loads it into the running model with the model's own
`load_weights` (which fuses q/k/v and gate/up itself). The engine side, the chunking and the
prefix-cache reset live in `trustee.engines.vllm`. This module must stay importable inside the
vLLM worker processes, so it imports nothing from trustee and only torch at call time.
"""

from __future__ import annotations

from typing import Any


class TrusteeWorkerExtension:
    """vLLM mixes this into its Worker; `self.model_runner` and `self.device` are the worker's."""

    def trustee_load_weights(self, weights: list[tuple[str, Any]]) -> int:
        """Load one chunk of (HF name, tensor); returns how many tensors were given."""
        import torch

        model = self.model_runner.model  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        with torch.inference_mode():
            model.load_weights(weights=((name, t.to(device, non_blocking=True)) for name, t in weights))
        if getattr(device, "type", "cpu") == "cuda":
            torch.cuda.synchronize(device)
        return len(weights)

    def trustee_param_names(self) -> list[str]:
        """Names of the model's parameters as vLLM holds them (fused, LoRA-wrapped)."""
        return [name for name, _ in self.model_runner.model.named_parameters()]  # type: ignore[attr-defined]
