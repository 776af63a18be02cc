"""bench.learning's per-call count of broken held-out calls (issue 26: an arm that calls tools
more often has more episodes with a broken call at the same rate per call)."""

import json

from bench.learning import _call_errors


def _row(step: int, mode: str, calls: int, fmt: int = 0, schema: int = 0, unknown: int = 0) -> str:
    counters = {"tool_calls": calls, "format_errors": fmt, "schema_errors": schema, "unknown_tools": unknown}
    return json.dumps({"step": step, "mode": mode, "trajectory": {"counters": counters}})


def test_call_errors_count_the_last_evaluation_of_the_mode_only(tmp_path):
    # a hand-written eval_trajectories.jsonl, standing in for a run's (same keys)
    rows = [
        _row(0, "sampled", calls=0, fmt=5),  # an earlier evaluation: not counted
        _row(30, "greedy", calls=1, schema=3),  # the other mode: not counted
        _row(30, "sampled", calls=2, schema=1),
        _row(30, "sampled", calls=1, fmt=1, unknown=1),
        _row(30, "sampled", calls=0),
    ]
    (tmp_path / "eval_trajectories.jsonl").write_text("\n".join(rows) + "\n")
    assert _call_errors(tmp_path, "sampled") == (3, 6)
    assert _call_errors(tmp_path, "greedy") == (3, 4)


def test_call_errors_of_a_run_without_held_out_episodes(tmp_path):
    assert _call_errors(tmp_path, "sampled") == (0, 0)
    (tmp_path / "eval_trajectories.jsonl").write_text(_row(10, "greedy", calls=2) + "\n")
    assert _call_errors(tmp_path, "sampled") == (0, 0)
