"""SFT warm-up data and plumbing: reference conversations become the exact ids a rollout
would produce, with the mask on assistant tokens only; a short warm-up runs and reports."""

from __future__ import annotations

import json
import random
import re
import shutil

from trustee.chat.render import ChatFormat
from trustee.envs.base import Knobs
from trustee.envs.toy import ToyEnv
from trustee.models.sft import encode_conversation, sft_warm


def test_reference_conversation_ids_and_mask(tiny_tokenizer):
    env = ToyEnv(kinds=("chain",))
    task = env.task(Knobs(n_tools=3, n_expected_calls=2), random.Random(0))
    msgs = env.sft_messages(task)
    ids, mask = encode_conversation(tiny_tokenizer, task, msgs)
    fmt = ChatFormat(tiny_tokenizer, task.tools)
    whole = fmt.encode(fmt.render_text(msgs, generation_prompt=False))
    assert whole[: len(ids)] == ids  # same ids as rendering in one go (TITO)
    eos = fmt.eos_id
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert trained.count(eos) == 3  # two call turns and the answer, each ends with <|im_end|>
    text = tiny_tokenizer.decode(trained)
    assert text.count("<tool_call>") == 2 and "The answer is" in text
    assert "<tool_response>" not in text and task.first_query not in text


def test_short_warm_up_writes_weights_and_report(tiny_model_dir, tmp_path, capsys):
    work = tmp_path / "m"
    shutil.copytree(tiny_model_dir, work)
    report = sft_warm(work, 3, batch_size=2, eval_samples=2, progress=True)
    # the warm-up shows a progress bar with its ETA (elapsed<remaining) and the loss
    err = capsys.readouterr().err
    assert re.search(r"SFT warm-up: 100%.*3/3 \[\d\d:\d\d<\d\d:\d\d.*loss=", err), err
    assert report.steps == 3 and 0.0 <= report.well_formed_rate <= 1.0
    assert report.loss_first > 0 and json.loads((work / "trustee_sft.json").read_text())["steps"] == 3
    assert (work / "model.safetensors").stat().st_mtime > (
        tiny_model_dir / "model.safetensors"
    ).stat().st_mtime


def test_warm_up_data_mixes_reference_and_guessing_conversations(tiny_tokenizer):
    from trustee.models.sft import _examples

    data = _examples(tiny_tokenizer, 40, seed=1, guess_share=0.5)

    def calls(examples):
        return [
            "<tool_call>" in tiny_tokenizer.decode([t for t, m in zip(i, k, strict=True) if m])
            for i, k in examples
        ]

    assert 10 <= sum(calls(data)) <= 30  # about half call a tool, the rest guess
    assert all(calls(_examples(tiny_tokenizer, 8, seed=1, guess_share=0.0)))


def test_a_refused_call_is_context_and_the_recovery_is_trained(tiny_tokenizer):
    """The warm-up never trains on a call its tool refused: those tokens have mask 0; the
    recovery call and the answer have mask 1."""
    env = ToyEnv(kinds=("convert",))
    task = env.task(Knobs(), random.Random(2))
    msgs = env.sft_messages(task, slip=random.Random(2))
    refused = [m.tool_calls[0] for m in msgs[2:-1] if m.role == "assistant"][:-1]
    assert refused
    ids, mask = encode_conversation(tiny_tokenizer, task, msgs)
    trained = tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    context = tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert (
        trained.count("<tool_call>") == 1
        and f'"to_unit": "{task.expected_calls[0].arguments["to_unit"]}"' in trained
    )
    for call in refused:
        assert f'"to_unit": "{call.arguments["to_unit"]}"' in context
        assert f'"to_unit": "{call.arguments["to_unit"]}"' not in trained
    assert "The answer is" in trained


def test_warm_up_data_slips_at_about_the_share_asked(tiny_tokenizer):
    from trustee.models.sft import _examples

    data = _examples(tiny_tokenizer, 200, seed=3, guess_share=0.0, slip_share=0.5)
    slipped = sum(
        "cannot convert" in tiny_tokenizer.decode(i) or "not found" in tiny_tokenizer.decode(i)
        for i, _ in data
    )
    # convert and kv_get are 2 of the 5 kinds (chain only with 2 calls asked): about 0.5 x 2/5 x 200 = 40
    assert 15 <= slipped <= 70, slipped
    assert not any(
        "cannot convert" in tiny_tokenizer.decode(i)
        for i, _ in _examples(tiny_tokenizer, 60, seed=3, slip_share=0.0)
    )
