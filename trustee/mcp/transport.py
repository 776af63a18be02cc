"""One MCP server process, started so that it cannot outlive trustee, as an SDK transport.

Owns `ServerProcess`: an `mcp.client` transport (an async context manager that yields the
read and write streams of JSON-RPC messages the SDK's `Client` drives) over a child process
we start ourselves, because the process is where the hygiene lives:

- the child runs in its own session and process group (a Ctrl-C aimed at trustee's group
  does not reach it half-way through a call; `kill()` reaches the server and whatever it
  started);
- its stdin is a pipe of ours, never the terminal or trustee's own stdin (a child that
  inherits stdin corrupts the JSON-RPC stream);
- on Linux it gets SIGKILL when trustee dies, by any path, `kill -9` included
  (PR_SET_PDEATHSIG, set by a few lines of Python that then exec the server, since asyncio
  cannot run code between fork and exec safely in a threaded process);
- stderr is drained into a bounded tail (`stderr_tail()`), so a chatty server never blocks
  on a full pipe and a failed episode can show what the server said;
- closing follows the MCP shutdown order (close stdin, wait `grace` seconds, then SIGTERM
  and SIGKILL to the whole group), always shielded and bounded, and ends with SIGKILL to the
  group so no grandchild survives.

It does not speak MCP itself (the SDK's `Client` does, over these streams) nor decide when
a server is a fault (`trustee/mcp/servers.py` does). The run's watchdog
(`trustee/interrupt.py`) is the second line of defence for anything this misses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

import anyio
import anyio.abc
import mcp_types
from mcp.shared.message import SessionMessage

STDERR_TAIL_BYTES = 4096
"""How much of a server's stderr is kept (the end of it) for error messages."""

# Runs in the child between fork and exec: ask for SIGKILL when the parent dies, make sure
# the parent did not die already, then become the server. `-I -S` keeps it to a few ms.
_LAUNCH = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG
    "except (OSError, AttributeError):\n"
    "    pass\n"  # not Linux: the process group and the run's watchdog still apply
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write(f'cannot start {sys.argv[2]!r}: {e}\\n')\n"
    "    os._exit(127)\n"
)


class ServerProcess:
    """A stdio MCP server as an `mcp.client` transport (see the module docstring).

    `argv` is the server's command line (the executable resolved already), `env` its whole
    environment, `cwd` its working directory. `grace`: seconds the server has to exit after
    its stdin closes before it is killed. `pid` is the server's pid (the launcher execs into
    it) and its process group id; `returncode` is None while it runs.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        grace: float = 1.0,
        tail_bytes: int = STDERR_TAIL_BYTES,
    ):
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.grace = grace
        self.tail_bytes = tail_bytes
        self.process: anyio.abc.Process | None = None
        self._tail = bytearray()
        self._tg: anyio.abc.TaskGroup | None = None
        self._streams: list[Any] = []
        self._stderr_done = anyio.Event()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def stderr_tail(self, limit: int = 1000) -> str:
        """The last `limit` characters the server wrote to stderr (decoded leniently)."""
        return bytes(self._tail).decode("utf-8", "replace")[-limit:].strip()

    def kill(self) -> None:
        """SIGKILL the server's process group now (a hung or broken server). Safe to call
        from anywhere, any number of times."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ transport

    async def __aenter__(self) -> tuple[Any, Any]:
        self.process = await anyio.open_process(
            [sys.executable, "-I", "-S", "-c", _LAUNCH, str(os.getpid()), *self.argv],
            stdin=-1,  # subprocess.PIPE
            stdout=-1,
            stderr=-1,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,
        )
        # No await between the spawn and the task group's entry: a cancellation there would
        # leave a live process nobody closes.
        read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_send, write_recv = anyio.create_memory_object_stream[SessionMessage](0)
        self._streams = [read_send, read_recv, write_send, write_recv]
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._read_stdout, read_send)
        self._tg.start_soon(self._write_stdin, write_recv)
        self._tg.start_soon(self._read_stderr)
        self._tg.start_soon(self._watch_exit)
        return read_recv, write_send

    async def __aexit__(self, *exc: Any) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            await self._stop()
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        for s in self._streams:
            await s.aclose()

    async def _read_stdout(self, send: Any) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        try:
            async with send:
                async for chunk in self.process.stdout:
                    lines = (buffer + chunk).split(b"\n")
                    buffer = lines.pop()
                    for line in lines:
                        if line.strip():
                            await send.send(_parse(line))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass  # shutting down, or the server is gone: the session sees the stream end

    async def _write_stdin(self, recv: Any) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            async with recv:
                async for message in recv:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await self.process.stdin.send(data.encode() + b"\n")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # The server stopped reading (it died): end the read side too, so a request
            # waiting for its answer sees the connection close instead of its timeout.
            await self._streams[0].aclose()

    async def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        try:
            async for chunk in self.process.stderr:
                self._tail += chunk
                del self._tail[: max(0, len(self._tail) - self.tail_bytes)]
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self._stderr_done.set()

    async def _watch_exit(self) -> None:
        """When the server exits, end the read stream even if a process it started still
        holds its stdout open (no EOF would come): a request in flight then fails at once
        as 'connection closed' instead of waiting out its timeout."""
        assert self.process is not None
        while self.process.returncode is None:
            await anyio.sleep(0.05)
        await anyio.sleep(0.1)  # what the server wrote before exiting is still read
        await self._streams[0].aclose()

    async def _stop(self) -> None:
        """Close stdin, give the server `grace` seconds, then SIGTERM and SIGKILL its group;
        every wait is bounded."""
        p = self.process
        assert p is not None
        if p.stdin is not None:
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await p.stdin.aclose()
        if not await _exited(p, self.grace):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
            if not await _exited(p, 0.5):
                self.kill()
                await _exited(p, 2.0)
        self.kill()  # anything the server started in its group goes with it
        with anyio.move_on_after(0.5):  # the last words on stderr, for the tail
            await self._stderr_done.wait()


async def _exited(p: anyio.abc.Process, timeout: float) -> bool:
    """Whether `p` exited within `timeout` s (polls returncode: `wait()` also waits for the
    pipes to close, which a surviving grandchild can hold open)."""
    with anyio.move_on_after(timeout):
        while p.returncode is None:
            await anyio.sleep(0.005)
    return p.returncode is not None


def _parse(line: bytes) -> SessionMessage | Exception:
    """One JSON-RPC message, or the parse error as a value (the SDK's session surfaces it)."""
    try:
        return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as e:
        return e
