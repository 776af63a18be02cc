"""Per-turn credit (`grpo.turn_credit = "malformed"`): the tokens of a turn whose call did not
run get min(episode advantage, `grpo.malformed_advantage`), so an episode that scores well
around a broken call never reinforces the broken call. Checked from the episode runner's
flags, through the samples and the packed and shared-prefix micro-batches, to the sign of
the update on the flagged tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from test_episode import ScriptedPolicy, call_text, go, toy_task

from trustee.config import GrpoConfig, LearnerConfig
from trustee.envs.toy import ToyEnv
from trustee.learn.learner import Learner, samples_from_groups, turn_credit
from trustee.learn.packing import Sample, build_packed, build_shared, check_sample, plan_shared
from trustee.learn.policy import wrap_policy
from trustee.rollout.episode import EpisodeRunner
from trustee.types import Group, ToolCall, Trajectory


def test_the_runner_flags_exactly_the_turns_whose_call_did_not_run(tiny_tokenizer):
    env = ToyEnv(kinds=("add",))
    task = toy_task()
    (call,) = task.expected_calls
    broken = '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>'
    unknown = call_text(ToolCall(name="nope", arguments={"a": 1, "b": 2}))
    script = [broken, call_text(call), unknown, f"The answer is {task.payload['answer']}."]
    policy = ScriptedPolicy(tiny_tokenizer, script)
    runner = EpisodeRunner(policy, tiny_tokenizer)
    traj = go(runner.run, env, task, "ep0")
    assert traj.counters.turns == 4 and traj.counters.malformed_calls == 2
    # The sampled turns, in order, are the runs of mask 1; turns 1 and 3 are flagged.
    runs, i, n = [], traj.prompt_len, len(traj.tokens)
    while i < n:
        if traj.loss_mask[i]:
            j = i
            while j < n and traj.loss_mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert len(runs) == 4
    assert traj.malformed_turns == [runs[0], runs[2]]
    assert traj.tokens[runs[0][0] : runs[0][1]] == policy.ids_for(broken)
    traj.check()


def test_a_clean_episode_has_no_flagged_turn(tiny_tokenizer):
    task = toy_task()
    (call,) = task.expected_calls
    policy = ScriptedPolicy(tiny_tokenizer, [call_text(call), f"The answer is {task.payload['answer']}."])
    traj = go(EpisodeRunner(policy, tiny_tokenizer).run, ToyEnv(kinds=("add",)), task, "ep0")
    assert traj.reward == 1.0 and traj.malformed_turns == []


def _traj(n_prompt: int, turns: list[int], malformed: list[int], reward: float, eid: str) -> Trajectory:
    """A trajectory of `turns` sampled turns (lengths), one environment token between turns."""
    tokens, mask, spans = list(range(1, n_prompt + 1)), [0] * n_prompt, []
    for k, n in enumerate(turns):
        if k:
            tokens.append(3)
            mask.append(0)
        start = len(tokens)
        tokens += [10 + k * 7 + j for j in range(n)]
        mask += [1] * n
        if k in malformed:
            spans.append((start, len(tokens)))
    return Trajectory(
        episode_id=eid,
        task_id="t",
        tokens=tokens,
        loss_mask=mask,
        logprobs=[-1.0 * m for m in mask],
        versions=[0 if m else -1 for m in mask],
        prompt_len=n_prompt,
        reward=reward,
        malformed_turns=spans,
    )


def _group() -> Group:
    good_then_broken = _traj(20, [4, 3], [1], 1.0, "a")  # a good call, then a broken second call
    broken_first = _traj(20, [2, 5], [0], -1.0, "b")
    clean = _traj(20, [3], [], 0.0, "c")
    return Group(task_id="t", trajectories=[good_then_broken, broken_first, clean], advantages=[1.5, -0.4, 0.0])


def _expected(t: Trajectory, a: float, ceiling: float | None) -> list[float]:
    out = []
    for i, m in enumerate(t.loss_mask):
        if m:
            bad = ceiling is not None and any(s <= i < e for s, e in t.malformed_turns)
            out.append(min(a, ceiling) if bad else a)
    return out


@pytest.mark.parametrize("ceiling", [None, -1.0, 0.0])
def test_samples_carry_the_malformed_turns_advantage(ceiling):
    g = _group()
    samples = samples_from_groups([g], ceiling)
    for i, (s, t, a) in enumerate(zip(samples, g.trajectories, g.advantages, strict=True)):
        check_sample(s, i)
        pos = [j for j, m in enumerate(s.loss_mask) if m]
        assert s.token_advantages(pos) == _expected(t, a, ceiling)
    if ceiling == -1.0:  # the good first call keeps +1.5; the broken second call gets -1.0
        assert samples[0].token_advantages(pos_of(samples[0])) == [1.5] * 4 + [-1.0] * 3
        assert samples[1].token_advantages(pos_of(samples[1])) == [-1.0] * 2 + [-0.4] * 5


def pos_of(s: Sample) -> list[int]:
    return [j for j, m in enumerate(s.loss_mask) if m]


def test_turn_credit_reads_the_grpo_section():
    assert turn_credit(GrpoConfig()) == -1.0
    assert turn_credit(GrpoConfig(turn_credit="malformed", malformed_advantage=-0.25)) == -0.25
    assert turn_credit(GrpoConfig(turn_credit="episode")) is None


def test_packed_and_shared_micro_batches_hold_the_per_token_advantages():
    g = _group()
    samples = samples_from_groups([g], -1.0)
    want = [x for s, t, a in zip(samples, g.trajectories, g.advantages, strict=True) for x in _expected(t, a, -1.0)]
    packed = build_packed(samples, list(range(len(samples))))
    assert packed.adv.tolist() == pytest.approx(want)
    (units,) = plan_shared(samples, budget=4096)
    shared = build_shared(samples, units)
    assert sorted(shared.sample_ids) == [0, 1, 2]
    want = [x for k in shared.sample_ids for x in _expected(g.trajectories[k], g.advantages[k], -1.0)]
    assert shared.shared_tokens > 0  # the 20-token prompt is fed once
    assert shared.adv.tolist() == pytest.approx(want)


def test_bad_spans_are_refused():
    s = Sample(tokens=[1, 2, 3, 4], loss_mask=[0, 1, 1, 1], sampler_logprobs=[0.0] * 4, advantage=1.0, spans=((2, 9, -1.0),))
    with pytest.raises(ValueError, match="advantage span"):
        check_sample(s, 0)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _flagged_logprob_change(base_model, turn_credit: str) -> float:
    """One step on a group whose best episode's second turn is malformed: the change of the
    summed log-prob of that turn's tokens under the updated policy."""
    lcfg = LearnerConfig(mode="full", lr=1e-2, gradient_checkpointing=False, max_grad_norm=0.0)
    learner = Learner(wrap_policy(copy.deepcopy(base_model), lcfg), GrpoConfig(beta=0.0, turn_credit=turn_credit), lcfg)
    g = _group()
    sample = samples_from_groups([g])[0]
    a, b = g.trajectories[0].malformed_turns[0]

    def flagged_logp() -> float:
        with torch.no_grad():
            ids = torch.tensor([sample.tokens])
            logp = torch.log_softmax(learner.model(input_ids=ids).logits.float(), -1)[0]
            return float(sum(logp[i - 1, sample.tokens[i]] for i in range(a, b)))

    before = flagged_logp()
    learner.step([Group(task_id="t", trajectories=g.trajectories[:2], advantages=[1.0, -1.0])])
    return flagged_logp() - before


def test_the_update_lowers_a_malformed_turn_that_episode_credit_would_raise(base_model):
    # The episode with advantage +1 holds a broken second call: episode credit raises its
    # tokens' log-prob with the rest of the episode; malformed credit lowers it.
    assert _flagged_logprob_change(base_model, turn_credit="episode") > 0
    assert _flagged_logprob_change(base_model, turn_credit="malformed") < 0


def test_a_zero_variance_group_still_trains_its_malformed_turns():
    from trustee.learn.advantages import compute_advantages

    same = [_traj(20, [4, 3], [1], 0.0, "a"), _traj(20, [3], [], 0.0, "b"), _traj(20, [2, 2], [0], 0.0, "c")]
    varied = [_traj(20, [3], [], 1.0, "d"), _traj(20, [3], [], 0.0, "e")]
    groups = [Group(task_id="same", trajectories=same), Group(task_id="varied", trajectories=varied)]
    dropped = compute_advantages(groups)
    assert [g.task_id for g in dropped.groups] == ["varied"] and dropped.malformed_only == 0
    kept = compute_advantages(groups, keep_malformed=True)
    assert kept.filtered == 1 and kept.malformed_only == 1
    assert [g.task_id for g in kept.groups] == ["varied", "same"]  # the malformed-only group last
    only = kept.groups[1]
    assert [t.episode_id for t in only.trajectories] == ["a", "c"] and only.advantages == [0.0, 0.0]
    # In the learner only the malformed turns carry a gradient: every other token's advantage is 0.
    a, c = samples_from_groups([only], -1.0)
    assert a.token_advantages(pos_of(a)) == [0.0] * 4 + [-1.0] * 3
    assert c.token_advantages(pos_of(c)) == [-1.0] * 2 + [0.0] * 2
