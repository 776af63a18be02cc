"""simulator.engine = 'policy-base': the simulator plays on the policy engine with the adapter off.

The property that makes it sound: the simulator never sees the adapter, at any policy version.
Checked here on the HF engine through the run's own placement (one engine built, the simulator a
view of it), greedy and bit for bit, before and after several adapter updates, with policy and
simulator requests in flight together; and the converse (the policy's outputs do change with
the adapter), so the comparison could fail. The vLLM engine runs the same property in the
contract suite (tests/test_engine_contract.py, `test_base_requests_never_see_the_adapter`).
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
from pathlib import Path

import anyio
import torch
from engine_harness import load_reference, reference_greedy

from trustee.config import load_config, resolve
from trustee.engines.base import LoraUpdate, Sampling
from trustee.engines.policy_base import PolicyBase

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = ["environment.kind=simulated", "environment.reward=judge"]
GREEDY = Sampling(max_tokens=10, temperature=0.0)


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(10, 900, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _random_lora(reference, seed: int) -> LoraUpdate:
    """An adapter with non-zero B (peft's default leaves B = 0, a no-op): what a learner pushes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(reference), cfg)
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return LoraUpdate(config=model.peft_config["default"].to_dict(), tensors=tensors)


def _ids_and_logprobs(outs) -> list[tuple[list[int], list[float]]]:
    return [(o.token_ids, o.logprobs) for o in outs]


def test_simulator_on_the_policy_base_never_sees_the_adapter(tiny_model_dir, tmp_path):
    from trustee.placement import Placement

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "simulator.engine='policy-base'", *SIMULATED])
    reference = load_reference(tiny_model_dir)
    prompts = _prompts(4)

    async def scenario():
        placement = await Placement.start(cfg, resolve(cfg, tmp_path / "run"))
        try:
            assert list(placement.engines) == ["policy"]  # one engine, one copy of the weights
            sim = placement.simulator
            assert isinstance(sim, PolicyBase) and sim.policy is placement.policy
            before = await asyncio.gather(*[sim.generate(p, GREEDY) for p in prompts])
            rounds = []
            for seed in (1, 2, 3):
                await placement.push(_random_lora(reference, seed))
                # Policy and simulator requests queued together, interleaved.
                outs = await asyncio.gather(
                    *[e.generate(p, GREEDY) for p in prompts for e in (placement.policy, sim)]
                )
                rounds.append((outs[0::2], outs[1::2]))
            return before, rounds, placement.policy.version, placement.step_metrics()
        finally:
            await placement.close()

    before, rounds, version, metrics = anyio.run(scenario)
    eos = {int(t) for t in [reference.generation_config.eos_token_id] if t is not None}
    # The simulator samples from the base model itself ...
    assert [o.token_ids for o in before] == [reference_greedy(reference, p, 10, eos) for p in prompts]
    assert version == 3
    for i, (policy_outs, sim_outs) in enumerate(rounds):
        # ... at every policy version, bit for bit (token ids and log-probs) ...
        assert _ids_and_logprobs(sim_outs) == _ids_and_logprobs(before)
        assert all(o.policy_version == 0 for o in sim_outs)
        assert all(o.policy_version == i + 1 for o in policy_outs)
        # ... while the policy's requests, in the same queue, do run with the adapter.
        assert [o.token_ids for o in policy_outs] != [o.token_ids for o in before]
    assert metrics["engine/simulator/requests"] == 4 * 4
    assert metrics["engine/policy/requests"] == 4 * 4 + 4 * 3  # the shared engine served both


def test_the_hf_engine_keeps_a_batch_to_one_adapter_state(tiny_model_dir):
    """Base and adapter requests queued together run in separate batches (the HF engine switches
    the adapter per batch, not per row), and each kind gets its own model's outputs."""
    from trustee.engines.hf import HFEngine

    reference = load_reference(tiny_model_dir)
    eng = HFEngine.from_pretrained(tiny_model_dir, max_batch=16)
    base = Sampling(max_tokens=6, temperature=0.0, adapter=False)
    prompts = _prompts(6)

    async def scenario():
        await eng.update_weights(_random_lora(reference, 7))
        outs = await asyncio.gather(
            *[eng.generate(p, base if i % 2 else GREEDY) for i, p in enumerate(prompts)]
        )
        return outs, eng.stats().max_batch

    outs, widest = asyncio.run(scenario())
    eos = {int(t) for t in [reference.generation_config.eos_token_id] if t is not None}
    want = [reference_greedy(reference, p, 6, eos) for p in prompts]
    assert [o.token_ids for o in outs[1::2]] == want[1::2]  # base requests: the base model
    assert [o.token_ids for o in outs[0::2]] != want[0::2]  # adapter requests: not the base
    assert widest == 3  # the six were queued together but never decoded in one batch


def test_one_gpu_trustee_plans_one_engine_under_the_card():
    """configs/1gpu-trustee.toml: the simulator on the policy's base passes --dry-run with one
    engine (no simulator weights or KV cache in the plan); its return code 0 says every phase
    leaves 5% of 23.5 GiB free (the budget figures: tests/test_placement.py)."""
    r = subprocess.run(
        [sys.executable, "-m", "trustee.run", "configs/1gpu-trustee.toml", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    sim_line = next(x for x in r.stdout.splitlines() if x.strip().startswith("simulator"))
    assert "on the policy engine, adapter off: vllm on GPUs [0]" in sim_line
    rows = [x for x in r.stdout.splitlines() if x.strip().startswith(("GPU", "host"))]
    assert rows and not any("simulator" in x for x in rows)  # one engine, one copy of the weights
    assert sum(x.count("policy weights ") for x in rows if " rollout " in x) == 1
    assert "simulator.engine = 'policy-base'" in r.stdout


def test_worked_scenarios_come_before_the_task_request(tiny_tokenizer):
    """simulator.few_shot = 2: the task generator's scenario request follows two worked turns
    (another catalog draw's request and the toy teacher's scenario for it); 0: none."""
    import random

    from trustee.config import EnvironmentConfig, SimulatorConfig
    from trustee.envs.simulated import build_simulated_env
    from trustee.sim.fakes import FakeJsonEngine  # engine double: random schema-valid JSON
    from trustee.types import Knobs

    def prompt(few_shot: int) -> str:
        sim = SimulatorConfig(tool_catalog=str(ROOT / "configs/catalogs/toy-tools.jsonl"), few_shot=few_shot)
        engine = FakeJsonEngine(tiny_tokenizer)
        env = build_simulated_env(sim, EnvironmentConfig(reward="judge"), engine, tiny_tokenizer)
        anyio.run(env.make_task, Knobs(difficulty=1.0, n_tools=2, n_expected_calls=1), random.Random(0))
        return tiny_tokenizer.decode(engine.prompts[0])

    with_examples, without = prompt(2), prompt(0)
    assert with_examples.count("<|im_start|>assistant") == 3  # two worked answers, then the request's
    assert without.count("<|im_start|>assistant") == 1
    worked = with_examples.split("<|im_start|>assistant\n")[1]
    assert '"expected_calls": [{"name": ' in worked and '"first_query": "' in worked  # the teacher's scenario
    assert with_examples.count("<|im_start|>system") == 1


def test_the_simulated_policy_sees_the_toy_examples_and_never_trains_on_them(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    """environment.few_shot = 3 in the simulated kind (configs/cpu-trustee.toml): the policy's
    prompt is [system, three worked examples, the generated opening message], the examples
    being the toy environment's own (cpu-smollm's), each call written as Hermes <tool_call>
    JSON; every example token is prompt (loss mask 0), and the simulator's requests never hold
    them. A catalog without the toy tools is refused, naming the field. The simulator is an
    engine double (FakeJsonEngine: random schema-valid JSON); the policy is the tiny HF model."""
    import random

    import pytest

    from trustee.config import EnvironmentConfig, RolloutConfig, SimulatorConfig
    from trustee.engines.hf import HFEngine
    from trustee.envs.simulated import build_simulated_env
    from trustee.envs.toy import ToyEnv
    from trustee.rollout.episode import EpisodeRunner
    from trustee.sim.fakes import FakeJsonEngine  # engine double: random schema-valid JSON
    from trustee.types import Knobs

    catalog = str(ROOT / "configs/catalogs/toy-tools.jsonl")
    sim = SimulatorConfig(tool_catalog=catalog, judge_mode="scripted", max_user_turns=1)
    simulator = FakeJsonEngine(tiny_tokenizer)
    env = build_simulated_env(sim, EnvironmentConfig(reward="judge", few_shot=3), simulator, tiny_tokenizer)
    policy = HFEngine.from_pretrained(tiny_model_dir, max_batch=4, seed=1)
    runner = EpisodeRunner(
        policy, tiny_tokenizer, cfg=RolloutConfig(max_turns=2, max_tokens_per_turn=12), max_model_len=4096
    )

    async def episode():
        task = await env.make_task(Knobs(difficulty=1.0, n_tools=4, n_expected_calls=1), random.Random(0))
        try:
            return task, await runner.run(env, task, "e0")
        finally:
            await policy.close()

    task, traj = anyio.run(episode)
    shots = ToyEnv(few_shot=3).examples(task)
    assert [m.role for m in shots] == ["user", "assistant"] * 3
    assert traj.messages[0].role == "system" and traj.messages[1:7] == shots
    assert traj.messages[7].role == "user" and traj.messages[7].content == task.first_query
    prompt = tiny_tokenizer.decode(traj.tokens[: traj.prompt_len])
    assert prompt.count('<tool_call>\n{"name": "') == 3  # each call as the policy must write it
    assert all(m.content in prompt for m in shots if m.role == "user")
    assert prompt.index(shots[-2].content) < prompt.rindex(task.first_query)
    assert traj.status in ("ok", "truncated") and sum(traj.loss_mask) > 0
    assert not any(traj.loss_mask[: traj.prompt_len])  # no example token is ever trained on
    seen = [tiny_tokenizer.decode(p) for p in simulator.prompts]
    assert seen and not any(m.content in s for s in seen for m in shots if m.role == "user")

    other = tmp_path / "other.jsonl"
    other.write_text(
        '{"name": "ping", "description": "Ping.", "parameters": {"type": "object", "properties": {}}}\n'
    )
    with pytest.raises(ValueError, match=r"environment.few_shot = 3 with simulator.tool_catalog = .*lacks"):
        build_simulated_env(
            SimulatorConfig(tool_catalog=str(other), judge_mode="scripted"),
            EnvironmentConfig(reward="judge", few_shot=3),
            simulator,
            tiny_tokenizer,
        )
