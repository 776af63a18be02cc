"""Live host memory of a learner process on the CPU: the CPU counterpart of CUDA's
`memory_allocated` / `max_memory_allocated`.

Owns `live_bytes` (bytes the C allocator has handed out and not taken back: glibc's
`mallinfo2`, in-use arena bytes plus mmapped chunks) and `LivePeak` (their peak over a
window, sampled by a thread). Does not measure GPUs (torch's allocator counters do) or
decide anything; `learn/fsdp_rank.py` reports both per step, and `tests/test_memory_model.py`
holds them against the memory model (`trustee/memory.py`).

Why not the peak resident set (VmHWM, what `learner.peak_memory` reads on the CPU): besides
the tensors a rank holds, it counts library code paged in from disk the first time a kernel
runs (measured: about 25 MiB of libtorch during a rank's build and first step, the same for
full fine-tuning and LoRA, as RssFile in /proc/self/status) and the allocator's free lists
(about 5-8 MiB more). A GPU's allocated-bytes counter holds neither; measured against the
plan of a 6M-parameter LoRA rank (31.7 MiB), those 30 MiB were most of the "2.2x the plan"
that peak RSS showed, while live bytes came to 1.26x.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc >= 2.33), all size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc, or glibc < 2.33
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _mallinfo2()


def live_bytes() -> int | None:
    """Bytes currently allocated through malloc (every torch CPU tensor, gloo's buffers, large
    Python objects) and not freed; None where glibc's mallinfo2 is missing. About 1 us a call."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return int(m.uordblks + m.hblkhd)


class LivePeak:
    """The peak of `live_bytes` between `start` and `stop`, sampled every `interval` seconds by
    a daemon thread (torch kernels release the GIL, so it samples during compute; a peak
    shorter than the interval can be missed, which errs low). `peak` is None where
    `live_bytes` is. Use as a context manager or start/stop."""

    def __init__(self, interval: float = 2e-4):
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = live_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> LivePeak:
        self.peak = None
        self._sample()
        if self.peak is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="trustee-live-peak", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int | None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample()
        return self.peak

    def __enter__(self) -> LivePeak:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
