"""Deterministic learner inputs shared by the tests/test_learn_*.py modules (not a test module)."""

from __future__ import annotations

import random

from trustee.learn.packing import Sample


def make_samples(n: int, seed: int = 0, vocab: int = 1000) -> list[Sample]:
    """Multi-turn-like samples: a prompt, then sampled segments separated by masked turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mask = [0] * rng.randint(3, 8)
        for _ in range(rng.randint(1, 3)):
            mask += [1] * rng.randint(2, 9) + [0] * rng.randint(0, 5)
        toks = [rng.randrange(vocab) for _ in mask]
        lps = [rng.uniform(-8.0, -5.5) if m else 0.0 for m in mask]
        out.append(
            Sample(tokens=toks, loss_mask=mask, sampler_logprobs=lps, advantage=rng.choice([-1.2, 0.4, 1.0]))
        )
    return out


def make_groups(seed: int, n: int = 8, *, nan_group: int | None = None, vocab: int = 1024) -> list:
    """`make_samples(n)` as GRPO groups of two trajectories with advantages +1 / -1; group
    `nan_group` (if given) gets a NaN advantage, to inject a non-finite loss."""
    from trustee.types import Group, Trajectory

    samples = make_samples(n, seed=seed, vocab=vocab)
    out = []
    for g in range(0, n, 2):
        trajs = [
            Trajectory(
                episode_id=f"e{i}",
                task_id=f"t{g}",
                tokens=s.tokens,
                loss_mask=s.loss_mask,
                logprobs=s.sampler_logprobs,
                versions=[0 if m else -1 for m in s.loss_mask],
                prompt_len=s.loss_mask.index(1),
            )
            for i, s in enumerate(samples[g : g + 2])
        ]
        adv = [float("nan"), 1.0] if g // 2 == nan_group else [1.0, -1.0]
        out.append(Group(task_id=f"t{g}", trajectories=trajs, advantages=adv[: len(trajs)]))
    return out


def random_qwen3(out, *, vocab: int, hidden: int, layers: int, heads: int, tied: bool, seed: int):
    """A random float32 Qwen3 saved at `out` (weights and config; no tokenizer): the learner
    tests' models whose sizes they choose. MLP width 4 x hidden, half as many KV heads, head
    dim hidden / heads."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


def rank_spec_for(path, learner, grpo, world: int = 2):
    """The RankSpec of a CPU learner test: `world` gloo ranks of one torch thread, seed 0, on a
    free loopback port."""
    from trustee.learn.distributed import _free_port
    from trustee.learn.fsdp_rank import RankSpec

    return RankSpec(
        model_path=str(path),
        learner=learner,
        grpo=grpo,
        temperature=1.0,
        total_steps=10,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        threads=1,
        seed=0,
    )
