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


def test_engine_env_strips_expandable_segments_and_the_legacy_kv_variable(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:128")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with _engine_env(kv_cache_gib=0.25, on_cpu=True):
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
        # Whole GiB only, and it would override kv_cache_memory_bytes (vllm/platforms/cpu.py).
        assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"].startswith("expandable_segments")
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"


# ----------------------------------------------------------------------------- sleep, wake, errors


class FakeAsyncLLM:
    """Stands in for vllm's AsyncLLM where a GPU would be needed: records calls, tracks sleep."""

    def __init__(self, fail_with: Exception | None = None):
        self.calls: list[str] = []
        self.sleeping = False
        self.fail_with = fail_with

    async def sleep(self, level=1):
        self.calls.append(f"sleep {level}")
        self.sleeping = True

    async def wake_up(self, tags=None):
        self.calls.append(f"wake_up {tags}")
        self.sleeping = False
        return True

    async def is_sleeping(self):
        return self.sleeping

    async def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return True

    async def add_lora(self, req):
        self.calls.append(f"add_lora {req.lora_path}")
        return True

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(f"rpc {method}")
        return [len((kwargs or {}).get("packed", []))]

    async def generate(self, *args, **kwargs):
        raise self.fail_with
        yield  # an async generator, like AsyncLLM.generate

    def shutdown(self):
        pass


def _fake_engine(llm, **kw):
    from trustee.engines.vllm import VLLMEngine

    return VLLMEngine(llm, _Sink(), model_dir="unused", lora=True, **kw)


@needs_vllm
def test_update_weights_is_refused_while_the_engine_sleeps_and_allowed_after_wake(tmp_path):
    import anyio

    from trustee.engines.base import LoraUpdate

    llm = FakeAsyncLLM()
    eng = _fake_engine(llm)
    update = LoraUpdate(config={"r": 8}, path=str(tmp_path))

    async def go():
        await eng.sleep(1)
        with pytest.raises(RuntimeError, match="call wake"):
            await eng.update_weights(update)
        await eng.wake()
        await eng.update_weights(update)

    anyio.run(go)
    assert llm.calls == [
        "sleep 1",
        "wake_up None",
        "reset_prefix_cache",
        f"add_lora {tmp_path}",
        "reset_prefix_cache",
    ]
    assert eng.version == 1 and (eng.stats().sleeps, eng.stats().wakes) == (1, 1)


@needs_vllm
def test_level2_wake_reads_the_disk_only_until_a_full_update_has_been_pushed():
    """Issue 23 item 5: after a full update, a level-2 wake does not re-read the checkpoint
    (the next full update overwrites every weight); generation waits for that update."""
    import anyio
    import torch

    from trustee.engines.base import FatalEngineError, FullUpdate

    llm = FakeAsyncLLM()
    eng = _fake_engine(llm)
    full = FullUpdate(chunks=[[("model.layers.0.mlp.up_proj.weight", torch.ones(2, 2))]])

    async def go():
        await eng.sleep(2)
        await eng.wake()  # nothing pushed yet: the checkpoint is the policy, so it is restored
        assert "rpc reload_weights" in llm.calls
        await eng.update_weights(full)
        llm.calls.clear()
        await eng.sleep(2)
        await eng.wake()
        assert "rpc reload_weights" not in llm.calls and eng.stats().reloads_skipped == 1
        with pytest.raises(FatalEngineError, match="push the current weights"):
            await eng.generate([1, 2], Sampling(max_tokens=2))
        await eng.update_weights(
            FullUpdate(chunks=[[("model.layers.0.mlp.up_proj.weight", torch.ones(2, 2))]])
        )
        assert llm.calls[-2:] == ["rpc trustee_load_weights", "reset_prefix_cache"]

    anyio.run(go)


@needs_vllm
def test_sleep_is_refused_when_the_engine_was_built_without_sleep_mode():
    import anyio

    llm = FakeAsyncLLM()
    eng = _fake_engine(llm, sleep_mode=False)
    with pytest.raises(ValueError, match="enable_sleep_mode = false"):
        anyio.run(eng.sleep, 1)
    assert llm.calls == []


@needs_vllm
def test_validation_errors_are_recoverable():
    import anyio
    from vllm.exceptions import VLLMValidationError

    from trustee.engines.base import RecoverableEngineError
    from trustee.engines.vllm import _translate

    too_long = VLLMValidationError("prompt is longer than max_model_len", parameter="prompt", value=5000)
    assert isinstance(_translate(too_long), RecoverableEngineError)
    eng = _fake_engine(FakeAsyncLLM(fail_with=too_long))
    with pytest.raises(RecoverableEngineError, match="max_model_len"):
        anyio.run(eng.generate, [1, 2, 3], Sampling(max_tokens=4))
    assert eng.stats().failed == 1
    with pytest.raises(RecoverableEngineError, match="invalid sampling"):
        anyio.run(eng.generate, [1], Sampling(max_tokens=4, temperature=-1.0))


@pytest.mark.parametrize(
    ("gpus", "mask", "want"),
    [((0, 1), None, "0,1"), ((0, 2), "4,5,6,7", "4,6"), ((1,), "GPU-aa, GPU-bb", "GPU-bb"), ((3,), "", "3")],
)
def test_engine_gpus_are_composed_with_the_launch_mask(gpus, mask, want):
    from trustee.engines.vllm import visible_devices

    assert visible_devices(gpus, mask) == want


def test_engine_gpus_outside_the_launch_mask_are_refused():
    from trustee.engines.vllm import visible_devices

    with pytest.raises(ValueError, match="shows only 2"):
        visible_devices((2,), "4,5")
