"""GRPO losses against values computed by hand (trustee/learn/grpo.py).

The fixed batch: two sequences, five loss tokens, old log-probs 0 so ratio = exp(logp).

    token  seq  ratio  A    r*A    clamp(r,0.8,1.28)*A   min     loss = -min  clipped
    0      0    1.5    +1   1.5    1.28                  1.28    -1.28        yes (A>0, r>1.28)
    1      0    0.5    +1   0.5    0.8                   0.5     -0.5         no  (A>0, r low: unclipped wins)
    2      1    1.5    -2   -3.0   -2.56                 -3.0     3.0         no  (A<0, r high: unclipped wins)
    3      1    0.7    -2   -1.4   -1.6                  -1.6     1.6         yes (A<0, r<0.8)
    4      1    1.0    -2   -2.0   -2.0                  -2.0     2.0         no

Sums: seq0 = -1.78 (2 tokens), seq1 = 6.6 (3 tokens), all = 4.82 (5 tokens).
    grpo     = mean(-1.78/2, 6.6/3) = (-0.89 + 2.2) / 2 = 0.655
    dr_grpo  = 4.82 / (2 seqs * max_len 4) = 0.6025
    bnpo     = 4.82 / 5 = 0.964
    dapo     = 4.82 / (global 8 tokens / 2 ranks) = 1.205
"""

from __future__ import annotations

import math

import pytest
import torch

from trustee.learn.grpo import (
    aggregate,
    clipped_surrogate,
    grpo_token_loss,
    is_weights,
    k3_kl,
    loss_norm,
    token_weights,
)

RATIO = [1.5, 0.5, 1.5, 0.7, 1.0]
ADV = [1.0, 1.0, -2.0, -2.0, -2.0]
SEQ = [0, 0, 1, 1, 1]
HAND_TOKEN_LOSS = [-1.28, -0.5, 3.0, 1.6, 2.0]
SEQ_TOKENS = [2, 2, 3, 3, 3]


def t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def test_clipped_surrogate_matches_hand_table():
    loss, clipped = clipped_surrogate(t(RATIO), t(ADV), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, t(HAND_TOKEN_LOSS), atol=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]


def test_clipped_tokens_get_no_gradient():
    # d(-r*A)/dlogp = -r*A on unclipped tokens; 0 where the clamped term wins.
    logp = torch.log(t(RATIO)).requires_grad_()
    loss, _ = clipped_surrogate(torch.exp(logp - 0.0), t(ADV), 0.2, 0.28)
    loss.sum().backward()
    want = [0.0, -0.5 * 1.0, -1.5 * -2.0, 0.0, -1.0 * -2.0]
    assert torch.allclose(logp.grad, t(want), atol=1e-6)


@pytest.mark.parametrize(
    "loss_type, extra, want",
    [
        ("grpo", {}, 0.655),
        ("dr_grpo", {"max_len": 4}, 0.6025),
        ("bnpo", {}, 0.964),
        ("dapo", {"global_tokens": 8, "world_size": 2}, 1.205),
    ],
)
def test_aggregations_match_hand_values(loss_type, extra, want):
    norm = loss_norm(loss_type, [2, 3], **extra)
    logp = torch.log(t(RATIO))
    tok, parts = grpo_token_loss(
        logp,
        torch.zeros(5),
        torch.zeros(5),
        t(ADV),
        t(SEQ, torch.long),
        2,
        clip_low=0.2,
        clip_high=0.28,
        is_mode="off",
    )
    got = aggregate(tok, token_weights(norm, t(SEQ_TOKENS, torch.long)))
    assert float(got) == pytest.approx(want, abs=1e-5)
    assert parts.clipped == 2 and parts.tokens == 5


def test_dapo_and_bnpo_coincide_on_one_process():
    a = token_weights(loss_norm("dapo", [2, 3]), t(SEQ_TOKENS, torch.long))
    b = token_weights(loss_norm("bnpo", [2, 3]), t(SEQ_TOKENS, torch.long))
    assert torch.equal(a, b) and float(a[0]) == pytest.approx(1 / 5)


def test_loss_norm_rejects_bad_input():
    with pytest.raises(ValueError, match="loss_type"):
        loss_norm("ppo", [1])
    with pytest.raises(ValueError, match=">= 1 loss token"):
        loss_norm("grpo", [2, 0])


def test_k3_kl_hand_values():
    # d = ref - logp: k3 = e^d - d - 1. d = ln2 -> 1 - ln2; d = -ln2 -> 0.5 + ln2 - 1; d = 0 -> 0.
    logp = t([0.0, 0.0, -1.0])
    ref = t([math.log(2), -math.log(2), -1.0])
    want = [1 - math.log(2), 0.5 + math.log(2) - 1, 0.0]
    assert torch.allclose(k3_kl(logp, ref), t(want), atol=1e-6)


# IS correction: learner/sampler ratios rho = [4, 0.5, 1, 2, 0.1] per token, bounds [0.25, 3].
# Per sequence: seq0 = 4 * 0.5 = 2 (inside), seq1 = 1 * 2 * 0.1 = 0.2 (below 0.25).
RHO = [4.0, 0.5, 1.0, 2.0, 0.1]


@pytest.mark.parametrize(
    "level, mode, want_w, masked, truncated, stat_min, stat_max, count",
    [
        ("token", "truncate", [3.0, 0.5, 1.0, 2.0, 0.25], 0, 2, 0.1, 4.0, 5),
        ("token", "mask", [0.0, 0.5, 1.0, 2.0, 0.0], 2, 0, 0.1, 4.0, 5),
        ("sequence", "truncate", [2.0, 2.0, 0.25, 0.25, 0.25], 0, 1, 0.2, 2.0, 2),
        ("sequence", "mask", [2.0, 2.0, 0.0, 0.0, 0.0], 1, 0, 0.2, 2.0, 2),
        ("token", "off", [1.0] * 5, 0, 0, 0.1, 4.0, 5),  # no correction, ratios still reported
    ],
)
def test_is_weights_edge_cases(level, mode, want_w, masked, truncated, stat_min, stat_max, count):
    learner = torch.log(t(RHO))
    sampler = torch.zeros(5)
    w, st = is_weights(learner, sampler, t(SEQ, torch.long), 2, level=level, mode=mode, lo=0.25, hi=3.0)
    assert torch.allclose(w, t(want_w), atol=1e-6)
    assert (st.masked, st.truncated, st.count) == (masked, truncated, count)
    assert st.min == pytest.approx(stat_min) and st.max == pytest.approx(stat_max)


def test_is_weight_multiplies_surrogate_not_kl():
    # ratio 1 (logp == old), A = [1, -1]; rho = [2, 0.5] (token, no bounds hit); beta 0.1.
    # loss_t = -A*rho + beta*k3: k3 with ref = logp - ln2 -> d = -ln2 -> k3 = ln2 - 0.5.
    logp = t([-1.0, -2.0])
    sampler = logp - torch.log(t([2.0, 0.5]))
    ref = logp - math.log(2)
    tok, parts = grpo_token_loss(
        logp,
        logp.clone(),
        sampler,
        t([1.0, -1.0]),
        t([0, 1], torch.long),
        2,
        clip_low=0.2,
        clip_high=0.2,
        beta=0.1,
        ref_logp=ref,
        is_mode="truncate",
        is_min=0.0,
        is_max=3.0,
    )
    k3 = math.log(2) - 0.5
    assert torch.allclose(tok, t([-2.0 + 0.1 * k3, 0.5 + 0.1 * k3]), atol=1e-6)
    assert parts.kl_sum == pytest.approx(2 * k3, abs=1e-6)
    assert parts.is_stats.sum == pytest.approx(2.5) and parts.is_stats.count == 2


def test_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_loss(
            torch.zeros(1),
            torch.zeros(1),
            torch.zeros(1),
            torch.ones(1),
            torch.zeros(1, dtype=torch.long),
            1,
            clip_low=0.2,
            clip_high=0.2,
            beta=0.1,
        )
