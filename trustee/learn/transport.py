"""Full weights from the learner ranks to the engine without bytes on a pipe: shared buckets.

Owns the parts of the per-device weight route that are not CUDA, so the CPU tests run them
all: `plan_buckets` (which weights travel together: whole decoder layers, bounded bytes, the
same plan on every rank), `rank_key` (the device a rank's bucket is filed under),
`share_full` (a rank's side: gather, fill a bucket on its own device, send its handle, keep
the bucket until the parent acknowledges) and `merge_payloads` (the parent's side: one
payload holding every rank's handle, checked for agreement). The buckets themselves and the
receiver are `engines/vllm_ext.py`'s (`SharedBucket`, `open_bucket`); the parent's stream is
`learn/distributed.py`'s `DistributedLearner.export_full`.

The route (the colocated 8-GPU shape: GPU i holds learner rank i and the engine worker(s) on
GPU i). Every rank gathers every full weight anyway (the gather is collective), so each rank
fills a bucket on its own GPU and sends the parent only its handle; the parent merges the
handles into one payload keyed by device and sends it to every worker of the engine
(`collective_rpc`), each worker opens the bucket filed under its own device and copies it
out; when the call returns the parent acknowledges ('next') and every rank frees its bucket
and gathers the next. Nothing crosses a pipe but handles and names. This is how vLLM's IPC
weight-transfer engine (vllm/distributed/weight_transfer/ipc_engine.py: per-rank handles
keyed by GPU UUID, merged, shipped once, a barrier before a buffer is reused) and verl's
bucketed weight transfer (verl/workers/rollout/vllm_rollout/bucketed_weight_transfer.py: one
bucket at a time, the sender waits for the receiver's reply) move weights between colocated
processes. Bytes through the pipes stays as the CPU transport and the fallback
(`learner.weight_transport`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trustee.engines.vllm_ext import SharedBucket, aligned, device_key, layer_of
from trustee.memory import BUCKET_BYTES

DEFAULT_BUCKET_BYTES = BUCKET_BYTES  # per rank, on its own device, beside one gathered weight (memory.push_items)


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Names grouped into buckets, in order: a decoder layer is never split (vLLM's layerwise
    reload processes a layer when its group is loaded), a bucket holds at most `bucket_bytes`
    unless one layer (or one tensor outside the layers) alone is larger, and every name is in
    exactly one bucket. sizes: (name, bytes it takes in a bucket), in state-dict order (a
    layer's tensors contiguous). A pure function of its input, so every rank plans the same."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes = {bucket_bytes}: must be >= 1")
    units: list[tuple[list[str], int]] = []  # whole layers, and each other tensor alone
    for name, n in sizes:
        layer = layer_of(name)
        if units and layer is not None and layer_of(units[-1][0][-1]) == layer:
            units[-1][0].append(name)
            units[-1] = (units[-1][0], units[-1][1] + n)
        else:
            units.append(([name], n))
    buckets: list[list[str]] = []
    size = 0
    for names, n in units:
        if buckets and size + n <= bucket_bytes:
            buckets[-1] += names
            size += n
        else:
            buckets.append(list(names))
            size = n
    return buckets


def rank_key(device: torch.device, rank: int) -> str:
    """The key a rank files its bucket under: its GPU's UUID (`vllm_ext.device_key`). On the
    CPU every rank shares the host, so rank r stands for device 'cpu:r' (the CPU test's
    stand-in for 'GPU r'; a vLLM CPU worker, device 'cpu:0', opens rank 0's bucket)."""
    return device_key(device) if device.type == "cuda" else f"cpu:{rank}"


def merge_payloads(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One payload with every rank's handle (`SharedBucket.payload`, one per rank, rank order).
    The ranks fill the same plan, so their kinds and items (names, dtypes, shapes, offsets,
    sizes) must agree; two ranks filing under one device would leave a worker two buckets."""
    first = parts[0]
    handles: dict[str, Any] = {}
    for r, p in enumerate(parts):
        if p["kind"] != first["kind"] or p["items"] != first["items"]:
            names = [i[0] for i in p["items"]][:3]
            raise RuntimeError(f"rank {r}'s bucket ({p['kind']}, {names}...) differs from rank 0's")
        for key, handle in p["handles"].items():
            if key in handles:
                raise RuntimeError(
                    f"two learner ranks share device {key}; the shared weight route needs one rank per "
                    "device (set learner.weight_transport = 'bytes')"
                )
            handles[key] = handle
    return {"kind": first["kind"], "handles": handles, "items": first["items"]}


@torch.no_grad()
def share_full(
    model: nn.Module,
    names: list[str],
    *,
    rank: int,
    device: torch.device,
    dtype: torch.dtype | None,
    bucket_bytes: int,
    conn: Any,
    full: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    """A rank's side of the shared route (every rank runs it; the gathers are collective):
    per planned bucket, gather each weight (`full`), cast it into a bucket on this rank's own
    device, send ('bucket', payload) to the parent, and wait for 'next' (every receiver has
    copied it) or 'stop' (the consumer gave up: gather the rest without sharing) before the
    bucket is freed. names: HF state-dict names in order (tied weights appear once). Returns
    the buckets shared."""
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    order = []
    for name in names:
        if id(state[name]) not in seen:  # tied weights: engines re-tie on load
            seen.add(id(state[name]))
            order.append(name)
    size = {n: aligned(state[n].numel() * (dtype or state[n].dtype).itemsize) for n in order}
    key, shared, streaming = rank_key(device, rank), 0, True
    for group in plan_buckets([(n, size[n]) for n in order], bucket_bytes):
        tag = f"rank{rank}-pid{os.getpid()}"  # host buckets: /dev/shm/trustee-<tag>-...
        bucket = SharedBucket(sum(size[n] for n in group), device, tag=tag) if streaming else None
        try:
            for name in group:
                t = state[name].detach()
                w = full(t.to(dtype) if dtype is not None else t)  # cast the shard, gather half the bytes
                if bucket is not None:
                    bucket.put(name, w, dtype)
                del w
            if bucket is not None:
                conn.send(("bucket", bucket.payload(key)))
                streaming = conn.recv() == "next"
                shared += 1
        finally:
            if bucket is not None:
                bucket.close()
    return shared
