"""Token-level conversations (TITO: token in, token out).

Owns `ChatFormat` (how to render environment turns to ids for one tokenizer and template)
and `Conversation` (a growing list of ids with its loss mask, sampler log-probs and policy
versions). Sampled ids are appended exactly as the engine returned them; environment turns
are rendered to ids and appended; nothing earlier is ever re-rendered.

Rendering is template-driven: the ids for new environment turns are the tokenization of the
text the chat template adds when those turns are appended to a conversation. That keeps the
incremental ids equal to `apply_chat_template` over the whole conversation for any template
that is prefix-preserving, which `check_prefix_preserving` verifies at start-up.

The model family (Qwen3/Hermes, Llama 3.x, Mistral; `chat/formats.py`) decides the
end-of-turn token; `family = 'auto'` detects it from the tokenizer. Callers: the episode
runner (`rollout/episode.py`), the simulator client, SFT and the tests. It does not parse
tool calls (`chat/parse.py`), choose the template (`formats.chat_spec`) nor decide what the
environment says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trustee.chat.formats import TemplateError, detect_family, family, project_template
from trustee.types import Message, ToolCall, ToolSpec

__all__ = ["ChatFormat", "Conversation", "TemplateError", "check_prefix_preserving", "project_template"]

# A fixed conversation used to find the text that follows a finished assistant turn. Its
# contents never reach the model: only the template's suffix after it is used.
_PROBE_USER = Message(role="user", content="probe")
_PROBE_ASSISTANT = Message(role="assistant", content="probe")


@dataclass
class ChatFormat:
    """Renders messages to ids for one tokenizer + template + thinking setting.

    `eos_id` is the end-of-turn token the policy must emit (`<|im_end|>` for Qwen3,
    `<|eot_id|>` for Llama 3, `</s>` for Mistral); it is part of the sampled ids and therefore
    trained on. `family` names the format ('auto': detected from the tokenizer).
    """

    tokenizer: Any
    tools: list[ToolSpec]
    enable_thinking: bool = False
    template: str | None = None
    family: str = "auto"
    eos_id: int = field(init=False)

    def __post_init__(self) -> None:
        if self.family == "auto":
            self.family = detect_family(self.tokenizer)
        fam = family(self.family)
        if self.enable_thinking and not fam.thinking:
            raise TemplateError(
                f"the {fam.name} chat format has no reasoning block; set model.enable_thinking = false"
            )
        if self.template is None:
            self.template = self.tokenizer.chat_template
        if not self.template:
            raise TemplateError("the tokenizer has no chat template; set model.chat_template = 'trustee'")
        eos = self.tokenizer.convert_tokens_to_ids(fam.end_of_turn)
        if eos is None or eos == self.tokenizer.unk_token_id:
            eos = self.tokenizer.eos_token_id
        self.eos_id = int(eos)
        self._eos_text = self.tokenizer.convert_ids_to_tokens(self.eos_id)
        self._tools_json = [t.to_openai() for t in self.tools] or None

    def render_text(self, messages: list[Message], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            [m.to_template() for m in messages],
            tools=self._tools_json,
            chat_template=self.template,
            add_generation_prompt=generation_prompt,
            enable_thinking=self.enable_thinking,
            tokenize=False,
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Ids of the opening conversation (system, tools, first user turn) plus the
        generation prompt."""
        return self.encode(self.render_text(messages, generation_prompt=True))

    def continuation_text(self, new: list[Message], *, generation_prompt: bool = True) -> str:
        """The text the template adds after a finished assistant turn (whose sampled ids end
        with the end-of-turn token) when `new` messages follow it."""
        base = [_PROBE_USER, _PROBE_ASSISTANT]
        before = self.render_text(base, generation_prompt=False)
        after = self.render_text(base + list(new), generation_prompt=generation_prompt)
        if not after.startswith(before):
            raise TemplateError(
                "the chat template is not prefix-preserving: appending turns changed the text of "
                "earlier ones; use model.chat_template = 'trustee'"
            )
        cut = before.rfind(self._eos_text)
        if cut < 0:
            raise TemplateError(f"the chat template does not end assistant turns with {self._eos_text!r}")
        # Text between the assistant's end-of-turn token and the end of its rendering (e.g. the
        # "\n" after <|im_end|>) is template scaffolding the policy never samples.
        return before[cut + len(self._eos_text) :] + after[len(before) :]

    def continuation_ids(self, new: list[Message], *, generation_prompt: bool = True) -> list[int]:
        return self.encode(self.continuation_text(new, generation_prompt=generation_prompt))


def check_prefix_preserving(
    tokenizer: Any, template: str | None = None, family_name: str = "auto"
) -> list[str]:
    """Problems that make a template unusable for TITO rollouts (empty list: fine).

    Renders a conversation with reasoning (families that have it), a tool call, a tool
    result and a second user turn both in one go and turn by turn, and compares the texts.
    """
    tool = ToolSpec(name="probe_tool", description="d", parameters={"type": "object", "properties": {}})
    msgs = [
        Message(role="system", content="You are a probe."),
        Message(role="user", content="first question"),
        Message(
            role="assistant",
            content="checking",
            reasoning="thinking about it",
            tool_calls=[ToolCall(name="probe_tool", arguments={"x": 1})],
        ),
        Message(role="tool", content='{"ok": true}', name="probe_tool"),
        Message(role="assistant", content="done", reasoning="more thoughts"),
        Message(role="user", content="second question"),
    ]
    problems: list[str] = []
    try:
        name = detect_family(tokenizer) if family_name == "auto" else family_name
        fmt = ChatFormat(
            tokenizer, [tool], enable_thinking=family(name).thinking, template=template, family=name
        )
        for k in range(1, len(msgs)):
            short = fmt.render_text(msgs[:k], generation_prompt=False)
            long = fmt.render_text(msgs[: k + 1], generation_prompt=False)
            if not long.startswith(short):
                problems.append(
                    f"rendering {k + 1} messages changes the text of the first {k} "
                    f"(earlier turns are re-rendered, e.g. reasoning dropped)"
                )
                break
    except TemplateError as e:
        problems.append(str(e))
    except Exception as e:  # noqa: BLE001 - any template failure is reported to the user
        problems.append(f"the chat template failed to render a tool conversation: {e}")
    return problems


@dataclass
class Conversation:
    """A growing token sequence with per-token training metadata.

    Invariant: the four lists have equal length; `mask[i] == 1` exactly for ids the policy
    sampled; `logprobs[i]` is 0.0 and `versions[i]` is -1 wherever the mask is 0.
    """

    fmt: ChatFormat
    messages: list[Message]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    prompt_len: int = 0

    @classmethod
    def start(cls, fmt: ChatFormat, messages: list[Message], *, ids: list[int] | None = None) -> Conversation:
        """`ids`: `fmt.prompt_ids(messages)` when the caller has them already."""
        conv = cls(fmt=fmt, messages=list(messages))
        conv._append_rendered(fmt.prompt_ids(messages) if ids is None else ids)
        conv.prompt_len = len(conv.ids)
        return conv

    def _append_rendered(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))
        self.versions.extend([-1] * len(ids))

    def append_sampled(self, ids: list[int], logprobs: list[float], version: int) -> None:
        """Append the policy's sampled ids exactly as returned. If the sample did not end
        with the end-of-turn id (length limit), the id is appended as scaffolding (mask 0)
        so the conversation stays well-formed."""
        assert len(ids) == len(logprobs), "ids and logprobs differ in length"
        self.ids.extend(ids)
        self.mask.extend([1] * len(ids))
        self.logprobs.extend(map(float, logprobs))
        self.versions.extend([version] * len(ids))
        if not ids or ids[-1] != self.fmt.eos_id:
            self._append_rendered([self.fmt.eos_id])

    def append_env(
        self, new: list[Message], *, generation_prompt: bool = True, ids: list[int] | None = None
    ) -> None:
        """Render environment turns (tool results, user replies) after the last assistant
        turn and append them, followed by the generation prompt. `ids`: the caller's
        `fmt.continuation_ids(new, generation_prompt=...)`, when it has them already."""
        self.messages.extend(new)
        if ids is None:
            ids = self.fmt.continuation_ids(new, generation_prompt=generation_prompt)
        self._append_rendered(ids)

    def add_assistant(self, message: Message) -> None:
        """Record the parsed assistant message (for judges and logs; ids are unchanged)."""
        self.messages.append(message)

    def __len__(self) -> int:
        return len(self.ids)
