"""The MCP environment's pure parts: config rules, tool naming, tasks with server tool names,
the reference reward, what the policy sees of a result, where a command is found. The
parts that start servers are in test_mcp_servers.py; training runs in test_mcp_train.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trustee.config import (
    ConfigError,
    EnvironmentConfig,
    MCPConfig,
    MCPServerConfig,
    load_config,
    needs_simulator,
)
from trustee.envs.base import EpisodeState
from trustee.envs.reference import reference_reward
from trustee.envs.tasks_file import TasksFileError, episode_view, load_tasks
from trustee.mcp.servers import expand, resolve_command, result_text, routes_from
from trustee.types import Message, Task, ToolCall, ToolSpec

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, body: str):
    path = tmp_path / "c.toml"
    path.write_text(body)
    return load_config(path)


MCP_OK = """
[environment]
kind = "mcp"
reward = "reference"
[environment.mcp]
tasks = "t.jsonl"
[[environment.mcp.servers]]
name = "a"
command = "x"
"""


def test_config_rules_name_the_field_value_and_fix(tmp_path):
    cfg = _cfg(tmp_path, MCP_OK)
    assert cfg.environment.mcp.servers[0].scope == "episode" and not needs_simulator(cfg.environment)
    bad = """
[environment]
kind = "mcp"
reward = "function"
[environment.mcp]
[[environment.mcp.servers]]
name = "a b"
command = "x"
url = "http://127.0.0.1:1/mcp"
[[environment.mcp.servers]]
name = "c"
url = "ftp://host"
args = ["--x"]
"""
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, bad)
    text = str(e.value)
    for needle in (
        "environment.mcp.tasks",
        "environment.mcp.servers[0].name",
        "environment.mcp.servers[0].command",
        "either command (stdio) or url",
        "environment.mcp.servers[1].args",
        "environment.mcp.servers[1].url",
        "environment.mcp.reward_fn",
    ):
        assert needle in text, needle
    with pytest.raises(ConfigError, match=r"environment.mcp.servers\[1\].name.*unique"):
        _cfg(tmp_path, MCP_OK + '[[environment.mcp.servers]]\nname = "a"\ncommand = "y"\n')
    with pytest.raises(ConfigError, match="environment.reward.*'reference'"):
        _cfg(tmp_path, MCP_OK.replace('reward = "reference"', 'reward = "graded"'))
    with pytest.raises(ConfigError, match="environment.mcp.*only used with kind 'mcp'"):
        _cfg(
            tmp_path, '[environment]\nkind = "toy"\nreward = "exact"\n[environment.mcp]\ntasks = "t.jsonl"\n'
        )
    with pytest.raises(ConfigError, match="at least one server"):
        _cfg(
            tmp_path,
            '[environment]\nkind = "mcp"\nreward = "reference"\n[environment.mcp]\ntasks = "t.jsonl"\n',
        )


def test_generated_tasks_and_judged_rewards_need_the_simulator():
    server = [MCPServerConfig(name="a", command="x")]
    assert needs_simulator(
        EnvironmentConfig(kind="mcp", reward="reference", mcp=MCPConfig(tasks="generate", servers=server))
    )
    assert needs_simulator(
        EnvironmentConfig(kind="mcp", reward="judge", mcp=MCPConfig(tasks="t", servers=server))
    )
    assert not needs_simulator(
        EnvironmentConfig(kind="mcp", reward="function", mcp=MCPConfig(tasks="t", servers=server))
    )
    # The reference reward serves tasks files too, without a simulator.
    assert not needs_simulator(EnvironmentConfig(kind="tasks_file", reward="reference"))


def _tool(name: str, read_only: bool | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        description=f"{name} tool",
        input_schema={"type": "object", "properties": {"x": {"type": "string"}}},
        annotations=None if read_only is None else SimpleNamespace(read_only_hint=read_only),
    )


def test_names_two_servers_share_become_server_prefixed():
    routes = routes_from(
        {"git": [_tool("status", True), _tool("log")], "tickets": [_tool("status"), _tool("open")]}
    )
    assert sorted(routes) == ["git__status", "log", "open", "tickets__status"]
    r = routes["tickets__status"]
    assert (r.server, r.tool, r.spec.name) == ("tickets", "status", "tickets__status")
    assert routes["git__status"].read_only is True and routes["log"].read_only is None
    # A schema without 'type'/'properties' gets them, so the parser can check calls against it.
    bare = SimpleNamespace(name="ping", description=None, input_schema={}, annotations=None)
    assert routes_from({"s": [bare]})["ping"].spec.parameters == {"type": "object", "properties": {}}


def _catalog() -> dict[str, ToolSpec]:
    p = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    return {n: ToolSpec(name=n, parameters=p) for n in ("read_note", "list_notes")}


def _lines(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mcp_tasks_name_server_tools_and_default_to_all(tmp_path):
    path = _lines(
        tmp_path,
        [
            {
                "prompt": "a",
                "tools": ["read_note"],
                "expected_calls": [{"name": "read_note", "arguments": {"title": "x"}}],
            },
            {"prompt": "b"},
        ],
    )
    tasks = load_tasks(path, _catalog(), env="mcp")
    assert [[t.name for t in task.tools] for task in tasks] == [["read_note"], ["read_note", "list_notes"]]
    assert {t.env for t in tasks} == {"mcp"}
    with pytest.raises(
        TasksFileError,
        match=r"tasks.jsonl:1: tool 'nope' is not offered by any server; known: \['list_notes', 'read_note'\]",
    ):
        load_tasks(_lines(tmp_path, [{"prompt": "a", "tools": ["nope"]}]), _catalog())
    with pytest.raises(TasksFileError, match=r"expected_calls name \['list_notes'\]"):
        load_tasks(
            _lines(
                tmp_path,
                [
                    {
                        "prompt": "a",
                        "tools": ["read_note"],
                        "expected_calls": [{"name": "list_notes", "arguments": {}}],
                    }
                ],
            ),
            _catalog(),
        )
    with pytest.raises(TasksFileError, match="MCP tasks name their servers' tools"):
        load_tasks(_lines(tmp_path, [{"prompt": "a", "tools": [{"name": "f"}]}]), _catalog())
    # Without servers (kind 'tasks_file') names mean nothing and schemas stay required.
    with pytest.raises(TasksFileError, match="given by name"):
        load_tasks(_lines(tmp_path, [{"prompt": "a", "tools": ["read_note"]}]))
    with pytest.raises(TasksFileError, match="'tools' is required"):
        load_tasks(_lines(tmp_path, [{"prompt": "a"}]))


def _episode(calls: list[ToolCall], final: str, *, answer=None, done=True, call_errors=0) -> float:
    task = Task(
        id="t",
        env="mcp",
        tools=list(_catalog().values()),
        first_query="q",
        expected_calls=[ToolCall(name="read_note", arguments={"title": "wifi"})],
        payload={"answer": answer},
    )
    state = EpisodeState(episode_id="e", task=task, messages=[Message(role="user", content="q")], done=done)
    state.data.update(calls=calls, results=["{}"] * len(calls), call_errors=call_errors)
    if done:
        state.data["final"] = final
    return reference_reward(episode_view(state))


def test_reference_reward_orders_correct_over_tool_over_guess_over_malformed():
    right = ToolCall(name="read_note", arguments={"title": "wifi"})
    wrong_args = ToolCall(name="read_note", arguments={"title": "groceries"})
    correct = _episode([right], "The password is swordfish.", answer="swordfish")
    right_tool = _episode([wrong_args], "I could not find it.", answer="swordfish")
    guess = _episode([], "It is hunter2.", answer="swordfish")
    malformed = _episode([wrong_args], "I could not find it.", answer="swordfish", call_errors=1)
    truncated = _episode([right], "", answer="swordfish", done=False)
    assert correct.reward == 1.0 and correct.parts["exact"] == 1.0
    # As the toy environment's graded reward: a clean finish 0.1, the right tool 0.3 more.
    assert right_tool.reward == pytest.approx(0.4) and right_tool.parts["tool_names"] == 1.0
    assert guess.reward == pytest.approx(0.1)
    # Partial credit is paid only to an episode that finished cleanly.
    assert malformed.reward == 0.0 and malformed.parts["well_formed"] == 0.5
    assert truncated.reward == 0.0 and truncated.parts["finished"] == 0.0
    assert correct.reward > right_tool.reward > guess.reward > malformed.reward
    # A task without an answer is done when its expected calls were made exactly.
    assert _episode([right], "Done.").reward == 1.0
    assert _episode([wrong_args], "Done.").reward == pytest.approx(0.4)
    # Answers of other JSON types.
    assert _episode([right], "Yes, it is there.", answer=True).reward == 1.0
    assert _episode([right], "The count is 4.", answer=4).reward == 1.0
    assert _episode([right], "The count is 5.", answer=4).reward < 1.0


def test_what_the_policy_sees_of_a_result():
    text = SimpleNamespace(type="text", text='{\n  "b": 1,\n  "a": [1, 2]\n}')
    image = SimpleNamespace(type="image")
    ok = SimpleNamespace(structured_content=None, is_error=False, content=[text, image])
    assert result_text(ok) == '{"a":[1,2],"b":1}\n[image omitted]'
    structured = SimpleNamespace(structured_content={"z": 1, "y": "é"}, is_error=False, content=[])
    assert result_text(structured) == '{"y":"é","z":1}'
    err = SimpleNamespace(
        structured_content=None, is_error=True, content=[SimpleNamespace(type="text", text="bad tz")]
    )
    assert json.loads(result_text(err)) == {"error": "bad tz"}
    assert (
        result_text(
            SimpleNamespace(
                structured_content=None, is_error=False, content=[SimpleNamespace(type="text", text="{oops")]
            )
        )
        == "{oops"
    )


def test_commands_are_found_on_path_or_beside_python(tmp_path, monkeypatch):
    assert resolve_command("{python}") == sys.executable
    assert resolve_command("sh") is not None
    assert resolve_command("no-such-command-xyz") is None
    script = tmp_path / "srv"
    script.write_text("#!/bin/sh\n")
    assert resolve_command(str(script)) is None  # not executable
    script.chmod(0o755)
    assert resolve_command(str(script)) == str(script)
    # A console script of the running Python's environment is found with PATH empty.
    beside = Path(sys.executable).parent
    name = next(p.name for p in beside.iterdir() if p.name.startswith("pip") and os.access(p, os.X_OK))
    monkeypatch.setenv("PATH", "")
    assert resolve_command(name) == str(beside / name)
    assert expand("--dir={workdir}/x", "/w") == "--dir=/w/x" and expand("{python}", "/w") == sys.executable


def test_example_configs_pass_the_start_up_checks():
    from trustee.envs import check_environment

    for name in ("config.toml", "time.toml"):
        cfg = load_config(ROOT / "examples" / "mcp" / name)
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            problems = check_environment(cfg.environment)
        finally:
            os.chdir(cwd)
        if name == "time.toml" and resolve_command("mcp-server-time") is None:
            assert "pip install mcp-server-time" in problems[0]
            continue
        assert problems == [], (name, problems)


def test_dry_run_checks_name_a_missing_command_and_a_bad_tasks_file(tmp_path):
    from trustee.envs import check_environment

    (tmp_path / "t.jsonl").write_text('{"prompt": 3}\n')
    cfg = _cfg(
        tmp_path,
        MCP_OK.replace('tasks = "t.jsonl"', f'tasks = "{tmp_path / "t.jsonl"}"').replace(
            '"x"', '"no-such-server-xyz"'
        ),
    )
    problems = check_environment(cfg.environment)
    assert any("servers[0].command = 'no-such-server-xyz': not found" in p for p in problems)
    assert any(p.startswith("environment.mcp.tasks:") and "t.jsonl:1" in p for p in problems)
