"""The sim-to-real meter (`trustee.eval --judge-agreement`): the agreement arithmetic, the
whole path with the scripted judge (named as such) and BFCL's checker on scripted policies,
and the real path with the tiny model as policy and judge."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("bfcl_eval", reason="needs bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23 mpmath)")

from test_eval_bfcl import ScriptedOracleEngine  # noqa: E402

from trustee.config import EvalConfig, RolloutConfig  # noqa: E402
from trustee.eval.judge_agreement import (  # noqa: E402
    AgreementEntry,
    agreement,
    format_table,
    measure,
    pearson,
    report,
)
from trustee.sim.judge import ScriptedJudge  # noqa: E402


def test_agreement_arithmetic():
    a = agreement([True, True, False, False], [True, False, False, False])
    assert a.accuracy == 0.75 and a.confusion == {
        "both_pass": 1,
        "judge_only": 1,
        "bfcl_only": 0,
        "both_fail": 2,
    }
    # chance agreement 0.5 * 0.25 + 0.5 * 0.75 = 0.5, so kappa = (0.75 - 0.5) / 0.5
    assert a.kappa == pytest.approx(0.5) and a.judge_pass_rate == 0.5 and a.bfcl_pass_rate == 0.25
    opposite = agreement([True, False], [False, True])
    assert opposite.accuracy == 0.0 and opposite.kappa == pytest.approx(-1.0)
    assert agreement([False, False], [False, False]).kappa is None  # both constant: undefined
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 0.0, -1.0], [0.0, 0.5, 1.0]) == pytest.approx(-1.0)
    assert pearson([1.0, 1.0], [0.0, 1.0]) is None
    with pytest.raises(ValueError, match="equal, non-empty"):
        agreement([True], [True, False])


def _measure(tokenizer, engine, judge, limit=2):
    from trustee.chat.render import project_template
    from trustee.eval.bfcl import rollout_config
    from trustee.rollout.episode import EpisodeRunner

    cfg = EvalConfig(categories=["multi_turn_base"], limit=limit, multi_turn_split="all", concurrency=4)
    runner = EpisodeRunner(
        policy=engine,
        tokenizer=tokenizer,
        cfg=rollout_config(cfg, RolloutConfig()),
        max_model_len=1_000_000,
        template=project_template(),
    )
    return asyncio.run(measure(runner.run, cfg, judge, judge_mode="scripted"))


def test_scripted_judge_agrees_with_bfcl_on_oracle_and_silent_policies(tiny_tokenizer):
    """The oracle passes BFCL and makes every reference call (the scripted judge's top tier);
    the silent policy fails both. So the scripted judge agrees perfectly: kappa 1."""
    good = _measure(tiny_tokenizer, ScriptedOracleEngine(tiny_tokenizer), ScriptedJudge())
    bad = _measure(tiny_tokenizer, ScriptedOracleEngine(tiny_tokenizer, silent=True), ScriptedJudge())
    assert all(e.bfcl_valid and e.judge_pass and e.judge_reward == 1.0 for e in good.entries), good.entries
    assert all(not e.bfcl_valid and not e.judge_pass and e.judge_reward == -1.0 for e in bad.entries)
    assert good.overall.kappa is None and good.overall.accuracy == 1.0  # one-sided: kappa undefined
    both = report(good.entries + bad.entries, judge="scripted", model="scripted", wall_s=0.0)
    a = both.categories["multi_turn_base"]
    assert a.n == 4 and a.accuracy == 1.0 and a.kappa == pytest.approx(1.0)
    assert a.confusion == {"both_pass": 2, "judge_only": 0, "bfcl_only": 0, "both_fail": 2}
    assert a.reward_correlation == pytest.approx(1.0)  # reward 1 / -1 against progress 1 / 0
    assert "| multi_turn_base | 4 | 1.000 | 1.000 | 2 | 0 | 0 | 2 |" in format_table(both)


def test_report_leaves_out_entries_the_judge_could_not_score():
    rows = [
        AgreementEntry(
            id="a", category="c", bfcl_valid=True, bfcl_progress=1.0, judge_reward=1.0, judge_pass=True
        ),
        AgreementEntry(
            id="b",
            category="c",
            bfcl_valid=False,
            bfcl_progress=0.0,
            judge_reward=None,
            judge_pass=None,
            judge_error="x",
        ),
    ]
    rep = report(rows, judge="trustee", model="m", wall_s=0.0)
    assert rep.judge_errors == 1 and rep.overall.n == 1 and "could not score" in format_table(rep)


def test_cli_judge_agreement_with_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    """The real path: the tiny random model plays the BFCL entry and judges it (near chance,
    and that is the measurement); the CLI writes the table and the JSON."""
    from pathlib import Path

    from trustee.eval.__main__ import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "report.json"
    rc = main(
        [
            str(root / "configs" / "bfcl-cpu-tiny.toml"),
            "--model",
            str(tiny_model_dir),
            "--limit",
            "1",
            "--categories",
            "multi_turn_base",
            "--set",
            "eval.max_steps_per_turn=1",
            "--set",
            "eval.max_tokens_per_turn=16",
            "--set",
            "model.max_model_len=8192",
            "--set",
            "simulator.max_decode_retries=1",
            "--out",
            str(out),
            "--no-progress",
            "--judge-agreement",
        ]
    )
    assert rc == 0
    rep = json.loads((tmp_path / "judge_agreement.json").read_text())
    assert rep["judge"] == "trustee" and len(rep["entries"]) == 1
    (entry,) = rep["entries"]
    # the model judge either scored it (a TRUSTEE reward) or failed after its retries (counted)
    assert entry["judge_reward"] in (-1.0, 0.0, 1.0) or (entry["judge_error"] and rep["judge_errors"] == 1)
    assert (tmp_path / "judge_agreement.md").exists()
    assert "Judge agreement: simulated judge (trustee)" in capsys.readouterr().out
