"""Every cross-field rule of the config (`trustee.config.RULES`) and each of its messages.

A case is (overrides on the defaults, the field the problem names, words its message holds).
Each case is checked twice: `load_config` refuses it naming that field with that message, and
the named rule alone finds it in the decoded config (so the message comes from that rule). A
rule without cases, or cases for a rule that no longer exists, fails the first test.
"""

from __future__ import annotations

import msgspec
import pytest

from trustee.config import RULES, Config, ConfigError, apply_overrides, load_config
from trustee.config.load import _with_simulator_engine_defaults

SIM = ["environment.kind=simulated", "environment.reward=judge"]
VLLM = ["engines.policy.backend=vllm"]
MCP = ["environment.kind=mcp", "environment.reward=reference"]
SERVERS = "environment.mcp.servers="

CASES: dict[str, list[tuple[list[str], str, str]]] = {
    "grpo_clip_and_correction": [
        (["grpo.clip_low=0.3", "grpo.clip_high=0.1"], "grpo.clip_high", "must be >= grpo.clip_low (0.3)"),
        (["grpo.is_min=2.0", "grpo.is_max=1.5"], "grpo.is_max", "must be > grpo.is_min (2.0)"),
        (["grpo.clip_low=0"], "grpo.clip_low", "must be in (0, 1)"),
        (["grpo.clip_high=12", "grpo.clip_low=0.2"], "grpo.clip_high", "must be in (0, 10]"),
    ],
    "kl_metric_needs_a_reference": [
        (
            ["learner.mode=full", "grpo.kl_metric=true", "grpo.beta=0"],
            "grpo.kl_metric",
            "needs a reference copy",
        ),
    ],
    "curriculum_thresholds_fit_the_reward": [
        (["curriculum.low=0.6"], "curriculum.high", "must be >= curriculum.low (0.6)"),
        (["curriculum.high=1.0"], "curriculum.high", "the difficulty could never rise"),
        (["curriculum.low=-1.0"], "curriculum.low", "the difficulty could never fall"),
        (
            ["curriculum.kind=fixed", "curriculum.low=0.5", "curriculum.high=0.2"],
            "curriculum.high",
            "must be >= curriculum.low (0.5)",
        ),
    ],
    "curriculum_stages": [
        (
            ["environment.kind=bfcl", "environment.reward=progress", "curriculum.kind=staged"],
            "curriculum.stages",
            "needs at least one [[curriculum.stages]]",
        ),
        (["curriculum.kind=staged"], "curriculum.kind", "has none of them to switch"),
        (
            ["curriculum.stages=[{name='s1', reward='progress'}]"],
            "curriculum.stages",
            "only used with curriculum.kind = 'staged'",
        ),
    ],
    "engine_gpus": [
        (
            ["placement.policy_gpus=[0, 1]"],
            "placement.policy_gpus",
            "tensor_parallel_size x data_parallel_size = 1",
        ),
        (
            [*VLLM, "engines.policy.tensor_parallel_size=2", "placement.policy_gpus=[0, 0]"],
            "placement.policy_gpus",
            "lists a GPU twice",
        ),
        (
            [*SIM, "engines.simulator.backend=openai", "engines.simulator.base_url='http://x/v1'"]
            + ["placement.simulator_gpus=[0]"],
            "placement.simulator_gpus",
            "runs on no local GPU",
        ),
        (["placement.learner_gpus=[0, 0]"], "placement.learner_gpus", "lists a GPU twice"),
    ],
    "remote_engines": [
        (["engines.simulator.backend=openai"], "engines.simulator.base_url", "needs a server URL"),
        (
            ["engines.policy.backend=openai", "engines.policy.base_url='http://x/v1'"],
            "engines.policy.backend",
            "must load new weights",
        ),
    ],
    "backend_capabilities": [
        (
            ["engines.policy.kv_cache_gib=2"],
            "engines.policy.kv_cache_gib",
            "backend 'hf' cannot honour it (only 'vllm' can)",
        ),
        (["engines.policy.base_url='http://x/v1'"], "engines.policy.base_url", "only 'openai' can"),
        (
            [*SIM, "engines.simulator.backend=openai", "engines.simulator.base_url='http://x/v1'"]
            + ["engines.simulator.max_num_seqs=3"],
            "engines.simulator.max_num_seqs",
            "backend 'openai' cannot honour it (only 'hf', 'vllm' can)",
        ),
        (["engines.simulator.max_lora_rank=8"], "engines.simulator.max_lora_rank", "never loads an adapter"),
    ],
    "adapter_fits_the_policy_engine": [
        (
            [*VLLM, "engines.policy.max_lora_rank=8", "learner.lora_rank=16"],
            "engines.policy.max_lora_rank",
            "must be >= learner.lora_rank (16)",
        ),
    ],
    "learner_devices": [
        (["learner.mode=qlora"], "learner.mode", "needs CUDA"),
        (
            ["placement.learner_ranks=2", "placement.learner_gpus=[0]"],
            "placement.learner_ranks",
            "each learner rank needs its own GPU",
        ),
        (
            ["learner.mode=qlora", "placement.learner_ranks=2", "placement.learner_gpus=[0, 1]"],
            "placement.learner_ranks",
            "not sharded by the FSDP2 learner",
        ),
    ],
    "colocate_placement": [
        (
            [*SIM, "placement.mode=colocate"],
            "engines.simulator.enable_sleep_mode",
            "which must sleep while it trains",
        ),
        (
            [*VLLM, "placement.mode=colocate", "placement.policy_gpus=[0]", "placement.learner_gpus=[0, 3]"],
            "placement.learner_gpus",
            "[3] run no engine",
        ),
    ],
    "offload_needs_colocate": [
        (["learner.offload=true"], "learner.offload", "placement.mode = 'sync' never puts engines to sleep"),
    ],
    "shared_weights_fit": [
        (
            ["learner.weight_transport=shared"],
            "learner.weight_transport",
            "learner.mode = 'lora' sends an adapter, not full weights; placement.learner_ranks = 1",
        ),
        (
            [
                *VLLM,
                "learner.weight_transport=shared",
                "learner.mode=full",
                "placement.mode=colocate",
                "placement.policy_gpus=[0,1,2]",
                "placement.learner_gpus=[0,1]",
                "placement.learner_ranks=2",
            ],
            "learner.weight_transport",
            "policy GPUs [2] hold no learner rank",
        ),
    ],
    "sync_placement": [
        (
            [*VLLM, "placement.mode=sync", "placement.policy_gpus=[0]", "placement.learner_gpus=[0]"],
            "placement.learner_gpus",
            "'sync' keeps the policy engine resident on GPU(s) [0]",
        ),
    ],
    "split_placement": [
        (
            ["placement.mode=split"],
            "placement.learner_gpus",
            "'split' puts the learner on GPUs no engine uses",
        ),
        (
            [*VLLM, "placement.mode=split", "placement.policy_gpus=[0]", "placement.learner_gpus=[0]"],
            "placement.learner_gpus",
            "disjoint from the engines' (the policy engine is on [0])",
        ),
    ],
    "memory_fractions": [
        (
            [*SIM, *VLLM, "engines.simulator.backend=vllm", "placement.policy_gpus=[0]"]
            + ["placement.simulator_gpus=[0]", "engines.policy.gpu_memory_utilization=0.6"]
            + ["engines.simulator.gpu_memory_utilization=0.6"],
            "engines.simulator.gpu_memory_utilization",
            "= 1.20 > 1",
        ),
    ],
    "model_limits": [
        (
            ["simulator.tiny_sft_steps=3"],
            "simulator.tiny_sft_steps",
            "builds a tiny simulator, so it needs model.tiny",
        ),
        (
            ["rollout.max_tokens_per_turn=4096", "model.max_model_len=4096"],
            "rollout.max_tokens_per_turn",
            "must be < model.max_model_len (4096)",
        ),
        (
            ["model.enable_thinking=true", "model.chat_format=llama3"],
            "model.enable_thinking",
            "the llama3 chat format has no reasoning block",
        ),
        (
            ["model.enable_thinking=true", "model.chat_format=chatml"],
            "model.enable_thinking",
            "the chatml chat format has no reasoning block",
        ),
        (
            ["model.tiny=test", "model.packaged=smollm2-135m-instruct"],
            "model.packaged",
            "also builds model.path",
        ),
    ],
    "few_shot_environments": [
        (
            ["environment.kind=bfcl", "environment.reward=progress", "environment.few_shot=2"],
            "environment.few_shot",
            "for kinds 'toy', 'tasks_file' and 'simulated' only",
        ),
        (["environment.few_shot=2"], "environment.few_shot", "the simulated kind's worked examples are the toy"),
        (["simulator.few_shot=2"], "simulator.few_shot", "worked scenarios are written for catalog draws"),
        (["simulator.tool_few_shot=2"], "simulator.tool_few_shot", "worked tool calls are the toy tools' calls"),
    ],
    "environment_reward": [
        (
            ["environment.kind=toy", "environment.reward=judge"],
            "environment.reward",
            "one of 'exact', 'graded'",
        ),
    ],
    "python_environment_fields": [
        (["environment.kind=python", "environment.reward=custom"], "environment.factory", "needs a factory"),
        (["environment.factory='m:f'"], "environment.factory", "only used with kind 'python'"),
    ],
    "tasks_file_fields": [
        (
            ["environment.kind=tasks_file", "environment.reward=judge"],
            "environment.tasks_file.path",
            "needs a JSONL file of tasks",
        ),
        (
            [
                "environment.kind=tasks_file",
                "environment.reward=judge",
                "environment.tasks_file.path='t.jsonl'",
            ],
            "environment.tasks_file.tools_module",
            "tools = 'python' needs the module",
        ),
        (
            [
                "environment.kind=tasks_file",
                "environment.reward=judge",
                "environment.tasks_file.path='t.jsonl'",
            ]
            + ["environment.tasks_file.tools=simulated", "environment.tasks_file.tools_module='m'"],
            "environment.tasks_file.tools_module",
            "only used with tools = 'python'",
        ),
        (
            ["environment.kind=tasks_file", "environment.reward=function"],
            "environment.tasks_file.reward_fn",
            "needs 'module:function'",
        ),
        (
            [
                "environment.kind=tasks_file",
                "environment.reward=judge",
                "environment.tasks_file.reward_fn='m:f'",
            ],
            "environment.tasks_file.reward_fn",
            "only used with reward 'function' or 'function+judge'",
        ),
        (
            ["environment.tasks_file.path='t.jsonl'"],
            "environment.tasks_file",
            "only used with kind 'tasks_file'",
        ),
    ],
    "judge_mode_with_rubric": [
        (
            ["environment.reward=rubric", "simulator.judge_mode=trustee"],
            "simulator.judge_mode",
            "always judges with the rubric",
        ),
    ],
    "adapter_needs_an_adapter_learner": [
        (["model.adapter='a'", "learner.mode=full"], "model.adapter", "has no adapter to continue"),
        (
            ["model.adapter='a'", "placement.learner_ranks=2"],
            "model.adapter",
            "from an adapter is not built yet",
        ),
    ],
    "simulator_on_the_policy_base": [
        (
            ["simulator.engine='policy-base'", "learner.mode=full"],
            "simulator.engine",
            "learner.mode = 'full' trains",
        ),
        (
            ["simulator.engine='policy-base'", "simulator.model_path='sim'"],
            "simulator.model_path",
            "the simulator is model.path's base",
        ),
        (
            ["simulator.engine='policy-base'", "engines.simulator.max_num_seqs=8"],
            "engines.simulator.max_num_seqs",
            "no simulator engine is built",
        ),
        (
            ["simulator.engine='policy-base'", "placement.simulator_gpus=[0]"],
            "placement.simulator_gpus",
            "runs on placement.policy_gpus",
        ),
    ],
    "mcp_fields": [
        (MCP, "environment.mcp.tasks", "needs a JSONL tasks file, or 'generate'"),
        (MCP, "environment.mcp.servers", "needs at least one server"),
        ([*MCP, SERVERS + "[{name='a b', command='x'}]"], "environment.mcp.servers[0].name", "1-64 letters"),
        (
            [*MCP, SERVERS + "[{name='a', command='x'}, {name='a', command='y'}]"],
            "environment.mcp.servers[1].name",
            "must be unique",
        ),
        (
            [*MCP, SERVERS + "[{name='a', command='x', url='http://h/mcp'}]"],
            "environment.mcp.servers[0].command",
            "either command (stdio) or url",
        ),
        (
            [*MCP, SERVERS + "[{name='a', url='http://h/mcp', args=['-v']}]"],
            "environment.mcp.servers[0].args",
            "a url server takes neither",
        ),
        (
            [*MCP, SERVERS + "[{name='a', url='ftp://h'}]"],
            "environment.mcp.servers[0].url",
            "starts with http://",
        ),
        (
            ["environment.kind=mcp", "environment.reward=function"],
            "environment.mcp.reward_fn",
            "needs 'module:function'",
        ),
        (
            [*MCP, "environment.mcp.reward_fn='m:f'"],
            "environment.mcp.reward_fn",
            "only used with reward 'function'",
        ),
        (
            [*MCP, "environment.mcp.judge_weight=0.3"],
            "environment.mcp.judge_weight",
            "only used with reward 'function+judge'",
        ),
        (["environment.mcp.tasks='t.jsonl'"], "environment.mcp", "only used with kind 'mcp'"),
    ],
}


def test_every_rule_has_cases_and_every_case_a_rule():
    assert [r.__name__ for r in RULES] == list(CASES)
    for rule in RULES:
        assert rule.__doc__, f"{rule.__name__} says in a docstring what it checks"


@pytest.mark.parametrize(
    ("rule", "overrides", "path", "words"),
    [(rule, *case) for rule, cases in CASES.items() for case in cases],
    ids=[f"{rule}-{i}" for rule, cases in CASES.items() for i in range(len(cases))],
)
def test_rule_message(rule, overrides, path, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert any(p.path == path and words in p.message for p in e.value.problems), e.value
    raw = apply_overrides({}, overrides)
    cfg = msgspec.convert(_with_simulator_engine_defaults(raw), Config)
    found = next(r for r in RULES if r.__name__ == rule)(cfg, raw)
    assert any(p.path == path and words in p.message for p in found), found
