"""The decode hot path of every attention method is pure tensor code: no host syncs.

A host sync (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``.nonzero()``) blocks the CPU until the GPU catches up and makes a step
impossible to capture in a CUDA graph. These tests count such calls made *by vlmfix code*
(the calling frame is a vlmfix module) during decode forwards, for stock ``generate``
under ``attach`` and for ``vlmfix.generate``, and fail on any. ``generation.py``'s EOS
check is excluded: on CUDA it reads a flag copied asynchronously one step earlier, on the
CPU there is nothing to wait for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix import _compat
from vlmfix.generation import prepare_inputs

SINK_TAU = 2.0
STEPS = 4
PKG = str(Path(vlmfix.__file__).parent)
SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy", "nonzero")

METHODS = {
    "pai": lambda: [vlmfix.PAI()],
    "var": lambda: [vlmfix.VAR(tau=SINK_TAU, start_layer=1, end_layer=0)],
    "vhr_forward": lambda: [vlmfix.VHR()],
    "vhr_one_pass": lambda: [vlmfix.VHR(mode="one_pass")],
    "paint": lambda: [vlmfix.PAINT()],
    "only": lambda: [vlmfix.ONLY()],
    "helpd": lambda: [vlmfix.HELPD(early=1)],
    "all": lambda: [vlmfix.PAI(), vlmfix.VAR(tau=SINK_TAU), vlmfix.VHR(), vlmfix.PAINT()],
}


class SyncCounter:
    """Counts host-sync calls whose caller is a vlmfix module, while ``on`` is True."""

    def __init__(self, monkeypatch):
        self.on = False
        self.calls: list[str] = []
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter.on:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PKG) and not caller.endswith("generation.py"):
                    counter.calls.append(f"{name} from {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return original(tensor, *args, **kwargs)

        return wrapper

    def watch_decode(self, model):
        """Hooks turning counting on for each decode forward (cache already filled)."""

        def pre(module, args, kwargs):
            self.on = _compat.cache_length(_compat.cache_from_kwargs(kwargs)) > 0

        def post(module, args, kwargs, output):
            self.on = False

        return [
            model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]


@pytest.mark.filterwarnings("ignore:.*only inside vlmfix.generate")  # ONLY/HELPD under stock generate
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_no_host_sync_in_decode_steps(monkeypatch, family, name):
    model, processor = tiny(family)
    images, prompts = make_images(2), PROMPTS[:2]
    inputs = prepare_inputs(processor, images, prompts)
    counter = SyncCounter(monkeypatch)
    hooks = counter.watch_decode(model)
    decode_forwards = []
    hooks.append(model.register_forward_pre_hook(lambda m, a, k: decode_forwards.append(counter.on), with_kwargs=True))
    try:
        with vlmfix.attach(model, *METHODS[name]()), torch.no_grad():
            model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        out = vlmfix.generate(model, processor, images, prompts, methods=METHODS[name](), max_new_tokens=STEPS)
    finally:
        for h in hooks:
            h.remove()
    assert sum(decode_forwards) >= STEPS  # the counter really watched decode forwards
    assert out.stats  # telemetry is still read (once, after the loop)
    assert counter.calls == [], counter.calls


def test_the_counter_sees_a_sync(monkeypatch):
    """The counter is not blind: code of a vlmfix module that syncs is reported, code
    elsewhere is not."""
    counter = SyncCounter(monkeypatch)
    namespace: dict = {}
    exec(compile("def f(t):\n    return float(t.sum())\n", str(Path(PKG) / "fake_module.py"), "exec"), namespace)
    counter.on = True
    float(torch.ones(3).sum())  # this test file: not counted
    assert counter.calls == []
    namespace["f"](torch.ones(3))
    counter.on = False
    assert len(counter.calls) == 1 and counter.calls[0].startswith("__float__ from fake_module.py")


@pytest.mark.parametrize("name", ["var", "only", "helpd"])
def test_no_host_sync_in_beam_search_steps(monkeypatch, name):
    """Beam bookkeeping (``BeamSearch.step``) and the methods' ``reorder_rows`` run between
    decode forwards and stay on the device too."""
    from vlmfix.beam import BeamSearch

    model, processor = tiny("llava")
    counter = SyncCounter(monkeypatch)
    hooks = counter.watch_decode(model)
    calls = []

    def watched(cls, attr):
        original = getattr(cls, attr)

        def wrapper(*args, **kwargs):
            calls.append(attr)
            counter.on = True
            try:
                return original(*args, **kwargs)
            finally:
                counter.on = False

        monkeypatch.setattr(cls, attr, wrapper)

    watched(BeamSearch, "step")
    for cfg in METHODS[name]():
        watched(type(cfg.build()), "reorder_rows")
        watched(type(cfg.build()), "beam_penalty")
    try:
        vlmfix.generate(
            model, processor, make_images(2), PROMPTS[:2], methods=METHODS[name](), max_new_tokens=STEPS, num_beams=3
        )
    finally:
        for h in hooks:
            h.remove()
    assert calls.count("step") == STEPS and calls.count("reorder_rows") == STEPS == calls.count("beam_penalty")
    assert counter.calls == [], counter.calls
