"""Loading the next batch while the current one is generated."""

from __future__ import annotations

import threading
import time

import pytest

from vlmfix._prefetch import prefetched


def test_batches_come_in_order_and_the_next_one_loads_during_the_current():
    events = []

    def load(batch):
        events.append(("load", batch, threading.current_thread().name))
        return [x * 10 for x in batch]

    out = []
    for batch, loaded in prefetched([[1, 2], [3], [4, 5]], load):
        time.sleep(0.05)  # the "generation" of this batch; the next load runs meanwhile
        events.append(("use", batch))
        out.append(loaded)
    assert out == [[10, 20], [30], [40, 50]]
    assert all(e[2].startswith("vlmfix-prefetch") for e in events if e[0] == "load")
    order = [(e[0], e[1]) for e in events]
    # batch 2 was loaded before batch 1 was used up
    assert order.index(("load", [3])) < order.index(("use", [1, 2]))
    assert list(prefetched([], load)) == []


def test_a_failing_load_surfaces_at_its_batch_after_the_earlier_ones():
    def load(batch):
        if batch == "bad":
            raise OSError("disk gone")
        return batch.upper()

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for _batch, loaded in prefetched(["a", "b", "bad", "c"], load):
            seen.append(loaded)
    assert seen == ["A", "B"]
