"""Shared-prefix packing (learn/packing.py plan_shared/build_shared, learn/attention.py).

The claim under test: feeding a GRPO group's common prompt once changes nothing the learner
computes. Every check compares the shared layout with the same samples packed whole (the
layout whose equality with one row per sequence tests/test_learn_packing.py shows) on the
tiny random Qwen3 in float32: the step loss, every per-token log-prob (the boundary token
included) and every parameter gradient, within 1e-5. Episodes are token-exact renderings of
the toy, simulated and BFCL environments (bench/trajectories.py), regrouped so that G episodes
share a prompt and continue differently, with their tool results (multi-turn) or cut after
the first sampled turn. Also: the planner's invariants over random group shapes (hypothesis),
both CPU kernels, the run-time check falling back when the shared path is broken on purpose,
and the learn/shared_prefix_frac metric.
"""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustee.config import GrpoConfig, LearnerConfig
from trustee.learn import attention
from trustee.learn.learner import Learner
from trustee.learn.logprobs import token_logprobs
from trustee.learn.packing import Sample, build_packed, build_shared, plan_shared, prompt_len
from trustee.learn.policy import wrap_policy

TOL = 1e-5


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def episodes(tiny_tokenizer):
    """Rendered episodes per environment: (ids, loss_mask) of whole conversations."""
    from bench.trajectories import realistic_samples

    out = {}
    for src, n in (("toy", 8), ("simulated", 4), ("bfcl", 2)):
        got, _ = realistic_samples(tiny_tokenizer, n, 8192, seed=1, sources=(src,))
        assert got, src
        out[src] = got
    return out


def grouped(
    eps, G: int, *, multi_turn: bool, groups: int = 1, cont: int = 160, seed: int = 0
) -> list[Sample]:
    """`groups` GRPO groups of G samples: group g's prompt is episode g's, member j continues
    with episode (g + j)'s sampled turns and tool results (multi_turn) or its first sampled
    turn only, cut at `cont` tokens; advantages and sampler log-probs at random."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        ids, mask = eps[g % len(eps)]
        prompt = ids[: mask.index(1)]
        for j in range(G):
            e_ids, e_mask = eps[(g + j) % len(eps)]
            p = e_mask.index(1)
            c_ids, c_mask = e_ids[p : p + cont], e_mask[p : p + cont]
            if not multi_turn:
                end = c_mask.index(0) if 0 in c_mask else len(c_mask)
                c_ids, c_mask = c_ids[:end], c_mask[:end]
            m = [0] * len(prompt) + c_mask
            out.append(
                Sample(
                    tokens=prompt + c_ids,
                    loss_mask=m,
                    sampler_logprobs=[rng.uniform(-3.0, -0.5) if x else 0.0 for x in m],
                    advantage=rng.gauss(0.0, 1.0),
                )
            )
    return out


def learner_for(model, mode: str, share: str, budget: int = 16384) -> Learner:
    cfg = LearnerConfig(
        mode=mode,
        lr=1e-3,
        micro_batch_tokens=budget,
        gradient_checkpointing=False,
        logprob_chunk=64,
        lora_rank=4,
        lora_alpha=8.0,
        share_prefix=share,
    )
    grpo = GrpoConfig(loss_type="grpo", beta=0.04, is_level="sequence", is_mode="truncate")
    return Learner(wrap_policy(model, cfg, need_reference=mode == "full"), grpo, cfg, temperature=0.9)


def grads(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}


def assert_same_step(samples: list[Sample], model, mode: str, budget: int = 16384) -> Learner:
    """Loss, metrics parts and every gradient of one accumulation: shared == packed whole."""
    torch.manual_seed(0)
    whole = learner_for(copy.deepcopy(model), mode, "off", budget)
    torch.manual_seed(0)
    shared = learner_for(copy.deepcopy(model), mode, "on", budget)
    loss_w, parts_w, mbs_w = whole.accumulate(samples)
    loss_s, parts_s, mbs_s = shared.accumulate(samples)
    assert any(mb.layout is not None for mb in mbs_s), "nothing was shared"
    assert sum(mb.n_input_tokens for mb in mbs_s) < sum(mb.n_input_tokens for mb in mbs_w)
    assert loss_s == pytest.approx(loss_w, rel=TOL, abs=TOL)
    assert parts_s.tokens == parts_w.tokens and parts_s.clipped == parts_w.clipped
    assert parts_s.kl_sum == pytest.approx(parts_w.kl_sum, rel=1e-4, abs=1e-7)
    assert parts_s.entropy_sum == pytest.approx(parts_w.entropy_sum, rel=TOL)
    gw, gs = grads(whole), grads(shared)
    assert list(gw) == list(gs) and gw
    for name, w in gw.items():
        err = float((gs[name] - w).abs().max())
        assert err <= TOL * max(1.0, float(w.abs().max())), f"{mode} {name}: {err:.2e}"
    return shared


# ----------------------------------------------------------------------------- the planner


def test_a_groups_prompt_is_fed_once_and_positions_continue_from_it():
    prompt = list(range(100, 120))  # 20 tokens, above MIN_SHARED_PREFIX
    a = Sample(
        tokens=prompt + [1, 2, 3], loss_mask=[0] * 20 + [1, 1, 0], sampler_logprobs=[0.0] * 23, advantage=1.0
    )
    b = Sample(
        tokens=prompt + [4, 5], loss_mask=[0] * 20 + [1, 1], sampler_logprobs=[0.0] * 22, advantage=-1.0
    )
    lone = Sample(tokens=[7] * 10, loss_mask=[0] * 9 + [1], sampler_logprobs=[0.0] * 10, advantage=0.5)
    samples = [a, lone, b]
    (units,) = plan_shared(samples, budget=1000)
    mb = build_shared(samples, units)
    assert mb.sample_ids == [0, 2, 1]  # the group's unit (bigger) first, then the lone sequence
    assert mb.input_ids[0].tolist() == prompt + [1, 2, 3] + [4, 5] + [7] * 10
    assert mb.position_ids[0].tolist() == list(range(23)) + [20, 21] + list(range(10))
    assert mb.shared_tokens == 20 and mb.n_input_tokens == 23 + 22 + 10 - 20
    assert mb.layout.units == ((0, 20, (3, 2)), (25, 10, ()))
    # the boundary tokens (position 20 of a and of b) are predicted by the prefix's last row
    assert mb.src.tolist() == [19, 20, 19, 23, 25 + 8]
    assert mb.targets.tolist() == [1, 2, 4, 5, 7]


def test_the_prefix_stops_before_the_first_trained_token_of_any_member():
    shared = list(range(50, 90))  # 40 common tokens, but b trains from its 25th token on
    a = Sample(tokens=shared + [1], loss_mask=[0] * 40 + [1], sampler_logprobs=[0.0] * 41, advantage=1.0)
    b = Sample(tokens=shared + [2], loss_mask=[0] * 24 + [1] * 17, sampler_logprobs=[0.0] * 41, advantage=1.0)
    (units,) = plan_shared([a, b], budget=1000)
    assert [u.prefix for u in units] == [24]
    mb = build_shared([a, b], units)
    assert mb.input_ids.shape[1] == 41 + 41 - 24


def test_a_group_larger_than_the_budget_is_cut_with_a_prefix_copy_in_each_part():
    prompt = list(range(200, 230))  # 30
    samples = [
        Sample(
            tokens=prompt + [1] * n,
            loss_mask=[0] * 30 + [1] * n,
            sampler_logprobs=[0.0] * (30 + n),
            advantage=1.0,
        )
        for n in (20, 20, 20, 20, 5)
    ]
    bins = plan_shared(samples, budget=75)
    units = [u for b in bins for u in b]
    assert sorted(i for u in units for i in u.members) == list(range(5))
    assert all(u.size <= 75 for u in units)
    assert all(u.prefix == 30 for u in units if len(u.members) > 1)
    assert sum(sum(u.size for u in b) <= 75 for b in bins) == len(bins)


def _rows_of(mb, samples):
    """Each sample's row index per position, from the layout alone (what attention reads)."""
    rows = {}
    k = 0
    for start, p, branches in mb.layout.units:
        if not branches:
            rows[mb.sample_ids[k]] = list(range(start, start + p))
            k += 1
            continue
        at = start + p
        for s in branches:
            rows[mb.sample_ids[k]] = list(range(start, start + p)) + list(range(at, at + s))
            at += s
            k += 1
    return rows


@st.composite
def group_shapes(draw):
    """Random groups: prompt length (0 = every member its own prompt), group size, masks."""
    rng = random.Random(draw(st.integers(0, 10**6)))
    samples = []
    for _ in range(draw(st.integers(1, 4))):
        p = draw(st.sampled_from([0, 3, 16, 17, 40]))
        prompt = [rng.randrange(5, 60) for _ in range(p)]
        for _ in range(draw(st.integers(1, 6))):
            head = prompt if p else [rng.randrange(5, 60) for _ in range(rng.randint(1, 30))]
            mask = [0] * len(head) + [0] * rng.randint(0, 3)
            for _ in range(rng.randint(1, 3)):
                mask += [1] * rng.randint(1, 8) + [0] * rng.randint(0, 6)
            toks = head + [rng.randrange(5, 60) for _ in mask[len(head) :]]
            samples.append(
                Sample(tokens=toks, loss_mask=mask, sampler_logprobs=[0.0] * len(mask), advantage=1.0)
            )
    rng.shuffle(samples)
    return samples, draw(st.sampled_from([24, 40, 64, 200, 10_000]))


@settings(max_examples=150, deadline=None)
@given(group_shapes())
def test_shared_layout_invariants_over_random_group_shapes(shape):
    samples, budget = shape
    bins = plan_shared(samples, budget)
    seen = sorted(i for b in bins for u in b for i in u.members)
    assert seen == list(range(len(samples)))
    for b in bins:
        assert sum(u.size for u in b) <= budget or len(b) == 1
        mb = build_shared(samples, b)
        assert mb.n_input_tokens == sum(u.size for u in b)
        assert mb.shared_tokens == sum(len(samples[i].tokens) for i in mb.sample_ids) - mb.n_input_tokens
        for u in b:
            assert u.prefix <= min(prompt_len(samples[i]) for i in u.members)
        if mb.layout is None:
            assert all(u.prefix == 0 for u in b)
            continue
        ids, pos = mb.input_ids[0].tolist(), mb.position_ids[0].tolist()
        rows = _rows_of(mb, samples)
        src = mb.src.tolist()
        k = 0
        for i in mb.sample_ids:  # every sample reads back whole, at its own positions
            s = samples[i]
            assert [ids[r] for r in rows[i]] == s.tokens
            assert [pos[r] for r in rows[i]] == list(range(len(s.tokens)))
            for t in (t for t, m in enumerate(s.loss_mask) if m):
                assert src[k] == rows[i][t - 1] and mb.targets[k] == s.tokens[t]
                k += 1
        assert k == len(src)


@settings(max_examples=5, deadline=None)
@given(group_shapes())
def test_shared_logprobs_equal_packed_over_random_group_shapes(base_model, shape):
    samples, budget = shape
    with torch.no_grad():
        for units in plan_shared(samples, budget):
            mb = build_shared(samples, units)
            whole = build_packed([samples[i] for i in mb.sample_ids], mb.sample_ids)
            a, _ = token_logprobs(base_model, mb, temperature=0.7)
            b, _ = token_logprobs(base_model, whole, temperature=0.7)
            assert float((a - b).abs().max()) <= TOL


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kernel", ["cpu-merge", "sdpa-gather"])
def test_both_cpu_kernels_give_the_packed_logprobs_and_gradients(base_model, episodes, kernel):
    samples = grouped(episodes["toy"], 4, multi_turn=True, groups=2, cont=60)
    (units, *rest) = plan_shared(samples, 16384)
    assert not rest
    models = [copy.deepcopy(base_model) for _ in range(2)]
    mb = build_shared(samples, units, kernel=kernel)
    whole = build_packed([samples[i] for i in mb.sample_ids], mb.sample_ids)
    a, ent_a = token_logprobs(models[0], mb, temperature=0.9)
    b, ent_b = token_logprobs(models[1], whole, temperature=0.9)
    assert float((a - b).detach().abs().max()) <= TOL and float((ent_a - ent_b).abs().max()) <= TOL
    # the boundary tokens: each member's first loss token sits right after the prompt here
    first = [0] + torch.cumsum(torch.tensor([samples[i].n_loss for i in mb.sample_ids]), 0).tolist()[:-1]
    for f, i in zip(first, mb.sample_ids, strict=True):
        assert int(mb.position_ids[0, mb.src[f]]) == prompt_len(samples[i]) - 1
    w = torch.linspace(-1.0, 1.0, a.shape[0])
    (a * w).sum().backward()
    (b * w).sum().backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert float((p.grad - q.grad).abs().max()) <= TOL * max(1.0, float(q.grad.abs().max())), name


def test_the_last_layer_skips_the_prefix_rows_no_loss_token_reads(base_model, episodes):
    """cpu-merge in the model's last layer: a prefix's rows before its last stay zero (nothing
    after the last layer reads them); every earlier layer computes them. The log-probs and
    gradients this leaves exact are checked by the tests above and below."""
    samples = grouped(episodes["toy"], 4, multi_turn=False, groups=1, cont=24)
    (units,) = plan_shared(samples, 16384)
    mb = build_shared(samples, units, kernel="cpu-merge")
    start, p, branches = mb.layout.units[0]
    assert branches and p > 1
    got = {}
    layers = base_model.model.layers
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: got.__setitem__(i, out[0]))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            token_logprobs(base_model, mb)
    finally:
        for h in hooks:
            h.remove()
    last, first = got[len(layers) - 1][0], got[0][0]  # [T, hidden]
    assert float(last[start : start + p - 1].abs().max()) == 0.0
    assert (
        float(last[start + p - 1].abs().max()) > 0.0
        and float(last[start + p :].abs().min(-1).values.max()) > 0
    )
    assert float(first[start : start + p - 1].abs().amax(-1).min()) > 0.0


CASES = [  # (source, G, multi-turn, mode): G = 2, 4, 8, each source, both modes, with and without tool results
    ("toy", 8, True, "full"),
    ("simulated", 4, True, "lora"),
    ("bfcl", 2, True, "lora"),
    ("toy", 2, False, "lora"),
    ("simulated", 8, False, "full"),
]
SLOW_CASES = [
    ("toy", 8, True, "lora"),
    ("simulated", 4, True, "full"),
    ("bfcl", 2, True, "full"),
    ("bfcl", 4, False, "lora"),
    ("toy", 4, False, "full"),
]


def _case(source, G, multi_turn, mode, base_model, episodes):
    samples = grouped(episodes[source], G, multi_turn=multi_turn, groups=2 if G < 8 else 1, cont=80)
    if source == "bfcl":  # BFCL prompts run to thousands of tokens: the first 1,500 keep the shape
        samples = [_cut_prompt(s, 1500) for s in samples]
    if multi_turn:
        assert any(0 in s.loss_mask[prompt_len(s) :] for s in samples), "no tool result in the continuations"
    assert_same_step(samples, base_model, mode)


@pytest.mark.parametrize(("source", "G", "multi_turn", "mode"), CASES)
def test_shared_step_equals_the_unshared_step(base_model, episodes, source, G, multi_turn, mode):
    _case(source, G, multi_turn, mode, base_model, episodes)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "G", "multi_turn", "mode"), SLOW_CASES)
def test_shared_step_equals_the_unshared_step_more_shapes(base_model, episodes, source, G, multi_turn, mode):
    _case(source, G, multi_turn, mode, base_model, episodes)


def _cut_prompt(s: Sample, keep: int) -> Sample:
    """The sample with its prompt cut to its first `keep` tokens (same continuation)."""
    p = prompt_len(s)
    if p <= keep:
        return s
    return Sample(
        tokens=s.tokens[:keep] + s.tokens[p:],
        loss_mask=s.loss_mask[:keep] + s.loss_mask[p:],
        sampler_logprobs=s.sampler_logprobs[:keep] + s.sampler_logprobs[p:],
        advantage=s.advantage,
    )


def test_a_group_cut_over_several_micro_batches_gives_the_same_step(base_model, episodes):
    samples = grouped(episodes["toy"], 4, multi_turn=True, groups=1, cont=60)
    p = prompt_len(samples[0])
    budget = p + 130  # a few branches per unit, the prefix copied into each
    learner = assert_same_step(samples, base_model, "lora", budget=budget)
    mbs = learner.plan(samples)
    assert len(mbs) >= 2 and all(mb.layout is not None for mb in mbs)


# ----------------------------------------------------------------------------- run time


def test_step_reports_the_shared_share_and_auto_keeps_a_correct_shared_path(base_model, episodes):
    samples = grouped(episodes["toy"], 4, multi_turn=True, groups=2, cont=60)
    learner = learner_for(copy.deepcopy(base_model), "lora", "auto")
    m = learner._step(samples)
    real = sum(len(s.tokens) for s in samples)
    once = real - sum(prompt_len(s) for s in samples) + sum(prompt_len(samples[g * 4]) for g in range(2))
    assert m.tokens == real and m.input_tokens == once  # each group's prompt fed once
    assert m.shared_prefix_frac == pytest.approx((real - once) / real) and m.shared_prefix_frac > 0.5
    assert m.shared_prefix_fallback == 0 and learner.share_prefix == "auto" and learner._verified
    off = learner_for(copy.deepcopy(base_model), "lora", "off")._step(samples)
    assert off.shared_prefix_frac == 0.0 and off.input_tokens == real


def test_share_prefix_auto_falls_back_when_the_shared_path_is_wrong(
    base_model, episodes, monkeypatch, caplog
):
    """The shared kernel broken on purpose (branches no longer see their prefix): 'auto' finds
    the mismatch on the first micro-batch, warns, reports it, and trains the unshared layout."""
    samples = grouped(episodes["toy"], 4, multi_turn=True, groups=1, cont=60)

    def own_tokens_only(layout, query, key, value, scaling, **_):  # prefix and branches as separate sequences
        return attention._packed_sdpa(query, key, value, layout.cu_q, scaling)

    monkeypatch.setattr(attention, "_cpu_merge", own_tokens_only)
    torch.manual_seed(0)
    whole = learner_for(copy.deepcopy(base_model), "lora", "off")
    whole.accumulate(samples)
    want = grads(whole)
    torch.manual_seed(0)
    learner = learner_for(copy.deepcopy(base_model), "lora", "auto")
    with caplog.at_level(logging.WARNING, logger="trustee.learn"):
        loss, _, mbs = learner.accumulate(samples)
    assert "shared-prefix layout disagrees" in caplog.text
    assert learner.share_prefix == "off" and learner.shared_prefix_fallbacks == 1
    assert all(mb.layout is None for mb in mbs)
    got = grads(learner)
    for name, w in want.items():
        assert float((got[name] - w).abs().max()) <= TOL * max(1.0, float(w.abs().max())), name
    m = learner_for(copy.deepcopy(base_model), "lora", "auto")._step(samples)
    assert m.shared_prefix_fallback == 1 and m.shared_prefix_frac == 0.0
