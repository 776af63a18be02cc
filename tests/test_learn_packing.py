"""Packing, chunked log-probs and exact gradient accumulation (learn/packing.py, logprobs.py, learner.py).

All on the tiny random Qwen3 model in fp32 with SDPA: transformers builds the block-diagonal
mask from restarting position_ids, so a packed row must give the same log-probs as one row
per sequence, and the step gradient must not depend on how the batch was split.
"""

from __future__ import annotations

import copy

import pytest
import torch
from learn_samples import make_samples

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn.learner import Learner
from trustee.learn.logprobs import split_causal_lm, token_logprobs
from trustee.learn.packing import Sample, build_packed, build_padded, check_sample, plan_bins, segment_kwargs
from trustee.learn.policy import wrap_policy


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_plan_bins_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2, 12, 4]
    bins = plan_bins(lengths, budget=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 10 or len(b) == 1
    assert [5] in bins  # the 12-token sequence is alone (over budget)
    # FFD, decreasing 12, 9, 7, 5, 4, 3, 2: 12 alone; 9 (room 1); 7 (room 3); 5 (room 5);
    # 4 joins 5 (room 1); 3 joins 7 (room 0); 2 fits nowhere -> a new bin.
    assert bins == [[5], [1], [3, 2], [0, 6], [4]]


def test_segment_kwargs_are_cumulative_lengths():
    kw = segment_kwargs([3, 5, 2])
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 8, 10] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 5


def test_check_sample_rejects_bad_masks():
    with pytest.raises(ValueError, match="first token has no predictor"):
        check_sample(Sample(tokens=[1, 2], loss_mask=[1, 1], sampler_logprobs=[0.0, 0.0], advantage=1.0), 0)
    with pytest.raises(ValueError, match="no loss tokens"):
        check_sample(Sample(tokens=[1, 2], loss_mask=[0, 0], sampler_logprobs=[0.0, 0.0], advantage=1.0), 3)


def test_packed_equals_unpacked_logprobs(base_model):
    samples = make_samples(6, seed=1)
    ids = list(range(len(samples)))
    with torch.no_grad():
        packed, ent_p = token_logprobs(base_model, build_packed(samples, ids), temperature=0.8)
        padded, ent_u = token_logprobs(base_model, build_padded(samples, ids), temperature=0.8)
        alone = torch.cat(
            [token_logprobs(base_model, build_packed([s], [0]), temperature=0.8)[0] for s in samples]
        )
    assert packed.shape[0] == sum(s.n_loss for s in samples)
    assert (packed - padded).abs().max() <= 1e-5
    assert (packed - alone).abs().max() <= 1e-5
    assert (ent_p - ent_u).abs().max() <= 1e-5


def test_logprobs_match_full_softmax_and_temperature(base_model):
    s = make_samples(1, seed=2)[0]
    with torch.no_grad():
        lp, _ = token_logprobs(base_model, build_packed([s], [0]), temperature=0.5, chunk=3)
        logits = base_model(input_ids=torch.tensor([s.tokens])).logits[0]  # [T, V]
        ref = torch.log_softmax(logits[:-1] / 0.5, -1).gather(-1, torch.tensor(s.tokens[1:])[:, None])[:, 0]
    want = ref[[i - 1 for i, m in enumerate(s.loss_mask) if m]]
    assert (lp - want).abs().max() <= 1e-5


def test_lm_head_sees_only_loss_rows_in_chunks(base_model):
    samples = make_samples(3, seed=3)
    _, head = split_causal_lm(base_model)
    rows: list[int] = []
    hook = head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            token_logprobs(base_model, build_packed(samples, [0, 1, 2]), chunk=4)
    finally:
        hook.remove()
    assert max(rows) <= 4
    assert sum(rows) == sum(s.n_loss for s in samples) < sum(len(s.tokens) for s in samples)


def test_chunked_checkpointed_gradient_equals_single_chunk(base_model):
    model = copy.deepcopy(base_model)
    samples = make_samples(3, seed=4)
    grads = []
    for chunk in (5, 100_000):
        model.zero_grad()
        lp, _ = token_logprobs(model, build_packed(samples, [0, 1, 2]), chunk=chunk)
        (lp * torch.linspace(-1, 1, lp.shape[0])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) <= 1e-5


def _step_grad(model, loss_type: str, budget: int, samples, layout="packed"):
    grpo = GrpoConfig(
        loss_type=loss_type, beta=0.05, is_level="sequence", is_mode="truncate", dr_grpo_length=64
    )
    cfg = LearnerConfig(
        mode="full", micro_batch_tokens=budget, gradient_checkpointing=False, logprob_chunk=16
    )
    learner = Learner(wrap_policy(model, cfg, need_reference=True), grpo, cfg, temperature=0.9, layout=layout)
    loss, parts, mbs = learner.accumulate(samples)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss, grad, len(mbs), parts


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_accumulated_gradient_equals_one_big_batch(base_model, loss_type):
    samples = make_samples(8, seed=5)
    loss_1, g_1, n_1, parts_1 = _step_grad(copy.deepcopy(base_model), loss_type, 10_000, samples)
    loss_k, g_k, n_k, parts_k = _step_grad(copy.deepcopy(base_model), loss_type, 40, samples)
    assert n_1 == 1 and n_k >= 3
    assert loss_k == pytest.approx(loss_1, rel=1e-5)
    assert float((g_k - g_1).norm() / g_1.norm()) <= 1e-5
    assert parts_k.tokens == parts_1.tokens and parts_k.kl_sum == pytest.approx(
        parts_1.kl_sum, rel=1e-4, abs=1e-7
    )


def test_padded_layout_gives_the_same_gradient(base_model):
    samples = make_samples(5, seed=6)
    _, g_packed, _, _ = _step_grad(copy.deepcopy(base_model), "grpo", 60, samples)
    _, g_padded, _, _ = _step_grad(copy.deepcopy(base_model), "grpo", 60, samples, layout="padded")
    assert float((g_packed - g_padded).norm() / g_packed.norm()) <= 1e-5


def test_benchmarks_trl_style_layout_pads_to_the_batch_and_gives_the_same_gradient(base_model):
    """bench/learner.py's baseline as TRL lays a batch out: every row as wide as the batch's
    longest sequence, budget // longest rows per micro-batch; the gradient is the packed one."""
    from bench.learner import DEFAULT_BUDGET, trl_padded_learner

    assert DEFAULT_BUDGET == LearnerConfig().micro_batch_tokens
    samples = make_samples(5, seed=6)
    longest = max(len(s.tokens) for s in samples)
    _, g_packed, _, _ = _step_grad(copy.deepcopy(base_model), "grpo", 2 * longest, samples)
    model = copy.deepcopy(base_model)
    grpo = GrpoConfig(loss_type="grpo", beta=0.05, is_level="sequence", is_mode="truncate", dr_grpo_length=64)
    cfg = LearnerConfig(
        mode="full", micro_batch_tokens=2 * longest, gradient_checkpointing=False, logprob_chunk=16
    )
    learner = trl_padded_learner(wrap_policy(model, cfg, need_reference=True), grpo, cfg, temperature=0.9)
    mbs = learner.micro_batches(samples)
    assert [tuple(mb.input_ids.shape) for mb in mbs] == [(2, longest), (2, longest), (1, longest)]
    learner.accumulate(samples)
    g_trl = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert float((g_packed - g_trl).norm() / g_packed.norm()) <= 1e-5


def test_dapo_uses_the_global_token_count_across_ranks(base_model):
    # A scripted all-reduce: the other rank holds twice this rank's loss tokens (3n in all).
    # dapo's weight is world_size / global = 2 / 3n, bnpo's is 1 / n: gradients differ by 2/3.
    samples = make_samples(4, seed=7)
    grads = {}
    for name, kw in {"bnpo": {}, "dapo": {"world_size": 2, "sum_over_ranks": lambda n: 3 * n}}.items():
        model = copy.deepcopy(base_model)
        cfg = LearnerConfig(mode="full", gradient_checkpointing=False)
        learner = Learner(wrap_policy(model, cfg), GrpoConfig(loss_type=name, beta=0.0), cfg, **kw)
        learner.accumulate(samples)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert float((grads["dapo"] - grads["bnpo"] * 2 / 3).norm() / grads["dapo"].norm()) <= 1e-5


def test_packed_attention_stays_within_sequences(tiny_model_dir, monkeypatch):
    """A packed micro-batch runs SDPA per sequence: no call sees more keys than the longest
    sequence, and the model is switched to segment attention (padded batches keep SDPA's mask)."""
    from transformers import AutoModelForCausalLM

    from trustee.learn.attention import SEGMENT_ATTENTION

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    samples = make_samples(5, seed=3)
    longest = max(len(s.tokens) for s in samples)
    seen: list[tuple[int, int]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):  # records (query length, key length) of every SDPA call
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = list(range(len(samples)))
    with torch.no_grad():
        token_logprobs(model, build_packed(samples, ids))
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    assert seen and max(k for _, k in seen) == longest
    assert len(seen) == len(samples) * model.config.num_hidden_layers
    seen.clear()
    with torch.no_grad():
        token_logprobs(model, build_padded(samples, ids))
    assert seen and all(k == longest for _, k in seen)  # padded rows: one call per layer, full rows


def test_packed_gradients_equal_padded(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    samples = make_samples(4, seed=5)
    ids = list(range(len(samples)))
    grads = []
    for build in (build_packed, build_padded):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        logp, _ = token_logprobs(
            model, build(samples, ids) if build is build_packed else build(samples, ids, pad_id=0)
        )
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * max(1.0, grads[1].abs().max().item())


def test_cpu_attention_repeats_kv_heads_instead_of_enable_gqa(tiny_model_dir, monkeypatch):
    """On CPU, SDPA with enable_gqa=True runs the math kernel (several times slower): the
    learner's attention repeats key/value heads instead, packed and padded alike, and gives
    transformers' own SDPA results."""
    from transformers import AutoModelForCausalLM

    samples = make_samples(3, seed=7)
    ids = list(range(len(samples)))
    ref_model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    cfg = ref_model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the tiny model has grouped-query attention
    with torch.no_grad():  # transformers' SDPA path, before any switch: the reference values
        ref = [token_logprobs(ref_model, build_padded(samples, ids))[0]]
        ref += [token_logprobs(ref_model, build_padded([s], [0]))[0] for s in samples]
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    calls: list[tuple[int, int, bool]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):  # records (query heads, key heads, enable_gqa) of every call
        calls.append((q.shape[1], k.shape[1], bool(kw.get("enable_gqa", False))))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        got = [token_logprobs(model, build_padded(samples, ids))[0]]  # masked rows
        got += [token_logprobs(model, build_padded([s], [0]))[0] for s in samples]  # no mask: causal
        packed = token_logprobs(model, build_packed(samples, ids))[0]
    assert calls and all(h == kh and not gqa for h, kh, gqa in calls)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, ref[0], rtol=1e-5, atol=1e-5)
