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
    `reward_std` are over every trajectory passed in, kept or not. `malformed_only` counts
    the zero-variance groups kept for their malformed turns alone (`keep_malformed`); they
    come last in `groups`.
    """

    groups: list[Group]
    filtered: int = 0
    malformed_only: int = 0
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
    keep_malformed: bool = False,
    eps: float = STD_EPS,
) -> AdvantageBatch:
    """A_i = (r_i - mean_group(r)) / (std + eps), with std per `scale`.

    scale 'group': std of the group; 'batch': std of all kept rewards; 'none': no division.
    Groups with one trajectory are rejected (nothing to compare). With
    `filter_zero_variance` off, constant groups stay in with advantages exactly 0 (useful
    with a KL term). With `keep_malformed` (per-turn credit), a filtered group still trains
    its episodes that hold a malformed turn (`Trajectory.malformed_turns`), with advantage 0:
    the learner gives those turns' tokens `grpo.malformed_advantage`, and nothing else of them
    moves. New Group records are returned; the inputs are not modified.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale = {scale!r}: choose 'group', 'batch' or 'none' (grpo.scale_rewards)")
    all_rewards = [r for g in groups for r in g.rewards]
    mean_all, std_all = _mean_std(all_rewards)
    kept: list[Group] = []
    malformed: list[Group] = []
    filtered = 0
    for g in groups:
        if len(g.trajectories) < 2:
            raise ValueError(
                f"group {g.task_id!r} has {len(g.trajectories)} trajectory: GRPO compares samples within a "
                "group; set grpo.group_size >= 2 and drop groups that lost members before the learner"
            )
        if filter_zero_variance and _is_constant(g.rewards):
            filtered += 1
            bad = [t for t in g.trajectories if t.malformed_turns] if keep_malformed else []
            if bad:
                malformed.append(Group(task_id=g.task_id, trajectories=bad, advantages=[0.0] * len(bad)))
            continue
        kept.append(g)
    batch_std = _mean_std([r for g in kept for r in g.rewards])[1]
    out = []
    for g in kept:
        mean, std = _mean_std(g.rewards)
        denom = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        adv = [(r - mean) / denom for r in g.rewards]
        out.append(Group(task_id=g.task_id, trajectories=g.trajectories, advantages=adv))
    return AdvantageBatch(
        groups=out + malformed,
        filtered=filtered,
        malformed_only=len(malformed),
        reward_mean=mean_all,
        reward_std=std_all,
    )


# ----------------------------------------------------------------------------- truncation

OverlongMode = Literal["train", "mask", "penalty"]


def overlong_penalty(
    sampled_tokens: int, truncated: bool, *, budget: int, buffer: int, penalty: float
) -> float:
    """DAPO's soft overlong punishment, for a multi-turn episode: 0 up to `budget - buffer`
    sampled tokens, then growing linearly to `penalty` at `budget`; a truncated episode (a
    turn or length limit ended it) gets all of `penalty`."""
    if truncated:
        return penalty
    start = budget - buffer
    if sampled_tokens <= start:
        return 0.0
    return penalty * min(1.0, (sampled_tokens - start) / buffer)


def shape_overlong(
    groups: list[Group], mode: OverlongMode, *, budget: int, buffer: int, penalty: float
) -> tuple[list[Group], int]:
    """Rewards of truncated / long episodes before advantages, per `grpo.overlong`:
    'train' leaves them; 'penalty' subtracts `overlong_penalty`; 'mask' leaves rewards alone
    (`drop_truncated` removes the episodes after advantages). Returns the groups and how many
    episodes were truncated."""
    n_trunc = sum(t.status == "truncated" for g in groups for t in g.trajectories)
    if mode != "penalty":
        return groups, n_trunc
    out = []
    for g in groups:
        trajs = []
        for t in g.trajectories:
            cut = overlong_penalty(
                sum(t.loss_mask), t.status == "truncated", budget=budget, buffer=buffer, penalty=penalty
            )
            trajs.append(msgspec.structs.replace(t, reward=t.reward - cut) if cut else t)
        out.append(Group(task_id=g.task_id, trajectories=trajs))
    return out, n_trunc


def drop_truncated(groups: list[Group]) -> tuple[list[Group], int]:
    """'mask': truncated episodes keep their place in the group's baseline (their rewards
    were in the mean) but leave the loss. Groups with advantages in, groups without the
    truncated members out (a group left empty is dropped); returns how many were dropped."""
    out, dropped = [], 0
    for g in groups:
        keep = [i for i, t in enumerate(g.trajectories) if t.status != "truncated"]
        dropped += len(g.trajectories) - len(keep)
        if keep:
            out.append(
                Group(
                    task_id=g.task_id,
                    trajectories=[g.trajectories[i] for i in keep],
                    advantages=[g.advantages[i] for i in keep],
                )
            )
    return out, dropped
