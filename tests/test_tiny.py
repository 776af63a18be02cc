"""The tiny offline model builder: loads offline, deterministic, right size."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trustee.models.tiny import SPECIAL_TOKENS, build_tiny_model


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_loads_offline_with_special_tokens(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000, n
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, f"{t} is not a single token"
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    out = model(torch.tensor([tok.encode("hello world")])).logits
    assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "a", size="test", seed=0)
    other = build_tiny_model(tmp_path / "b", size="test", seed=1)
    assert _digest(again) == _digest(tiny_model_dir)
    assert _digest(other) != _digest(tiny_model_dir)


def test_unknown_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        build_tiny_model(tmp_path / "x", size="huge")


def test_tokenizer_has_tokens_for_the_toy_words(tiny_tokenizer):
    """The tokenizer is trained on toy conversations too, so a toy call's tool name, argument
    names, units and values are one or two tokens each, as a real tokenizer's domain words are
    (letter by letter, a 430k-parameter model miscopied about 2% of its calls)."""
    for word in (" answer", "green", "planet", "convert", "km", "kg"):
        assert len(tiny_tokenizer.encode(word, add_special_tokens=False)) == 1, word
    call = '{"name": "convert_units", "arguments": {"value": 5, "from_unit": "km", "to_unit": "mi"}}'
    assert len(tiny_tokenizer.encode(call, add_special_tokens=False)) <= 32
