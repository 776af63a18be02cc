"""vLLM engine pieces that need no running engine: chunk regrouping, tensor packing for
collective_rpc, per-engine stat sinks, SamplingParams mapping, the spawn environment.
The engine itself runs in the contract suite (test_engine_contract.py, `vllm` backend)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from trustee.engines.base import Sampling
from trustee.engines.vllm import _engine_env, _Sink, _stat_logger_factory, whole_layers
from trustee.engines.vllm_ext import pack, unpack

try:
    import vllm  # noqa: F401

    NO_VLLM = ""
except Exception as e:
    NO_VLLM = f"import vllm failed: {e!r}"
needs_vllm = pytest.mark.skipif(bool(NO_VLLM), reason=NO_VLLM or "vllm present")


NAMES = (
    ["model.embed_tokens.weight"]
    + [
        f"model.layers.{i}.{p}.weight"
        for i in range(3)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")
    ]
    + ["model.norm.weight"]
)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6, 7, 100])
def test_whole_layers_never_splits_a_layer_and_keeps_order(size):
    items = [(n, i) for i, n in enumerate(NAMES)]
    groups = list(whole_layers(items[i : i + size] for i in range(0, len(items), size)))
    assert [n for g in groups for n, _ in g] == NAMES
    for layer in range(3):
        holding = [g for g in groups if any(f".layers.{layer}." in n for n, _ in g)]
        assert len(holding) == 1, (size, layer, holding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_pack_unpack_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)[:, 1:4]  # non-contiguous on purpose
    name, back = unpack(list(pack("w", t)))  # msgpack turns tuples into lists
    assert name == "w" and back.dtype == dtype and back.shape == (3, 3)
    assert torch.equal(back, t)


@needs_vllm
def test_stat_loggers_of_two_engines_do_not_share_counts():
    a, b = _Sink(), _Sink()
    la, lb = _stat_logger_factory(a)(None, 0), _stat_logger_factory(b)(None, 0)
    pcs = SimpleNamespace(queries=300, hits=256, reset=False)
    la.record(SimpleNamespace(prefix_cache_stats=pcs, num_running_reqs=5), None)
    la.record(SimpleNamespace(prefix_cache_stats=pcs, num_running_reqs=0), None)
    lb.record(None, None)
    assert (a.prefix_queries, a.prefix_hits, a.steps, a.max_running) == (600, 512, 1, 5)
    assert (b.prefix_queries, b.prefix_hits, b.steps) == (0, 0, 0)


@needs_vllm
def test_sampling_params_mapping():
    from vllm.sampling_params import RequestOutputKind

    from trustee.engines.vllm import VLLMEngine

    eng = VLLMEngine(None, _Sink(), model_dir="unused")
    sp = eng.sampling_params(Sampling(max_tokens=7, temperature=0.5, stop_token_ids=(2,), seed=3))
    assert sp.max_tokens == 7 and sp.temperature == 0.5 and sp.stop_token_ids == [2] and sp.seed == 3
    assert sp.logprobs == 0 and sp.detokenize is False and sp.output_kind == RequestOutputKind.FINAL_ONLY
    assert sp.top_k in (0, -1) and sp.structured_outputs is None
    sp = eng.sampling_params(
        Sampling(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    )
    assert "root ::=" in sp.structured_outputs.grammar
    assert eng._rank("episode-1") is None  # one replica: no pinning


def test_engine_env_strips_expandable_segments_and_sets_kv_space(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:128")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with _engine_env(kv_cache_gib=2, on_cpu=True):
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"].startswith("expandable_segments")
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
