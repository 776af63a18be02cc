"""Moving a learner's optimiser state and KL reference to host memory while the engines run,
and back before the next update (`learner.offload`, colocate only).

Owns `offload_targets` (which tensors move: every AdamW state tensor and the KL reference's
parameters; never the policy's parameters, which the weight push after the wake still reads)
and `HostCopy` (the move itself, storage by storage: each storage's bytes are copied to a host
buffer, pinned when CUDA is there, and the storage is resized to zero, so every tensor, view,
FSDP2 shard and optimiser key stays the same object; `restore` resizes it back and copies
the bytes in). Callers: `Learner.offload` / `reload` and the FSDP rank's handlers of the same
names. It does not decide when (trustee/placement.py: after the update, before the wake; back
after the engines sleep).

For the 8-GPU shape (Qwen3-8B, 8 ranks) that is the fp32 AdamW moments (7.63 GiB a rank) and
the bf16 reference (1.91) of a 13.35 GiB shard; the fp32 master weights stay. On the CPU the
"host" is the same memory, so there it only proves the round trip (tests/test_memory_model.py:
bit-exact, storages emptied).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2's parameters and their AdamW state), or `t`."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def offload_targets(optimizer: torch.optim.Optimizer, reference: nn.Module | None) -> list[torch.Tensor]:
    """The tensors `learner.offload` moves: every state tensor of `optimizer` (AdamW's moments
    and step counts) and the parameters of the KL `reference` model (None: no reference)."""
    out = [_local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    if reference is not None:
        out += [_local(p) for p in reference.parameters()]
    return out


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over every tensor's bytes, in order (to show a round trip is bit-exact). Hashes a
    copy: `Tensor.numpy()` marks the storage it shares as not resizable, which `HostCopy` needs."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", copy=True).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class HostCopy:
    """The bytes of some tensors' storages, held in host memory while the storages are empty.
    Tensors that share a storage move once; empty storages are skipped."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        pin = torch.cuda.is_available()
        self._held: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        seen: set[int] = set()
        for t in tensors:
            s = t.untyped_storage()
            if not s.resizable():  # read from a checkpoint file by torch.load (a resumed CPU run)
                s = _own_storage(t)
            if s.nbytes() == 0 or s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin and s.device.type == "cuda")
            host.copy_(_bytes(s), non_blocking=False)
            self._held.append((s, host))
        for s, _ in self._held:
            s.resize_(0)
        self.nbytes = sum(h.numel() for _, h in self._held)
        """Bytes moved to the host."""

    def restore(self) -> None:
        """Give every storage back its bytes (the same size, the same contents)."""
        for s, host in self._held:
            s.resize_(host.numel())
            _bytes(s).copy_(host)
        self._held = []


def _own_storage(t: torch.Tensor) -> torch.UntypedStorage:
    """Point `t` at a fresh (resizable) copy of its data; its storage. For tensors that are the
    only users of their storage (optimiser state, a reference's parameters), as the ones
    `torch.load` returns are."""
    fresh = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        fresh.copy_(t)
        t.set_(fresh)
    return t.untyped_storage()


def _bytes(s: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)
