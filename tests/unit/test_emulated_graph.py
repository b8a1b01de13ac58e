"""The CPU emulation of CUDA graphs that the fast-path tests rely on behaves like one."""

from __future__ import annotations

import pytest
import torch

from vlmfix.fastpath import CaptureError, EmulatedGraph, GraphRunner


def test_a_replay_repeats_the_recorded_tensor_work_on_current_values():
    x = torch.tensor([1.0, 2.0])
    acc = torch.zeros(2)
    graph = EmulatedGraph()
    graph.capture(lambda: acc.add_((x * 2).exp().log()))
    assert torch.equal(acc, torch.tensor([2.0, 4.0]))
    x.copy_(torch.tensor([10.0, 20.0]))  # an input updated in place between replays
    graph.replay()
    torch.testing.assert_close(acc, torch.tensor([22.0, 44.0]))


def test_host_values_and_rebound_attributes_stay_as_captured():
    class State:
        total = torch.zeros(())
        calls = 0

    s = State()
    step = torch.ones(())

    def fn():
        s.calls += 1  # Python: runs at capture only
        s.total = s.total + step  # rebinding: the replay recomputes into the captured output

    graph = EmulatedGraph()
    graph.capture(fn)
    captured = s.total
    graph.replay()
    graph.replay()
    assert s.calls == 1 and s.total is captured and float(captured) == 1.0  # frozen, as on CUDA


def test_ops_that_need_the_host_are_refused():
    x = torch.tensor([0.0, 1.0, 2.0])
    for fn in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: x[x > 0], lambda: bool(x.any())):
        with pytest.raises(CaptureError, match="host|data"):
            EmulatedGraph().capture(fn)


def test_a_replay_that_reads_a_freed_tensor_raises():
    holder = {"t": torch.ones(3)}
    out = torch.zeros(3)
    graph = EmulatedGraph()
    graph.capture(lambda: out.copy_(holder["t"] * 2))
    del holder["t"]
    with pytest.raises(CaptureError, match="freed"):
        graph.replay()


def test_the_runner_captures_on_the_second_call_and_falls_back_with_a_reason():
    n = torch.zeros(())
    runner = GraphRunner(lambda: n.add_(1), "graph", "cpu")
    for _ in range(4):
        runner()
    assert float(n) == 4 and runner.replays == 3 and runner.graph is not None
    bad = GraphRunner(lambda: n.add_(1).item(), "graph", "cpu")
    for _ in range(3):
        bad()
    assert bad.graph is None and "needs the host" in bad.fallback and float(n) == 7
