"""QuietCollector: the collector's settings while a run's episodes go on, put back after."""

from __future__ import annotations

import gc

import pytest

from trustee.gcpolicy import QuietCollector


def test_start_freezes_and_raises_the_threshold_stop_puts_both_back():
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    q = QuietCollector(gen0=before[0] + 12345)
    q.start()
    try:
        assert gc.get_threshold() == (before[0] + 12345, *before[1:])
        assert gc.get_freeze_count() > frozen  # what was alive at start-up is never scanned
        q.start()  # a second start changes nothing
        assert gc.get_threshold()[0] == before[0] + 12345
    finally:
        q.stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    q.stop()  # idempotent
    assert gc.get_threshold() == before


def test_context_manager_and_garbage_in_cycles_is_still_collected():
    class Node:
        pass

    with QuietCollector():
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2  # the collector still runs; it only runs less often
    assert gc.get_freeze_count() == 0


def test_a_threshold_below_one_is_refused():
    with pytest.raises(ValueError, match="gen0 = 0"):
        QuietCollector(gen0=0)
