"""The judge role: scores a finished episode.

Owns `Judge`, the verdict Structs and the reward arithmetic (pure functions, tested
directly):

- mode `trustee` (TRUSTEE): reward in {-1, 0, 1}. Criteria get stricter with the task's
  `judge_strictness` (1..5): intent satisfied -> correct tools -> no hallucination -> no
  redundancy -> efficiency. Intent "no" gives -1; intent "yes" with every active criterion
  met gives 1; anything else 0.
- mode `rubric` (SynthAgent): forbidden gate x mean(fraction of sub-goals met, fraction of
  required interactions made); a list that is empty is left out of the mean; in [0, 1].

Optional k votes, combined by `majority` (ties go to the lower reward) or `mean`. Prompt
layout (KV cache): the episode's `SimLog` as the user and tool roles last saw it (run-wide
rules, the group's task block, the transcript), then one request holding what only the judge
may know (reference calls, active criteria or rubric). So the judge's prompt extends the
episode's cached prefix. Called by `envs/simulated.py` at the end of an episode and by the
judge-agreement meter (`eval/judge_agreement.py`).
"""

from __future__ import annotations

from collections import Counter
from string import Template
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from trustee.sim.client import OutputRejected, SimClient, gather_first_error, load_prompt, schema_of
from trustee.sim.log import SimLog, call_text
from trustee.types import Message, Score, Task, ToolCall

JudgeMode = Literal["trustee", "rubric"]
VoteRule = Literal["mean", "majority"]
CRITERIA = ("intent", "correct_tools", "no_hallucination", "no_redundancy", "efficient")
Analysis = Annotated[str, Meta(max_length=200)]


class TrusteeVerdict(msgspec.Struct, kw_only=True):
    analysis: Analysis
    intent: Literal["yes", "partly", "no"]
    correct_tools: bool
    no_hallucination: bool
    no_redundancy: bool
    efficient: bool


class RubricVerdict(msgspec.Struct, kw_only=True):
    """Lists follow the task rubric's order; their lengths are fixed per task in the schema."""

    analysis: Analysis
    forbidden_violated: Annotated[list[bool], Meta(max_length=8)]
    subgoals_met: Annotated[list[bool], Meta(max_length=8)]
    interactions_made: Annotated[list[bool], Meta(max_length=8)]


# ------------------------------------------------------------------ arithmetic


def trustee_reward(v: TrusteeVerdict, strictness: int) -> float:
    """{-1, 0, 1} from the verdict and the active criteria (the first `strictness`)."""
    if v.intent == "no":
        return -1.0
    active = CRITERIA[1 : max(1, min(5, strictness))]
    if v.intent == "yes" and all(getattr(v, c) for c in active):
        return 1.0
    return 0.0


def rubric_reward(v: RubricVerdict) -> tuple[float, dict[str, float]]:
    """Forbidden gate x mean of the sub-goal and interaction fractions (empty lists left out)."""
    gate = 0.0 if any(v.forbidden_violated) else 1.0
    fractions = {}
    if v.subgoals_met:
        fractions["subgoals"] = sum(v.subgoals_met) / len(v.subgoals_met)
    if v.interactions_made:
        fractions["interactions"] = sum(v.interactions_made) / len(v.interactions_made)
    mean = sum(fractions.values()) / len(fractions) if fractions else 1.0
    return gate * mean, {"gate": gate, **fractions}


def combine(rewards: list[float], rule: VoteRule) -> float:
    """k judge votes -> one reward. `majority`: the most common value, ties to the lowest."""
    if not rewards:
        raise ValueError("no judge votes to combine")
    if rule == "mean":
        return sum(rewards) / len(rewards)
    counts = Counter(rewards)
    top = max(counts.values())
    return min(r for r, c in counts.items() if c == top)


def majority_rubric(votes: list[RubricVerdict]) -> RubricVerdict:
    """Item-wise majority over rubric votes (ties: violated / not met, the stricter side)."""

    def vote(lists: list[list[bool]], tie: bool) -> list[bool]:
        out = []
        for items in zip(*lists, strict=True):
            yes = sum(items)
            out.append(tie if 2 * yes == len(items) else 2 * yes > len(items))
        return out

    return RubricVerdict(
        analysis=votes[0].analysis,
        forbidden_violated=vote([v.forbidden_violated for v in votes], True),
        subgoals_met=vote([v.subgoals_met for v in votes], False),
        interactions_made=vote([v.interactions_made for v in votes], False),
    )


# ------------------------------------------------------------------ prompts


def criteria_block(task: Task, mode: JudgeMode) -> str:
    if mode == "rubric":
        r = task.rubric
        lines = ["Rubric"]
        lines += _numbered("Forbidden behaviours:", r.forbidden)
        lines += _numbered("Sub-goals:", r.subgoals)
        lines += _numbered("Required interactions:", r.required_interactions)
        return "\n".join(lines)
    return ", ".join(active_criteria(task))


def active_criteria(task: Task) -> tuple[str, ...]:
    strictness = int(task.knobs.get("judge_strictness", 1))
    return CRITERIA[: max(1, min(5, strictness))]


def _numbered(title: str, items: list[str]) -> list[str]:
    return [title] + ([f"{i + 1}. {x}" for i, x in enumerate(items)] or ["(none)"])


def judge_request(task: Task, mode: JudgeMode, ending: str) -> str:
    """The judge's request: the ending and what only the judge knows (after the transcript)."""
    expected = "\n".join(call_text(c) for c in task.expected_calls) or "(none)"
    fields = {"ending": ending, "expected": expected}
    if mode == "rubric":
        fields["rubric"] = criteria_block(task, mode)
    else:
        fields["criteria"] = criteria_block(task, mode)
    return Template(load_prompt(f"judge_{mode}_request")).substitute(fields).rstrip()


def rubric_schema(task: Task) -> dict:
    schema = schema_of(RubricVerdict)
    sizes = {
        "forbidden_violated": len(task.rubric.forbidden),
        "subgoals_met": len(task.rubric.subgoals),
        "interactions_made": len(task.rubric.required_interactions),
    }
    for name, n in sizes.items():
        schema["properties"][name].update(minItems=n, maxItems=n)
    return schema


def check_rubric_lengths(task: Task, v: RubricVerdict) -> None:
    want = (len(task.rubric.forbidden), len(task.rubric.subgoals), len(task.rubric.required_interactions))
    got = (len(v.forbidden_violated), len(v.subgoals_met), len(v.interactions_made))
    if want != got:
        raise OutputRejected(f"rubric list lengths {got} do not match the rubric {want}")


# ------------------------------------------------------------------ the role


class Judge:
    """Scores episodes of one environment; `score` returns the Score and decode retries."""

    def __init__(
        self,
        client: SimClient,
        *,
        mode: JudgeMode = "trustee",
        votes: int = 1,
        vote_rule: VoteRule = "mean",
        temperature: float = 0.1,
    ):
        if votes < 1:
            raise ValueError(f"judge votes = {votes}: need at least 1; set simulator.judge_votes >= 1")
        self.client, self.mode, self.votes, self.vote_rule, self.temperature = (
            client,
            mode,
            votes,
            vote_rule,
            temperature,
        )

    async def score(self, task: Task, log: SimLog, ending: str, *, key: str) -> tuple[Score, int]:
        """The episode's score from its log (the live one, or `SimLog.replay` of a finished
        conversation) and the decode retries."""
        prompt = log.prompt(judge_request(task, self.mode, ending))
        if self.mode == "trustee":
            return await self._trustee(task, prompt, key)
        return await self._rubric(task, prompt, key)

    async def _trustee(self, task: Task, prompt: list[Message], key: str) -> tuple[Score, int]:
        outs = await gather_first_error(
            [lambda: self.client.ask("judge", prompt, TrusteeVerdict, temperature=self.temperature, key=key)]
            * self.votes
        )
        strictness = int(task.knobs.get("judge_strictness", 1))
        rewards = [trustee_reward(v, strictness) for v, _ in outs]
        reward = combine(rewards, self.vote_rule)
        parts = {"judge": reward, "strictness": float(strictness)}
        parts["intent"] = sum(v.intent == "yes" for v, _ in outs) / len(outs)
        return Score(reward=reward, parts=parts), sum(r for _, r in outs)

    async def _rubric(self, task: Task, prompt: list[Message], key: str) -> tuple[Score, int]:
        schema = rubric_schema(task)

        def ask():
            return self.client.ask(
                "judge",
                prompt,
                RubricVerdict,
                schema=schema,
                check=lambda v: check_rubric_lengths(task, v),
                temperature=self.temperature,
                key=key,
            )

        outs = await gather_first_error([ask] * self.votes)
        votes = [v for v, _ in outs]
        if self.vote_rule == "majority":
            reward, parts = rubric_reward(majority_rubric(votes))
        else:
            scored = [rubric_reward(v) for v in votes]
            reward = sum(r for r, _ in scored) / len(scored)
            parts = {k: sum(p.get(k, 0.0) for _, p in scored) / len(scored) for k in scored[0][1]}
        return Score(reward=reward, parts={"judge": reward, **parts}), sum(r for _, r in outs)


# ------------------------------------------------------------------ the scripted judge


class ScriptedJudge:
    """A judge in code, named as such: no model reads the episode. For CPU runs whose tiny
    simulator cannot judge (`simulator.judge_mode = 'scripted'`), and as the known-answer
    judge of tests. It fills a `TrusteeVerdict` from the agent's calls against the task's
    reference calls and scores it with `trustee_reward`, so the tiers, strictness and
    reward range are the model judge's:

    - intent: "yes" when every reference call was made with the same arguments, "partly"
      when at least one reference tool was called, "no" otherwise;
    - correct_tools: every call named a reference tool; no_hallucination: every call passed
      its schema; no_redundancy: no call repeated; efficient: at most one call more than
      the reference.
    """

    mode = "scripted"

    def __init__(self, votes: int = 1) -> None:
        self.votes = votes

    async def score(self, task: Task, log: SimLog, ending: str, *, key: str) -> tuple[Score, int]:
        return self.score_calls(task, log.agent_calls), 0

    def score_calls(self, task: Task, calls: list[tuple[ToolCall, bool]]) -> Score:
        """`calls`: the agent's calls in order, each with whether it passed its schema."""
        made = [call_text(c) for c, _ in calls]
        expected = [call_text(c) for c in task.expected_calls]
        names = {c.name for c in task.expected_calls}
        if expected and all(e in made for e in expected):
            intent = "yes"
        elif any(c.name in names for c, _ in calls):
            intent = "partly"
        else:
            intent = "no"
        verdict = TrusteeVerdict(
            analysis="scripted",
            intent=intent,
            correct_tools=bool(calls) and all(c.name in names for c, _ in calls),
            no_hallucination=all(ok for _, ok in calls),
            no_redundancy=len(set(made)) == len(made),
            efficient=len(made) <= len(expected) + 1,
        )
        strictness = int(task.knobs.get("judge_strictness", 1))
        reward = trustee_reward(verdict, strictness)
        parts = {"judge": reward, "strictness": float(strictness), "intent": float(intent == "yes")}
        return Score(reward=reward, parts=parts)
