"""`python -m trustee.run` trains through MCP servers: the example's notes server and the
official `mcp-server-time`, two steps each on the tiny model, and no server process is left
afterwards (a scan of /proc). The generated-tasks run with the tiny simulator is slow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_harness import train_two_steps

from trustee.interrupt import alive
from trustee.mcp.servers import resolve_command

ROOT = Path(__file__).resolve().parents[1]


def processes_running(needle: str) -> list[str]:
    """Command lines of live processes that contain `needle`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            out.append(f"{d.name}: {cmd}")
    return out


def check_run(recs: list[dict], trajs: list[dict], task_file: Path, episode_scope: bool) -> None:
    assert [x["step"] for x in recs] == [0, 1]
    assert [x["policy_version"] for x in recs] == [1.0, 2.0]
    assert all(x["groups_trained"] == 2.0 and x["status/error"] == 0.0 for x in recs)
    assert all(x["mcp/server_faults"] == 0.0 for x in recs)
    starts = sum(x["mcp/server_starts"] for x in recs)
    # Discovery starts one server; then one per episode ('episode'), or one for the pool ('shared').
    assert starts == (1 + len(trajs) if episode_scope else 2), starts
    ids = {json.loads(line)["id"] for line in task_file.read_text().splitlines()}
    assert len(trajs) == 8 and {t["task_id"] for t in trajs} <= ids
    assert all(0.0 <= t["reward"] <= 1.0 and "tool_names" in t["parts"] for t in trajs)


def test_example_notes_server_trains_two_steps_and_leaves_no_server(tmp_path, tiny_model_dir):
    recs, trajs = train_two_steps("examples/mcp/config.toml", tmp_path / "run", tiny_model_dir)
    check_run(recs, trajs, ROOT / "examples" / "mcp" / "tasks.jsonl", episode_scope=True)
    assert processes_running("examples/mcp/notes_server.py") == []


def test_mcp_server_time_trains_two_steps_and_leaves_no_server(tmp_path, tiny_model_dir):
    if resolve_command("mcp-server-time") is None:
        pytest.skip(
            "mcp-server-time is not installed (tools/install.sh --dev installs it: pip install mcp-server-time)"
        )
    recs, trajs = train_two_steps("examples/mcp/time.toml", tmp_path / "run", tiny_model_dir)
    check_run(recs, trajs, ROOT / "examples" / "mcp" / "time_tasks.jsonl", episode_scope=False)
    assert processes_running("mcp-server-time") == []


@pytest.mark.slow  # the tiny simulator writes every task on CPU: about 3 minutes on 2 busy cores
def test_generated_tasks_verified_on_the_notes_server_train_two_steps(tmp_path, tiny_model_dir):
    recs, trajs = train_two_steps(
        "examples/mcp/config.toml",
        tmp_path / "run",
        tiny_model_dir,
        "--set",
        "environment.mcp.tasks=generate",
        "--set",
        "engines.simulator.backend=hf",
    )
    generated = sum(x["mcp/tasks_generated"] for x in recs)
    kept = sum(x["mcp/tasks_generated"] * x["mcp/tasks_kept_share"] for x in recs)
    print(f"generated {generated:.0f} tasks, kept {kept:.0f} (share {kept / generated:.2f})")
    assert all(x["tasks_failed"] == 0.0 and x["groups_trained"] == 2.0 for x in recs)
    assert kept == 4 and generated >= 4  # two tasks per step, each kept only after its calls ran
    # Every generated task's reference calls ran on fresh servers: one start per task generated,
    # on top of discovery and one per episode.
    assert sum(x["mcp/server_starts"] for x in recs) == 1 + generated + len(trajs)
    assert all(t["task_id"].startswith("mcp-") for t in trajs)
    assert processes_running("examples/mcp/notes_server.py") == []


@pytest.mark.slow  # a training run per signal: 76-80 s each at load 20 (the SIGKILL and cancellation tests of test_mcp_servers.py are in the default suite)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_run_stops_and_leaves_no_server(tmp_path, tiny_model_dir, sig):
    """SIGTERM (or Ctrl-C's SIGINT) while episodes hold servers: the run stops at a step
    boundary with the signal's status (SIGTERM abandoning the step: its episodes are
    cancelled; SIGINT finishing it), and neither the servers nor what they started survive."""
    pidfile = tmp_path / "pids"
    fake = ROOT / "tests" / "mcp_fake_server.py"
    (tmp_path / "tasks.jsonl").write_text(
        json.dumps(
            {
                "prompt": "Echo hi.",
                "answer": "hi",
                "expected_calls": [{"name": "echo", "arguments": {"text": "hi"}}],
            }
        )
        + "\n"
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"""
[model]
path = "{tiny_model_dir}"
[engines.policy]
backend = "hf"
[environment]
kind = "mcp"
reward = "reference"
[environment.mcp]
tasks = "{tmp_path / "tasks.jsonl"}"
[[environment.mcp.servers]]
name = "fake"
command = "{{python}}"
args = ["-S", "{fake}", "--child", "--pidfile", "{pidfile}"]
[rollout]
max_turns = 2
max_tokens_per_turn = 24
[grpo]
steps = 50
tasks_per_step = 2
group_size = 2
[learner]
mode = "lora"
[logging]
progress_bar = false
[checkpoint]
on_interrupt = "{"abandon" if sig == signal.SIGTERM else "finish"}"
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustee.run", str(cfg), "--out", str(tmp_path / "run")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while (
            len(pidfile.read_text().split()) < 4 if pidfile.exists() else True
        ):  # discovery + an episode's pair
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no episode started a server"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, err[-3000:]
        assert f"stopped by {signal.Signals(sig).name}" in err
        pids = [int(x) for x in pidfile.read_text().split()]
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in pids if alive(p)] == []
        assert processes_running(str(fake)) == []
    finally:
        proc.kill()
