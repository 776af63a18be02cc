"""Policy modes and optimiser steps on the tiny model (learn/policy.py, learn/learner.py)."""

from __future__ import annotations

import copy
import math

import anyio
import pytest
import torch
from learn_samples import make_groups, make_samples

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn.learner import Learner, lr_lambda, samples_from_groups
from trustee.learn.logprobs import token_logprobs
from trustee.learn.packing import build_packed
from trustee.learn.policy import check_reference_fits, load_policy, module_bytes, wrap_policy
from trustee.types import Group


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def fixed_groups(seed: int = 0) -> list[Group]:
    """Two groups of two; in each, one sequence has advantage +1 and the other -1."""
    return make_groups(seed, n=4, vocab=1000)


def seq_mean_logps(model, groups) -> list[float]:
    """Mean log-prob of the loss tokens of each trajectory, in order."""
    samples = samples_from_groups(groups)
    mb = build_packed(samples, list(range(len(samples))))
    with torch.no_grad():
        lp, _ = token_logprobs(model, mb)
    return [float(lp[mb.seq == k].mean()) for k in range(len(samples))]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_step_moves_only_adapters_in_the_advantage_direction(base_model):
    cfg = LearnerConfig(mode="lora", lr=5e-3, lora_rank=8, lora_alpha=16, gradient_checkpointing=True)
    policy = wrap_policy(copy.deepcopy(base_model), cfg)
    learner = Learner(policy, GrpoConfig(beta=0.0, is_mode="off"), cfg)
    groups = fixed_groups()
    before_lp = seq_mean_logps(policy.model, groups)
    before = snapshot(policy.model)
    for _ in range(3):
        m = learner.step(groups)
    after = snapshot(policy.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    after_lp = seq_mean_logps(policy.model, groups)
    for k, adv in enumerate([1.0, -1.0, 1.0, -1.0]):
        assert (after_lp[k] - before_lp[k]) * adv > 0, (k, before_lp[k], after_lp[k])
    assert (
        m.step == 3
        and m.grad_norm > 0
        and m.loss_tokens == sum(sum(t.loss_mask) for g in groups for t in g.trajectories)
    )
    assert 0 < m.entropy <= math.log(base_model.config.vocab_size) + 1e-3


def test_full_step_changes_base_parameters(base_model):
    cfg = LearnerConfig(mode="full", lr=1e-3, gradient_checkpointing=False)
    policy = wrap_policy(copy.deepcopy(base_model), cfg, need_reference=True, available_bytes=2**40)
    learner = Learner(policy, GrpoConfig(beta=0.01), cfg)
    before = snapshot(policy.model)
    m = learner.step(fixed_groups(1))
    after = snapshot(policy.model)
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    # the frozen reference did not move, so the KL of the next step is positive
    ref = dict(policy.ref_model.named_parameters())
    assert torch.equal(
        ref["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert m.kl == pytest.approx(0.0, abs=1e-6)  # first step: policy == reference
    m2 = learner.step(fixed_groups(1))
    assert m2.kl > 0


def test_lora_reference_is_the_base_without_adapter(base_model):
    cfg = LearnerConfig(mode="lora", lr=1e-2, gradient_checkpointing=False)
    policy = wrap_policy(copy.deepcopy(base_model), cfg)
    Learner(policy, GrpoConfig(beta=0.0, is_mode="off"), cfg).step(fixed_groups(2))
    mb = build_packed(make_samples(2, seed=9), [0, 1])
    with torch.no_grad():
        trained, _ = token_logprobs(policy.model, mb)
        with policy.reference() as ref:
            ref_lp, _ = token_logprobs(ref, mb)
        base_lp, _ = token_logprobs(base_model, mb)
    assert (ref_lp - base_lp).abs().max() <= 1e-5
    assert (trained - base_lp).abs().max() > 1e-4  # the adapter is back on after the context


def test_full_reference_refused_when_it_cannot_fit(base_model):
    need = module_bytes(base_model)
    with pytest.raises(MemoryError, match="grpo.beta = 0"):
        check_reference_fits(base_model, available=need)
    check_reference_fits(base_model, available=4 * need)
    with pytest.raises(MemoryError, match="GiB"):
        wrap_policy(
            copy.deepcopy(base_model), LearnerConfig(mode="full"), need_reference=True, available_bytes=need
        )


def test_full_with_beta_needs_reference(base_model):
    cfg = LearnerConfig(mode="full")
    with pytest.raises(ValueError, match="need_reference"):
        Learner(wrap_policy(copy.deepcopy(base_model), cfg), GrpoConfig(beta=0.1), cfg)


def test_qlora_on_cpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="needs CUDA"):
        load_policy(tiny_model_dir, LearnerConfig(mode="qlora"), device="cpu")


def test_load_policy_lora_from_directory(tiny_model_dir):
    policy = load_policy(
        tiny_model_dir, LearnerConfig(mode="lora", lora_rank=4, lora_targets=["q_proj", "v_proj"])
    )
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)


def test_group_without_advantages_is_rejected(base_model):
    g = fixed_groups()[0]
    g.advantages = []
    with pytest.raises(ValueError, match="compute_advantages"):
        samples_from_groups([g])


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(LearnerConfig(warmup_steps=3, schedule="cosine", min_lr_ratio=0.1), total_steps=13)
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the 10 cosine steps
    assert f(13) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    g = lr_lambda(LearnerConfig(warmup_steps=0, schedule="constant"), total_steps=5)
    assert g(0) == g(100) == 1.0


def test_step_async_runs_in_a_worker_thread_while_the_loop_runs(base_model):
    cfg = LearnerConfig(mode="lora", lr=1e-3, gradient_checkpointing=False)
    learner = Learner(wrap_policy(copy.deepcopy(base_model), cfg), GrpoConfig(beta=0.0), cfg)
    ticks = 0

    async def ticker(done: anyio.Event):
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.sleep(0.001)

    async def main():
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker, done)
            m = await learner.step_async(fixed_groups(3))
            done.set()
        return m

    m = anyio.run(main)
    assert m.step == 1 and ticks > 1  # the loop kept running during the step


def test_build_learner_wires_the_config(tiny_model_dir):
    from trustee.learn.learner import build_learner

    learner = build_learner(
        str(tiny_model_dir), GrpoConfig(beta=0.01, steps=7), LearnerConfig(mode="full"), temperature=0.7
    )
    assert learner.policy.mode == "full" and learner.policy.ref_model is not None
    assert learner.temperature == 0.7
    assert all(not p.requires_grad for p in learner.policy.ref_model.parameters())


@pytest.mark.gpu
def test_qlora_step_and_merged_export_on_cuda(tiny_model_dir):
    """QLoRA: NF4 base + LoRA trains on CUDA; the merged export (dequantised W + delta)
    reproduces the adapter model's logits up to bf16 rounding, without modifying it."""
    from trustee.learn.export import export_merged

    cfg = LearnerConfig(mode="qlora", lr=1e-2, lora_rank=8, lora_alpha=16)
    policy = load_policy(tiny_model_dir, cfg, device="cuda:0", dtype=torch.bfloat16)
    learner = Learner(policy, GrpoConfig(beta=0.01, is_mode="truncate"), cfg)
    m = learner.step(fixed_groups())
    assert m.grad_norm > 0 and m.peak_mem_bytes > 0
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    state = dict(kv for c in export_merged(policy.model, dtype=torch.bfloat16).chunks for kv in c)
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).to("cuda:0").eval()
    res = twin.load_state_dict(state, strict=False)
    assert res.unexpected_keys == [] and set(res.missing_keys) <= {"lm_head.weight"}
    ids = torch.tensor([[5, 17, 300, 42, 9]], device="cuda:0")
    with torch.no_grad():
        a = twin(ids).logits.float()
        b = policy.model(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
