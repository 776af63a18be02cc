"""Tiny offline models: a byte-level BPE tokenizer trained here and a small Qwen3 model.

Owns `build_tiny_model`, used by `tools/make_tiny_model.py`, by `trustee.run` when the CPU
config names a tiny model directory that does not exist yet, and by the test fixtures, and
`build_tokenizer`, which also builds the tiny Llama 3 and Mistral tokenizers the chat tests use. No
network: the tokenizer is trained on a corpus generated from a fixed seed, the model is
initialised from a config with a seeded generator. The same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from trustee.chat.render import project_template

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<tool_response>",
    "</tool_response>",
]

# The special tokens of each chat family a tiny tokenizer is built for (trained in this order,
# so ids follow it) and their roles. Qwen's are the tiny model's; Llama 3's and Mistral's serve
# the tests of those families' renderers.
FAMILY_TOKENS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "qwen": (
        SPECIAL_TOKENS,
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:]),
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"],
        dict(
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            additional_special_tokens=[
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            ],
        ),
    ),
    "mistral": (
        ["<s>", "</s>", "<pad>"],
        dict(
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            additional_special_tokens=[
                "[INST]",
                "[/INST]",
                "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ],
        ),
    ),
}

# Qwen2/Qwen3's pre-tokenizer pattern: newlines are split off letters, so the boundary
# between a rendered prefix ending in "\n" and sampled text is the same whether the two are
# tokenized apart or together (the property the TITO tests rely on).
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SIZES: dict[str, dict[str, int]] = {
    # head_dim 64 and a vocabulary that is a multiple of 64 keep vLLM's CPU/GPU kernels happy.
    "test": dict(
        vocab=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
    ),
    "demo": dict(
        vocab=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
}

_WORDS = (
    "the a an of to in for on with by from at as is are was be can will please find get set "
    "list show book cancel order weather city date time price total amount number name user "
    "account email phone address flight hotel room ticket train car trip day week month year "
    "today tomorrow morning evening temperature celsius fahrenheit meter kilometer mile kilogram "
    "pound convert add subtract multiply divide sum result value key store read write delete "
    "update create search query status error ok true false null yes no thanks hello help need "
    "want would like could you I we it this that what which when where how why your my their "
    "file folder path size message send receive payment card balance transfer bank stock market "
    "item product cart shipping delivery restaurant menu reservation table people guest note "
    "task reminder calendar meeting schedule event location distance route map music song play"
).split()


def _corpus(seed: int, lines: int = 6000, family: str = "qwen", toy_conversations: int = 1500) -> list[str]:
    """Deterministic text resembling tool-use chats: prose, JSON calls, numbers, and the
    family's template scaffolding."""
    rng = random.Random(seed)
    out: list[str] = []
    scaffolding = project_template(family)
    out.extend([scaffolding] * 3)
    for _ in range(lines):
        kind = rng.random()
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if kind < 0.45:
            s = " ".join(words).capitalize() + rng.choice([".", "?", "!"])
        elif kind < 0.8:
            name = "_".join(rng.sample(_WORDS, 2))
            args = {
                rng.choice(_WORDS): rng.choice([rng.randint(0, 9999), rng.choice(_WORDS), rng.random() < 0.5])
            }
            s = json.dumps({"name": name, "arguments": args})
        else:
            s = json.dumps({"type": "object", "properties": {rng.choice(_WORDS): {"type": "string"}}})
        out.append(s)
    out.extend(_toy_corpus(seed, toy_conversations))
    return out


def _toy_corpus(seed: int, conversations: int) -> list[str]:
    """The text of toy-environment conversations (tool schemas, queries, calls, results,
    answers), so the tokenizer has tokens for the words the tiny model is warmed and trained
    on, as a real model's tokenizer has for its domain's words."""
    from trustee.envs.base import Knobs
    from trustee.envs.toy import SYSTEM_PROMPT, ToyEnv

    env, rng, out = ToyEnv(), random.Random(seed + 1), []
    for _ in range(conversations):
        task = env.task(Knobs(difficulty=rng.random()), rng)
        out.extend(json.dumps(t.to_openai()) for t in task.tools)
        for m in env.sft_messages(task, guess=rng if rng.random() < 0.5 else None)[1:]:
            out.extend(json.dumps({"name": c.name, "arguments": c.arguments}) for c in m.tool_calls or [])
            out.append(m.content or "")
    out.append(SYSTEM_PROMPT)
    return out


def build_tokenizer(seed: int, vocab: int, family: str = "qwen"):
    """A byte-level BPE tokenizer of chat `family` ('qwen', 'llama3' or 'mistral', `FAMILY_TOKENS`)
    with trustee's template for it, trained offline on `_corpus(seed)`; the same arguments give
    the same tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trained, roles = FAMILY_TOKENS[family]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=trained + [t for t in roles["additional_special_tokens"] if t not in trained],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_corpus(seed, family=family), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **roles)
    tok.chat_template = project_template(family)
    return tok


TINY_FORMAT = 2
"""Bumped when the same size and seed would build different files: 2 = the tokenizer also learns
the toy conversations' words (issue 26). A directory stamped with another format is rebuilt by
`build_tiny_model` and refused by `trustee.run` (`tiny_recipe_problem`)."""


def build_tiny_model(out: str | Path, *, size: str = "test", seed: int = 0, force: bool = False) -> Path:
    """Write a tokenizer + random-weight Qwen3 model to `out` (skipped if already built with
    the same size and seed). Returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    if size not in SIZES:
        raise ValueError(f"size {size!r} unknown; choose one of {sorted(SIZES)}")
    out = Path(out)
    stamp = out / "trustee_tiny.json"
    want = {"size": size, "seed": seed, "format": TINY_FORMAT}
    if not force and stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(SIZES[size])
    tok = build_tokenizer(seed, spec.pop("vocab"))
    vocab = -(-len(tok) // 64) * 64
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen3Config(
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=tok.pad_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stamp.write_text(json.dumps(want))
    return out
