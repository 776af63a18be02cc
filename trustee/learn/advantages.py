"""Group-relative advantages (GRPO) and dynamic-sampling filtering.

Owns `compute_advantages`: rewards of each group minus the group mean, optionally divided by
the group std, the whole batch's std, or nothing (Dr. GRPO); groups whose rewards are all
equal carry no signal and are dropped and counted. Pure Python over `Group` records: no
torch. Called by the controller between rollouts and `Learner.step`; the learner only reads
`Group.advantages`.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from trustee.types import Group

ScaleMode = Literal["group", "batch", "none"]

# Added to the std before dividing (TRL uses 1e-4): keeps near-constant groups finite.
STD_EPS = 1e-4
# Rewards closer than this count as equal (zero-variance group).
ZERO_VAR_TOL = 1e-8


class AdvantageBatch(msgspec.Struct, kw_only=True):
    """The groups that train, with `advantages` filled, plus what was filtered out.

    Invariant: every group in `groups` has `len(advantages) == len(trajectories)`.
    `filtered` counts zero-variance groups dropped (dynamic sampling); `reward_mean` and
    `reward_std` are over every trajectory passed in, kept or not.
    """

    groups: list[Group]
    filtered: int = 0
    reward_mean: float = 0.0
    reward_std: float = 0.0


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0); (0, 0) for an empty list."""
    if not xs:
        return 0.0, 0.0
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _is_constant(xs: list[float]) -> bool:
    return max(xs) - min(xs) <= ZERO_VAR_TOL


def compute_advantages(
    groups: list[Group],
    *,
    scale: ScaleMode = "group",
    filter_zero_variance: bool = True,
    eps: float = STD_EPS,
) -> AdvantageBatch:
    """A_i = (r_i - mean_group(r)) / (std + eps), with std per `scale`.

    scale 'group': std of the group; 'batch': std of all kept rewards; 'none': no division.
    Groups with one trajectory are rejected (nothing to compare). With
    `filter_zero_variance` off, constant groups stay in with advantages exactly 0 (useful
    with a KL term). New Group records are returned; the inputs are not modified.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale = {scale!r}: choose 'group', 'batch' or 'none' (grpo.scale_rewards)")
    all_rewards = [r for g in groups for r in g.rewards]
    mean_all, std_all = _mean_std(all_rewards)
    kept: list[Group] = []
    filtered = 0
    for g in groups:
        if len(g.trajectories) < 2:
            raise ValueError(
                f"group {g.task_id!r} has {len(g.trajectories)} trajectory: GRPO compares samples within a "
                "group; set grpo.group_size >= 2 and drop groups that lost members before the learner"
            )
        if filter_zero_variance and _is_constant(g.rewards):
            filtered += 1
            continue
        kept.append(g)
    batch_std = _mean_std([r for g in kept for r in g.rewards])[1]
    out = []
    for g in kept:
        mean, std = _mean_std(g.rewards)
        denom = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        adv = [(r - mean) / denom for r in g.rewards]
        out.append(Group(task_id=g.task_id, trajectories=g.trajectories, advantages=adv))
    return AdvantageBatch(groups=out, filtered=filtered, reward_mean=mean_all, reward_std=std_all)
