"""Closed-loop learning: a one-prompt bandit through the real HF engine, episode runner,
learner and weight push must drive a rarely-said first token to probability >= 0.9.

The environment is a test double (`BanditEnv`, scripted: one turn, reward 1 when the turn is
exactly the chosen token); everything else is the production path. What this catches: a sign
error in the loss or the advantages (the probability falls), stale weights after a push (the
engine keeps sampling from the old policy, so its own log-prob of the chosen token never
rises), masks off by one (the first sampled token is not the one trained), and a learner that
silently trains nothing. The probability is read from the engine's log-prob of the sampled
chosen token, i.e. from the weights that actually serve.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import anyio
import pytest
import torch

from trustee.chat.render import ChatFormat, Conversation, project_template
from trustee.config import EngineConfig, GrpoConfig, LearnerConfig, RolloutConfig
from trustee.engines import build_engine
from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score
from trustee.learn.advantages import compute_advantages
from trustee.learn.learner import Learner
from trustee.learn.policy import load_policy
from trustee.placement import weight_update
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.types import Group, Message, Task

# A random-weight model's next-token distribution is nearly flat (top p ~ 0.002 at
# temperature 1); at 0.2 its top tokens reach a few percent, so a target near 2% exists.
# Sampler and learner both use this temperature, as a run with rollout.temperature = 0.2 would.
TEMPERATURE = 0.2
PROMPT = [Message(role="system", content="Answer."), Message(role="user", content="Say the word.")]


class BanditEnv:
    """Test double: one policy turn; reward 1.0 when the turn's text is exactly `target`."""

    name = "bandit"
    reward_range = (0.0, 1.0)

    def __init__(self, target: str):
        self.target = target

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        return Task(
            id="bandit",
            env=self.name,
            tools=[],
            first_query=PROMPT[1].content,
            system_prompt=PROMPT[0].content,
        )

    async def start(self, task: Task, episode_id: str, group=None) -> EpisodeState:
        return EpisodeState(episode_id=episode_id, task=task, messages=list(PROMPT), group=group)

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        state.data["text"] = action.message.content
        state.done = True
        return []

    async def score(self, state: EpisodeState) -> Score:
        return Score(reward=float(state.data["text"] == self.target))


def _pick_target(model_dir: Path, tokenizer) -> tuple[int, str, float]:
    """A first token the untrained model rarely says: probability near 2% at TEMPERATURE,
    not special, and unambiguous as text."""
    from transformers import AutoModelForCausalLM

    fmt = ChatFormat(tokenizer, [], template=project_template())
    ids = Conversation.start(fmt, PROMPT).ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float() / TEMPERATURE, -1)  # [V]
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    texts = [tokenizer.decode([i]) for i in range(len(p))]
    stripped: dict[str, int] = {}
    for t in texts:  # the parser may trim whitespace: a target must be unambiguous after that
        stripped[t.strip()] = stripped.get(t.strip(), 0) + 1
    best = None
    for tok in torch.argsort((p - 0.02).abs()).tolist():
        text = texts[tok]
        if tok in special or text != text.strip() or not text or "<" in text or stripped[text] > 1:
            continue
        best = (tok, text, float(p[tok]))
        break
    assert best is not None
    return best


async def _train_bandit(model_dir: Path, tokenizer, mode: str, lr: float, push: bool, max_steps: int):
    tok, text, p0 = _pick_target(model_dir, tokenizer)
    assert p0 < 0.1, f"the chosen token is not rare at first (p = {p0:.3f})"
    env = BanditEnv(text)
    engine = build_engine(
        EngineConfig(backend="hf", max_num_seqs=64),
        str(model_dir),
        dtype="float32",
        max_model_len=256,
        seed=0,
        lora=mode == "lora",
        lora_rank=8,
    )
    rollout = RolloutConfig(max_turns=1, max_tokens_per_turn=1, temperature=TEMPERATURE)
    runner = EpisodeRunner(engine, tokenizer, cfg=rollout, max_model_len=256, template=project_template())
    grpo = GrpoConfig(steps=max_steps, tasks_per_step=4, group_size=16, beta=0.0, loss_type="dapo")
    lcfg = LearnerConfig(
        mode=mode, lr=lr, lora_rank=8, lora_alpha=16.0, gradient_checkpointing=False, max_grad_norm=1.0
    )
    policy = load_policy(str(model_dir), lcfg, device=torch.device("cpu"), dtype=torch.float32)
    learner = Learner(
        policy, grpo, lcfg, temperature=TEMPERATURE, total_steps=max_steps, pad_id=tokenizer.pad_token_id or 0
    )
    history = []
    try:
        task = await env.make_task(Knobs(), random.Random(0))
        for step in range(max_steps):
            groups = []
            for g in range(grpo.tasks_per_step):
                groups.append(
                    Group(
                        task_id=f"{step}-{g}",
                        trajectories=await run_group(env, task, grpo.group_size, runner),
                    )
                )
            trajs = [t for g in groups for t in g.trajectories]
            hits = [t for t in trajs if t.reward == 1.0]
            # The engine's own probability of the chosen token (log-prob of the sampled id).
            p_engine = max((math.exp(t.logprobs[t.prompt_len]) for t in hits), default=0.0)
            for t in hits:
                assert t.tokens[t.prompt_len] == tok  # the sampled first id is the chosen token
            history.append((step, len(hits) / len(trajs), p_engine, engine.version))
            if p_engine >= 0.9:
                return history, True
            adv = compute_advantages(groups, scale="group")
            if adv.groups:
                await learner.step_async(adv.groups)
                if push:
                    await engine.update_weights(weight_update(learner))
        return history, False
    finally:
        await engine.close()


@pytest.mark.parametrize(("mode", "lr"), [("lora", 5e-3), ("full", 5e-4)])
def test_bandit_reaches_the_rewarded_token(tiny_model_dir, tiny_tokenizer, mode, lr):
    history, ok = anyio.run(_train_bandit, tiny_model_dir, tiny_tokenizer, mode, lr, True, 25)
    assert ok, f"{mode}: the engine's p(chosen) never reached 0.9 in 25 steps: {history}"
    # It started rare: the first step's hit rate is low.
    assert history[0][1] < 0.25, history
