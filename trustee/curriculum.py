"""Task difficulty over training: TRUSTEE's adaptive curriculum and staged schedules.

Owns `Curriculum` (built from `CurriculumConfig`) and its serialisable `CurriculumState`.

- `adaptive` (TRUSTEE): difficulty D in [1, 100] moves by `delta` after each step: up when
  the batch mean reward is above `high`, down when below `low` (both derived from the
  environment's reward range when unset), clamped. D maps linearly to
  the seven aspects (tools, expected calls, turns, system-prompt specificity, persona
  expertise, query ambiguity, judge strictness) plus the tool error rate, each from its value
  at D = 1 to its value at D = 100 (integers rounded). With probability `eps` a task draws
  every aspect uniformly between its easiest value and its value at the current D (the soft
  curriculum); otherwise it takes the values at D.
- `staged` (Environment Tuning): a list of stages, each with its own reward and environment
  switches (handed to the environment in `Knobs.extra`: 'stage', 'reward', 'hints',
  'split'); a stage advances after N steps, or when a metric stays >= a threshold for K
  consecutive steps (whichever is set and fires first). D stays at `start_difficulty`.
- `fixed`: D stays at `start_difficulty`.

Per-aspect success rates (reward > `high`) are kept per aspect value and reported by
`metrics()`. Called by the controller: `sample(rng)` per task, `update(...)` per step,
`state()`/`load_state()` for checkpoints. It does not generate tasks.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import msgspec

from trustee.config import AspectRanges, CurriculumConfig, StageConfig, curriculum_thresholds
from trustee.envs.base import Knobs

D_MIN, D_MAX = 1.0, 100.0
INT_ASPECTS = ("n_tools", "n_expected_calls", "n_turns", "judge_strictness")
ASPECTS = INT_ASPECTS + ("prompt_specificity", "persona_expertise", "query_ambiguity", "tool_error_rate")


class CurriculumState(msgspec.Struct, kw_only=True):
    """Everything that changes during training (checkpointed).

    `success[aspect][value] = [episodes, successes]` with `value` the aspect's value as text.
    """

    difficulty: float
    steps: int = 0
    stage: int = 0
    stage_steps: int = 0
    streak: int = 0
    success: dict[str, dict[str, list[int]]] = msgspec.field(default_factory=dict)
    history: list[float] = msgspec.field(default_factory=list)


def aspect_value(ranges: AspectRanges, name: str, d: float) -> float:
    """The aspect's value at difficulty d (linear between D = 1 and D = 100)."""
    lo, hi = getattr(ranges, name)
    t = (min(max(d, D_MIN), D_MAX) - D_MIN) / (D_MAX - D_MIN)
    v = lo + (hi - lo) * t
    return float(int(v + 0.5)) if name in INT_ASPECTS else v


def knobs_at(ranges: AspectRanges, d: float, extra: dict | None = None) -> Knobs:
    values = {name: aspect_value(ranges, name, d) for name in ASPECTS}
    return _knobs(d, values, extra)


def _knobs(d: float, values: Mapping[str, float], extra: dict | None) -> Knobs:
    ints = {k: int(values[k]) for k in INT_ASPECTS}
    floats = {k: float(values[k]) for k in ASPECTS if k not in INT_ASPECTS}
    return Knobs(difficulty=d, **ints, **floats, extra=dict(extra or {}))


class Curriculum:
    """`reward_range`: the environment's reward bounds; `low` / `high` left unset in the
    config are derived from it (`config.curriculum_thresholds`)."""

    def __init__(self, cfg: CurriculumConfig, reward_range: tuple[float, float] = (-1.0, 1.0)):
        self.low, self.high = curriculum_thresholds(cfg, reward_range)
        if self.high < self.low:
            raise ValueError(f"curriculum.high ({self.high}) < curriculum.low ({self.low}); set high >= low")
        if cfg.kind == "staged" and not cfg.stages:
            raise ValueError("curriculum.kind = 'staged' needs at least one [[curriculum.stages]]")
        self.cfg = cfg
        self.st = CurriculumState(difficulty=cfg.start_difficulty)

    # ------------------------------------------------------------------ reading

    @property
    def difficulty(self) -> float:
        return self.st.difficulty

    @property
    def stage(self) -> StageConfig | None:
        return self.cfg.stages[self.st.stage] if self.cfg.kind == "staged" else None

    def stage_extra(self) -> dict:
        s = self.stage
        return {} if s is None else {"stage": s.name, "reward": s.reward, "hints": s.hints, "split": s.split}

    def knobs(self) -> Knobs:
        """The aspects at the current D (no randomness)."""
        return knobs_at(self.cfg.aspects, self.st.difficulty, self.stage_extra())

    def sample(self, rng: random.Random) -> Knobs:
        """Aspects for one task: with probability eps each aspect is drawn uniformly between
        its easiest value (D = 1) and its value at the current D; else the values at D."""
        if rng.random() >= self.cfg.eps:
            return self.knobs()
        values = {}
        for name in ASPECTS:
            a = aspect_value(self.cfg.aspects, name, D_MIN)
            b = aspect_value(self.cfg.aspects, name, self.st.difficulty)
            lo, hi = min(a, b), max(a, b)
            values[name] = (
                float(rng.randint(int(lo), int(hi))) if name in INT_ASPECTS else rng.uniform(lo, hi)
            )
        return _knobs(self.st.difficulty, values, self.stage_extra())

    # ------------------------------------------------------------------ updating

    def update(
        self,
        rewards: list[float],
        knobs: list[Knobs] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """One training step: record per-aspect success, move D (adaptive), advance the
        stage (staged). `rewards[i]` belongs to a task made with `knobs[i]`. Returns this
        step's curriculum metrics."""
        if not rewards:
            raise ValueError("curriculum update with no rewards: pass the step's episode rewards")
        if knobs is not None and len(knobs) != len(rewards):
            raise ValueError(f"{len(rewards)} rewards but {len(knobs)} knobs; pass one Knobs per reward")
        mean = sum(rewards) / len(rewards)
        for r, k in zip(rewards, knobs or [], strict=False):
            self._record(k, r > self.high)
        self.st.steps += 1
        if self.cfg.kind == "adaptive":
            self._move(mean)
        elif self.cfg.kind == "staged":
            self._advance({"reward_mean": mean, **(metrics or {})})
        self.st.history.append(self.st.difficulty)
        return {
            "curriculum/difficulty": self.st.difficulty,
            "curriculum/reward_mean": mean,
            **self._stage_metrics(),
        }

    def _move(self, mean: float) -> None:
        d = self.st.difficulty
        if mean > self.high:
            d += self.cfg.delta
        elif mean < self.low:
            d -= self.cfg.delta
        self.st.difficulty = min(max(d, D_MIN), D_MAX)

    def _advance(self, metrics: Mapping[str, float]) -> None:
        stage = self.cfg.stages[self.st.stage]
        self.st.stage_steps += 1
        if stage.advance_metric:
            value = metrics.get(stage.advance_metric)
            self.st.streak = (
                self.st.streak + 1 if value is not None and value >= stage.advance_threshold else 0
            )
        by_steps = stage.advance_after_steps > 0 and self.st.stage_steps >= stage.advance_after_steps
        by_metric = bool(stage.advance_metric) and self.st.streak >= stage.advance_patience
        if (by_steps or by_metric) and self.st.stage + 1 < len(self.cfg.stages):
            self.st.stage += 1
            self.st.stage_steps = 0
            self.st.streak = 0

    def _record(self, k: Knobs, success: bool) -> None:
        for name in ASPECTS:
            value = getattr(k, name)
            key = str(int(value)) if name in INT_ASPECTS else f"{value:.1f}"
            cell = self.st.success.setdefault(name, {}).setdefault(key, [0, 0])
            cell[0] += 1
            cell[1] += int(success)

    def _stage_metrics(self) -> dict[str, float]:
        if self.cfg.kind != "staged":
            return {}
        return {
            "curriculum/stage": float(self.st.stage),
            "curriculum/stage_steps": float(self.st.stage_steps),
        }

    def metrics(self) -> dict[str, float]:
        """Success rate per aspect value: 'curriculum/success/<aspect>=<value>'."""
        out = {}
        for name, cells in self.st.success.items():
            for value, (n, ok) in sorted(cells.items()):
                out[f"curriculum/success/{name}={value}"] = ok / n if n else 0.0
        return out

    def aspect_metrics(self, knobs: list[Knobs]) -> dict[str, float]:
        """Per-step curriculum figures: the success rate per aspect bucket so far
        (`metrics()`), the difficulty, and the share of this step's tasks that were soft
        (`knobs` as `sample` drew them, before `update`; a soft draw that lands exactly on the
        values at D, as at D = 1, is the same task and counts as not soft)."""
        at_d = self.knobs()
        soft = sum(any(getattr(k, a) != getattr(at_d, a) for a in ASPECTS) for k in knobs)
        return {
            **self.metrics(),
            "curriculum/difficulty": self.st.difficulty,
            "curriculum/soft_share": soft / len(knobs) if knobs else 0.0,
        }

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> CurriculumState:
        return msgspec.convert(msgspec.to_builtins(self.st), CurriculumState)

    def load_state(self, state: CurriculumState) -> None:
        if self.cfg.kind == "staged" and not 0 <= state.stage < len(self.cfg.stages):
            raise ValueError(
                f"checkpointed stage {state.stage} does not exist in this config ({len(self.cfg.stages)} stages)"
            )
        self.st = msgspec.convert(msgspec.to_builtins(state), CurriculumState)
