"""Real server processes: scopes, faults, concurrency and no process left behind.

Most tests use `mcp_fake_server.py`, a test double that speaks MCP without the SDK (it starts
in milliseconds, so 64 run at once on two cores); one uses the example's notes server,
written with the SDK's server API. Every test ends by checking that no server it started
is alive (`/proc`), and timeouts are short so the faults are quick."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from test_episode import ScriptedPolicy, call_text

from trustee.envs.base import AgentAction, Knobs
from trustee.envs.mcp_env import MCPEnv
from trustee.envs.reference import reference_reward
from trustee.interrupt import alive, children_of
from trustee.mcp.servers import ServerFault, ServerSpec, Timeouts
from trustee.rollout.episode import EpisodeRunner, run_group
from trustee.types import Message, ToolCall

ROOT = Path(__file__).resolve().parents[1]
FAKE = str(ROOT / "tests" / "mcp_fake_server.py")
QUICK = Timeouts(init=10.0, call=10.0, grace=0.3)

_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before():
    """The live children of this process when the test starts (the suite's session fixtures, e.g. a
    vLLM server, are children of the same pytest process and outlive any one test)."""
    global _BEFORE
    _BEFORE = set(children_of(os.getpid()))
    yield


def left_children() -> list[int]:
    """Children of this process that the test started and that are still alive."""
    return sorted(set(children_of(os.getpid())) - _BEFORE)


def fake(name: str = "fake", *extra: str, scope: str = "episode") -> ServerSpec:
    return ServerSpec(name=name, command="{python}", args=("-S", FAKE, *extra), scope=scope)  # type: ignore[arg-type]


def tasks_file(tmp_path: Path, rows: list[dict] | None = None) -> str:
    rows = rows or [
        {
            "id": "echo",
            "prompt": "Echo hi.",
            "answer": "hi",
            "expected_calls": [{"name": "echo", "arguments": {"text": "hi"}}],
        }
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_env(tmp_path: Path, *servers: ServerSpec, timeouts: Timeouts = QUICK, **kw) -> MCPEnv:
    return MCPEnv(
        list(servers), tasks_path=tasks_file(tmp_path), reward=reference_reward, timeouts=timeouts, **kw
    )


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_dead(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


class KeyedPolicy(ScriptedPolicy):
    """Policy double: the script of each episode is `script(episode_id)`."""

    def __init__(self, tokenizer, script):
        super().__init__(tokenizer, [""])
        self.script = script

    async def generate(self, prompt, params, *, key=None):
        self.texts = self.script(key)
        return await super().generate(prompt, params, key=key)


def act(*calls: ToolCall) -> AgentAction:
    return AgentAction(message=Message(role="assistant", tool_calls=list(calls)), calls=list(calls))


def add(n: int) -> ToolCall:
    return ToolCall(name="add", arguments={"n": n})


# ----------------------------------------------------------------------------- scopes


def test_episode_scope_isolates_state_shared_scope_shares_it(tmp_path):
    async def totals(env: MCPEnv, episodes: int) -> list[str]:
        out = []
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            for i in range(episodes):
                state = await env.start(task, f"e{i}")
                reply = await env.step(state, act(add(2)))
                out.append(json.loads(reply[0].content)["total"])
                await env.end_episode(state)
        return out

    pidfile = tmp_path / "pids"
    # 'episode': a fresh server each time, so the counter starts from zero.
    assert anyio.run(totals, make_env(tmp_path, fake("f", "--pidfile", str(pidfile))), 3) == [2, 2, 2]
    assert len(pids_in(pidfile)) == 4  # discovery + one per episode
    # 'shared': one pooled server, so the counter grows; replaced after 2 episodes.
    shared = fake("f", scope="shared")
    assert anyio.run(totals, make_env(tmp_path, shared), 3) == [2, 4, 6]
    assert anyio.run(totals, make_env(tmp_path, shared, max_episodes_per_server=2), 5) == [2, 4, 2, 4, 2]
    assert left_children() == []


def test_shared_pool_spreads_concurrent_episodes_over_pool_size_servers(tmp_path):
    pidfile = tmp_path / "pids"

    async def main() -> dict[str, float]:
        async with make_env(
            tmp_path, fake("f", "--pidfile", str(pidfile), scope="shared"), pool_size=3
        ) as env:
            task = await env.make_task(Knobs(), random.Random(0))
            states = []
            for i in range(6):  # all six at once: the pool grows to three, then shares
                states.append(await env.start(task, f"e{i}"))
            assert env.pool.running == 3
            for s in states:
                await env.end_episode(s)
            return env.step_metrics()

    m = anyio.run(main)
    assert m["mcp/server_starts"] == 4.0 and m["mcp/server_faults"] == 0.0  # discovery + 3
    assert wait_dead(pids_in(pidfile), 2.0) == []


def test_tools_of_two_servers_that_collide_are_prefixed_and_routed(tmp_path):
    async def main():
        env = MCPEnv(
            [fake("a", scope="shared"), fake("b", scope="shared")],
            tasks_path=tasks_file(tmp_path, [{"prompt": "p"}]),
            reward=reference_reward,
            timeouts=QUICK,
        )
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            names = sorted(t.name for t in task.tools)
            state = await env.start(task, "e")
            a = await env.step(state, act(ToolCall(name="a__add", arguments={"n": 1})))
            b = await env.step(state, act(ToolCall(name="b__add", arguments={"n": 5})))
            a2 = await env.step(state, act(ToolCall(name="a__add", arguments={"n": 1})))
            await env.end_episode(state)
            return names, [json.loads(m[0].content)["total"] for m in (a, b, a2)]

    names, totals = anyio.run(main)
    assert names == sorted(f"{s}__{t}" for s in "ab" for t in ("add", "crash", "echo", "hang", "info"))
    assert totals == [1, 5, 2]  # each name reaches its own server


# ----------------------------------------------------------------------------- faults


def test_server_exiting_mid_episode_fails_only_that_episode(tmp_path, tiny_tokenizer):
    env = make_env(tmp_path, fake("f", "--child"))
    echo = call_text(ToolCall(name="echo", arguments={"text": "hi"}))
    crash = call_text(ToolCall(name="crash", arguments={}))

    def script(key: str) -> list[str]:
        return [crash if key.endswith("/1") else echo, "It said hi."]

    async def main():
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            trajs = await run_group(
                env, task, 3, EpisodeRunner(KeyedPolicy(tiny_tokenizer, script), tiny_tokenizer)
            )
            return trajs, env.step_metrics()

    t0 = time.monotonic()
    trajs, m = anyio.run(main)
    assert time.monotonic() - t0 < 20
    assert [t.status for t in trajs] == ["ok", "error", "ok"]
    assert [t.reward for t in trajs] == [1.0, 0.0, 1.0]
    err = trajs[1].error
    assert (
        "ServerFault" in err and "closed the connection during tool 'crash'" in err and "exit status 3" in err
    )
    assert (
        "stderr tail: fake server: crashing on purpose" in err
    )  # the server's own words reach the trajectory
    assert m["mcp/server_faults"] == 1.0 and m["mcp/server_starts"] == 4.0
    assert left_children() == []  # the crashed server's grandchild went with its group


def test_server_that_never_answers_initialize_fails_the_episode_in_time(tmp_path, tiny_tokenizer):
    pidfile = tmp_path / "pids"
    server = fake(
        "f", "--mode", "silent", "--after-first", str(tmp_path / "marker"), "--pidfile", str(pidfile)
    )
    env = make_env(tmp_path, server, timeouts=Timeouts(init=3.0, call=10.0, grace=0.2))
    policy = KeyedPolicy(tiny_tokenizer, lambda key: ["hi"])

    async def main():
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            return await run_group(env, task, 2, EpisodeRunner(policy, tiny_tokenizer)), env.step_metrics()

    t0 = time.monotonic()
    trajs, m = anyio.run(main)
    assert time.monotonic() - t0 < 30
    assert [t.status for t in trajs] == ["error", "error"]
    assert all("did not answer the initialize handshake within 3 s" in t.error for t in trajs)
    assert m["mcp/server_faults"] == 2.0
    assert len(pids_in(pidfile)) == 3 and wait_dead(pids_in(pidfile), 2.0) == []


def test_server_that_cannot_start_reports_its_stderr(tmp_path):
    server = fake("f", "--mode", "die", "--after-first", str(tmp_path / "marker"))

    async def main():
        async with make_env(tmp_path, server) as env:
            task = await env.make_task(Knobs(), random.Random(0))
            with pytest.raises(ServerFault) as e:
                await env.start(task, "e")
            return str(e.value)

    msg = anyio.run(main)
    assert "could not start" in msg and "exit status 1" in msg and "refusing to start" in msg
    with pytest.raises(ServerFault, match="not found on PATH"):
        anyio.run(make_env(tmp_path, ServerSpec(name="x", command="no-such-server-xyz")).__aenter__)


def hanging(tmp_path: Path, tokenizer, call_timeout: float) -> tuple[MCPEnv, Path, EpisodeRunner]:
    """An environment of one fake server, its pid file, and a runner whose policy calls `hang`."""
    pidfile = tmp_path / "pids"
    timeouts = Timeouts(init=10.0, call=call_timeout, grace=0.2)
    env = make_env(tmp_path, fake("f", "--pidfile", str(pidfile)), timeouts=timeouts)
    hang = call_text(ToolCall(name="hang", arguments={}))
    return env, pidfile, EpisodeRunner(KeyedPolicy(tokenizer, lambda key: [hang, "done"]), tokenizer)


def test_server_that_hangs_on_a_call_is_killed_and_fails_the_episode(tmp_path, tiny_tokenizer):
    env, pidfile, runner = hanging(tmp_path, tiny_tokenizer, 0.5)

    async def main():
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            t0 = time.monotonic()
            trajs = await run_group(env, task, 2, runner)
            return trajs, time.monotonic() - t0

    trajs, wall = anyio.run(main)
    assert wall < 5.0  # 0.5 s call timeout, then the server is killed, not waited for
    assert [t.status for t in trajs] == ["error", "error"]
    assert all("did not answer tool 'hang' within 0.5 s" in t.error for t in trajs)
    assert wait_dead(pids_in(pidfile), 2.0) == []


def test_cancelled_episodes_close_their_servers(tmp_path, tiny_tokenizer):
    env, pidfile, runner = hanging(tmp_path, tiny_tokenizer, 30.0)

    async def main():
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            with anyio.move_on_after(1.5):  # as a first SIGINT with on_interrupt = 'abandon' does
                await run_group(env, task, 4, runner)
            return env.pool.running

    assert anyio.run(main) == 0
    assert len(pids_in(pidfile)) == 5 and wait_dead(pids_in(pidfile), 2.0) == []


# ----------------------------------------------------------------------------- scale and kill


def test_64_concurrent_episodes_each_with_its_own_server(tmp_path, tiny_tokenizer):
    pidfile = tmp_path / "pids"
    env = make_env(
        tmp_path, fake("f", "--pidfile", str(pidfile)), timeouts=Timeouts(init=60.0, call=30.0, grace=1.0)
    )
    calls = call_text(
        ToolCall(name="add", arguments={"n": 3}), ToolCall(name="echo", arguments={"text": "hi"})
    )
    runner = EpisodeRunner(KeyedPolicy(tiny_tokenizer, lambda key: [calls, "It said hi."]), tiny_tokenizer)
    peak = 0

    async def main():
        nonlocal peak
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, env.pool.running)
                    await anyio.sleep(0.02)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                trajs = await run_group(env, task, 64, runner)
                tg.cancel_scope.cancel()
            return trajs, env.step_metrics()

    trajs, m = anyio.run(main)
    assert [t.status for t in trajs] == ["ok"] * 64 and all(t.reward == 1.0 for t in trajs)
    # Every episode's counter started from zero: 64 isolated servers, not one shared.
    tool_results = [[m.content for m in t.messages if m.role == "tool"] for t in trajs]
    assert all(r == ['{"total":3}', '{"echo":"hi"}'] for r in tool_results), tool_results[:2]
    assert m["mcp/server_starts"] == 65.0 and m["mcp/calls"] == 128.0 and m["mcp/server_faults"] == 0.0
    assert peak >= 32  # they really ran at the same time
    pids = pids_in(pidfile)
    assert len(set(pids)) == 65 and wait_dead(pids, 3.0) == []


DRIVER = """
import anyio, random, sys
from trustee.envs.base import Knobs
from trustee.envs.mcp_env import MCPEnv
from trustee.envs.reference import reference_reward
from trustee.interrupt import start_reaper
from trustee.mcp.servers import ServerSpec, Timeouts

if sys.argv[3] == "reaper":
    start_reaper()  # as trustee.run does

async def main():
    spec = ServerSpec(name="f", command="{python}", args=("-S", sys.argv[1], "--child", "--pidfile", sys.argv[2]))
    env = MCPEnv([spec], tasks_path=sys.argv[4], reward=reference_reward, timeouts=Timeouts(init=60))
    async with env:
        task = await env.make_task(Knobs(), random.Random(0))
        states = []
        async with anyio.create_task_group() as tg:
            async def one(i):
                states.append(await env.start(task, f"e{i}"))
            for i in range(16):
                tg.start_soon(one, i)
        print("ready", env.pool.running, flush=True)
        await anyio.sleep(600)

anyio.run(main)
"""


@pytest.mark.parametrize("reaper", ["reaper", "no-reaper"])
def test_sigkilled_trustee_leaves_no_server_of_16(tmp_path, reaper):
    pidfile = tmp_path / "pids"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, FAKE, str(pidfile), reaper, tasks_file(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()
        assert line.split() == ["ready", "16"], (line, proc.stderr.read() if proc.poll() is not None else "")
        pids = pids_in(pidfile)  # (server, grandchild) pairs: discovery's pair and 16 live ones
        servers, grandchildren = pids[0::2], pids[1::2]
        live = [p for p in servers + grandchildren if alive(p)]
        assert len(live) == 32
        time.sleep(0.6)  # the reaper samples the run's descendants every 0.5 s
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # PR_SET_PDEATHSIG: every server dies with trustee, reaper or not.
        assert wait_dead(servers, 5.0) == []
        if reaper == "reaper":  # and the watchdog takes what the servers started
            assert wait_dead(grandchildren, 5.0) == []
    finally:
        proc.kill()
        for p in pids_in(pidfile):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_example_notes_server_state_and_workdir(tmp_path):
    """The example's SDK-written server: each episode starts from the template's notes, and
    what it saves stays in its own working directory, removed at the end."""
    spec = ServerSpec(
        name="notes",
        command="{python}",
        args=(str(ROOT / "examples" / "mcp" / "notes_server.py"), "--dir", "{workdir}"),
    )
    env = MCPEnv(
        [spec],
        tasks_path=str(ROOT / "examples" / "mcp" / "tasks.jsonl"),
        reward=reference_reward,
        timeouts=Timeouts(init=60.0, call=30.0, grace=1.0),
        workdir_template=str(ROOT / "examples" / "mcp" / "workdir"),
    )

    async def main():
        async with env:
            task = next(t for t in env.tasks if t.id == "save-then-count")
            a, b = await env.start(task, "a"), await env.start(task, "b")
            saved = await env.step(
                a, act(ToolCall(name="add_note", arguments={"title": "plumber", "text": "Friday"}))
            )
            listed_a = await env.step(a, act(ToolCall(name="list_notes", arguments={})))
            listed_b = await env.step(b, act(ToolCall(name="list_notes", arguments={})))
            missing = await env.step(b, act(ToolCall(name="read_note", arguments={"title": "plumber"})))
            dirs = [a.data["workdir"], b.data["workdir"]]
            for s in (a, b):
                await env.end_episode(s)
            return saved, listed_a, listed_b, missing, dirs

    saved, listed_a, listed_b, missing, dirs = anyio.run(main)
    assert json.loads(saved[0].content) == {"count": 5, "saved": "plumber"}
    assert "plumber" in json.loads(listed_a[0].content)["titles"]
    assert json.loads(listed_b[0].content)["titles"] == ["dentist", "groceries", "ideas", "wifi"]
    assert "no note titled 'plumber'" in json.loads(missing[0].content)["error"]
    assert not any(Path(d).exists() for d in dirs)
    assert left_children() == []


# ----------------------------------------------------------------------------- from the config


def test_config_fields_reach_and_change_the_environment(tmp_path):
    """Every [environment.mcp] knob through load_config and build_environment, with its effect."""
    from trustee.config import load_config
    from trustee.envs import build_environment

    template = tmp_path / "template"
    template.mkdir()
    (template / "seed.txt").write_text("seeded")
    (tmp_path / "reward.py").write_text("def reward(ep):\n    return 0.25 * len(ep.calls)\n")
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        f"""
[environment]
kind = "mcp"
reward = "function"
[environment.mcp]
tasks = "{tasks_file(tmp_path, [{"prompt": "p"}])}"
workdir_template = "{template}"
keep_failed_workdirs = true
init_timeout = 10.0
call_timeout = 1.0
shutdown_grace = 0.3
pool_size = 2
max_episodes_per_server = 2
reward_fn = "{tmp_path / "reward.py"}:reward"
[[environment.mcp.servers]]
name = "solo"
command = "{{python}}"
args = ["-S", "{FAKE}", "--pidfile", "{{workdir}}/pids"]
env = {{FAKE_TAG = "tagged"}}
scope = "episode"
[[environment.mcp.servers]]
name = "pool"
command = "{{python}}"
args = ["-S", "{FAKE}", "--ignore-eof", "--pidfile", "{tmp_path / "pool_pids"}"]
scope = "shared"
"""
    )
    env = build_environment(load_config(cfg_path))
    assert isinstance(env, MCPEnv)

    def call(name: str, **arguments) -> AgentAction:
        return act(ToolCall(name=name, arguments=arguments))

    async def main():
        async with env:
            task = await env.make_task(Knobs(), random.Random(0))
            # Both servers offer the same tools: every name is prefixed by its server.
            assert {t.name for t in task.tools} >= {"solo__info", "pool__add"}
            a = await env.start(task, "a")
            info = json.loads((await env.step(a, call("solo__info")))[0].content)
            workdir = a.data["workdir"]
            assert info == {"argv": ["--pidfile", f"{workdir}/pids"], "tag": "tagged"}  # args, {workdir}, env
            assert (Path(workdir) / "seed.txt").read_text() == "seeded"  # workdir_template
            score = await env.score(a)
            assert score.reward == 0.25 and score.parts["function"] == 0.25  # reward_fn
            # pool_size 2: two episodes at once get two shared servers; max_episodes_per_server 2:
            # each then serves one more episode and is replaced.
            b = await env.start(task, "b")
            totals = [
                json.loads((await env.step(s, call("pool__add", n=2)))[0].content)["total"] for s in (a, b)
            ]
            for s in (a, b):
                await env.end_episode(s)
            ends = []
            for i in range(3):
                s = await env.start(task, f"c{i}")
                totals.append(json.loads((await env.step(s, call("pool__add", n=2)))[0].content)["total"])
                t0 = time.monotonic()
                await env.end_episode(s)
                ends.append(time.monotonic() - t0)
            assert totals == [2, 2, 4, 4, 2]
            # shutdown_grace: a worn-out shared server is closed when its last episode ends; these
            # ignore their stdin closing, so each close waits out the 0.3 s grace, then kills.
            assert 0.3 <= ends[0] < 3.0 and 0.3 <= ends[1] < 3.0 and ends[2] < 0.3
            assert not Path(workdir).exists()
            # call_timeout: a hung call fails its episode after 1 s; keep_failed_workdirs keeps
            # the episode's directory and names it.
            h = await env.start(task, "h")
            t0 = time.monotonic()
            with pytest.raises(ServerFault, match="within 1 s") as e:
                await env.step(h, call("solo__hang"))
            assert time.monotonic() - t0 < 5.0
            await env.end_episode(h)
            assert h.data["workdir"] in str(e.value) and Path(h.data["workdir"]).exists()
            shutil.rmtree(h.data["workdir"])

    anyio.run(main)
    assert len(pids_in(tmp_path / "pool_pids")) == 4  # discovery, then three shared servers
    assert wait_dead(pids_in(tmp_path / "pool_pids"), 2.0) == []
    assert left_children() == []


class ScriptedGenerator:
    """Task generator double: hands out the given tasks in order (named as such; the slow
    test in test_mcp_train.py uses the real generator with the tiny simulator)."""

    def __init__(self, calls: list[list[ToolCall]]):
        self.calls = list(calls)
        self.catalog = None

    async def generate(self, knobs, rng):
        from trustee.types import Task

        calls = self.calls.pop(0)
        tools = [t for ts in self.catalog.by_category.values() for t in ts]
        return Task(
            id=f"sim-{len(self.calls)}", env="simulated", tools=tools, first_query="q", expected_calls=calls
        )


def test_generated_tasks_are_kept_only_when_their_calls_succeed_on_a_fresh_server(tmp_path):
    pidfile = tmp_path / "pids"
    bad_args = [ToolCall(name="add", arguments={"n": "x"})]  # the server fails it (int("x"))
    crashes = [ToolCall(name="crash", arguments={})]
    good = [add(1), ToolCall(name="echo", arguments={"text": "hi"})]

    def env(generate_attempts: int, script: list) -> MCPEnv:
        return MCPEnv(
            [fake("f", "--pidfile", str(pidfile), scope="shared")],
            generator=ScriptedGenerator(script),
            reward=reference_reward,
            timeouts=QUICK,
            generate_attempts=generate_attempts,
        )

    async def main(e: MCPEnv):
        async with e:
            try:
                return await e.make_task(Knobs(), random.Random(0)), e.step_metrics()
            except ValueError as err:
                return err, e.step_metrics()

    task, m = anyio.run(main, env(3, [bad_args, crashes, good]))
    assert task.env == "mcp" and task.id.startswith("mcp-") and task.expected_calls == good
    assert m["mcp/tasks_generated"] == 3.0 and m["mcp/tasks_kept_share"] == pytest.approx(1 / 3)
    # Verification runs on fresh servers even for a shared server: discovery, then one per task.
    assert len(pids_in(pidfile)) == 4 and wait_dead(pids_in(pidfile), 2.0) == []
    err, m = anyio.run(main, env(2, [bad_args, crashes, good]))
    assert isinstance(err, ValueError) and "none of 2 generated tasks passed verification" in str(err)
    assert "closed the connection during tool 'crash'" in str(err) and m["mcp/tasks_kept_share"] == 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streamable_http_server_by_url(tmp_path):
    """A server trustee did not start, reached by `url` (the example server in HTTP mode, on
    the loopback address); each episode gets its own session."""
    port = _free_port()
    (tmp_path / "notes.json").write_text(json.dumps({"wifi": "swordfish"}))
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "mcp" / "notes_server.py"),
            "--dir",
            str(tmp_path),
            "--http",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        import socket

        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        env = MCPEnv(
            [ServerSpec(name="notes", url=f"http://127.0.0.1:{port}/mcp", scope="episode")],
            tasks_path=tasks_file(tmp_path, [{"prompt": "p", "tools": ["read_note"]}]),
            reward=reference_reward,
            timeouts=Timeouts(init=30.0, call=30.0),
        )

        async def main():
            async with env:
                task = await env.make_task(Knobs(), random.Random(0))
                s = await env.start(task, "e")
                out = await env.step(s, act(ToolCall(name="read_note", arguments={"title": "wifi"})))
                await env.end_episode(s)
                return out[0].content, env.step_metrics()

        text, m = anyio.run(main)
        assert json.loads(text) == {"text": "swordfish", "title": "wifi"}
        assert (
            m["mcp/server_starts"] == 2.0 and m["mcp/server_faults"] == 0.0
        )  # discovery + the episode's session
        assert server.poll() is None  # trustee never owned it, so never stopped it
    finally:
        server.kill()
        server.wait()
