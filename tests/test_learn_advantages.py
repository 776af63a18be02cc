"""Group-relative advantages and zero-variance filtering (trustee/learn/advantages.py)."""

from __future__ import annotations

import math

import pytest

from trustee.learn.advantages import STD_EPS, compute_advantages
from trustee.types import Group, Trajectory


def group(task: str, rewards: list[float]) -> Group:
    trajs = [
        Trajectory(
            episode_id=f"{task}-{i}",
            task_id=task,
            tokens=[1, 2],
            loss_mask=[0, 1],
            logprobs=[0.0, -1.0],
            versions=[-1, 0],
            prompt_len=1,
            reward=r,
        )
        for i, r in enumerate(rewards)
    ]
    return Group(task_id=task, trajectories=trajs)


def test_group_scale_hand_values():
    # rewards [1, 0, 0, -1]: mean 0, population std sqrt(2/4) = 0.7071.
    out = compute_advantages([group("a", [1, 0, 0, -1])], scale="group")
    s = math.sqrt(0.5) + STD_EPS
    assert out.groups[0].advantages == pytest.approx([1 / s, 0.0, 0.0, -1 / s])
    assert out.filtered == 0


def test_none_scale_is_mean_centred_only():
    out = compute_advantages([group("a", [1, 1, 0, 0])], scale="none")
    assert out.groups[0].advantages == pytest.approx([0.5, 0.5, -0.5, -0.5])


def test_batch_scale_uses_std_of_kept_groups():
    # kept rewards: [1, 0] and [1, -1]; constant group [0.5, 0.5] is filtered out first.
    # kept pooled std: values [1, 0, 1, -1], mean 0.25, var = (0.5625+0.0625+0.5625+1.5625)/4 = 0.6875
    out = compute_advantages([group("a", [1, 0]), group("b", [0.5, 0.5]), group("c", [1, -1])], scale="batch")
    s = math.sqrt(0.6875) + STD_EPS
    assert out.filtered == 1
    assert [g.task_id for g in out.groups] == ["a", "c"]
    assert out.groups[0].advantages == pytest.approx([0.5 / s, -0.5 / s])
    assert out.groups[1].advantages == pytest.approx([1 / s, -1 / s])
    assert out.reward_mean == pytest.approx((1 + 0 + 0.5 + 0.5 + 1 - 1) / 6)


def test_zero_variance_kept_when_filter_off():
    out = compute_advantages([group("a", [1, 1, 1])], filter_zero_variance=False)
    assert out.filtered == 0 and out.groups[0].advantages == [0.0, 0.0, 0.0]


def test_inputs_not_modified_and_bad_inputs_rejected():
    g = group("a", [1, 0])
    compute_advantages([g])
    assert g.advantages == []
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages([group("x", [1.0])])
    with pytest.raises(ValueError, match="scale"):
        compute_advantages([g], scale="rank")  # type: ignore[arg-type]
