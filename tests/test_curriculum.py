"""The curriculum: D moves by delta on the batch mean, clamps, maps monotonically to the
aspects; soft sampling stays within bounds; staged schedules advance; state round-trips."""

from __future__ import annotations

import random

import msgspec
import pytest

from trustee.config import AspectRanges, CurriculumConfig, StageConfig
from trustee.curriculum import ASPECTS, Curriculum, CurriculumState, aspect_value, knobs_at


def test_d_moves_by_delta_against_thresholds():
    c = Curriculum(CurriculumConfig(start_difficulty=10.0))
    c.update([1.0, 1.0, 0.0])  # mean 0.667 > 0.5
    assert c.difficulty == 13.0
    c.update([1.0, 0.0, -1.0, 0.0])  # mean 0 : neither above 0.5 nor below 0.0
    assert c.difficulty == 13.0
    c.update([-1.0, 0.0])  # mean -0.5 < 0.0
    assert c.difficulty == 10.0
    c.update([0.5])  # exactly high: not above
    assert c.difficulty == 10.0


def test_d_is_clamped_to_1_100():
    c = Curriculum(CurriculumConfig(start_difficulty=2.0))
    c.update([-1.0])
    assert c.difficulty == 1.0
    c.update([-1.0])
    assert c.difficulty == 1.0
    c = Curriculum(CurriculumConfig(start_difficulty=99.0))
    c.update([1.0])
    c.update([1.0])
    assert c.difficulty == 100.0


def test_fixed_kind_never_moves():
    c = Curriculum(CurriculumConfig(kind="fixed", start_difficulty=40.0))
    for _ in range(5):
        c.update([1.0])
    assert c.difficulty == 40.0


def test_aspect_endpoints_match_trustee():
    r = AspectRanges()
    lo, hi = knobs_at(r, 1.0), knobs_at(r, 100.0)
    assert (lo.n_tools, hi.n_tools) == (1, 10)
    assert (lo.n_expected_calls, hi.n_expected_calls) == (1, 3)
    assert (lo.n_turns, hi.n_turns) == (1, 2)
    assert (lo.judge_strictness, hi.judge_strictness) == (1, 5)
    assert (lo.prompt_specificity, hi.prompt_specificity) == (1.0, 0.0)
    assert (lo.persona_expertise, hi.persona_expertise) == (1.0, 0.0)
    assert (lo.query_ambiguity, hi.query_ambiguity) == (0.0, 1.0)


@pytest.mark.parametrize("name", ASPECTS)
def test_aspects_monotone_in_d(name):
    r = AspectRanges(tool_error_rate=(0.0, 0.2))
    lo, hi = getattr(r, name)
    values = [aspect_value(r, name, d) for d in range(1, 101)]
    pairs = list(zip(values, values[1:], strict=False))
    if hi >= lo:
        assert all(a <= b for a, b in pairs)
    else:
        assert all(a >= b for a, b in pairs)
    assert values[0] == pytest.approx(lo) and values[-1] == pytest.approx(hi)


def test_soft_sampling_within_current_bounds():
    c = Curriculum(CurriculumConfig(start_difficulty=50.0, eps=1.0))
    rng = random.Random(0)
    at_d = c.knobs()
    seen_tools = set()
    for _ in range(300):
        k = c.sample(rng)
        assert 1 <= k.n_tools <= at_d.n_tools
        assert 1 <= k.judge_strictness <= at_d.judge_strictness
        assert at_d.prompt_specificity <= k.prompt_specificity <= 1.0
        assert 0.0 <= k.query_ambiguity <= at_d.query_ambiguity
        seen_tools.add(k.n_tools)
    assert seen_tools == set(range(1, at_d.n_tools + 1))  # the whole range is used


def test_eps_zero_gives_values_at_d():
    c = Curriculum(CurriculumConfig(start_difficulty=70.0, eps=0.0))
    rng = random.Random(1)
    assert all(c.sample(rng) == c.knobs() for _ in range(20))


def test_eps_half_mixes():
    c = Curriculum(CurriculumConfig(start_difficulty=100.0, eps=0.5))
    rng = random.Random(2)
    fixed = sum(c.sample(rng) == c.knobs() for _ in range(400))
    assert 120 < fixed < 280  # about half the tasks (plus rare random draws equal to D's)


def test_per_aspect_success_rates():
    c = Curriculum(CurriculumConfig(start_difficulty=1.0))
    k1 = knobs_at(c.cfg.aspects, 1.0)
    k2 = knobs_at(c.cfg.aspects, 100.0)
    c.update([1.0, 0.0, 1.0], [k1, k1, k2])
    m = c.metrics()
    assert m["curriculum/success/n_tools=1"] == 0.5
    assert m["curriculum/success/n_tools=10"] == 1.0
    with pytest.raises(ValueError, match="knobs"):
        c.update([1.0], [k1, k2])


def _stages():
    return [
        StageConfig(name="syntax", reward="syntax", hints=False, split="base", advance_after_steps=2),
        StageConfig(
            name="hints-base",
            split="base",
            advance_metric="accuracy",
            advance_threshold=0.5,
            advance_patience=2,
        ),
        StageConfig(name="hints-all", advance_after_steps=1),
        StageConfig(name="no-hints", hints=False),
    ]


def test_staged_schedule_advances_by_steps_and_metric():
    c = Curriculum(CurriculumConfig(kind="staged", stages=_stages()))
    assert c.sample(random.Random(0)).extra == {
        "stage": "syntax",
        "reward": "syntax",
        "hints": False,
        "split": "base",
    }
    c.update([0.0])
    assert c.stage.name == "syntax"
    c.update([0.0])
    assert c.stage.name == "hints-base"
    c.update([0.0], metrics={"accuracy": 0.6})
    c.update([0.0], metrics={"accuracy": 0.4})  # streak broken
    c.update([0.0], metrics={"accuracy": 0.7})
    assert c.stage.name == "hints-base"
    c.update([0.0], metrics={"accuracy": 0.8})
    assert c.stage.name == "hints-all"
    c.update([0.0])
    assert c.stage.name == "no-hints"
    for _ in range(3):
        c.update([0.0])
    assert c.stage.name == "no-hints"  # the last stage stays
    assert c.knobs().extra["hints"] is False


def test_state_round_trips_through_msgspec():
    c = Curriculum(CurriculumConfig(kind="staged", stages=_stages()))
    for _ in range(3):
        c.update([1.0], [c.knobs()])
    blob = msgspec.json.encode(c.state())
    d = Curriculum(CurriculumConfig(kind="staged", stages=_stages()))
    d.load_state(msgspec.json.decode(blob, type=CurriculumState))
    assert d.state() == c.state() and d.stage.name == c.stage.name
    with pytest.raises(ValueError, match="stage"):
        Curriculum(CurriculumConfig(kind="staged", stages=_stages()[:1])).load_state(c.state())
