"""HFEngine's prefix reuse across an episode's turns (engines/hf_prefix.py): the same tokens and
log-probs as prefilling every turn whole, fewer tokens prefilled, nothing stale after a weight
update, and the store's own rules (longest match, budget, least recently used first)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_harness import load_reference, perturbed_state

from trustee.engines.base import FullUpdate, Sampling
from trustee.engines.hf import HFEngine
from trustee.engines.hf_prefix import PrefixStore

TOOL_RESULT = [7, 8, 9, 10, 11]  # what an environment appends after each assistant turn


def _engine(tiny_model_dir, reuse: bool) -> HFEngine:
    eng = HFEngine(load_reference(tiny_model_dir), max_batch=16, prefix_cache_bytes=2**26 if reuse else 0)
    eng.eos_ids = frozenset()  # every turn runs to max_tokens: the same lengths with and without reuse
    return eng


async def _episodes(eng: HFEngine, turns: int, update=None) -> list[list]:
    """Two groups of GRPO-style multi-turn episodes (two opening prompts of different lengths,
    four episodes each; greedy and seeded sampling), every turn's prompt the whole conversation.
    `update`, if given, is pushed between the first and the second turn of every episode."""
    openings = [list(range(3, 60)), list(range(100, 140))]
    pushed = asyncio.Event()

    async def episode(i: int) -> list:
        conv, outs = list(openings[i // 4]), []
        for turn in range(turns):
            if turn == 1 and update is not None:
                await pushed.wait()
            params = Sampling(max_tokens=6 + turn, temperature=0.0 if i % 2 else 0.9, seed=10 * i + turn)
            out = await eng.generate(conv, params)
            outs.append(out)
            conv = conv + out.token_ids + TOOL_RESULT
        return outs

    tasks = [asyncio.create_task(episode(i)) for i in range(8)]
    if update is not None:
        while eng.stats().requests < 8 or eng._pending or eng._gate.locked():
            await asyncio.sleep(0.01)  # the first turns were served
        await eng.update_weights(update)
        pushed.set()
    return await asyncio.gather(*tasks)


def _same(a: list[list], b: list[list]) -> None:
    for ea, eb in zip(a, b, strict=True):
        for x, y in zip(ea, eb, strict=True):
            assert x.token_ids == y.token_ids
            assert (torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max().item() < 1e-5


@pytest.mark.parametrize("fast", [True, False])  # hf_decode's cache with room; transformers' DynamicCache
def test_reuse_gives_the_tokens_of_whole_prefills_and_prefills_less(tiny_model_dir, fast):
    with_reuse, without = _engine(tiny_model_dir, True), _engine(tiny_model_dir, False)
    with_reuse.fast_decode = without.fast_decode = fast
    a = asyncio.run(_episodes(with_reuse, turns=3))
    b = asyncio.run(_episodes(without, turns=3))
    _same(a, b)
    assert len({tuple(e[0].token_ids) for e in a[:4]}) > 1  # the sampled episodes went apart
    assert with_reuse.prefix.reused_tokens > 8 * 2 * 40  # turns 2 and 3 reused each conversation
    assert without.prefix.reused_tokens == 0 and len(without.prefix) == 0
    assert with_reuse.prefilled_tokens * 3 < without.prefilled_tokens


def test_a_weight_update_leaves_nothing_stale(tiny_model_dir):
    update = FullUpdate(chunks=[perturbed_state(load_reference(tiny_model_dir), seed=3)])
    with_reuse, without = _engine(tiny_model_dir, True), _engine(tiny_model_dir, False)
    a = asyncio.run(_episodes(with_reuse, turns=3, update=update))
    b = asyncio.run(_episodes(without, turns=3, update=update))
    _same(a, b)
    assert {o.policy_version for e in a for o in e[1:]} == {1}
    # turn 2 prefilled whole under the new weights; only turn 3 reused (turn 2's sequences)
    reused = with_reuse.prefix.reused_tokens
    assert reused > 0
    stale = _engine(tiny_model_dir, True)
    asyncio.run(_episodes(stale, turns=1))
    assert len(stale.prefix) > 0
    asyncio.run(stale.update_weights(update))
    assert len(stale.prefix) == 0 and stale.prefix.nbytes == 0


def _kv(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.zeros(1, n, 2)], [torch.zeros(1, n, 2)]  # one layer, [Hkv, n, D]; 16 n bytes each


def test_prefix_store_longest_match_budget_and_order():
    store = PrefixStore(budget=16 * 60, min_reuse=4)  # room for 60 tokens' keys and values
    store.add(tuple(range(20)), True, *_kv(20))
    store.add(tuple(range(10)) + (99,) * 10, True, *_kv(20))
    entry, n = store.match(tuple(range(30)), True)
    assert entry is not None and n == 20 and entry.tokens == tuple(range(20))
    assert store.match(tuple(range(20)), True)[1] == 19  # one token is left to prefill
    assert store.match(tuple(range(30)), False) == (None, 0)  # another adapter state
    assert store.match((5,) * 30, True) == (None, 0)  # nothing shares min_reuse tokens
    store.add(tuple(range(25)), True, *_kv(25))  # extends the first: replaces it
    assert len(store) == 2 and store.match(tuple(range(30)), True)[1] == 25
    store.add(tuple(range(12)), True, *_kv(12))  # a prefix of a stored one: nothing new
    assert len(store) == 2
    store.match(tuple(range(10)) + (99,) * 12, True)  # the 99s entry is now the most recent
    store.add(tuple(range(200, 220)), True, *_kv(20))  # over budget: the least recent goes
    assert store.match(tuple(range(30)), True)[1] == 10  # range(25) is gone; the 99s share 10
    assert store.match(tuple(range(10)) + (99,) * 12, True)[1] == 20
    assert store.nbytes == 16 * 40 <= store.budget
    store.add(tuple(range(300, 400)), True, *_kv(100))  # bigger than the budget: not kept
    assert len(store) == 2


def test_a_group_split_across_batches_prefills_its_prompt_once(tiny_model_dir):
    # The copies of a group's opening prompt are run once when they share a batch; a copy that
    # arrives after the batch started reuses the stored prompt and prefills one token.
    prompt, greedy = list(range(3, 80)), Sampling(max_tokens=5, temperature=0.0)
    eng = _engine(tiny_model_dir, True)
    first = asyncio.run(eng.generate(prompt, greedy))
    tokens0 = eng.prefilled_tokens
    again = asyncio.run(eng.generate(prompt, greedy))
    assert eng.prefix.reused_tokens == len(prompt) - 1 and eng.prefilled_tokens - tokens0 == 1
    plain = asyncio.run(_engine(tiny_model_dir, False).generate(prompt, greedy))
    assert first.token_ids == again.token_ids == plain.token_ids


def test_enable_prefix_caching_false_turns_reuse_off(tiny_model_dir):
    from trustee.config.schema import EngineConfig

    on = HFEngine.from_config(EngineConfig(), model_path=tiny_model_dir)
    off = HFEngine.from_config(EngineConfig(enable_prefix_caching=False), model_path=tiny_model_dir)
    prompt, greedy = list(range(3, 80)), Sampling(max_tokens=3, temperature=0.0)
    for eng in (on, off):
        for _ in range(2):
            asyncio.run(eng.generate(prompt, greedy))
    assert on.prefix.reused_tokens == len(prompt) - 1
    assert off.prefix.reused_tokens == 0 and len(off.prefix) == 0
