"""Typed records that cross component boundaries.

Owns the data shapes shared by the chat layer, environments, the episode runner and the
learner. Holds no behaviour beyond small invariant checks; every other module imports from
here and nothing here imports from the rest of trustee.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One function call the policy asked for.

    Invariant: `arguments` is a JSON object (a dict), never a JSON string; `name` is the
    function name exactly as written by the policy (it may be unknown to the tool set: the
    parser reports that as a ToolCallError, not as a ToolCall).
    """

    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolCallError(msgspec.Struct, frozen=True, kw_only=True):
    """A `<tool_call>` block that could not become a ToolCall.

    `kind` names the failure (`too_many_calls`: a valid call over the per-turn limit, set by
    the episode runner, never executed); `message` is what the policy is shown (it is an observation,
    and each one is counted as a format or schema error); `raw` is the block's text.
    `index` is the block's position among the turn's `<tool_call>` blocks (-1: not from a
    block), so an environment can restore the order of calls and errors.
    """

    kind: Literal[
        "invalid_json",
        "not_an_object",
        "missing_name",
        "unknown_tool",
        "schema",
        "unclosed",
        "too_many_calls",
    ]
    message: str
    raw: str
    name: str | None = None
    index: int = -1


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One chat message in the OpenAI shape.

    `tool_calls` only on assistant messages; `reasoning` is the text inside `<think>` of an
    assistant turn (empty when thinking is off). A `tool` message carries one tool result in
    `content` and the function `name` it answers.
    """

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    reasoning: str = ""
    name: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The dict `tokenizer.apply_chat_template` expects (OpenAI function-call shape)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            d["reasoning_content"] = self.reasoning
            if self.tool_calls:
                d["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in self.tool_calls
                ]
        if self.role == "tool" and self.name is not None:
            d["name"] = self.name
        return d


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A tool as an OpenAI function schema.

    Invariant: `parameters` is a JSON Schema object schema (`{"type": "object", ...}`);
    `name` is unique within a task's tool set.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        """`{"type": "function", "function": {...}}`, the shape chat templates render."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class Rubric(msgspec.Struct, frozen=True, kw_only=True):
    """SynthAgent-style grading criteria for one task (all lists may be empty)."""

    subgoals: list[str] = msgspec.field(default_factory=list)
    required_interactions: list[str] = msgspec.field(default_factory=list)
    forbidden: list[str] = msgspec.field(default_factory=list)


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """One task, shared by every episode of a GRPO group.

    `hidden_info` is known to the user simulator only (the information gap); `expected_calls`
    and `rubric` are known to the judge only; `knobs` records the curriculum aspects the task
    was made with, so per-aspect success can be logged. `payload` holds environment-specific
    data (e.g. a BFCL instance) as plain JSON.
    """

    id: str
    env: str
    tools: list[ToolSpec]
    first_query: str
    system_prompt: str = ""
    domain: str = ""
    persona: str = ""
    goal: str = ""
    hidden_info: str = ""
    expected_calls: list[ToolCall] = msgspec.field(default_factory=list)
    rubric: Rubric = msgspec.field(default_factory=Rubric)
    knobs: dict[str, float] = msgspec.field(default_factory=dict)
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


class Counters(msgspec.Struct, kw_only=True):
    """What happened in one episode, for metrics."""

    turns: int = 0
    user_turns: int = 0
    tool_calls: int = 0
    format_errors: int = 0
    schema_errors: int = 0
    unknown_tools: int = 0
    tool_errors: int = 0
    sim_retries: int = 0
    truncated_results: int = 0
    wall_s: float = 0.0

    @property
    def malformed_calls(self) -> int:
        """Calls that did not run: bad format, arguments outside the schema, unknown tool. An
        episode with one is 'malformed' in the health metrics."""
        return self.format_errors + self.schema_errors + self.unknown_tools


EpisodeStatus = Literal["ok", "truncated", "sim_error", "error"]


class Trajectory(msgspec.Struct, kw_only=True):
    """One finished episode, token-in/token-out.

    Invariants: `tokens`, `loss_mask`, `logprobs` and `versions` have equal length;
    `loss_mask[i] == 1` exactly where `tokens[i]` was sampled by the policy; `logprobs[i]` is
    the sampler's log-prob (after temperature) where the mask is 1 and 0.0 elsewhere;
    `versions[i]` is the policy version that sampled token i and -1 where the mask is 0.
    `prompt_len` is the length of the first rendered prompt (no sampled token before it).
    `malformed_turns` holds the token spans [start, end) of the sampled turns that wrote a
    call that did not run (`Counters.malformed_calls`), in order; the learner may give their
    tokens their own advantage (`grpo.turn_credit`). Status `sim_error` and `error` episodes
    carry no usable reward and never train.
    """

    episode_id: str
    task_id: str
    tokens: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    prompt_len: int
    reward: float = 0.0
    parts: dict[str, float] = msgspec.field(default_factory=dict)
    counters: Counters = msgspec.field(default_factory=Counters)
    status: EpisodeStatus = "ok"
    error: str = ""
    messages: list[Message] = msgspec.field(default_factory=list)
    knobs: dict[str, float] = msgspec.field(default_factory=dict)
    malformed_turns: list[tuple[int, int]] = msgspec.field(default_factory=list)

    def check(self) -> None:
        """Raise AssertionError if the length/mask invariants do not hold (internal bug)."""
        n = len(self.tokens)
        assert len(self.loss_mask) == n and len(self.logprobs) == n and len(self.versions) == n, (
            f"trajectory {self.episode_id}: lengths differ "
            f"({n}, {len(self.loss_mask)}, {len(self.logprobs)}, {len(self.versions)})"
        )
        try:  # as bytes, both checks run in C (this runs once per episode)
            mask = bytes(self.loss_mask)
        except (TypeError, ValueError):
            raise AssertionError("loss_mask holds values other than 0 and 1") from None
        assert mask.count(0) + mask.count(1) == n, "loss_mask holds values other than 0 and 1"
        assert mask.find(1, 0, self.prompt_len) < 0, "sampled token inside the prompt"
        for a, b in self.malformed_turns:
            assert self.prompt_len <= a < b <= n, f"malformed turn span ({a}, {b}) outside the sampled tokens"

    @property
    def trainable(self) -> bool:
        return self.status in ("ok", "truncated") and any(self.loss_mask)


class Group(msgspec.Struct, kw_only=True):
    """The G episodes of one task, with their group-relative advantages.

    Invariant: `len(advantages) == len(trajectories)` once advantages are computed (empty
    before); only trainable trajectories are kept in a group handed to the learner.
    """

    task_id: str
    trajectories: list[Trajectory]
    advantages: list[float] = msgspec.field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]


class Knobs(msgspec.Struct, frozen=True, kw_only=True):
    """Curriculum aspects for one task (TRUSTEE's seven, plus the tool error rate).

    Values are already sampled within the curriculum's bounds; environments read the ones
    they understand and ignore the rest.
    """

    difficulty: float = 1.0
    n_tools: int = 1
    n_expected_calls: int = 1
    n_turns: int = 1
    prompt_specificity: float = 1.0  # 1 detailed system prompt .. 0 generic
    persona_expertise: float = 1.0  # 1 expert .. 0 novice
    query_ambiguity: float = 0.0  # 0 clear .. 1 highly ambiguous
    judge_strictness: int = 1  # 1 intent .. 5 efficiency
    tool_error_rate: float = 0.0
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        d = msgspec.structs.asdict(self)
        d.pop("extra")
        return {k: float(v) for k, v in d.items()}


class Score(msgspec.Struct, frozen=True, kw_only=True):
    """An episode's reward in [-1, 1] (BFCL progress and rubric rewards are in [0, 1]; the
    syntax reward is rescaled) and its named parts for logging."""

    reward: float
    parts: dict[str, float] = msgspec.field(default_factory=dict)


class EpisodeFailure(RuntimeError):
    """The environment could not play an episode (e.g. a simulator role exhausted its retry
    budget). The episode runner marks it `sim_error`: not scored, never trained. Environments
    and their helpers raise subclasses; the runner needs to know no more than this type."""
