"""trustee/threads.py: the CPU thread rule a run applies (one thread for a small model, the
user's OMP_NUM_THREADS always wins, torch's setting restored after the run)."""

from __future__ import annotations

import json

import pytest
import torch

from trustee.threads import SMALL_MODEL_PARAMS, cpu_threads, cpu_threads_applied


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TRUSTEE_CPU_THREADS", raising=False)


def _config(tmp_path, hidden: int, layers: int, vocab: int):
    cfg = dict(
        model_type="llama", hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), vocab_size=vocab, tie_word_embeddings=False,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_a_small_model_runs_on_one_thread(tiny_model_dir):
    threads, why = cpu_threads(tiny_model_dir)
    assert threads == 1
    assert "parameters" in why and "OMP_NUM_THREADS" in why


def test_a_large_model_keeps_torch_default(tmp_path):
    path = _config(tmp_path, hidden=576, layers=30, vocab=49152)  # SmolLM2-135M's shape
    threads, why = cpu_threads(path)
    assert threads is None
    assert "one per core" in why


def test_the_threshold_is_the_parameter_count(tmp_path):
    from trustee.memory import model_shape

    small = _config(tmp_path, hidden=256, layers=4, vocab=8000)
    assert model_shape(small).params < SMALL_MODEL_PARAMS
    assert cpu_threads(small)[0] == 1


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "TRUSTEE_CPU_THREADS"])
def test_the_users_choice_wins(tiny_model_dir, monkeypatch, var):
    monkeypatch.setenv(var, "2")
    threads, why = cpu_threads(tiny_model_dir)
    assert threads == 2
    assert f"{var}=2" in why


def test_a_bad_setting_is_named_and_ignored(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    threads, why = cpu_threads(tiny_model_dir)
    assert threads is None
    assert "'lots'" in why


def test_an_unknown_model_keeps_torch_default(tmp_path):
    assert cpu_threads(tmp_path / "missing")[0] is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "odd"}))
    assert cpu_threads(tmp_path)[0] is None


def test_applied_restores_torchs_setting():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with cpu_threads_applied(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with cpu_threads_applied(None):
        assert torch.get_num_threads() == before
