"""Stopping a run cleanly: signals, faults, and no orphan processes.

Owns:
- `StopGuard`: installed around the training loop. The first SIGINT/SIGTERM asks the loop to
  stop taking work; with `checkpoint.on_interrupt = 'abandon'` the step being collected is
  cancelled (its episodes are dropped), with 'finish' it completes. Either way the loop ends at
  a step boundary and a checkpoint of that boundary is written. A second signal exits at once
  (`os._exit`): checkpoints are written beside the last complete one and renamed into place,
  so the last complete checkpoint survives. A fatal fault (`FatalEngineError`, a streak of
  non-finite steps) is handled the same way: checkpoint the last good boundary, then stop with
  the reason; a fault after a step's update (a wake, a push) checkpoints that step, whose
  trained state it is (`_Run.trained_step`), so resuming does not train it twice. The
  exception `RunStopped` carries the exit status and the line to print.
- `start_reaper()`: starts a small watchdog process that keeps track of the run's descendants
  (vLLM engine cores, learner ranks, their workers) and kills those left when the run's
  process ends by any path, `kill -9` included.

It does not decide what a checkpoint holds (`trustee/resume.py`). Callers: `trustee.run`
(reaper, exit status) and `trustee.train` (guard).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio

from trustee.resume import Boundary, boundary, save_state

log = logging.getLogger("trustee.interrupt")

T = TypeVar("T")

EXIT_FAULT = 3
NONFINITE_STREAK = 3
"""Consecutive steps whose loss or gradient was not finite (optimiser step skipped) that stop the run."""


class RunStopped(Exception):
    """The loop stopped before its last step. `status` is the process exit status; `message`
    the line that says why, where the last checkpoint is, and how to continue."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class StopGuard:
    """See the module docstring. Usage in the loop:

    guard = StopGuard(run); guard.install()
    for step in ...:
        if guard.stopping: break
        with guard.collecting() as scope: groups = await collect(...)
        if scope.cancelled_caught: break
        last = await guard.run_step(run.step, step, ...)
    guard.finish()   # raises RunStopped after a stop, else returns
    """

    def __init__(self, run: Any, *, exit_now: Callable[[int], None] = os._exit):
        self.run = run
        self.abandon = run.cfg.checkpoint.on_interrupt == "abandon"
        self.signal: int | None = None
        self.fault: str | None = None
        self.nonfinite_streak = 0
        self._scope: anyio.CancelScope | None = None
        self._boundary: Boundary | None = None
        self._exit_now = exit_now
        self._old: dict[int, Any] = {}
        self._t_signal = 0.0
        self._loop: Any = None

    # ---------------------------------------------------------------- signals

    def install(self) -> None:
        """Call from the event loop's thread (the main thread), inside the running loop."""
        import asyncio

        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            last = self._last_checkpoint()
            print(
                f"\n{name} again: exiting now; the last complete checkpoint is {last or '(none)'}",
                file=sys.stderr,
                flush=True,
            )
            self._exit_now(128 + signum)
            return
        self.signal = signum
        self._t_signal = time.monotonic()
        what = "abandoning the current step" if self.abandon else "finishing the current step"
        print(
            f"\n{name}: stopping: {what}, then writing a checkpoint (send {name} again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        if self.abandon:
            # A Python signal handler runs between bytecodes of the main thread, possibly while
            # the loop sits in select(); call_soon_threadsafe wakes it to cancel the rollouts.
            self._loop.call_soon_threadsafe(self._cancel_collect)

    def _cancel_collect(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    @property
    def stopping(self) -> bool:
        return self.signal is not None or self.fault is not None

    def _last_checkpoint(self) -> str | None:
        from trustee.checkpoint import latest_checkpoint

        p = latest_checkpoint(self.run.run_dir)
        return str(p) if p else None

    # ---------------------------------------------------------------- the loop's hooks

    def mark(self, step: int) -> None:
        """The run is at a step boundary after `step` (-1: before the first step)."""
        self._boundary = boundary(self.run, step)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[anyio.CancelScope]:
        """The part of a step that may be abandoned (rollouts): nothing of the run's trained
        state changes inside it, only RNGs advance, and the boundary snapshot covers those."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self.stopping and self.abandon:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None

    async def run_step(self, fn: Callable[..., Awaitable[T]], step: int, *args: Any, **kw: Any) -> T:
        """Run the part of a step that changes trained state (score, curriculum, learn, push,
        log, checkpoint); never cancelled half way. Marks the boundary after it."""
        with anyio.CancelScope(shield=True):
            out = await fn(step, *args, **kw)
        self.mark(step)
        record = out if isinstance(out, dict) else {}
        if record.get("learn/skipped_nonfinite"):
            self.nonfinite_streak += 1
            if self.nonfinite_streak >= NONFINITE_STREAK:
                self.fault = (
                    f"{self.nonfinite_streak} steps in a row had a non-finite loss or gradient "
                    f"(last: step {step}, loss {record.get('learn/loss')}, grad_norm {record.get('learn/grad_norm')}); "
                    "lower learner.lr or check the rewards"
                )
        else:
            self.nonfinite_streak = 0
        return out

    def on_fault(self, err: BaseException) -> None:
        while isinstance(err, BaseExceptionGroup):  # task groups nest: report the first real error
            err = err.exceptions[0]
        self.fault = f"{type(err).__name__}: {err}"

    def finish(self) -> None:
        """After the loop: when it stopped early, checkpoint the last boundary (unless that
        step is already saved) and raise RunStopped; otherwise return."""
        if not self.stopping:
            return
        b = self._boundary
        where = self._checkpoint_boundary(b)
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            done = (b.step + 1) if b else 0
            raise RunStopped(
                128 + self.signal,
                f"stopped by {name} after {done} of {self.run.cfg.grpo.steps} steps; {where}; "
                "run the same command to resume",
            )
        raise RunStopped(EXIT_FAULT, f"run stopped: {self.fault}; {where}; run the same command to resume")

    def _checkpoint_boundary(self, b: Boundary | None) -> str:
        trained = getattr(self.run, "trained_step", None)
        if trained is not None and (b is None or trained > b.step):
            # The fault came after this step's update (its wake or its push): the learner and the
            # curriculum are this step's, and nothing has drawn from an RNG since the update.
            b = boundary(self.run, trained)
        if b is None or b.step < 0:
            return "no step finished, so there is no checkpoint"
        if getattr(self.run, "saved_step", None) == b.step:
            return f"checkpoint step-{b.step:06d} is complete"
        try:
            path = save_state(self.run, b.step, b)
        except OSError as e:
            return f"could not write a checkpoint ({e}); the last complete one is {self._last_checkpoint() or '(none)'}"
        self.run.saved_step = b.step
        return f"checkpoint written: {path}"


# ----------------------------------------------------------------------------- orphans

_WATCHDOG = r"""
import os, select, signal, sys, time
main = int(sys.argv[1])
me = os.getpid()

def stat(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(f[1]), f[19], f[0]   # ppid, start time (ticks since boot), state

def descendants():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = stat(int(d))
            if st:
                kids.setdefault(st[0], []).append((int(d), st[1]))
    out, todo = {}, [main]
    while todo:
        for pid, start in kids.get(todo.pop(), []):
            if pid != me and pid not in out:
                out[pid] = start
                todo.append(pid)
    return out

known = {}
while True:   # until the run writes 'x' (normal exit) or dies (EOF)
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready:
        break
    known.update(descendants())
known.update(descendants())   # children re-parented by now are still in `known`
for _ in range(3):
    for pid, start in list(known.items()):
        st = stat(pid)
        if st is None or st[1] != start or st[2] == "Z":
            known.pop(pid)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            known.pop(pid)
    if not known:
        break
    time.sleep(0.2)
"""


class Reaper:
    """Handle on the watchdog; `release()` at a normal exit (it then kills leftovers and ends)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def release(self) -> None:
        try:
            self.proc.stdin.write(b"x")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def start_reaper() -> Reaper:
    """Start the watchdog (in its own session, so terminal signals and group kills aimed at the
    run do not reach it): every 0.5 s it records the run's descendants (pid and start time);
    when the run exits, normally or killed, it SIGKILLs those still alive. It leaves the run's
    process group alone, so Ctrl-C in a terminal still reaches the run (and its children)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    return Reaper(proc)


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) direct children of `pid` (tests use it to check for orphans)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d))
    return out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
