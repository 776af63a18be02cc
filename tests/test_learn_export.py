"""Weight export (learn/export.py): learner -> fresh transformers/peft model, and -> HFEngine.

A LoRA policy and a fully fine-tuned policy are each trained for two steps on the tiny model
(large learning rates, so the weights really moved); every export path must then reproduce
the learner's logits (fresh model) or greedy output (HF engine) exactly.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from learn_samples import make_samples

from trustee.config import GrpoConfig, LearnerConfig
from trustee.engines.base import LoraUpdate, Sampling
from trustee.learn.export import export_full, export_lora, export_merged, lora_config_dict
from trustee.learn.learner import Learner
from trustee.learn.policy import wrap_policy
from trustee.types import Group, Trajectory

PROMPTS = [[5, 17, 300, 42, 9], [100, 101, 102], [7, 8, 9, 10, 11, 12, 13]]
MAX_NEW = 10


def groups_from(seed: int) -> list[Group]:
    s = make_samples(4, seed=seed)
    trajs = [
        Trajectory(
            episode_id=str(i),
            task_id="t",
            tokens=x.tokens,
            loss_mask=x.loss_mask,
            logprobs=x.sampler_logprobs,
            versions=[0] * len(x.tokens),
            prompt_len=x.loss_mask.index(1),
        )
        for i, x in enumerate(s)
    ]
    return [Group(task_id="t", trajectories=trajs, advantages=[1.0, -1.0, 0.5, -0.5])]


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def fresh(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _trained(base_model, mode: str, lr: float):
    cfg = LearnerConfig(mode=mode, lr=lr, lora_rank=8, lora_alpha=16, gradient_checkpointing=False)
    policy = wrap_policy(copy.deepcopy(base_model), cfg)
    learner = Learner(policy, GrpoConfig(beta=0.0, is_mode="off"), cfg)
    for seed in (0, 1):
        learner.step(groups_from(seed))
    return policy.model


@pytest.fixture(scope="module")
def lora_model(base_model):
    return _trained(base_model, "lora", 3e-2)


@pytest.fixture(scope="module")
def full_model(base_model):
    return _trained(base_model, "full", 3e-3)


@torch.no_grad()
def logits(model, ids=PROMPTS[0]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]


def test_models_really_moved(base_model, lora_model, full_model):
    assert (logits(lora_model) - logits(base_model)).abs().max() > 1e-3
    assert (logits(full_model) - logits(base_model)).abs().max() > 1e-3


def test_lora_tensors_into_a_fresh_peft_model(tiny_model_dir, lora_model):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    up = export_lora(lora_model)
    assert up.path is None and up.tensors and all(".lora_" in k for k in up.tensors)
    assert up.config["r"] == 8 and isinstance(up.config["target_modules"], list)
    cfg = LoraConfig(**{k: v for k, v in up.config.items() if k not in ("peft_type", "auto_mapping")})
    twin = get_peft_model(fresh(tiny_model_dir), cfg)
    res = set_peft_model_state_dict(twin, up.tensors)
    assert not [k for k in res.unexpected_keys if "lora_" in k]
    assert (logits(twin) - logits(lora_model)).abs().max() <= 1e-5
    # tensors are copies: training on must not change an exported update
    name = next(iter(up.tensors))
    assert all(up.tensors[name].data_ptr() != p.data_ptr() for p in lora_model.parameters())


def test_lora_directory_loads_with_peft(tiny_model_dir, lora_model, tmp_path):
    from peft import PeftModel

    up = export_lora(lora_model, path=tmp_path / "adapter", tensors=False)
    assert up.tensors is None and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    twin = PeftModel.from_pretrained(fresh(tiny_model_dir), up.path)
    assert (logits(twin) - logits(lora_model)).abs().max() <= 1e-5
    assert lora_config_dict(lora_model)["lora_alpha"] == 16


def test_full_export_in_chunks_into_a_fresh_model(tiny_model_dir, full_model):
    up = export_full(full_model, chunk_bytes=200_000)
    chunks = list(up.chunks)
    assert len(chunks) > 3 and all(chunks)
    state = dict(kv for c in chunks for kv in c)
    twin = fresh(tiny_model_dir)
    res = twin.load_state_dict(state, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}  # tied to embed_tokens
    assert (logits(twin) - logits(full_model)).abs().max() <= 1e-5


def test_exports_refuse_the_wrong_policy_kind(lora_model, full_model):
    with pytest.raises(TypeError, match="export_merged"):
        export_full(lora_model)
    with pytest.raises(TypeError, match="export_full"):
        export_merged(full_model)
    with pytest.raises(TypeError, match="no LoRA adapter"):
        export_lora(full_model)


def test_merged_lora_weights_without_touching_the_model(tiny_model_dir, lora_model):
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    state = dict(kv for c in export_merged(lora_model, chunk_bytes=1 << 20).chunks for kv in c)
    assert not any("lora_" in n or "base_layer" in n for n in state)
    twin = fresh(tiny_model_dir)
    res = twin.load_state_dict(state, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}
    assert (logits(twin) - logits(lora_model)).abs().max() <= 1e-5
    after = dict(lora_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


# ---------------------------------------------------------------------------- HF engine


def _engine_greedy(tiny_model_dir, update) -> list[list[int]]:
    from trustee.engines.hf import HFEngine

    async def run():
        eng = HFEngine.from_pretrained(tiny_model_dir, max_batch=8)
        try:
            await eng.update_weights(update)
            assert eng.version == 1
            params = Sampling(max_tokens=MAX_NEW, temperature=0.0)
            outs = await asyncio.gather(*(eng.generate(p, params) for p in PROMPTS))
        finally:
            await eng.close()
        return [o.token_ids for o in outs]

    return asyncio.run(run())


@torch.no_grad()
def _learner_greedy(model) -> list[list[int]]:
    """Greedy decoding with the learner's own model by repeated full forward passes (no cache)."""
    stop = model.generation_config.eos_token_id
    outs = []
    for prompt in PROMPTS:
        out: list[int] = []
        while len(out) < MAX_NEW and (not out or out[-1] != stop):
            out.append(int(model(torch.tensor([prompt + out])).logits[0, -1].argmax()))
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def base_greedy(base_model) -> list[list[int]]:
    return _learner_greedy(base_model)


@pytest.mark.parametrize("route", ["lora_tensors", "lora_dir", "full", "merged"])
def test_export_to_hf_engine_matches_learner_greedy(
    tiny_model_dir, base_greedy, lora_model, full_model, route, tmp_path
):
    if route == "lora_tensors":
        model, update = lora_model, export_lora(lora_model)
    elif route == "lora_dir":
        model, update = lora_model, export_lora(lora_model, path=tmp_path / "a", tensors=False)
        assert isinstance(update, LoraUpdate) and update.tensors is None
    elif route == "full":
        model, update = full_model, export_full(full_model, chunk_bytes=1 << 20)
    else:
        model, update = lora_model, export_merged(lora_model, chunk_bytes=1 << 20)
    want = _learner_greedy(model)
    got = _engine_greedy(tiny_model_dir, update)
    assert got == want
    assert want != base_greedy  # the update changed what the engine says
