"""Chat families: which template renders a conversation, which token ends a turn, and how
the policy writes tool calls.

Owns `ChatFamily`, the explicit registry `FAMILIES` (Qwen3/Hermes `<tool_call>`, Llama 3.x
JSON calls, Mistral `[TOOL_CALLS]`, plain ChatML with Hermes calls written as text for models
without tool or reasoning tokens such as SmolLM2), `detect_family` (from the tokenizer's tokens)
and `chat_spec`, the one place that turns `model.chat_format` / `model.chat_template` into a
family and a template text. Called by the training loop, eval, the start-up checks and the
episode runner; `chat/render.py` reads the end-of-turn token from here and `chat/parse.py`
the call syntax. It renders nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

FamilyName = Literal["qwen", "llama3", "mistral", "chatml"]


@dataclass(frozen=True)
class ChatFamily:
    """One model family's conversation format.

    `end_of_turn`: the token that ends an assistant turn (sampled, trained on);
    `markers`: special tokens whose presence in a tokenizer's vocabulary identifies the
    family; `template_file`: trustee's prefix-preserving template for it (in `templates/`);
    `thinking`: whether the format has a reasoning block (`<think>`).
    """

    name: FamilyName
    end_of_turn: str
    markers: tuple[str, ...]
    template_file: str
    thinking: bool
    end_tokens: tuple[str, ...]
    """Tokens a decoded completion may end with (stripped before parsing)."""


FAMILIES: dict[str, ChatFamily] = {
    "qwen": ChatFamily(
        name="qwen",
        end_of_turn="<|im_end|>",
        markers=("<|im_start|>", "<|im_end|>", "<tool_call>"),
        template_file="qwen3_tools.jinja",
        thinking=True,
        end_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
    "llama3": ChatFamily(
        name="llama3",
        end_of_turn="<|eot_id|>",
        markers=("<|start_header_id|>", "<|eot_id|>"),
        template_file="llama3_json.jinja",
        thinking=False,
        end_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    ),
    "mistral": ChatFamily(
        name="mistral",
        end_of_turn="</s>",
        markers=("[INST]", "[TOOL_CALLS]"),
        template_file="mistral_tools.jinja",
        thinking=False,
        end_tokens=("</s>",),
    ),
    # Plain ChatML (SmolLM2): the turn markers without Qwen's <tool_call> token; the calls are
    # Hermes JSON written as ordinary text and there is no <think> block. Detected after 'qwen'.
    "chatml": ChatFamily(
        name="chatml",
        end_of_turn="<|im_end|>",
        markers=("<|im_start|>", "<|im_end|>"),
        template_file="chatml_tools.jinja",
        thinking=False,
        end_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
}


class TemplateError(ValueError):
    """The model's chat template cannot be used for token-level multi-turn rollouts."""


def family(name: str) -> ChatFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise TemplateError(
            f"chat format {name!r} is unknown; set model.chat_format to 'auto' or one of {sorted(FAMILIES)}"
        ) from None


def project_template(name: str = "qwen") -> str:
    """trustee's prefix-preserving tool template for a family (shipped with the package)."""
    return resources.files("trustee.chat").joinpath("templates", family(name).template_file).read_text()


def detect_family(tokenizer: Any) -> FamilyName:
    """The family whose marker tokens are all special tokens of `tokenizer`."""
    for fam in FAMILIES.values():
        if all(_has_token(tokenizer, m) for m in fam.markers):
            return fam.name
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise TemplateError(
        f"cannot tell the chat format of tokenizer {name!r}: it has none of the marker tokens "
        + "; ".join(f"{f.name}: {' '.join(f.markers)}" for f in FAMILIES.values())
        + ". Set model.chat_format to one of "
        + ", ".join(repr(n) for n in FAMILIES)
    )


def _has_token(tokenizer: Any, token: str) -> bool:
    """`token` is one id of the vocabulary (cheap: no copy of the vocabulary)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i is not None and i != tokenizer.unk_token_id


@dataclass(frozen=True)
class ChatSpec:
    """A run's chat choice: the family (call syntax, end-of-turn token) and the template
    text to render with (None: the tokenizer's own, model.chat_template = 'model')."""

    family: FamilyName
    template: str | None


def chat_spec(
    tokenizer: Any,
    *,
    chat_format: str = "auto",
    chat_template: str = "trustee",
    enable_thinking: bool = False,
) -> ChatSpec:
    """The one place that chooses a run's chat template: `chat_format` 'auto' detects the
    family from the tokenizer; `chat_template` 'trustee' takes the project's template for
    that family, 'model' the tokenizer's own. Raises TemplateError for thinking in a family
    without a reasoning block (at start-up, not in every episode)."""
    name = detect_family(tokenizer) if chat_format == "auto" else family(chat_format).name
    if enable_thinking and not FAMILIES[name].thinking:
        raise TemplateError(
            f"model.enable_thinking = true, but the {name} chat format has no reasoning block; set it to false"
        )
    if chat_template not in ("trustee", "model"):
        raise TemplateError(f"model.chat_template = {chat_template!r}: choose 'trustee' or 'model'")
    return ChatSpec(family=name, template=project_template(name) if chat_template == "trustee" else None)
