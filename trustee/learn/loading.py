"""Loading the policy into FSDP2 ranks: one reader of the weight files, shards by broadcast.

Owns `SafetensorsReader` (a checkpoint directory's tensors read one at a time with plain file
reads: no memory map, so the reader holds one tensor, not the file), `empty_model` (the
architecture from config.json with its parameters on the meta device: nothing allocated, no
file read), `fill_shards` (rank 0 reads each weight and broadcasts it; every rank keeps its
own shard of it), `copy_shards` (the KL reference's shards from the policy's, cast) and
`init_lora` (the adapter's initial weights from the seed and each weight's name, so every
process, sharded or not, draws the same adapter without drawing the base).

Why: every rank loading the whole model on the host at once and deep-copying it for the
KL reference cost 8 ranks x (16 + 16) GB for Qwen3-8B. Here rank 0 holds one tensor at a
time beyond its shard, the others hold their shard, and no process reads the files but
rank 0. Called by `learn/fsdp_rank.py` (ranks) and `learn/policy.py` (`init_lora`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """The tensors of a transformers checkpoint directory (`model.safetensors`, or the shards
    named by `model.safetensors.index.json`), read on demand with seek + readinto."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        files = (
            sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.exists()
            else [path / "model.safetensors"]
        )
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")  # u64 header length, then the JSON header
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, meta in header.items():
                self.entries[name] = (f, 8 + n, meta)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        f, start, meta = self.entries[name]
        begin, end = meta["data_offsets"]
        buf = bytearray(end - begin)
        with open(f, "rb") as fh:
            fh.seek(start + begin)
            fh.readinto(buf)
        flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return flat.view(_SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def empty_model(path: str | Path, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The causal LM of `path`/config.json with meta parameters (buffers such as the rotary
    frequencies are computed for real) and tied weights tied."""
    from accelerate import init_empty_weights  # a dependency of peft
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()
    return model


def checkpoint_name(name: str) -> str:
    """A (PEFT-wrapped) parameter's name as the checkpoint spells it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) meta parameters on `device`, uninitialised, keeping the buffers
    that were computed for real (`to_empty` would drop them)."""
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])


def _into_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `param` (a DTensor shard, or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        part = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def fill_shards(
    model: nn.Module, reader: SafetensorsReader | None, *, rank: int, device: torch.device
) -> int:
    """Every checkpoint weight into the sharded `model`: rank 0 reads it (`reader`; None on
    the other ranks) and broadcasts it, every rank keeps its shard. LoRA weights are left to
    `init_lora`. Returns the bytes read from the files (0 off rank 0). Collective: all ranks
    call it with the same model."""
    import torch.distributed as dist

    read = 0
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or ".lora_" in name:
            continue
        seen.add(id(t))
        key = checkpoint_name(name)
        here = torch.tensor([int(reader is not None and key in reader)], device=device)
        dist.broadcast(here, src=0)
        if not here.item():  # not in the checkpoint: a computed buffer, or tied away
            continue
        if rank == 0:
            assert reader is not None
            cpu = reader.read(key)
            read += cpu.numel() * cpu.element_size()
            full = cpu.to(device=device, dtype=t.dtype)
        else:
            full = torch.empty(tuple(t.shape), dtype=t.dtype, device=device)
        dist.broadcast(full, src=0)
        _into_shard(t, full)
        del full
    return read


@torch.no_grad()
def copy_shards(dst: nn.Module, src: nn.Module) -> None:
    """dst's local shards from src's (same architecture, same sharding), cast to dst's dtype:
    the KL reference from the policy's shards, with no second read and no full copy."""
    from torch.distributed.tensor import DTensor

    srcs = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        s = srcs[name]
        if isinstance(p, DTensor):
            p.to_local().copy_(s.to_local())
        else:
            p.copy_(s)


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """Every LoRA weight drawn from (seed, its name): A as peft draws it (Kaiming uniform with
    a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, so the adapter starts at zero
    delta. Works on plain, meta-built-then-materialised and sharded parameters alike."""
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            g = torch.Generator().manual_seed(_seed_of(seed, name))
            bound = 1.0 / math.sqrt(p.shape[1])
            full = torch.rand(tuple(p.shape), generator=g, dtype=torch.float32) * (2 * bound) - bound
        elif ".lora_B." in name:
            full = torch.zeros(tuple(p.shape))
        else:
            continue
        _into_shard(p, full.to(device=p.device, dtype=p.dtype))
