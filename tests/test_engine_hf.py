"""HFEngine behaviour beyond the shared contract (test_engine_contract.py): input validation,
LoRA from a PEFT directory, sleep(2) after a full update, failure modes, loop changes, the
registry, and top-k/top-p log-probs. Uses the tiny random model on CPU."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_harness import load_reference, perturbed_state, reference_greedy, teacher_logprobs

from trustee.engines import ENGINES, build_engine
from trustee.engines.base import (
    FatalEngineError,
    FullUpdate,
    LoraUpdate,
    RecoverableEngineError,
    Sampling,
)
from trustee.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine.from_pretrained(tiny_model_dir, max_batch=16, max_model_len=256)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_reference(tiny_model_dir)


GREEDY = Sampling(max_tokens=6, temperature=0.0)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], Sampling(), "prompt is empty"),
        ([5] * 256, Sampling(), "max_model_len is 256"),
        ([5, 99999], Sampling(), "outside"),
        ([5], Sampling(max_tokens=0), "max_tokens"),
        ([5], Sampling(temperature=-1.0), "temperature"),
    ],
)
def test_bad_requests_are_recoverable(engine, prompt, params, match):
    with pytest.raises(RecoverableEngineError, match=match):
        asyncio.run(engine.generate(prompt, params))


def test_generation_stops_at_max_model_len(engine):
    out = asyncio.run(engine.generate([7] * 250, Sampling(max_tokens=50, stop_token_ids=())))
    assert len(out.token_ids) <= 6
    if out.finish_reason == "length":
        assert len(out.token_ids) == 6


def test_engine_follows_a_new_event_loop(engine):
    a = asyncio.run(engine.generate([5, 6, 7], GREEDY))
    b = asyncio.run(engine.generate([5, 6, 7], GREEDY))  # a second loop: batcher rebuilt
    assert a.token_ids == b.token_ids


def test_top_k_top_p_logprobs_are_of_the_truncated_distribution(engine, reference):
    prompt = [11, 12, 13, 14]
    params = Sampling(max_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    out = asyncio.run(engine.generate(prompt, params))
    full = teacher_logprobs(reference, prompt, out.token_ids, 0.8)
    got = torch.tensor(out.logprobs)
    assert (got >= full - 1e-5).all()  # renormalised over fewer tokens: never lower
    assert (got > full + 1e-4).any()  # and truly truncated


def test_lora_update_from_a_peft_dir(tiny_model_dir, reference, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_reference(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(tmp_path)
    eng = HFEngine.from_pretrained(tiny_model_dir)
    asyncio.run(eng.update_weights(LoraUpdate(config={}, path=str(tmp_path))))
    prompt = [20, 21, 22]
    out = asyncio.run(eng.generate(prompt, GREEDY))
    assert out.token_ids == reference_greedy(peft_model, prompt, 6, {2})
    assert out.policy_version == 1


def test_lora_with_mismatched_names_is_refused(tiny_model_dir):
    eng = HFEngine.from_pretrained(tiny_model_dir)
    bad = {"base_model.model.model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(4, 128)}
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match="unexpected"):
        asyncio.run(eng.update_weights(LoraUpdate(config=cfg, tensors=bad)))
    assert eng.version == 0


def test_full_update_with_unknown_names_is_refused(tiny_model_dir):
    eng = HFEngine.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="not parameters of this model"):
        asyncio.run(eng.update_weights(FullUpdate(chunks=[[("model.nope.weight", torch.zeros(3))]])))
    assert eng.version == 0


def test_sleep2_after_full_update_demands_new_weights(tiny_model_dir):
    eng = HFEngine.from_pretrained(tiny_model_dir)
    new = perturbed_state(eng._model, seed=1)

    async def scenario():
        await eng.update_weights(FullUpdate(chunks=[new]))
        before = await eng.generate([5, 6], GREEDY)
        await eng.sleep(2)
        await eng.wake()  # reloads the checkpoint, which is older than version 1
        with pytest.raises(FatalEngineError, match="push the current"):
            await eng.generate([5, 6], GREEDY)
        await eng.update_weights(FullUpdate(chunks=[new]))
        after = await eng.generate([5, 6], GREEDY)
        return before, after

    before, after = asyncio.run(scenario())
    assert after.token_ids == before.token_ids and after.policy_version == 2


def test_sleep2_keeps_the_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(1)
    peft_model = get_peft_model(
        load_reference(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    update = LoraUpdate(
        config=peft_model.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(peft_model)
    )
    eng = HFEngine.from_pretrained(tiny_model_dir)

    async def scenario():
        await eng.update_weights(update)
        a = await eng.generate([9, 8, 7], GREEDY)
        await eng.sleep(2)
        assert eng._model.device.type == "meta"  # weights really dropped
        await eng.wake()
        return a, await eng.generate([9, 8, 7], GREEDY)

    a, b = asyncio.run(scenario())
    assert a.token_ids == b.token_ids


def test_requests_wait_while_asleep(tiny_model_dir):
    eng = HFEngine.from_pretrained(tiny_model_dir)

    async def scenario():
        await eng.sleep(1)
        task = asyncio.create_task(eng.generate([5, 6], GREEDY))
        await asyncio.sleep(0.2)
        assert not task.done()  # queued, not failed
        await eng.wake()
        return await task

    assert len(asyncio.run(scenario()).token_ids) >= 1


def test_closed_engine_is_fatal(tiny_model_dir):
    eng = HFEngine.from_pretrained(tiny_model_dir)

    async def scenario():
        await eng.generate([5], GREEDY)
        await eng.close()
        await eng.generate([5], GREEDY)

    with pytest.raises(FatalEngineError, match="closed"):
        asyncio.run(scenario())


class FakeBrokenModelError(RuntimeError):
    pass


def test_a_failing_batch_is_fatal_for_its_requests(tiny_model_dir):
    eng = HFEngine.from_pretrained(tiny_model_dir)

    def broken(*a, **k):
        raise FakeBrokenModelError("simulated device failure")

    eng._prefill = broken  # a test double for a torch failure inside the batch

    async def scenario():
        return await asyncio.gather(*[eng.generate([5, 6], GREEDY) for _ in range(3)], return_exceptions=True)

    errs = asyncio.run(scenario())
    assert all(isinstance(e, FatalEngineError) and "simulated" in str(e) for e in errs)
    assert eng.stats().failed == 3
    with pytest.raises(FatalEngineError, match="failed earlier"):
        asyncio.run(eng.generate([5], GREEDY))


def test_registry_and_build_engine(tiny_model_dir):
    from trustee.config import EngineConfig

    assert set(ENGINES) == {"hf", "vllm", "openai"}
    eng = build_engine(
        EngineConfig(backend="hf", max_num_seqs=4), model_path=str(tiny_model_dir), max_model_len=128
    )
    assert isinstance(eng, HFEngine) and eng.max_batch == 4 and eng.max_model_len == 128
    with pytest.raises(ValueError, match="unknown"):
        build_engine(_FakeCfg(), str(tiny_model_dir))


class _FakeCfg:
    backend = "tgi"


def test_late_requests_join_a_running_batch(engine, reference):
    prompts = [[30 + i, 31, 32 + i] for i in range(6)]

    async def scenario():
        long = asyncio.create_task(engine.generate([5, 6, 7], Sampling(max_tokens=400, temperature=0.0)))
        late = []
        for p in prompts:  # staggered arrivals while the long request decodes
            await asyncio.sleep(0.02)
            late.append(
                asyncio.create_task(engine.generate(p, Sampling(max_tokens=8, temperature=0.7, seed=1)))
            )
        outs = await asyncio.gather(*late)
        long_still_running = not long.done()  # static batching would finish it first
        return long_still_running, await long, outs

    before = engine.stats()
    long_still_running, long, outs = asyncio.run(scenario())
    after = engine.stats()
    assert long_still_running and long.finish_reason == "length"  # greedy: deterministic, no eos
    assert after.max_batch >= 2 and after.batches - before.batches < len(long.token_ids) + 6 * 8
    for p, o in zip(prompts, outs, strict=True):
        ref = teacher_logprobs(reference, p, o.token_ids, 0.7)
        assert (ref - torch.tensor(o.logprobs)).abs().max().item() <= 1e-4
    greedy = asyncio.run(engine.generate(prompts[0], GREEDY))
    assert greedy.token_ids == reference_greedy(reference, prompts[0], 6, {2})


def test_a_group_s_copies_of_one_prompt_are_prefilled_once(engine, reference):
    # A GRPO group sends its opening prompt G times; prefill runs each distinct prompt once and
    # repeats its cache rows, and every copy still samples on its own from the right logits.
    a, b = [40, 41, 42, 43, 44], [50, 51]
    prompts = [a, a, a, a, b, b]

    async def group():
        sampled = [
            engine.generate(p, Sampling(max_tokens=6, temperature=0.9, seed=i)) for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*sampled, engine.generate(a, GREEDY), engine.generate(b, GREEDY))

    rows0 = engine.prefilled_rows
    *outs, greedy_a, greedy_b = asyncio.run(group())
    # one batch prefills 2 rows for 8 requests; a split into two batches prefills at most 4
    assert engine.prefilled_rows - rows0 <= 4
    assert greedy_a.token_ids == reference_greedy(reference, a, 6, {2})
    assert greedy_b.token_ids == reference_greedy(reference, b, 6, {2})
    for p, o in zip(prompts, outs, strict=True):
        ref = teacher_logprobs(reference, p, o.token_ids, 0.9)
        assert (ref - torch.tensor(o.logprobs)).abs().max().item() <= 1e-4
    assert len({tuple(o.token_ids) for o in outs[:4]}) > 1  # the copies sampled apart


def _tiny_arch(arch: str):
    """A random-weight tiny model of another Llama-family type (GQA; Qwen2 has q/k/v biases)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(1)
    shape = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
    )  # fmt: skip
    cfg = LlamaConfig(**shape) if arch == "llama" else Qwen2Config(**shape)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _decode_scenario(eng: HFEngine) -> list:
    """Requests that exercise the decode loop: left padding (different prompt lengths), copies of
    one prompt, rows finishing at different times, late rows joining (max_batch 3), and more
    new tokens than one cache reallocation's room (hf_decode.ROOM). No stop tokens: every
    request runs to its max_tokens."""
    eng.eos_ids = frozenset()
    prompts = [[5, 6, 7], [9] * 11, [5, 6, 7], [30, 31], [12, 13, 14, 15, 16, 17, 18], [40]]
    lengths = [90, 7, 20, 3, 70, 12]

    async def run():
        calls = [
            eng.generate(p, Sampling(max_tokens=n, temperature=0.9, seed=i, stop_token_ids=()))
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        return await asyncio.gather(
            *calls, eng.generate([7, 8, 9, 10], Sampling(max_tokens=80, temperature=0.0))
        )

    return asyncio.run(run())


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_fast_decode_equals_the_model_forward(tiny_model_dir, arch):
    # hf_decode's path (a KV cache with room, decoder layers called directly) must give the same
    # tokens and the same log-probs, bit for bit, as transformers' DynamicCache + model forward.
    from trustee.engines.hf_decode import fast_decode_ok

    outs = []
    for fast in (True, False):
        model = load_reference(tiny_model_dir) if arch == "qwen3" else _tiny_arch(arch)
        eng = HFEngine(model, max_batch=3)
        eng.fast_decode = fast
        assert fast_decode_ok(model)
        outs.append(_decode_scenario(eng))
    fast_outs, slow_outs = outs
    assert [len(o.token_ids) for o in fast_outs][:6] == [90, 7, 20, 3, 70, 12]
    for a, b in zip(fast_outs, slow_outs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs


def test_fast_decode_with_a_lora_adapter_equals_the_model_forward(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from trustee.learn.export import export_lora

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_reference(tiny_model_dir),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    update = export_lora(peft_model)
    outs = []
    for fast in (True, False):
        eng = HFEngine(load_reference(tiny_model_dir), max_batch=3)
        eng.fast_decode = fast
        asyncio.run(eng.update_weights(update))
        outs.append(_decode_scenario(eng))
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    plain = _decode_scenario(HFEngine(load_reference(tiny_model_dir), max_batch=3))
    assert [o.logprobs for o in plain] != [o.logprobs for o in outs[0]]  # the adapter was in use


def test_unseeded_and_seeded_sampling_follow_the_softmax(engine):
    # Free rows draw one uniform from the engine's generator and invert the CDF; seeded rows do
    # the same with their own generator. Both must sample the tempered softmax.
    from trustee.engines.hf import _Request

    loop = asyncio.new_event_loop()
    params = [Sampling(temperature=0.5), Sampling(temperature=0.5, seed=7)]
    reqs = [
        _Request([1], p, frozenset(), 1, loop.create_future(), generator=torch.Generator().manual_seed(7))
        if p.seed is not None
        else _Request([1], p, frozenset(), 1, loop.create_future())
        for p in params * 4
    ]
    logits = torch.tensor([0.0, 0.3, 0.6, -0.4]).repeat(8, 1)  # [8, 4]
    counts = torch.zeros(2, 4)
    for _ in range(1500):
        toks, lps = engine._sample(logits, reqs)
        counts[0] += torch.bincount(toks[0::2], minlength=4)
        counts[1] += torch.bincount(toks[1::2], minlength=4)
    want = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(counts / counts.sum(-1, keepdim=True), want.expand(2, 4), atol=0.02)
    assert torch.allclose(lps, torch.log_softmax(logits / 0.5, -1).gather(1, toks[:, None])[:, 0])
    loop.close()
