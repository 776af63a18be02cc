"""The MCP environment: the policy calls the real tools of MCP servers.

Owns `MCPEnv` (the `Environment` contract over `trustee/mcp/`), `build_mcp_env` (from
`[environment.mcp]`) and `check_mcp` (the start-up checks a dry run also runs).

The servers' tools are discovered with `list_tools` when the environment is entered
(`async with env`, which the training loop does; leaving it closes every server) and shown
to the policy like any other tools (their JSON schemas validated by the parser; a name two
servers share becomes `server__tool`). Tasks come from a tasks file (the tasks-file format,
`tools` naming server tools, every tool when absent) or are generated (`tasks =
"generate"`): the simulator's task generator draws tools from the servers' catalog (one
category per server) and writes a task with reference calls, which are then executed on a
fresh server in a fresh working directory; the task is kept only if every call succeeds
(`mcp/tasks_kept_share`).

An episode: a fresh working directory (`{workdir}`, copied from `workdir_template`), a
connection to each server its tools need (fresh for `scope = "episode"`, pooled for
"shared"), the tool calls of each turn run in order (servers have state), a turn without
calls is the final answer. A server that crashes, hangs or breaks the protocol fails that
episode only (`ServerFault`: its message, with the server's stderr tail, becomes the
trajectory's error; counted in `mcp/server_faults`). `end_episode` (called by the runner
however the episode ended) gives the connections back and removes the directory. Reward:
`reference` (`envs/reference.py`), a function of the episode, the judge, or both, scored as
the tasks-file environment scores.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from trustee.envs.base import AgentAction, EpisodeState, Knobs, Score
from trustee.envs.tasks_file import RewardFn, final_answer, load_tasks, record_turn, score_episode
from trustee.mcp.servers import (
    Connection,
    ServerFault,
    ServerPool,
    ServerSpec,
    Timeouts,
    ToolRoute,
    routes_from,
)
from trustee.types import Message, Task, ToolCall

if TYPE_CHECKING:
    from trustee.config import MCPConfig
    from trustee.envs import EnvContext
    from trustee.sim.judge import Judge
    from trustee.sim.taskgen import TaskGenerator


@dataclass
class GenStats:
    """Generated tasks and the share kept after verification on the server."""

    generated: int = 0
    kept: int = 0
    reasons: list[str] = field(default_factory=list)


class MCPEnv:
    """See the module docstring. `tasks_path` is a tasks file, or None with a `generator`."""

    name = "mcp"

    def __init__(
        self,
        servers: list[ServerSpec],
        *,
        tasks_path: str | None = None,
        generator: TaskGenerator | None = None,
        reward: RewardFn | None = None,
        judge: Judge | None = None,
        judge_weight: float = 0.5,
        timeouts: Timeouts | None = None,
        pool_size: int = 1,
        max_episodes_per_server: int = 0,
        workdir_template: str = "",
        keep_failed_workdirs: bool = False,
        generate_attempts: int = 4,
    ):
        if (tasks_path is None) == (generator is None):
            raise ValueError("give a tasks file or a task generator, not both or neither")
        if reward is None and judge is None:
            raise ValueError("give a `reward` function, a `judge`, or both")
        self.specs = {s.name: s for s in servers}
        self.pool = ServerPool(
            self.specs,
            timeouts or Timeouts(),
            pool_size=pool_size,
            max_episodes=max_episodes_per_server,
            workdir_template=workdir_template,
        )
        self.tasks_path = tasks_path
        self.generator = generator
        self.reward = reward
        self.judge = judge
        self.judge_weight = judge_weight if (reward is not None and judge is not None) else None
        self.keep_failed_workdirs = keep_failed_workdirs
        self.generate_attempts = generate_attempts
        self.routes: dict[str, ToolRoute] = {}
        self.tasks: list[Task] = []
        self.gen = GenStats()
        self._gen_step = GenStats()

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> MCPEnv:
        await self.pool.__aenter__()
        try:
            self.routes = routes_from(await self.pool.discover())
            if self.tasks_path is not None:
                catalog = {name: r.spec for name, r in self.routes.items()}
                tasks = load_tasks(self.tasks_path, catalog, env="mcp")
                self.tasks = sorted(tasks, key=lambda t: t.payload.get("difficulty", 1.0))
            else:
                self._attach_catalog()
        except BaseException:
            await self.pool.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.pool.__aexit__(*exc)

    def _attach_catalog(self) -> None:
        from trustee.sim.taskgen import CatalogEntry, ToolCatalog

        assert self.generator is not None
        entries = [
            CatalogEntry(
                name=name,
                description=r.spec.description,
                parameters=r.spec.parameters,
                category=r.server,
                changes_state=None if r.read_only is None else not r.read_only,
            )
            for name, r in self.routes.items()
        ]
        self.generator.catalog = ToolCatalog(entries)

    def step_metrics(self) -> dict[str, float]:
        """This step's `mcp/*` figures: server starts and their mean start-up time, faults,
        calls, and with generated tasks the share kept after verification."""
        out = self.pool.stats.take()
        if self.generator is not None:
            g = self._gen_step
            out["mcp/tasks_generated"] = float(g.generated)
            out["mcp/tasks_kept_share"] = g.kept / g.generated if g.generated else 0.0
            self._gen_step = GenStats()
        return out

    # ------------------------------------------------------------------ tasks

    async def make_task(self, knobs: Knobs, rng: random.Random) -> Task:
        if self.generator is None:
            easiest = self.tasks[0].payload.get("difficulty", 1.0)
            ok = [t for t in self.tasks if t.payload.get("difficulty", 1.0) <= max(knobs.difficulty, easiest)]
            return msgspec.structs.replace(rng.choice(ok), knobs=knobs.as_dict())
        reasons = []
        for _ in range(self.generate_attempts):
            task = await self.generator.generate(knobs, rng)
            task = msgspec.structs.replace(task, id=task.id.replace("sim-", "mcp-", 1), env="mcp")
            problem = await self.verify(task)
            for g in (self.gen, self._gen_step):
                g.generated += 1
                g.kept += problem is None
            if problem is None:
                return task
            reasons.append(problem)
        raise ValueError(
            f"none of {self.generate_attempts} generated tasks passed verification on the server; last: {reasons[-1]}"
        )

    async def verify(self, task: Task) -> str | None:
        """Run the task's reference calls, in order, on fresh servers in a fresh working
        directory. None when every call succeeds, else what failed."""
        workdir = await self.pool.workdir()
        conns: dict[str, Connection] = {}
        try:
            for call in task.expected_calls:
                route = self.routes[call.name]
                if route.server not in conns:
                    conns[route.server] = await self.pool.open(route.server, workdir)
                text, is_error = await conns[route.server].call(route.tool, call.arguments)
                if is_error:
                    return f"reference call {call.name}({call.arguments}) failed: {text[:300]}"
            return None
        except ServerFault as e:
            return str(e)
        finally:
            with anyio.CancelScope(shield=True):
                for conn in conns.values():
                    await self.pool.close(conn)
                shutil.rmtree(workdir, ignore_errors=True)

    # ------------------------------------------------------------------ episodes

    def servers_of(self, task: Task) -> list[str]:
        """The servers whose tools the task offers (only those are started)."""
        return sorted({self.routes[t.name].server for t in task.tools if t.name in self.routes})

    async def start(self, task: Task, episode_id: str, group: Any = None) -> EpisodeState:
        names = self.servers_of(task)
        # A working directory only when a server of the episode's own will use it.
        fresh = any(self.specs[n].scope == "episode" for n in names)
        workdir = await self.pool.workdir() if fresh else ""
        conns: dict[str, Connection] = {}

        async def lease(name: str) -> None:
            conns[name] = await self.pool.lease(name, workdir)

        try:
            if len(names) == 1:
                await lease(names[0])
            else:
                async with anyio.create_task_group() as tg:  # the servers start together
                    for name in names:
                        tg.start_soon(lease, name)
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                for conn in conns.values():
                    await self.pool.release(conn)
                if workdir:
                    shutil.rmtree(workdir, ignore_errors=True)
            fault = _first(e, ServerFault)
            if fault is not None:
                raise fault from None
            raise
        messages = [Message(role="system", content=task.system_prompt)] if task.system_prompt else []
        messages.append(Message(role="user", content=task.first_query))
        data: dict[str, Any] = {
            "calls": [],
            "results": [],
            "call_errors": 0,
            "conns": conns,
            "workdir": workdir,
        }
        return EpisodeState(episode_id=episode_id, task=task, messages=messages, group=group, data=data)

    async def step(self, state: EpisodeState, action: AgentAction) -> list[Message]:
        if final_answer(state, action):
            return []
        out = []
        for call in action.calls:  # in order: a server's state is what earlier calls left
            out.append(await self._call(state, call))
        return record_turn(state, action, out)

    async def _call(self, state: EpisodeState, call: ToolCall) -> Message:
        route = self.routes[call.name]  # the parser has checked the name against the task's tools
        conn: Connection = state.data["conns"][route.server]
        self.pool.stats.calls += 1
        try:
            text, _ = await conn.call(route.tool, call.arguments)
        except ServerFault as e:
            self.pool.stats.faults += 1
            state.data["fault"] = str(e)
            if self.keep_failed_workdirs and state.data["workdir"]:
                raise ServerFault(
                    route.server, f"{e}; working directory kept: {state.data['workdir']}"
                ) from None
            raise
        return Message(role="tool", content=text, name=call.name)

    async def score(self, state: EpisodeState) -> Score:
        return await score_episode(
            state, reward=self.reward, judge=self.judge, judge_weight=self.judge_weight
        )

    async def end_episode(self, state: EpisodeState) -> None:
        """Give the episode's connections back and remove its working directory (kept after a
        server fault with `keep_failed_workdirs`). Called once per episode by the runner."""
        conns: dict[str, Connection] = state.data.pop("conns", {})
        with anyio.CancelScope(shield=True):
            for conn in conns.values():
                await self.pool.release(conn)
            workdir = state.data["workdir"]
            if workdir and not (self.keep_failed_workdirs and "fault" in state.data):
                shutil.rmtree(workdir, ignore_errors=True)


def _first(e: BaseException, kind: type) -> Any:
    """The first exception of type `kind` in `e` or the groups it nests."""
    if isinstance(e, kind):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _first(sub, kind)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------- from the config


def server_specs(cfg: MCPConfig) -> list[ServerSpec]:
    return [
        ServerSpec(
            name=s.name,
            command=s.command,
            args=tuple(s.args),
            env=tuple(sorted(s.env.items())),
            url=s.url,
            scope=s.scope,
        )
        for s in cfg.servers
    ]


def check_mcp(cfg: MCPConfig, reward: str) -> list[str]:
    """Start-up checks (also run by --dry-run), without starting a server: every command is
    found, the tasks file reads, the working-directory template exists, the reward function
    imports."""
    from trustee.envs.python import FactoryError, load_object
    from trustee.envs.tasks_file import TasksFileError, read_records
    from trustee.mcp.servers import resolve_command

    problems = []
    for i, s in enumerate(cfg.servers):
        if s.command and resolve_command(s.command) is None:
            problems.append(
                f"environment.mcp.servers[{i}].command = {s.command!r}: not found on PATH or beside the running "
                "Python; install the server (e.g. pip install mcp-server-time) or give its path"
            )
    if cfg.tasks and cfg.tasks != "generate":
        try:
            read_records(cfg.tasks)
        except TasksFileError as e:
            problems.append(f"environment.mcp.tasks: {e}")
    if cfg.workdir_template and not os.path.isdir(cfg.workdir_template):
        problems.append(f"environment.mcp.workdir_template = {cfg.workdir_template!r}: no such directory")
    if reward in ("function", "function+judge"):
        try:
            load_object(cfg.reward_fn, "environment.mcp.reward_fn")
        except FactoryError as e:
            problems.append(str(e))
    return problems


def build_mcp_env(ctx: EnvContext) -> MCPEnv:
    """`environment.kind = 'mcp'`: everything from the config."""
    from trustee.envs.tasks_file import judge_for, reward_function

    env, cfg = ctx.config, ctx.config.mcp
    generator = None
    if cfg.tasks == "generate":
        from trustee.envs.simulated import check_budgets
        from trustee.sim.taskgen import TaskGenerator

        assert ctx.simulator is not None, "needs_simulator() is true for generated MCP tasks"
        sim = ctx.sim_config
        check_budgets(sim, ctx.max_expected_calls, ctx.max_model_len)
        generator = TaskGenerator(
            ctx.simulator, max_regenerations=sim.max_task_regenerations, max_tokens=sim.task_max_tokens
        )
    return MCPEnv(
        server_specs(cfg),
        tasks_path=None if generator is not None else cfg.tasks,
        generator=generator,
        reward=reward_function(env.reward, cfg.reward_fn, "environment.mcp.reward_fn"),
        judge=judge_for(ctx),
        judge_weight=cfg.judge_weight,
        timeouts=Timeouts(init=cfg.init_timeout, call=cfg.call_timeout, grace=cfg.shutdown_grace),
        pool_size=cfg.pool_size,
        max_episodes_per_server=cfg.max_episodes_per_server,
        workdir_template=cfg.workdir_template,
        keep_failed_workdirs=cfg.keep_failed_workdirs,
        generate_attempts=cfg.generate_attempts,
    )
