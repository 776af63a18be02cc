"""The shared weight route (learn/transport.py, engines/vllm_ext.py's shared buckets): every
learner rank fills a bucket on its own device and sends only a handle; the parent merges the
handles, one per device; each engine worker opens the bucket filed under its own device.

What runs here, on the CPU: the bucket plan (whole layers, bounded, complete, in order); the
merge and its refusals; a worker picking its own device's bucket; and two real gloo ranks of
the full learner exporting through the real `VLLMEngine._load_full` into two
`VllmWorkerDouble`s (the real worker extension with vLLM's `reload_weights` replaced by a
recorder, standing in for the vLLM workers on 'GPU 0' and 'GPU 1'; on the CPU rank r files
its bucket under 'cpu:r'). Checked there: the weights equal the bytes transport's bit for bit
(bf16 export, tied weights once, same names in the same order); rank 0's pipe carries handles,
not weights; a bucket lives until the consumer asks for the next one and is freed then; a
consumer that stops early, or a worker with no bucket for its device, leaves no bucket behind
and the learner usable. The buckets are /dev/shm files here, GPU memory behind CUDA IPC
handles on a GPU: that kind is not run here (tools/gpu_check.sh's `cuda-ipc-transport` row).
"""

from __future__ import annotations

import asyncio
import glob
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from learn_samples import random_qwen3, rank_spec_for

from trustee.config import GrpoConfig, LearnerConfig, load_config, weight_transport
from trustee.engines.base import FullUpdate
from trustee.engines.vllm import VLLMEngine, _Sink
from trustee.engines.vllm_ext import SharedBucket, TrusteeWorkerExtension, aligned, open_bucket
from trustee.learn.distributed import DistributedLearner
from trustee.learn.fsdp_rank import RankSpec
from trustee.learn.transport import merge_payloads, plan_buckets

LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"]
NAMES = (
    ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.{p}" for i in range(4) for p in LAYER]
    + ["model.norm.weight", "lm_head.weight"]
)


def _layer(name: str) -> str:
    return ".".join(name.split(".")[:3]) if ".layers." in name else name


@pytest.mark.parametrize("bucket_bytes", [1, 30, 45, 100, 10_000])
def test_buckets_hold_whole_layers_in_order_within_the_bound(bucket_bytes):
    sizes = [(n, 40 if "embed" in n or "lm_head" in n else 10) for n in NAMES]
    buckets = plan_buckets(sizes, bucket_bytes)
    assert [n for b in buckets for n in b] == NAMES  # every name once, in order
    size = dict(sizes)
    for b in buckets:
        if len({_layer(n) for n in b}) > 1:  # more than one unit: within the bound
            assert sum(size[n] for n in b) <= bucket_bytes, b
    owner = {}
    for i, b in enumerate(buckets):
        for n in b:
            assert owner.setdefault(_layer(n), i) == i, f"{_layer(n)} split across buckets"
    if bucket_bytes >= sum(size.values()):
        assert len(buckets) == 1
    with pytest.raises(ValueError, match="bucket_bytes = 0"):
        plan_buckets(sizes, 0)


def _bucket(key: str, fill: float, tag: str) -> tuple[dict, SharedBucket]:
    b = SharedBucket(aligned(6 * 2) + aligned(3 * 4), "cpu", tag=tag)
    b.put("model.layers.0.mlp.up_proj.weight", torch.full((2, 3), fill), torch.bfloat16)
    b.put("model.norm.weight", torch.full((3,), fill))
    return b.payload(key), b


def test_each_worker_opens_the_bucket_of_its_own_device_and_nothing_else():
    (p0, b0), (p1, b1) = _bucket("cpu:0", 1.0, "t0"), _bucket("cpu:1", 2.0, "t1")
    try:
        merged = merge_payloads([p0, p1])
        assert sorted(merged["handles"]) == ["cpu:0", "cpu:1"]
        got1 = open_bucket(merged, torch.device("cpu", 1))
        got0 = open_bucket(merged, torch.device("cpu", 0))
        assert [n for n, _ in got1] == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
        assert got1[0][1].dtype == torch.bfloat16 and got1[0][1].shape == (2, 3)
        assert all(float(t.float().min()) == float(t.float().max()) == 2.0 for _, t in got1)
        assert all(float(t.float().min()) == float(t.float().max()) == 1.0 for _, t in got0)
        with pytest.raises(
            ValueError, match=r"no weight bucket for this worker's device cpu:5.*'cpu:0', 'cpu:1'"
        ):
            open_bucket(merged, torch.device("cpu", 5))
        with pytest.raises(RuntimeError, match="two learner ranks share device cpu:0"):
            merge_payloads([p0, p0])
        p1_other = {**p1, "items": p1["items"][:1]}
        with pytest.raises(RuntimeError, match="rank 1's bucket"):
            merge_payloads([p0, p1_other])
    finally:
        b0.close(), b1.close()
    assert not Path(p0["handles"]["cpu:0"][0]).exists()  # close frees it (removes the file)


def test_a_full_update_is_chunks_or_buckets_and_chunk_engines_refuse_buckets():
    with pytest.raises(ValueError, match="exactly one of `chunks` and `buckets`"):
        FullUpdate()
    with pytest.raises(ValueError, match="exactly one"):
        FullUpdate(chunks=[], buckets=[])
    assert FullUpdate(chunks=[[]]).chunks_for("the HF engine") == [[]]
    with pytest.raises(
        TypeError, match="the HF engine loads full weights as chunks.*weight_transport = 'bytes'"
    ):
        FullUpdate(buckets=iter([])).chunks_for("the HF engine")


def test_auto_picks_the_shared_route_only_where_every_policy_worker_has_a_rank_beside_it():
    cfg = load_config("configs/8gpu.toml")
    assert weight_transport(cfg) == "shared"
    apart = load_config(
        "configs/8gpu.toml", ["placement.learner_gpus=[0,1,2,3]", "placement.learner_ranks=4"]
    )
    assert weight_transport(apart) == "bytes"  # policy GPUs 4..7 hold no rank
    assert weight_transport(load_config("configs/8gpu.toml", ["learner.weight_transport=bytes"])) == "bytes"
    assert weight_transport(load_config(None)) == "bytes"  # the CPU default


# ----------------------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A random Qwen3 with tied embeddings, 3 layers, float32, about 1 MB."""
    out = tmp_path_factory.mktemp("transport-model")
    return random_qwen3(out, vocab=512, hidden=64, layers=3, heads=2, tied=True, seed=3)


class VllmWorkerDouble(TrusteeWorkerExtension):
    """Stands in for one vLLM worker on `device`: the real extension's `trustee_load_bucket`
    and `_trustee_load`, with vLLM's layerwise `reload_weights` replaced by a recorder."""

    def __init__(self, device: torch.device):
        self.device = device
        self.model_runner = SimpleNamespace(model=SimpleNamespace())  # no config: nothing to re-tie
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.calls = 0

    def reload_weights(self, weights_iterator, is_checkpoint_format: bool) -> None:
        assert is_checkpoint_format
        self.calls += 1
        self.loaded += list(weights_iterator)


class FakeAsyncLLM:
    """What VLLMEngine calls on AsyncLLM during a full update: `collective_rpc` sends the same
    kwargs to every worker (as vLLM does across data-parallel engines), the cache reset says yes."""

    def __init__(self, workers: list[VllmWorkerDouble]):
        self.workers = workers

    async def collective_rpc(self, method: str, kwargs: dict) -> list:
        return [getattr(w, method)(**kwargs) for w in self.workers]

    async def reset_prefix_cache(self) -> bool:
        return True


def _spec(path: Path) -> RankSpec:
    learner = LearnerConfig(mode="full", lr=1e-3, micro_batch_tokens=64, gradient_checkpointing=False)
    return rank_spec_for(path, learner, GrpoConfig(beta=0.0, loss_type="grpo"))


def _left_over(pids: list[int]) -> list[str]:
    """Bucket files of these learner ranks on disk (SharedBucket names them
    trustee-rank<r>-pid<pid>-...)."""
    return [f for p in pids for f in glob.glob(f"/dev/shm/trustee-rank*-pid{p}-*")]


def _push(workers: list[VllmWorkerDouble], update: FullUpdate) -> VLLMEngine:
    engine = VLLMEngine(FakeAsyncLLM(workers), _Sink(), model_dir="unused")
    asyncio.run(engine.update_weights(update))
    return engine


def test_two_ranks_share_buckets_per_device_equal_to_the_bytes_route(small_model, tmp_path):
    with DistributedLearner(
        _spec(small_model), export_dtype="bfloat16", transport="shared", bucket_bytes=40_000
    ) as dl:
        want = [(n, t) for chunk in dl.export_full("bytes").chunks for n, t in chunk]
        by_bytes = dl.last_export
        assert by_bytes.transport == "bytes" and by_bytes.rank0_pipe_bytes > by_bytes.weight_bytes
        names = [n for n, _ in want]
        assert "lm_head.weight" not in names and names[0] == "model.embed_tokens.weight"  # tied: once

        # Through the engine's real bucket path into a worker per device, listed out of rank order.
        workers = [VllmWorkerDouble(torch.device("cpu", 1)), VllmWorkerDouble(torch.device("cpu", 0))]
        engine = _push(workers, dl.export_full())
        assert engine.version == 1
        st = dl.last_export
        assert st.transport == "shared" and st.weight_bytes == by_bytes.weight_bytes and st.pieces >= 3
        for w in workers:
            assert w.calls == st.pieces  # one load per bucket
            assert [n for n, _ in w.loaded] == names
            for (n, got), (_, ref) in zip(w.loaded, want, strict=True):
                assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref), n
        # Rank 0's pipe carried handles and names, not weights.
        assert st.rank0_pipe_bytes < 0.05 * st.weight_bytes, (st.rank0_pipe_bytes, st.weight_bytes)

        # Keep-alive and acknowledgement, by hand: a bucket exists until the next one is asked for.
        stream = dl.export_full().buckets
        first = next(stream)
        paths = {k: h[0] for k, h in first["handles"].items()}
        assert sorted(paths) == ["cpu:0", "cpu:1"]
        assert all(
            f"trustee-rank{k[-1]}-pid{dl.pids[int(k[-1])]}-" in p for k, p in paths.items()
        )  # rank r files under cpu:r
        assert all(Path(p).exists() for p in paths.values())
        assert [n for n, _ in open_bucket(first, torch.device("cpu", 1))] == [i[0] for i in first["items"]]
        second = next(stream)  # the acknowledgement: the ranks free the first bucket
        assert not any(Path(p).exists() for p in paths.values())
        assert second["items"][0][0] != first["items"][0][0]
        stream.close()  # stop early: the ranks finish their gathers without sharing
        assert _left_over(dl.pids) == []

        # A worker whose device has no rank refuses, and the learner is still usable after it.
        with pytest.raises(ValueError, match="no weight bucket for this worker's device cpu:5"):
            _push([VllmWorkerDouble(torch.device("cpu", 5))], dl.export_full())
        again = [(n, t) for chunk in dl.export_full("bytes").chunks for n, t in chunk]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, want, strict=True))
        assert _left_over(dl.pids) == []
        # A shared-route learner still writes its model directory (by the bytes transport).
        from safetensors.torch import load_file

        out = dl.save_pretrained(tmp_path / "model", small_model)
        files = {}
        for f in sorted(out.glob("*.safetensors")):
            files.update(load_file(f))
        assert sorted(files) == sorted(names) and all(torch.equal(files[n], t) for n, t in want)
