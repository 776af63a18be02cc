"""Connections to MCP servers: start, discover tools, call with timeouts, pool, close.

Owns:
- `ServerSpec` (one server as the environment sees it: a command or a URL, its scope) and
  `resolve_command` (where a command's executable is);
- `ServerFault`: a server that could not start, did not answer `initialize` or a call in
  time, exited, or broke the protocol. It fails the episode it happened in (the message
  names the server, what it was doing, its exit status and the tail of its stderr) and
  nothing else;
- `Connection`: one live MCP session (the SDK's `Client` over `transport.ServerProcess`, or
  Streamable HTTP for a URL). Its whole life runs in one owner task of the pool's task group,
  so a connection opened for one episode can be closed by another task, or by the pool;
- `ServerPool`: every connection of an environment. `scope = "episode"` opens a fresh server
  per episode (its state isolated) and closes it when the episode ends; `scope = "shared"`
  keeps up to `pool_size` servers per spec, spreads episodes over them and replaces a server
  after `max_episodes` episodes. Leaving the pool (`async with`) closes every server.
- `ToolRoute`/`discover`: each server's tools from `list_tools`, named as the policy sees
  them (a name that two servers share becomes `server__tool` for both).

Calls return the text the policy sees: the tool's structured result as JSON when it has one,
else its text blocks; a tool error (`isError`) or a protocol error answer (unknown tool, bad
arguments) becomes `{"error": ...}`, an observation like any API error, not a fault. It
does not build tasks or score (`envs/mcp_env.py` does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
from mcp import Client
from mcp.client.stdio import get_default_environment
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

from trustee.chat.parse import canonical_json
from trustee.mcp.transport import ServerProcess
from trustee.types import ToolSpec

log = logging.getLogger("trustee.mcp")

Scope = Literal["episode", "shared"]


@dataclass(frozen=True)
class ServerSpec:
    """One server. Exactly one of `command` (a stdio server: the executable, found by
    `resolve_command`; `args` may use `{workdir}` and `{python}`) and `url` (Streamable HTTP)
    is set. `env` is added to a minimal inherited environment (PATH, HOME, ...)."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    url: str = ""
    scope: Scope = "episode"


@dataclass(frozen=True)
class Timeouts:
    """Seconds: `init` for the connection handshake (process start included), `call` per
    tool call, `grace` for a server to exit once its stdin closes before it is killed."""

    init: float = 10.0
    call: float = 30.0
    grace: float = 1.0


def resolve_command(command: str) -> str | None:
    """The executable of `command`: `{python}` is the running Python; a path (with a '/') is
    taken as it is; a bare name is looked up on PATH, then beside the running Python (where
    pip installs a package's commands, e.g. `mcp-server-time` in a virtual environment that
    is not on PATH). None when there is none."""
    if command == "{python}":
        return sys.executable
    if "/" in command:
        path = os.path.abspath(command)
        return path if os.access(path, os.X_OK) and os.path.isfile(path) else None
    found = shutil.which(command)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), command)
    return beside if os.access(beside, os.X_OK) and os.path.isfile(beside) else None


def expand(arg: str, workdir: str) -> str:
    return arg.replace("{workdir}", workdir).replace("{python}", sys.executable)


class ServerFault(RuntimeError):
    """A server failed (see the module docstring); fails its episode only."""

    def __init__(self, server: str, what: str, *, returncode: int | None = None, stderr: str = ""):
        status = "" if returncode is None else f" (exit status {returncode})"
        tail = f"; stderr tail: {stderr}" if stderr else "; stderr: (empty)"
        super().__init__(f"MCP server {server!r}: {what}{status}{tail}")
        self.server = server


# ----------------------------------------------------------------------------- one connection


class Connection:
    """One session with one server (see the module docstring). `open` starts it; `call` runs
    a tool; `close` ends it (killing the server first when it is `broken`)."""

    def __init__(self, spec: ServerSpec, workdir: str, timeouts: Timeouts, *, own_workdir: bool = False):
        self.spec = spec
        self.workdir = workdir
        self.own_workdir = own_workdir  # a shared server's directory, removed with it
        self.timeouts = timeouts
        self.process: ServerProcess | None = None
        self.client: Client | None = None
        self.broken = False
        self.users = 0
        self.episodes = 0
        self.start_s = 0.0
        self._ready = anyio.Event()
        self._closing = anyio.Event()
        self._done = anyio.Event()
        self._error: BaseException | None = None

    def fault(self, what: str) -> ServerFault:
        p = self.process
        return ServerFault(
            self.spec.name,
            what,
            returncode=p.returncode if p is not None else None,
            stderr=p.stderr_tail() if p is not None else "",
        )

    async def open(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the server in an owner task of `tg` and wait for the handshake; ServerFault
        if it cannot start or does not answer in `timeouts.init` seconds."""
        t0 = time.perf_counter()
        tg.start_soon(self._own)
        await self._ready.wait()
        self.start_s = time.perf_counter() - t0
        if self._error is not None:
            e = self._error
            await self._done.wait()
            if isinstance(e, TimeoutError):
                raise self.fault(f"did not answer the initialize handshake within {self.timeouts.init:g} s")
            raise self.fault(f"could not start: {_describe(e)}") from None

    async def _own(self) -> None:
        """The connection's whole life, in one task (anyio scopes must close where they opened)."""
        try:
            if self.spec.url:
                transport: Any = self.spec.url
            else:
                exe = resolve_command(self.spec.command)
                if exe is None:
                    raise FileNotFoundError(
                        f"command {self.spec.command!r} not found on PATH or beside {sys.executable}"
                    )
                env = get_default_environment() | dict(self.spec.env)
                argv = [exe, *(expand(a, self.workdir) for a in self.spec.args)]
                # The server runs where trustee runs (relative paths in args read as the
                # config's do); the episode's directory reaches it as `{workdir}`.
                self.process = transport = ServerProcess(argv, env=env, grace=self.timeouts.grace)
            client = Client(transport, mode="auto", cache=None)
            # One scope around the whole session (the SDK's task groups open inside it and
            # must close inside it); its deadline is the handshake's, lifted once connected.
            with anyio.CancelScope(deadline=anyio.current_time() + self.timeouts.init) as scope:
                async with client:
                    scope.deadline = math.inf
                    self.client = client
                    self._ready.set()
                    await self._closing.wait()
                    if self.broken and self.process is not None:
                        self.process.kill()
            if scope.cancelled_caught and not self._ready.is_set():
                raise TimeoutError
        except Exception as e:  # noqa: BLE001 - reported to the opener; an owner task never raises into the pool
            self._error = e
        finally:
            self.client = None
            self._ready.set()
            self._done.set()

    async def call(self, tool: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """(text for the policy, whether the tool reported an error). ServerFault when the
        server is gone, hangs past `timeouts.call`, or answers something that is not MCP."""
        client = self.client
        if client is None or self.broken:
            raise self.fault(f"was not running when tool {tool!r} was called")
        try:
            with anyio.fail_after(self.timeouts.call):
                result = await client.call_tool(tool, arguments)
        except TimeoutError:
            self.broken = True
            raise self.fault(f"did not answer tool {tool!r} within {self.timeouts.call:g} s") from None
        except MCPError as e:
            if e.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT):
                self.broken = True
                await self._settle()
                raise self.fault(f"closed the connection during tool {tool!r}") from None
            return canonical_json({"error": e.error.message}), True  # unknown tool, bad arguments, ...
        except Exception as e:  # noqa: BLE001 - anything else is a broken protocol: the server is unusable
            self.broken = True
            await self._settle()
            raise self.fault(f"broke the protocol during tool {tool!r}: {_describe(e)}") from None
        return result_text(result), bool(result.is_error)

    async def _settle(self) -> None:
        """Give a dying server a moment to be reaped, so the fault shows its exit status."""
        with anyio.move_on_after(0.2):
            while self.process is not None and self.process.returncode is None:
                await anyio.sleep(0.01)

    async def list_tools(self) -> list[Any]:
        """Every tool the server offers (all pages), as the SDK's `Tool` records."""
        client = self.client
        assert client is not None, "list_tools on a connection that is not open"
        tools, cursor = [], None
        with anyio.fail_after(self.timeouts.init):
            for _ in range(1000):  # a paginator that never ends cannot hang discovery
                page = await client.list_tools(cursor=cursor)
                tools += page.tools
                cursor = page.next_cursor
                if not cursor:
                    break
        return tools

    async def close(self) -> None:
        """End the session and the server (bounded; shielded from cancellation)."""
        with anyio.CancelScope(shield=True):
            if self.broken and self.process is not None:
                self.process.kill()
            self._closing.set()
            await self._done.wait()
            if self.own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def result_text(result: Any) -> str:
    """What the policy sees of a `CallToolResult` (see the module docstring). JSON text is
    written compactly (servers often indent it: tokens the policy would pay for)."""
    if result.structured_content is not None and not result.is_error:
        return canonical_json(result.structured_content)
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(_compact(text) if text is not None else f"[{getattr(block, 'type', 'content')} omitted]")
    text = "\n".join(parts)
    return canonical_json({"error": text or "the tool reported an error"}) if result.is_error else text


def _compact(text: str) -> str:
    if text[:1] not in ("{", "["):
        return text
    try:
        return canonical_json(json.loads(text))
    except ValueError:
        return text


def _describe(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolRoute:
    """A tool as the policy sees it (`spec`, with its exposed name) and where it runs."""

    spec: ToolSpec
    server: str
    tool: str
    read_only: bool | None = None
    """The server's `readOnlyHint` (None: not said)."""


def routes_from(listing: dict[str, list[Any]]) -> dict[str, ToolRoute]:
    """Exposed name -> route, over every server's tools; a tool name that more than one
    server offers is exposed as `server__tool` on each of them."""
    count: dict[str, int] = {}
    for tools in listing.values():
        for t in tools:
            count[t.name] = count.get(t.name, 0) + 1
    out: dict[str, ToolRoute] = {}
    for server, tools in listing.items():
        for t in tools:
            name = t.name if count[t.name] == 1 else f"{server}__{t.name}"
            schema = dict(t.input_schema) if t.input_schema else {}
            schema.setdefault("type", "object")
            schema.setdefault("properties", {})
            hint = t.annotations.read_only_hint if t.annotations is not None else None
            out[name] = ToolRoute(
                spec=ToolSpec(name=name, description=t.description or "", parameters=schema),
                server=server,
                tool=t.name,
                read_only=hint,
            )
    return out


# ----------------------------------------------------------------------------- the pool


@dataclass
class PoolStats:
    """Counters since the last `take()` (the training loop logs them per step)."""

    starts: int = 0
    start_s: float = 0.0
    faults: int = 0
    calls: int = 0

    def take(self) -> dict[str, float]:
        out = {
            "mcp/server_starts": float(self.starts),
            "mcp/server_start_s": self.start_s / self.starts if self.starts else 0.0,
            "mcp/server_faults": float(self.faults),
            "mcp/calls": float(self.calls),
        }
        self.starts, self.start_s, self.faults, self.calls = 0, 0.0, 0, 0
        return out


@dataclass
class ServerPool:
    """Every connection of one environment (see the module docstring). Use as
    `async with ServerPool(...) as pool:`; leaving it closes every server."""

    specs: dict[str, ServerSpec]
    timeouts: Timeouts = field(default_factory=Timeouts)
    pool_size: int = 1
    max_episodes: int = 0
    """A shared server is replaced after this many episodes (0: never)."""
    workdir_template: str = ""
    """Copied into every working directory the pool makes ('' = they start empty)."""
    stats: PoolStats = field(default_factory=PoolStats)
    _tg: anyio.abc.TaskGroup | None = None
    _live: set[Connection] = field(default_factory=set)
    _shared: dict[str, list[Connection]] = field(default_factory=dict)
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)

    async def __aenter__(self) -> ServerPool:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for conn in list(self._live):
                    tg.start_soon(conn.close)
        self._live.clear()
        self._shared.clear()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    @property
    def running(self) -> int:
        return len(self._live)

    def pids(self) -> list[int]:
        """The pids of the live stdio servers (tests look for them after the run)."""
        return [c.process.pid for c in self._live if c.process is not None and c.process.pid is not None]

    async def open(self, name: str, workdir: str, *, own_workdir: bool = False) -> Connection:
        """A fresh connection to server `name` (ServerFault if it cannot start)."""
        if self._tg is None:
            raise RuntimeError("the MCP server pool is not open: use `async with` around the environment")
        conn = Connection(self.specs[name], workdir, self.timeouts, own_workdir=own_workdir)
        self._live.add(conn)
        try:
            await conn.open(self._tg)
        except BaseException:
            self.stats.faults += 1
            self._live.discard(conn)
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        self.stats.starts += 1
        self.stats.start_s += conn.start_s
        return conn

    async def lease(self, name: str, workdir: str) -> Connection:
        """A connection for one episode: fresh for scope 'episode' (in `workdir`), a pooled one
        for scope 'shared' (in its own directory). Give it back with `release`."""
        if self.specs[name].scope == "episode":
            conn = await self.open(name, workdir)
        else:
            conn = await self._shared_lease(name)
        conn.users += 1
        conn.episodes += 1
        return conn

    async def _shared_lease(self, name: str) -> Connection:
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:  # one opener at a time per server: no thundering herd of starts
            conns = [c for c in self._shared.get(name, []) if not c.broken]
            usable = [c for c in conns if not self.max_episodes or c.episodes < self.max_episodes]
            idle = [c for c in usable if c.users == 0]
            if idle or (usable and len(conns) >= self.pool_size):
                return min(idle or usable, key=lambda c: c.users)
            conn = await self.open(name, await self.workdir(), own_workdir=True)
            self._shared.setdefault(name, []).append(conn)
            return conn

    async def release(self, conn: Connection) -> None:
        """The episode is done with `conn`: an episode-scoped server is closed; a shared one
        is closed only when broken or worn out (`max_episodes`) and no episode still uses it."""
        conn.users -= 1
        shared = conn.spec.scope == "shared"
        worn = self.max_episodes and conn.episodes >= self.max_episodes
        if shared and conn in self._shared.get(conn.spec.name, []) and (conn.broken or worn):
            self._shared[conn.spec.name].remove(conn)
        if not shared or ((conn.broken or worn) and conn.users <= 0):
            self._live.discard(conn)
            await conn.close()

    async def close(self, conn: Connection) -> None:
        """Close a connection from `open` (not one from `lease`: `release` that)."""
        self._live.discard(conn)
        await conn.close()

    async def discover(self) -> dict[str, list[Any]]:
        """Each server's tools (`list_tools` on one fresh connection per server)."""
        out: dict[str, list[Any]] = {}
        for name in self.specs:
            with self.scratch() as workdir:
                conn = await self.open(name, workdir)
                try:
                    out[name] = await conn.list_tools()
                except TimeoutError:
                    conn.broken = True
                    raise conn.fault(f"did not list its tools within {self.timeouts.init:g} s") from None
                finally:
                    await self.close(conn)
        return out

    async def workdir(self) -> str:
        """A fresh working directory ('{workdir}'), filled from `workdir_template`; the
        caller removes it."""
        path = tempfile.mkdtemp(prefix="trustee-mcp-")
        if self.workdir_template:
            template = self.workdir_template
            await anyio.to_thread.run_sync(lambda: shutil.copytree(template, path, dirs_exist_ok=True))
        return path

    @contextlib.contextmanager
    def scratch(self) -> Iterator[str]:
        """A temporary working directory, removed afterwards."""
        path = tempfile.mkdtemp(prefix="trustee-mcp-")
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
