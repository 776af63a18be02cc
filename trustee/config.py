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


class ModelConfig(Section, kw_only=True):
    path: str = ".cache/models/tiny-demo"
    """Policy model: a local directory with config.json and tokenizer files (no hub access)."""
    tiny: Literal["", "test", "demo"] = ""
    """If set, build a tiny offline model of this size at `path` when it is missing."""
    tiny_sft_steps: NonNeg = 0
    """With `tiny`: SFT-warm the built model this many steps on toy tool calls, so RL starts from a model that calls tools."""
    chat_template: Literal["trustee", "model"] = "trustee"
    """'trustee': the project's prefix-preserving Qwen3/Hermes template; 'model': the model's own."""
    enable_thinking: bool = False
    """Let the policy write a <think> block before acting (Qwen3 thinking mode)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for engines and learner; 'auto' = bfloat16 on CUDA, float32 on CPU."""
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
    """Allow sleep/wake so the engine can hand GPU memory to the learner (placement 'sync')."""
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


class EnginesConfig(Section, kw_only=True):
    policy: EngineConfig = msgspec.field(default_factory=EngineConfig)
    """The engine that samples the policy being trained."""
    simulator: EngineConfig = msgspec.field(
        default_factory=lambda: EngineConfig(enable_sleep_mode=False, max_lora_rank=0)
    )
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


class EnvironmentConfig(Section, kw_only=True):
    kind: Literal["simulated", "toy", "bfcl"] = "simulated"
    """'simulated': all roles played by the simulator model; 'toy': programmatic tools, exact rewards; 'bfcl': BFCL executable classes."""
    reward: Literal["judge", "rubric", "progress", "syntax", "exact", "graded"] = "judge"
    """Reward: simulator judge, rubric judge, BFCL progress, Environment Tuning syntax reward, toy exact match, or toy exact with partial credit."""
    bfcl: BfclConfig = msgspec.field(default_factory=BfclConfig)
    """BFCL options (kind = 'bfcl')."""


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


# ----------------------------------------------------------------------------- learner


class LearnerConfig(Section, kw_only=True):
    mode: Literal["lora", "qlora", "full"] = "lora"
    """What trains: LoRA adapters, LoRA on a 4-bit base (CUDA), or every weight."""
    lr: PosFloat = 1e-6
    """Peak learning rate (TRUSTEE / Environment Tuning: 1e-6 for full fine-tuning)."""
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
    mode: Literal["sync", "overlap", "split"] = "sync"
    """'sync': engines sleep while the learner trains; 'overlap': all resident; 'split': disjoint GPUs."""
    policy_gpus: list[Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=list)
    """GPU ids of the policy engine; empty = CPU."""
    simulator_gpus: list[Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=list)
    """GPU ids of the simulator engine; empty = CPU (or remote, backend 'openai')."""
    learner_gpus: list[Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=list)
    """GPU ids of the learner; empty = CPU."""


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
    low: float = 0.0
    """Mean batch reward below this lowers D (TRUSTEE: 0.0, rewards in {-1, 0, 1})."""
    high: float = 0.5
    """Mean batch reward above this raises D (TRUSTEE: 0.5)."""
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
    """JSON report path; '' = bfcl_eval.json next to the model (or in the run directory)."""
    judge_agreement: bool = False
    """Also score each multi-turn episode with the simulated judge and report its agreement with BFCL's checker (the sim-to-real meter)."""


# ----------------------------------------------------------------------------- logging / checkpoint


class LoggingConfig(Section, kw_only=True):
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    wandb_project: str = ""
    """Weights & Biases project; '' = off (needs the wandb extra)."""
    save_trajectories: bool = True
    """Write every trajectory to trajectories.jsonl in the run directory."""
    log_every: Positive = 1
    """Steps between metric records."""


class CheckpointConfig(Section, kw_only=True):
    every_steps: NonNeg = 20
    """Steps between checkpoints; 0 = only at the end."""
    keep: Positive = 2
    """Most recent checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': resume from the run directory's last checkpoint if there is one."""


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


def _cross_checks(cfg: Config) -> list[Problem]:
    """Rules that involve more than one field. One place, all reported together."""
    p: list[Problem] = []
    g, pl, eng = cfg.grpo, cfg.placement, cfg.engines
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
    if cfg.curriculum.high < cfg.curriculum.low:
        p.append(
            Problem(
                "curriculum.high", cfg.curriculum.high, f"must be >= curriculum.low ({cfg.curriculum.low})"
            )
        )
    if cfg.curriculum.kind == "staged" and not cfg.curriculum.stages:
        p.append(
            Problem(
                "curriculum.stages", [], "curriculum.kind = 'staged' needs at least one [[curriculum.stages]]"
            )
        )
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
        if e.backend != "openai" and e.base_url:
            p.append(
                Problem(
                    f"engines.{role}.base_url",
                    e.base_url,
                    f"only used with backend 'openai' (backend is {e.backend!r})",
                )
            )
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
    if pl.mode == "split":
        used = [set(pl.policy_gpus), set(pl.simulator_gpus), set(pl.learner_gpus)]
        if (used[0] & used[2]) or (used[1] & used[2]):
            p.append(
                Problem(
                    "placement.learner_gpus",
                    pl.learner_gpus,
                    "placement.mode = 'split' needs GPU sets disjoint from the engines'",
                )
            )
    if pl.mode in ("sync", "overlap") and pl.learner_gpus and pl.policy_gpus:
        missing = sorted(set(pl.learner_gpus) - set(pl.policy_gpus) - set(pl.simulator_gpus))
        if missing and pl.mode == "sync":
            p.append(
                Problem(
                    "placement.learner_gpus",
                    pl.learner_gpus,
                    f"mode 'sync' time-shares GPUs with the engines, but {missing} run no engine; use mode 'split' or share them",
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
    if cfg.environment.kind == "bfcl" and cfg.environment.reward not in ("progress", "syntax"):
        p.append(
            Problem("environment.reward", cfg.environment.reward, "BFCL rewards are 'progress' or 'syntax'")
        )
    if cfg.environment.kind == "toy" and cfg.environment.reward not in ("exact", "graded"):
        p.append(
            Problem("environment.reward", cfg.environment.reward, "the toy environment's reward is 'exact' or 'graded'")
        )
    if cfg.environment.kind != "toy" and cfg.environment.reward in ("exact", "graded"):
        p.append(
            Problem("environment.reward", cfg.environment.reward, "'exact' and 'graded' are the toy environment's rewards")
        )
    return p


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
    cfg = msgspec.convert(raw, Config)
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


# ============================================================================= derived values


class Resolved(msgspec.Struct, frozen=True, kw_only=True):
    """Values derived from a Config for one run; written beside the run as resolved.json."""

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
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    per_step = cfg.grpo.tasks_per_step * cfg.grpo.group_size

    def where(ids: list[int]) -> str:
        return f"GPUs {ids}" if ids else "CPU"

    return Resolved(
        run_dir=str(run_dir),
        device=device,
        dtype=dtype,
        policy_model=cfg.model.path,
        simulator_model=cfg.simulator.model_path or cfg.model.path,
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
