"""The typed configuration tree and its loader.

Owns one frozen msgspec Struct per section of a run (model, engines, simulator,
environment, rollout, grpo, learner, placement, curriculum, logging, checkpoint), the
loader `load_config(path, overrides)` and the cross-field checks. Every default exists once,
on its field, with a one-line docstring (the string literal under the field). Values derived
from the config live in `Resolved` (see `resolve`), never written back into the config.

Errors: `load_config` raises `ConfigError` listing every problem at once, each naming the
field path, the value and the fix. Callers: `trustee.run`, `trustee.eval`, tests.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import textwrap
import tomllib
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Meta

Positive = Annotated[int, Meta(ge=1)]
NonNeg = Annotated[int, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Meta(gt=0.0)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # kw_only is not inherited by msgspec subclasses: every section repeats `kw_only=True`.
    """Base of every config section: strict, immutable, keyword-only."""


# ----------------------------------------------------------------------------- model


def resolve_dtype(dtype: str, device: str) -> str:
    """The one place 'auto' becomes a dtype: bfloat16 on CUDA, float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


class ModelConfig(Section, kw_only=True):
    path: str = ".cache/models/tiny-demo"
    """Policy model: a local directory with config.json and tokenizer files (no hub access)."""
    tiny: Literal["", "test", "demo"] = ""
    """If set, build a tiny offline model of this size at `path` when it is missing."""
    tiny_sft_steps: NonNeg = 0
    """With `tiny`: SFT-warm the built model this many steps on toy tool calls, so RL starts from a model that calls tools."""
    chat_format: Literal["auto", "qwen", "llama3", "mistral"] = "auto"
    """Tool-call syntax and turn format: 'qwen' (Qwen3/Hermes <tool_call>), 'llama3' (Llama 3.x JSON calls), 'mistral' ([TOOL_CALLS]); 'auto' = detected from the tokenizer's special tokens."""
    chat_template: Literal["trustee", "model"] = "trustee"
    """'trustee': the project's prefix-preserving template for the chat format; 'model': the model's own."""
    enable_thinking: bool = False
    """Let the policy write a <think> block before acting (Qwen3 thinking mode; chat_format 'qwen' only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for engines and learner; 'auto' = bfloat16 on CUDA, float32 on CPU (see resolve_dtype)."""
    max_model_len: Annotated[int, Meta(ge=128)] = 8192
    """Longest sequence (prompt + all turns) an episode may reach, in tokens."""


# ----------------------------------------------------------------------------- engines


class EngineConfig(Section, kw_only=True):
    backend: Literal["hf", "vllm", "openai"] = "hf"
    """Inference backend: 'hf' (transformers, CPU/one GPU), 'vllm' (AsyncLLM), 'openai' (remote server)."""
    max_num_seqs: Positive = 256
    """Most sequences decoded together (vLLM max_num_seqs; HF batch cap)."""
    gpu_memory_utilization: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.3
    """Share of each GPU's total memory this engine may take (vLLM); ignored if kv_cache_gib > 0."""
    kv_cache_gib: Annotated[float, Meta(ge=0.0)] = 0.0
    """Fixed KV-cache size per GPU in GiB (vLLM; on CPU: VLLM_CPU_KVCACHE_SPACE); 0 = use the fraction."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of repeated prompt prefixes (multi-turn episodes, GRPO groups)."""
    enable_sleep_mode: bool = True
    """Allow sleep/wake so the engine can hand its memory to the learner (placement 'colocate' needs it on every engine beside the learner)."""
    max_lora_rank: Annotated[int, Meta(ge=0)] = 64
    """Largest LoRA rank the engine accepts (vLLM: one of 1, 8, 16, 32, 64, 128, 256, 320, 512); 0 = no LoRA."""
    tensor_parallel_size: Positive = 1
    """GPUs per engine replica."""
    data_parallel_size: Positive = 1
    """Engine replicas; an episode's turns stick to one replica (prefix-cache locality)."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (slower decode, faster start-up, less memory held in sleep)."""
    base_url: str = ""
    """OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1 (backend 'openai' only)."""
    timeout_s: PosFloat = 120.0
    """Per-request timeout (backend 'openai')."""
    max_retries: NonNeg = 3
    """Retries with exponential backoff on connection errors and 5xx (backend 'openai')."""


_DEFAULT = object()
# What each backend cannot honour: field -> the one value it accepts (_DEFAULT = the field's
# default). Any other value is refused at load time, never ignored. The HF engine is one process
# on one device with no memory cap or compilation; a remote (openai) server's parallelism and
# memory are configured on the server, not here (placement never asks it to sleep, and it never
# receives an adapter, so enable_sleep_mode / max_lora_rank do not apply to it).
BACKEND_ONLY: dict[str, dict[str, Any]] = {
    "hf": {
        "tensor_parallel_size": _DEFAULT,
        "data_parallel_size": _DEFAULT,
        "kv_cache_gib": _DEFAULT,
        "gpu_memory_utilization": _DEFAULT,
        "enforce_eager": _DEFAULT,
        "base_url": _DEFAULT,
        "timeout_s": _DEFAULT,
        "max_retries": _DEFAULT,
    },
    "vllm": {"base_url": _DEFAULT, "timeout_s": _DEFAULT, "max_retries": _DEFAULT},
    "openai": {
        "tensor_parallel_size": _DEFAULT,
        "data_parallel_size": _DEFAULT,
        "kv_cache_gib": _DEFAULT,
        "gpu_memory_utilization": _DEFAULT,
        "enforce_eager": _DEFAULT,
    },
}


def unhonoured_fields(e: EngineConfig) -> list[tuple[str, Any, Any]]:
    """(field, value, the value the backend accepts) for each field `e.backend` cannot honour."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(EngineConfig)}
    out = []
    for name, only in BACKEND_ONLY[e.backend].items():
        want = defaults[name] if only is _DEFAULT else only
        if getattr(e, name) != want:
            out.append((name, getattr(e, name), want))
    return out


# Where the simulator engine's defaults differ from EngineConfig's: it never gets an adapter
# and, unless placement asks, never sleeps. They hold whether or not [engines.simulator] is
# written (load_config fills them in under what the file sets).
SIMULATOR_ENGINE_DEFAULTS: dict[str, Any] = {"enable_sleep_mode": False, "max_lora_rank": 0}


class EnginesConfig(Section, kw_only=True):
    policy: EngineConfig = msgspec.field(default_factory=EngineConfig)
    """The engine that samples the policy being trained."""
    simulator: EngineConfig = msgspec.field(default_factory=lambda: EngineConfig(**SIMULATOR_ENGINE_DEFAULTS))
    """The engine that plays tasks, users, tools and the judge (never gets new weights)."""


# ----------------------------------------------------------------------------- simulator


class SimulatorConfig(Section, kw_only=True):
    model_path: str = ""
    """Simulator model directory; '' = the policy's base model (TRUSTEE: one free 8B model plays every role)."""
    temperature: Annotated[float, Meta(ge=0.0)] = 0.7
    """Sampling temperature of the task generator, user and tool roles."""
    judge_mode: Literal["trustee", "rubric", "scripted"] = "trustee"
    """Judge used when environment.reward = 'judge': 'trustee' verdict in {-1, 0, 1} (stricter with difficulty), 'rubric', or 'scripted': TRUSTEE tiers filled in code from the agent's calls vs the task's reference calls (no model judges; for a tiny CPU simulator that cannot)."""
    judge_temperature: Annotated[float, Meta(ge=0.0)] = 0.1
    """Judge sampling temperature (low, as SynthAgent's 0.1)."""
    judge_votes: Positive = 1
    """Judge calls per episode, combined by judge_vote_rule."""
    judge_vote_rule: Literal["mean", "majority"] = "mean"
    """How k judge votes combine: 'mean' of rewards, or 'majority' (ties to the lower reward; rubric: item-wise)."""
    max_decode_retries: NonNeg = 3
    """Retries when a simulator output fails to decode; then the episode is marked sim_error."""
    max_task_regenerations: NonNeg = 3
    """Regenerations of a task that fails validation (schemas, expected calls)."""
    max_user_turns: Positive = 4
    """Most user-simulator replies per episode."""
    max_tokens: Positive = 512
    """Token budget of one user, tool or judge output; start-up refuses a budget below a role's longest possible output (sim/budget.py), so no JSON is cut."""
    task_max_tokens: Positive = 3072
    """Token budget of one task-generator output (one tool, or the scenario); checked like max_tokens at the hardest knobs."""
    tool_catalog: str = ""
    """Optional JSONL of tool specs to draw task tools from instead of inventing them."""
    tiny_sft_steps: NonNeg = 0
    """With model.tiny and a simulator.model_path that does not exist yet: build a tiny model there and SFT-warm it this many steps on the toy teacher's answers in the task, user and tool roles (trustee/envs/toy_teacher.py; use with the toy catalog), so a CPU simulator writes toy tasks instead of noise."""


# ----------------------------------------------------------------------------- environment


class BfclConfig(Section, kw_only=True):
    categories: list[
        Literal["multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context"]
    ] = msgspec.field(
        default_factory=lambda: [
            "multi_turn_base",
            "multi_turn_miss_func",
            "multi_turn_miss_param",
            "multi_turn_long_context",
        ]
    )
    """BFCL multi-turn categories to train on (a stage with split = 'base' narrows this to multi_turn_base)."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which half of each category (fixed-seed split) to draw instances from."""
    split_seed: int = 0
    """Seed of the train / held-out split; one index split shared by all categories (entry i of each is one scenario)."""
    train_fraction: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.5
    """Share of each category in the train half (Environment Tuning: 0.5, i.e. 100 / 100)."""
    hints: bool = True
    """Environment Tuning's actionable augmentation: corrective messages for unhelpful tool errors."""
    max_steps_per_turn: Positive = 5
    """Policy steps allowed within one user turn before it is forced to end (Environment Tuning: 5)."""
    force_quit_ends_episode: bool = False
    """Hitting max_steps_per_turn ends the whole episode and fails its remaining turns (BFCL's own rule)."""
    miss_turn_warning: bool = True
    """On a turn with a missing function/parameter, a tool call fails the turn, is not executed, and the next question carries Environment Tuning's warning; false = BFCL's rule (executed, turn not scored)."""
    syntax_instances: NonNeg = 75
    """Instances used while the reward is 'syntax' (Environment Tuning's small stage-1 set); 0 = all."""
    system_prompt: str = ""
    """System prompt before the tool block; '' = none, as in BFCL's function-calling mode."""


class TasksFileConfig(Section, kw_only=True):
    path: str = ""
    """JSONL of tasks, one object per line: prompt, tools (JSON schemas), optional id, system, answer, expected_calls, rubric, difficulty (docs/environments.md)."""
    tools: Literal["python", "simulated"] = "python"
    """'python': each tool is a function of tools_module; 'simulated': the simulator model plays the tools."""
    tools_module: str = ""
    """With tools = 'python': 'my_pkg.tools' or 'path/to/tools.py', holding one function per tool, named like the tool."""
    reward_fn: str = ""
    """With reward 'function' or 'function+judge': 'module:function' or 'path/to/file.py:function'; gets an EpisodeView, returns a float in [-1, 1] or a Score."""
    judge_weight: Fraction = 0.5
    """With reward 'function+judge': the judge's share of the reward (the function gets the rest)."""


class EnvironmentConfig(Section, kw_only=True):
    kind: Literal["simulated", "toy", "bfcl", "tasks_file", "python"] = "simulated"
    """'simulated': all roles played by the simulator model; 'toy': programmatic tools, exact rewards; 'bfcl': BFCL executable classes; 'tasks_file': tasks from a JSONL file; 'python': your own Environment from environment.factory."""
    reward: Literal[
        "judge", "rubric", "progress", "syntax", "exact", "graded", "function", "function+judge", "custom"
    ] = "judge"
    """Reward: simulator judge, rubric judge, BFCL progress, Environment Tuning syntax reward, toy exact match, toy exact with partial credit, a tasks file's reward function (alone or mixed with the judge), or 'custom' (kind 'python': the environment's own score)."""
    bfcl: BfclConfig = msgspec.field(default_factory=BfclConfig)
    """BFCL options (kind = 'bfcl')."""
    tasks_file: TasksFileConfig = msgspec.field(default_factory=TasksFileConfig)
    """Tasks-file options (kind = 'tasks_file')."""
    factory: str = ""
    """kind 'python': 'my_pkg.my_env:make_env', 'path/to/env.py:make_env' or a `trustee.environments` entry-point name; called with an EnvContext, returns an Environment."""
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    """kind 'python': a free-form table handed to the factory as ctx.options."""
    uses_simulator: bool = False
    """kind 'python': start the simulator engine and hand the factory a client of it (ctx.simulator), for simulated tools or the judge."""


def environment_problems(env: EnvironmentConfig) -> list[Problem]:
    """The [environment] rules that involve more than one field (called by _cross_checks)."""
    p: list[Problem] = []
    kind, reward = env.kind, env.reward
    rewards = {
        "bfcl": ("progress", "syntax"),
        "toy": ("exact", "graded"),
        "simulated": ("judge", "rubric"),
        "tasks_file": ("function", "judge", "rubric", "function+judge"),
        "python": ("custom",),
    }[kind]
    if reward not in rewards:
        p.append(
            Problem(
                "environment.reward",
                reward,
                f"environment.kind = {kind!r} scores with one of {', '.join(repr(r) for r in rewards)}",
            )
        )
    if kind == "python" and not env.factory:
        p.append(
            Problem(
                "environment.factory",
                "",
                "kind 'python' needs a factory: 'my_pkg.my_env:make_env' or 'path/to/env.py:make_env'",
            )
        )
    if kind != "python":
        for name, value, default in (
            ("factory", env.factory, ""),
            ("options", env.options, {}),
            ("uses_simulator", env.uses_simulator, False),
        ):
            if value != default:
                p.append(
                    Problem(f"environment.{name}", value, f"only used with kind 'python' (kind is {kind!r})")
                )
    tf = env.tasks_file
    if kind == "tasks_file":
        if not tf.path:
            p.append(
                Problem("environment.tasks_file.path", "", "kind 'tasks_file' needs a JSONL file of tasks")
            )
        if tf.tools == "python" and not tf.tools_module:
            p.append(
                Problem(
                    "environment.tasks_file.tools_module",
                    "",
                    "tools = 'python' needs the module of tool functions, or set tools = 'simulated'",
                )
            )
        if tf.tools == "simulated" and tf.tools_module:
            p.append(
                Problem(
                    "environment.tasks_file.tools_module", tf.tools_module, "only used with tools = 'python'"
                )
            )
        uses_fn = reward in ("function", "function+judge")
        if uses_fn and not tf.reward_fn:
            p.append(
                Problem("environment.tasks_file.reward_fn", "", f"reward {reward!r} needs 'module:function'")
            )
        if not uses_fn and tf.reward_fn:
            p.append(
                Problem(
                    "environment.tasks_file.reward_fn",
                    tf.reward_fn,
                    f"only used with reward 'function' or 'function+judge' (reward is {reward!r})",
                )
            )
    elif tf != TasksFileConfig():
        p.append(
            Problem(
                "environment.tasks_file",
                msgspec.to_builtins(tf),
                f"only used with kind 'tasks_file' (kind is {kind!r})",
            )
        )
    return p


# ----------------------------------------------------------------------------- rollout


class RolloutConfig(Section, kw_only=True):
    temperature: PosFloat = 1.0
    """Policy sampling temperature (the learner recomputes log-probs at the same temperature)."""
    max_turns: Positive = 16
    """Most policy turns per episode."""
    max_tool_calls_per_turn: Positive = 8
    """Tool calls executed per policy turn; extra calls get an error observation."""
    max_tokens_per_turn: Positive = 1024
    """Token budget of one policy turn."""
    max_tool_result_tokens: Positive = 1024
    """Longer tool results are truncated with a marker."""
    max_inflight_episodes: Positive = 256
    """Episodes running at once (backpressure on the engines)."""
    max_staleness: NonNeg = 1
    """Most policy versions a trained token may lag the learner (0 = strictly on-policy)."""


# ----------------------------------------------------------------------------- grpo


class GrpoConfig(Section, kw_only=True):
    steps: Positive = 200
    """Training steps (TRUSTEE: 200)."""
    tasks_per_step: Positive = 16
    """Tasks (GRPO groups) per step (TRUSTEE: 16)."""
    group_size: Annotated[int, Meta(ge=2)] = 8
    """Episodes per task; advantages compare within the group (TRUSTEE: 8)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """Loss aggregation: grpo (seq mean, then mean), dr_grpo (sum / (seqs x dr_grpo_length)), dapo (token mean over all ranks' step batch), bnpo (token mean over this rank's step batch)."""
    dr_grpo_length: Positive = 4096
    """dr_grpo's fixed length: the step loss is the token sum / (sequences x this)."""
    clip_low: Fraction = 0.2
    """Lower clip: ratio >= 1 - clip_low."""
    clip_high: Annotated[float, Meta(ge=0.0)] = 0.28
    """Upper clip: ratio <= 1 + clip_high (DAPO's clip-higher)."""
    beta: Annotated[float, Meta(ge=0.0)] = 0.001
    """k3 KL coefficient to the reference policy; 0 disables it (TRUSTEE: 0.001)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std, the batch std, or not at all (Dr. GRPO)."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal (no learning signal) and count them."""
    is_level: Literal["token", "sequence"] = "token"
    """Importance-sampling correction level for the sampler/learner mismatch."""
    is_mode: Literal["truncate", "mask", "off"] = "truncate"
    """Clamp the IS ratio to [is_min, is_max], zero it outside, or no correction."""
    is_min: Annotated[float, Meta(ge=0.0)] = 0.0
    """Lower IS bound."""
    is_max: PosFloat = 3.0
    """Upper IS bound (TRL: 3.0)."""
    updates_per_batch: Positive = 1
    """Passes over each step's batch (TRL: num_iterations); old log-probs are the learner's own at the batch start, so the clip binds only when updates_per_batch x mini_batches > 1."""
    mini_batches: Positive = 1
    """Optimiser updates per pass: the batch's sequences are shuffled and split into this many parts (verl's PPO mini-batches)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: replace groups with zero reward variance by new groups until tasks_per_step useful groups (or max_resample_rounds) are reached."""
    max_resample_rounds: NonNeg = 3
    """Most extra rounds of groups a step may play to replace zero-variance groups (dynamic_sampling)."""
    overlong: Literal["train", "mask", "penalty"] = "train"
    """Truncated episodes (a turn or length limit ended them): train on them as scored, leave them out of the loss, or subtract DAPO's soft overlong penalty."""
    overlong_buffer: Positive = 256
    """Soft penalty ramp: an episode whose sampled tokens exceed (budget - this) loses up to overlong_penalty, linearly; a truncated one loses all of it."""
    overlong_penalty: Annotated[float, Meta(ge=0.0)] = 1.0
    """Largest penalty (overlong = 'penalty'); the budget is rollout.max_turns x rollout.max_tokens_per_turn."""
    kl_metric: bool = False
    """Log the k3 KL from the starting policy (LoRA: adapter off; full: the reference copy) even when beta = 0: one extra forward pass per micro-batch."""


# ----------------------------------------------------------------------------- learner


class LearnerConfig(Section, kw_only=True):
    mode: Literal["lora", "qlora", "full"] = "lora"
    """What trains: LoRA adapters, LoRA on a 4-bit base (CUDA), or every weight."""
    lr: Annotated[float, Meta(ge=0.0)] = 1e-6
    """Peak learning rate (TRUSTEE / Environment Tuning: 1e-6 for full fine-tuning); 0 = an untouched control run (bench/learning.py)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    min_lr_ratio: Fraction = 0.0
    """Cosine schedule floor, as a share of lr (reached at grpo.steps)."""
    warmup_steps: NonNeg = 0
    """Linear warm-up steps."""
    weight_decay: Annotated[float, Meta(ge=0.0)] = 0.0
    """AdamW weight decay."""
    max_grad_norm: Annotated[float, Meta(ge=0.0)] = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    lora_rank: Positive = 16
    """LoRA rank r."""
    lora_alpha: PosFloat = 32.0
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: Fraction = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = msgspec.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters."""
    micro_batch_tokens: Positive = 16384
    """Token budget of one packed micro-batch."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory."""
    logprob_chunk: Positive = 1024
    """Rows of the [tokens x vocab] log-softmax computed at once."""


# ----------------------------------------------------------------------------- placement


class PlacementConfig(Section, kw_only=True):
    mode: Literal["colocate", "sync", "overlap", "split"] = "sync"
    """'colocate': engines and learner share devices, both engines sleep while it trains; 'sync': learner apart, trains between rollouts; 'overlap': all resident, rollouts go on while it trains; 'split': learner on GPUs no engine uses, fully asynchronous."""
    policy_gpus: list[Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=list)
    """GPU ids of the policy engine (relative to CUDA_VISIBLE_DEVICES at launch); empty = CPU."""
    simulator_gpus: list[Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=list)
    """GPU ids of the simulator engine; empty = CPU (or remote, backend 'openai')."""
    learner_gpus: list[Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=list)
    """GPU ids of the learner, one rank per id; empty = one rank on the CPU."""
    gpu_memory_gib: PosFloat = 80.0
    """Memory of one GPU in GiB: every phase of the plan (`--dry-run`) must fit under it; a real run checks the device's own figure."""
    learner_ranks: Positive = 1
    """Learner processes (FSDP2 ranks, started by the run; no torchrun): 1 = the single-process learner; N > 1 shards full or LoRA training over N processes, one per GPU in learner_gpus (NCCL), or N CPU processes (gloo) when learner_gpus is empty."""


# ----------------------------------------------------------------------------- curriculum


class StageConfig(Section, kw_only=True):
    name: str
    """Stage name, shown in logs."""
    reward: Literal["judge", "rubric", "progress", "syntax", "exact"] = "progress"
    """Reward used in this stage."""
    hints: bool = True
    """Environment augmentation (hints) on in this stage."""
    split: str = "all"
    """Data subset of this stage (BFCL: 'base' or 'all')."""
    advance_after_steps: NonNeg = 0
    """Advance after this many steps in the stage (0 = only by metric); with both rules set, the first to fire advances."""
    advance_metric: str = ""
    """Metric that advances the stage when it stays >= advance_threshold (e.g. 'reward_mean')."""
    advance_threshold: float = 0.0
    """Threshold for advance_metric."""
    advance_patience: Positive = 3
    """Consecutive steps the metric must hold."""


class AspectRanges(Section, kw_only=True):
    """Each TRUSTEE aspect as [value at D = 1, value at D = 100]; linear in between (integers rounded)."""

    n_tools: tuple[float, float] = (1.0, 10.0)
    """Tools offered to the policy."""
    n_expected_calls: tuple[float, float] = (1.0, 3.0)
    """Tool calls the task needs."""
    n_turns: tuple[float, float] = (1.0, 2.0)
    """Expected user interaction turns (details the user holds back)."""
    prompt_specificity: tuple[float, float] = (1.0, 0.0)
    """1 = detailed system prompt .. 0 = generic 'You are a helpful assistant'."""
    persona_expertise: tuple[float, float] = (1.0, 0.0)
    """1 = expert user .. 0 = novice."""
    query_ambiguity: tuple[float, float] = (0.0, 1.0)
    """0 = clear opening query .. 1 = highly ambiguous."""
    judge_strictness: tuple[float, float] = (1.0, 5.0)
    """Judge criteria tier: 1 intent .. 5 efficiency."""
    tool_error_rate: tuple[float, float] = (0.0, 0.0)
    """Share of simulated tool calls that fail by injection (TRUSTEE: none)."""


class CurriculumConfig(Section, kw_only=True):
    kind: Literal["adaptive", "staged", "fixed"] = "adaptive"
    """'adaptive': TRUSTEE difficulty control; 'staged': Environment Tuning stages; 'fixed': constant difficulty."""
    start_difficulty: Annotated[float, Meta(ge=1.0, le=100.0)] = 1.0
    """Initial difficulty D in [1, 100]."""
    delta: Annotated[float, Meta(ge=0.0)] = 3.0
    """Step of D per update (TRUSTEE: 3)."""
    low: float | None = None
    """Mean batch reward below this lowers D; unset = halfway up the environment's reward range (TRUSTEE: 0.0 on its [-1, 1] judge)."""
    high: float | None = None
    """Mean batch reward above this raises D; unset = three quarters up the reward range (TRUSTEE: 0.5 on [-1, 1])."""
    eps: Fraction = 0.5
    """Probability a task draws its aspects at random within the current bounds (soft curriculum)."""
    aspects: AspectRanges = msgspec.field(default_factory=AspectRanges)
    """How difficulty D maps to each aspect."""
    stages: list[StageConfig] = msgspec.field(default_factory=list)
    """Stages, in order (kind = 'staged')."""


# ----------------------------------------------------------------------------- eval


# The BFCL V4 categories trustee evaluates; `envs/bfcl_data.py` groups them by checker.
BFCL_AST_CATEGORIES = (
    "simple",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
BFCL_RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")
BFCL_MULTI_TURN_CATEGORIES = (
    "multi_turn_base",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
    "multi_turn_long_context",
)
BFCL_EVAL_CATEGORIES = BFCL_AST_CATEGORIES + BFCL_RELEVANCE_CATEGORIES + BFCL_MULTI_TURN_CATEGORIES


class EvalConfig(Section, kw_only=True):
    every_steps: NonNeg = 0
    """Evaluate on the environment's held-out tasks every this many training steps (and before the first and after the last); 0 = off."""
    heldout_tasks: Positive = 32
    """Held-out tasks per evaluation (toy: a fixed set never trained on; BFCL: the held-out half; simulated: a fixed generated set)."""
    heldout_samples: NonNeg = 4
    """Sampled episodes per held-out task (at rollout.temperature) beside the greedy one; 0 = greedy only."""
    heldout_difficulty: Annotated[float, Meta(ge=1.0, le=100.0)] = 1.0
    """Fixed difficulty D of the held-out tasks (the reward at a fixed difficulty, beside the curriculum's)."""
    categories: list[str] = msgspec.field(default_factory=lambda: list(BFCL_EVAL_CATEGORIES))
    """BFCL categories evaluated by `python -m trustee.eval` (single-turn AST/relevance and multi-turn)."""
    multi_turn_split: Literal["train", "heldout", "all"] = "heldout"
    """Half of each multi-turn category to evaluate (environment.bfcl.split_seed's split; 'all' = BFCL's full 200)."""
    limit: NonNeg = 0
    """Entries per category (the first ones of the selection, in BFCL order); 0 = all."""
    concurrency: Positive = 32
    """Entries evaluated at once (requests in flight on the engine)."""
    temperature: PosFloat = 0.001
    """Sampling temperature (BFCL's default for local models: 0.001, near greedy)."""
    max_tokens_per_turn: Positive = 1024
    """Token budget of one policy turn."""
    max_steps_per_turn: Positive = 21
    """Policy steps per user turn before BFCL forces the entry to quit (BFCL: counter > 20, i.e. 21 steps)."""
    out: str = ""
    """JSON report path; '' = runs/eval/<model directory name>/bfcl_eval.json (with --run-dir: RUN/bfcl_eval.json). Never inside the model directory (refused)."""
    judge_agreement: bool = False
    """Also score each multi-turn episode with the simulated judge and report its agreement with BFCL's checker (the sim-to-real meter)."""


# ----------------------------------------------------------------------------- logging / checkpoint


class LoggingConfig(Section, kw_only=True):
    progress_bar: bool = True
    """Show a tqdm progress bar (reward, loss and difficulty of the last step)."""
    wandb_project: str = ""
    """Weights & Biases project; '' = off (needs the wandb extra). A resumed run continues the same W&B run."""
    trajectories: Literal["all", "sampled", "none"] = "all"
    """Episodes written to trajectories.jsonl: every one, a fixed share (trajectories_fraction), or none."""
    trajectories_fraction: Fraction = 0.1
    """With trajectories = 'sampled': share of episodes written (chosen by a hash of the episode id, not the run's RNG)."""
    trajectories_max_mb: Annotated[float, Meta(ge=0.0)] = 1024.0
    """Cap on trajectories.jsonl in MB; later episodes are counted (log/trajectories_dropped), not written. 0 = no cap."""
    log_every: Positive = 1
    """Steps between records in metrics.jsonl and W&B (the last step is always recorded)."""


class CheckpointConfig(Section, kw_only=True):
    every_steps: NonNeg = 20
    """Steps between checkpoints; 0 = only at the end (and when the run is stopped)."""
    keep: Positive = 2
    """Most recent checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from the run directory's last checkpoint; 'never': refuse a directory that holds one."""
    on_interrupt: Literal["finish", "abandon"] = "finish"
    """On SIGINT/SIGTERM: 'finish' the step in progress or 'abandon' its rollouts; then checkpoint and exit."""


class Config(Section, kw_only=True):
    name: str = "trustee"
    """Run name; the default run directory is runs/<name>."""
    seed: int = 0
    """Seed of every random choice in the run."""
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    engines: EnginesConfig = msgspec.field(default_factory=EnginesConfig)
    simulator: SimulatorConfig = msgspec.field(default_factory=SimulatorConfig)
    environment: EnvironmentConfig = msgspec.field(default_factory=EnvironmentConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    grpo: GrpoConfig = msgspec.field(default_factory=GrpoConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)
    curriculum: CurriculumConfig = msgspec.field(default_factory=CurriculumConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)


# ============================================================================= loading


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a config: where, what value, and how to fix it."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "(missing)" if self.value is _MISSING else _show(self.value)
        return f"{self.path} = {shown}: {self.message}"


class ConfigError(ValueError):
    """All problems found in a config, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = [f"config error in {source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


_MISSING = object()


def _show(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else msgspec.json.encode(v).decode() if _jsonable(v) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _jsonable(v: Any) -> bool:
    try:
        msgspec.json.encode(v)
        return True
    except (TypeError, msgspec.EncodeError):
        return False


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if (
                isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = b.value.value.strip()
    return docs


def _struct_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _type_hint(tp: Any) -> str:
    """A short, user-facing name of a field's type."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_hint(get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_hint(get_args(tp)[0])}s" if get_args(tp) else "a list"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _example(tp: Any, path: str) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metas = get_args(tp)
        for m in metas:
            if isinstance(m, Meta):
                for bound in ("ge", "gt", "le", "lt"):
                    b = getattr(m, bound, None)
                    if b is not None:
                        op = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound]
                        return f"set {path} to {_type_hint(base)} {op} {b}"
        return _example(base, path)
    if origin is Literal:
        return f"set {path} to one of {', '.join(repr(a) for a in get_args(tp))}"
    return f"set {path} to {_type_hint(tp)}"


def _check(raw: Any, cls: type, prefix: str, problems: list[Problem]) -> None:
    """Collect every problem in `raw` against Struct `cls` (does not stop at the first)."""
    if not isinstance(raw, dict):
        problems.append(
            Problem(prefix.rstrip(".") or "(root)", raw, f"expected a table [{prefix.rstrip('.')}]")
        )
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    docs = field_docs(cls)
    for key, value in raw.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            problems.append(
                Problem(f"{prefix}{key}", value, f"unknown key; {hint}known keys here: {', '.join(fields)}")
            )
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.required:
                problems.append(
                    Problem(path, _MISSING, f"required: {docs.get(name, '')} ({_example(f.type, path)})")
                )
            continue
        value = raw[name]
        sub = _struct_type(f.type)
        if sub is not None:
            _check(value, sub, path + ".", problems)
            continue
        if get_origin(f.type) is list and (inner := _struct_type(get_args(f.type)[0])) is not None:
            if not isinstance(value, list):
                problems.append(Problem(path, value, f"expected a list of tables ([[{path}]])"))
                continue
            for i, item in enumerate(value):
                _check(item, inner, f"{path}[{i}].", problems)
            continue
        try:
            msgspec.convert(value, f.type)
        except msgspec.ValidationError as e:
            what = str(e).split(" - at ")[0]
            doc = docs.get(name, "")
            problems.append(
                Problem(path, value, f"{what}. {doc} Fix: {_example(f.type, path)}".replace("  ", " "))
            )


# Reward range of each built-in (environment.kind, environment.reward); the curriculum's
# thresholds are derived from it when curriculum.low / high are not set.
REWARD_RANGES: dict[str, tuple[float, float]] = {
    "judge": (-1.0, 1.0),
    "rubric": (0.0, 1.0),
    "progress": (0.0, 1.0),
    "syntax": (0.0, 1.0),
    "exact": (0.0, 1.0),
    "graded": (0.0, 1.0),
}


def curriculum_thresholds(cfg: CurriculumConfig, reward_range: tuple[float, float]) -> tuple[float, float]:
    """(low, high) of the adaptive curriculum: the configured values, or, when unset, the
    points at 1/2 and 3/4 of the reward range (TRUSTEE's 0.0 and 0.5 on its [-1, 1] judge)."""
    lo, hi = reward_range
    low = cfg.low if cfg.low is not None else lo + 0.5 * (hi - lo)
    high = cfg.high if cfg.high is not None else lo + 0.75 * (hi - lo)
    return low, high


def _grpo_checks(cfg: Config) -> list[Problem]:
    """Training-control rules: clip ranges, the curriculum's thresholds against the reward."""
    p: list[Problem] = []
    g = cfg.grpo
    if not 0.0 < g.clip_low < 1.0:
        p.append(
            Problem("grpo.clip_low", g.clip_low, "must be in (0, 1): the ratio's lower bound is 1 - clip_low")
        )
    if not 0.0 < g.clip_high <= 10.0:
        p.append(
            Problem(
                "grpo.clip_high",
                g.clip_high,
                "must be in (0, 10]: the ratio's upper bound is 1 + clip_high (DAPO: 0.28)",
            )
        )
    if cfg.learner.mode == "full" and g.kl_metric and g.beta == 0:
        p.append(
            Problem(
                "grpo.kl_metric",
                True,
                "with learner.mode = 'full' the KL metric needs a reference copy of the model; set grpo.beta > 0 "
                "(which loads it) or kl_metric = false",
            )
        )
    c = cfg.curriculum
    rng = REWARD_RANGES.get(cfg.environment.reward)
    if c.kind == "adaptive" and rng is not None:
        low, high = curriculum_thresholds(c, rng)
        lo, hi = rng
        why = f"environment.reward = {cfg.environment.reward!r} lies in [{lo:g}, {hi:g}]"
        if high < low:
            p.append(Problem("curriculum.high", high, f"must be >= curriculum.low ({low:g})"))
        if high >= hi:
            p.append(
                Problem(
                    "curriculum.high",
                    high,
                    f"the difficulty could never rise: {why} and D rises only when the batch mean is above high; "
                    "set it below the top of the range, or leave low/high unset to derive them",
                )
            )
        if low <= lo:
            p.append(
                Problem(
                    "curriculum.low",
                    low,
                    f"the difficulty could never fall: {why} and D falls only when the batch mean is below low; "
                    "set it above the bottom of the range, or leave low/high unset to derive them",
                )
            )
    return p


def _cross_checks(cfg: Config) -> list[Problem]:
    """Rules that involve more than one field. One place, all reported together."""
    p: list[Problem] = []
    g = cfg.grpo
    if g.clip_high < g.clip_low:
        p.append(
            Problem(
                "grpo.clip_high",
                g.clip_high,
                f"must be >= grpo.clip_low ({g.clip_low}); DAPO's clip-higher widens the upper bound, never narrows it",
            )
        )
    if g.is_mode != "off" and g.is_max <= g.is_min:
        p.append(Problem("grpo.is_max", g.is_max, f"must be > grpo.is_min ({g.is_min})"))
    p += _grpo_checks(cfg)
    cl, ch = cfg.curriculum.low, cfg.curriculum.high
    if cl is not None and ch is not None and ch < cl:
        p.append(Problem("curriculum.high", ch, f"must be >= curriculum.low ({cl})"))
    if cfg.curriculum.kind == "staged" and not cfg.curriculum.stages:
        p.append(
            Problem(
                "curriculum.stages", [], "curriculum.kind = 'staged' needs at least one [[curriculum.stages]]"
            )
        )
    p += _placement_problems(cfg)
    sim = cfg.simulator
    if sim.tiny_sft_steps and not (cfg.model.tiny and sim.model_path):
        missing = "model.tiny" if not cfg.model.tiny else "simulator.model_path"
        p.append(
            Problem(
                "simulator.tiny_sft_steps",
                sim.tiny_sft_steps,
                f"builds a tiny simulator, so it needs {missing}: set model.tiny = 'test' and "
                "simulator.model_path = '.cache/models/tiny-sim-sft' (or set tiny_sft_steps = 0)",
            )
        )
    if cfg.rollout.max_tokens_per_turn >= cfg.model.max_model_len:
        p.append(
            Problem(
                "rollout.max_tokens_per_turn",
                cfg.rollout.max_tokens_per_turn,
                f"must be < model.max_model_len ({cfg.model.max_model_len}) to leave room for the prompt",
            )
        )
    if cfg.model.enable_thinking and cfg.model.chat_format in ("llama3", "mistral"):
        p.append(
            Problem(
                "model.enable_thinking",
                True,
                f"the {cfg.model.chat_format} chat format has no reasoning block; set it to false or use chat_format 'qwen'",
            )
        )
    p += environment_problems(cfg.environment)
    return p


def needs_simulator(env: EnvironmentConfig) -> bool:
    """Whether the run must start the simulator engine for this environment (the simulated
    environment, a tasks file with simulated tools or a judged reward, a Python environment
    that says it uses one). Re-exported by `trustee.envs`."""
    if env.kind == "simulated":
        return True
    if env.kind == "tasks_file":
        return env.tasks_file.tools == "simulated" or env.reward in ("judge", "rubric", "function+judge")
    if env.kind == "python":
        return env.uses_simulator
    return False


def _placement_problems(cfg: Config) -> list[Problem]:
    """Engine and placement rules that need no model sizes (the memory plan, which does, is
    checked at start-up by `trustee.placement.check_memory`)."""
    p: list[Problem] = []
    pl, eng = cfg.placement, cfg.engines
    for role in ("policy", "simulator"):
        e: EngineConfig = getattr(eng, role)
        gpus = pl.policy_gpus if role == "policy" else pl.simulator_gpus
        need = e.tensor_parallel_size * e.data_parallel_size
        if gpus and len(gpus) != need:
            p.append(
                Problem(
                    f"placement.{role}_gpus",
                    gpus,
                    f"engines.{role} needs tensor_parallel_size x data_parallel_size = {need} GPUs; "
                    f"list exactly {need} ids or change the parallel sizes",
                )
            )
        if len(set(gpus)) != len(gpus):
            p.append(Problem(f"placement.{role}_gpus", gpus, "lists a GPU twice"))
        if e.backend == "openai" and not e.base_url:
            p.append(
                Problem(
                    f"engines.{role}.base_url",
                    "",
                    "backend 'openai' needs a server URL, e.g. http://127.0.0.1:8000/v1",
                )
            )
        for name, value, want in unhonoured_fields(e):
            p.append(
                Problem(
                    f"engines.{role}.{name}",
                    value,
                    f"backend {e.backend!r} cannot honour it (only {_show(want)}); remove the line, "
                    f"set it to {_show(want)}, or use a backend that supports it",
                )
            )
        if e.backend == "openai" and gpus:
            p.append(
                Problem(
                    f"placement.{role}_gpus", gpus, "a remote (openai) engine runs on no local GPU; set []"
                )
            )
    if len(set(pl.learner_gpus)) != len(pl.learner_gpus):
        p.append(Problem("placement.learner_gpus", pl.learner_gpus, "lists a GPU twice"))
    if eng.policy.backend == "openai":
        p.append(
            Problem(
                "engines.policy.backend",
                "openai",
                "the policy engine must load new weights; use 'vllm' or 'hf'",
            )
        )
    if (
        cfg.learner.mode != "full"
        and eng.policy.backend == "vllm"
        and eng.policy.max_lora_rank < cfg.learner.lora_rank
    ):
        p.append(
            Problem(
                "engines.policy.max_lora_rank",
                eng.policy.max_lora_rank,
                f"must be >= learner.lora_rank ({cfg.learner.lora_rank}) so vLLM can load the adapter",
            )
        )
    if cfg.learner.mode == "qlora" and not pl.learner_gpus:
        p.append(
            Problem(
                "learner.mode",
                "qlora",
                "QLoRA (bitsandbytes 4-bit) needs CUDA; set placement.learner_gpus or use mode 'lora'",
            )
        )
    built = ("policy", "simulator") if needs_simulator(cfg.environment) else ("policy",)
    local = [r for r in built if getattr(eng, r).backend != "openai"]
    gpus_of = {"policy": set(pl.policy_gpus), "simulator": set(pl.simulator_gpus)}
    learner = set(pl.learner_gpus)
    # Engines on the learner's devices: on CPU every local engine shares the host with it.
    beside = [r for r in local if (gpus_of[r] & learner) or (not gpus_of[r] and not learner)]
    if pl.mode == "colocate":
        for r in beside:
            if not getattr(eng, r).enable_sleep_mode:
                p.append(
                    Problem(
                        f"engines.{r}.enable_sleep_mode",
                        False,
                        f"placement 'colocate' puts the learner beside the {r} engine "
                        f"({_where(sorted(gpus_of[r]))}), which must sleep while it trains; set "
                        f"engines.{r}.enable_sleep_mode = true, or use placement.mode = 'overlap'",
                    )
                )
        stray = sorted(learner - gpus_of["policy"] - gpus_of["simulator"])
        if stray:
            p.append(
                Problem(
                    "placement.learner_gpus",
                    pl.learner_gpus,
                    f"'colocate' shares the engines' GPUs, but {stray} run no engine; list only engine GPUs "
                    "or use placement.mode = 'split'",
                )
            )
    if pl.mode == "sync" and pl.learner_gpus:
        for r in local:
            shared = sorted(gpus_of[r] & learner)
            if shared:
                p.append(
                    Problem(
                        "placement.learner_gpus",
                        pl.learner_gpus,
                        f"'sync' keeps the {r} engine resident on GPU(s) {shared} while the learner trains "
                        "there (out of memory); use placement.mode = 'colocate' (engines sleep) or move the learner",
                    )
                )
    if pl.learner_ranks > 1 and pl.learner_gpus and len(pl.learner_gpus) != pl.learner_ranks:
        p.append(
            Problem(
                "placement.learner_ranks",
                pl.learner_ranks,
                f"each learner rank needs its own GPU, but placement.learner_gpus = {pl.learner_gpus}; "
                f"list {pl.learner_ranks} GPUs or set learner_ranks = {len(pl.learner_gpus)}",
            )
        )
    if pl.learner_ranks > 1 and cfg.learner.mode == "qlora":
        p.append(
            Problem(
                "placement.learner_ranks",
                pl.learner_ranks,
                "QLoRA's 4-bit base is not sharded by the FSDP2 learner; use learner_ranks = 1, or mode 'lora' / 'full'",
            )
        )
    if pl.mode == "split":
        if not learner:
            p.append(
                Problem(
                    "placement.learner_gpus",
                    [],
                    "'split' puts the learner on GPUs no engine uses; list them, or use placement.mode = "
                    "'overlap' to train beside the engines on the CPU",
                )
            )
        for r in local:
            shared = sorted(gpus_of[r] & learner)
            if shared:
                p.append(
                    Problem(
                        "placement.learner_gpus",
                        pl.learner_gpus,
                        f"placement.mode = 'split' needs GPU sets disjoint from the engines' (the {r} engine "
                        f"is on {shared}); move the learner or use placement.mode = 'colocate'",
                    )
                )
    # Memory fractions of the engines resident together on one GPU (kv_cache_gib engines are
    # sized in bytes and checked by the memory plan).
    for gpu in sorted(gpus_of["policy"] | gpus_of["simulator"]):
        on = [r for r in local if gpu in gpus_of[r] and getattr(eng, r).kv_cache_gib == 0]
        total = sum(getattr(eng, r).gpu_memory_utilization for r in on)
        if total > 1.0:
            shares = " + ".join(
                f"engines.{r}.gpu_memory_utilization ({getattr(eng, r).gpu_memory_utilization})" for r in on
            )
            p.append(
                Problem(
                    f"engines.{on[-1]}.gpu_memory_utilization",
                    getattr(eng, on[-1]).gpu_memory_utilization,
                    f"on GPU {gpu}, {shares} = {total:.2f} > 1; lower them so they add up to at most 1 "
                    "(less the learner's share when it trains beside them)",
                )
            )
            break
    return p


# Which engine backends honour each EngineConfig field (fields not listed: every backend).
# A value other than the role's default on a backend that cannot honour it is refused.
ENGINE_FIELD_BACKENDS: dict[str, tuple[str, ...]] = {
    "max_num_seqs": ("hf", "vllm"),
    "gpu_memory_utilization": ("vllm",),
    "kv_cache_gib": ("vllm",),
    "enable_prefix_caching": ("vllm",),
    "enable_sleep_mode": ("vllm",),
    "max_lora_rank": ("vllm",),
    "tensor_parallel_size": ("vllm",),
    "data_parallel_size": ("vllm",),
    "enforce_eager": ("vllm",),
    "base_url": ("openai",),
    "timeout_s": ("openai",),
    "max_retries": ("openai",),
}


def _unhonoured(cfg: Config, raw: dict[str, Any]) -> list[Problem]:
    """Settings the chosen components cannot honour (each would otherwise be silently ignored)."""
    p: list[Problem] = []
    defaults, plain = EnginesConfig(), EngineConfig()
    for role in ("policy", "simulator"):
        e, d = getattr(cfg.engines, role), getattr(defaults, role)
        placed = {name for name, _, _ in unhonoured_fields(e)}  # refused by _placement_problems already
        for name, backends in ENGINE_FIELD_BACKENDS.items():
            if name == "base_url" or name in placed or (role, name) == ("simulator", "max_lora_rank"):
                continue  # checked with a more specific message in _cross_checks / below
            v = getattr(e, name)
            if e.backend not in backends and v != getattr(d, name) and v != getattr(plain, name):
                p.append(
                    Problem(
                        f"engines.{role}.{name}",
                        v,
                        f"the {e.backend!r} backend cannot honour it (only {', '.join(repr(b) for b in backends)} "
                        f"does); remove it or set engines.{role}.backend accordingly",
                    )
                )
    sim_raw = (raw.get("engines") or {}).get("simulator") or {}
    if sim_raw.get("max_lora_rank", 0) != 0:
        p.append(
            Problem(
                "engines.simulator.max_lora_rank",
                sim_raw["max_lora_rank"],
                "the simulator engine never loads an adapter (only the policy is trained); remove the line or set 0",
            )
        )
    explicit_judge = "judge_mode" in (raw.get("simulator") or {})
    if cfg.environment.reward == "rubric" and explicit_judge and cfg.simulator.judge_mode != "rubric":
        p.append(
            Problem(
                "simulator.judge_mode",
                cfg.simulator.judge_mode,
                "environment.reward = 'rubric' always judges with the rubric; judge_mode applies with "
                "reward = 'judge'. Remove simulator.judge_mode or set environment.reward = 'judge'",
            )
        )
    if cfg.curriculum.kind == "staged" and cfg.environment.kind != "bfcl":
        p.append(
            Problem(
                "curriculum.kind",
                "staged",
                f"stages switch BFCL's reward, hints and data split; environment.kind = {cfg.environment.kind!r} "
                "has none of them to switch. Use curriculum.kind = 'adaptive' or 'fixed'",
            )
        )
    if cfg.curriculum.stages and cfg.curriculum.kind != "staged":
        p.append(
            Problem(
                "curriculum.stages",
                f"{len(cfg.curriculum.stages)} stage(s)",
                f"only used with curriculum.kind = 'staged' (kind is {cfg.curriculum.kind!r}); remove them or set the kind",
            )
        )
    return p


def _where(ids: list[int]) -> str:
    return f"GPUs {ids}" if ids else "the CPU"


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(
            "--set", [Problem(item, _MISSING, "expected section.key=value, e.g. --set grpo.group_size=8")]
        )
    key, value = item.split("=", 1)
    return key.strip().split("."), value.strip()


def _field_type(path: list[str]) -> Any:
    """The declared type at a dotted path, or None if the path does not exist."""
    cls: Any = Config
    tp: Any = None
    for part in path:
        sub = _struct_type(cls)
        if sub is None:
            return None
        fields = {f.encode_name: f for f in msgspec.structs.fields(sub)}
        if part not in fields:
            return None
        tp = fields[part].type
        cls = tp
    return tp


def _coerce(raw: str, tp: Any) -> Any:
    """Turn an override's text into a value of the field's type where the text allows."""
    base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
    if base is str or (get_origin(base) is Literal and all(isinstance(a, str) for a in get_args(base))):
        return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        tp = _field_type(path)
        node = raw
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[path[-1]] = _coerce(value, tp) if tp is not None else _coerce(value, Any)
    return raw


def _with_simulator_engine_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with the simulator engine's own defaults under what [engines.simulator] sets (a
    table written with one key would otherwise take EngineConfig's class defaults for the
    rest: an adapter slot and sleep mode the simulator never uses). `raw` is not changed."""
    engines = raw.get("engines")
    if not isinstance(engines, dict) or not isinstance(engines.get("simulator"), dict):
        return raw
    return {**raw, "engines": {**engines, "simulator": {**SIMULATOR_ENGINE_DEFAULTS, **engines["simulator"]}}}


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a TOML file (or defaults, if `path` is None) plus `--set` overrides.

    Raises ConfigError naming every problem: syntax errors, unknown keys, wrong types,
    out-of-range values, and cross-field conflicts.
    """
    source = str(path) if path is not None else "(defaults)"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(source, [Problem("(file)", str(path), "file not found")]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(source, [Problem("(syntax)", str(path), f"not valid TOML: {e}")]) from None
    raw = apply_overrides(raw, list(overrides))
    problems: list[Problem] = []
    _check(raw, Config, "", problems)
    if problems:
        raise ConfigError(source, problems)
    cfg = msgspec.convert(_with_simulator_engine_defaults(raw), Config)
    problems = _cross_checks(cfg) + _unhonoured(cfg, raw)
    if problems:
        raise ConfigError(source, problems)
    return cfg


# ============================================================================= derived values


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    """Values derived from a Config for one run; written beside the run as resolved.json.

    Paths (`run_dir`, `policy_model`, `simulator_model`) are absolute, so the file (and the
    adapter's base_model, which comes from `policy_model`) still work from another directory.
    """

    run_dir: str
    device: Literal["cpu", "cuda"]
    dtype: str
    policy_model: str
    simulator_model: str
    episodes_per_step: int
    total_episodes: int
    gpus_required: int
    engines: dict[str, str]
    learner: str


def resolve(cfg: Config, run_dir: str | os.PathLike) -> Resolved:
    pl = cfg.placement
    gpus = sorted(set(pl.policy_gpus) | set(pl.simulator_gpus) | set(pl.learner_gpus))
    device: Literal["cpu", "cuda"] = "cuda" if pl.learner_gpus else "cpu"
    dtype = resolve_dtype(cfg.model.dtype, device)
    per_step = cfg.grpo.tasks_per_step * cfg.grpo.group_size

    def where(ids: list[int]) -> str:
        return f"GPUs {ids}" if ids else "CPU"

    return Resolved(
        run_dir=os.path.abspath(run_dir),
        device=device,
        dtype=dtype,
        policy_model=os.path.abspath(cfg.model.path),
        simulator_model=os.path.abspath(cfg.simulator.model_path or cfg.model.path),
        episodes_per_step=per_step,
        total_episodes=per_step * cfg.grpo.steps,
        gpus_required=(max(gpus) + 1) if gpus else 0,
        engines={
            "policy": f"{cfg.engines.policy.backend} on {where(pl.policy_gpus)}",
            "simulator": (
                f"openai at {cfg.engines.simulator.base_url}"
                if cfg.engines.simulator.backend == "openai"
                else f"{cfg.engines.simulator.backend} on {where(pl.simulator_gpus)}"
            ),
        },
        learner=f"{cfg.learner.mode} on {where(pl.learner_gpus)} ({dtype})",
    )
