"""`vlmfix.load(..., device_map=...)`: a model spread by accelerate generates what the same
model on one device generates, with every method, and attach/remove leaves it as it was.

Without GPUs the spread is CPU + disk offload (`max_memory` / a dict with "disk"): the
layers past the budget keep their weights on `meta` and accelerate's hooks load them for
each forward, which is the hook path a GPU split takes. What only GPUs can show (layers
on two CUDA devices, activations and token maps crossing between them) is not run here;
`benchmarks/bench_multigpu.py --device-map-check` runs it on a 2-GPU machine."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix import attention, methods
from vlmfix.errors import ConfigError
from vlmfix.generation import prepare_inputs
from vlmfix.loading import input_device, placement


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """family -> the tiny model saved and reloaded with device_map="auto" under a CPU budget."""
    out = {}
    for family in ("llava", "llava_next"):
        model, processor = tiny(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded, proc = vlmfix.load(
                folder,
                dtype="float32",
                device_map="auto",
                max_memory={"cpu": "600KB"},
                offload_folder=tmp_path_factory.mktemp(f"{family}-offload"),
            )
        out[family] = loaded, proc
    return out


def test_auto_map_offloads_layers_and_inputs_go_to_the_embeddings(spread):
    model, _ = spread["llava"]
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters())  # offloaded until used
    assert input_device(model) == torch.device("cpu")
    assert placement(model) == "cpu+disk"
    assert placement(tiny("llava")[0]) == "cpu"


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("name", methods.available())
def test_every_method_generates_the_same_tokens(spread, family, name):
    ref, processor = tiny(family)
    model, proc = spread[family]
    images, prompts = make_images(2), PROMPTS[:2]
    cfg = methods.get(name)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # methods that cannot act on a tiny model say so
        a = vlmfix.generate(ref, processor, images, prompts, methods=[cfg], max_new_tokens=4)
        b = vlmfix.generate(model, proc, images, prompts, methods=[cfg], max_new_tokens=4)
    assert b.token_ids == a.token_ids


def _hooks(model):
    return {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), type(getattr(m, "_hf_hook", None)).__name__)
        for name, m in model.named_modules()
    }


def test_attach_and_remove_leave_the_spread_model_as_it_was(spread):
    model, proc = spread["llava"]
    inputs = prepare_inputs(proc, make_images(2), PROMPTS[:2], device=input_device(model))
    with torch.no_grad():
        before = model(**inputs).logits
    hooks, impl = _hooks(model), model.config.text_config._attn_implementation
    with vlmfix.attach(model, vlmfix.VAR(tau=2.5), vlmfix.PAI()):
        with torch.no_grad():
            model(**inputs)
    assert _hooks(model) == hooks  # vlmfix's hooks gone, accelerate's kept
    assert model.config.text_config._attn_implementation == impl
    assert not attention.is_registered()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_a_dict_map_spreads_an_in_memory_model(tmp_path):
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "disk",  # inputs still go to the execution device
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk",
        "model.language_model.layers.2": "cpu",
        "model.language_model.layers.3": "disk",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, proc = vlmfix.load("tiny-random", device_map=device_map, offload_folder=tmp_path)
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    ref, processor = tiny("llava")
    for cfg in ([], [vlmfix.DeCo()], [vlmfix.VCD()]):  # DeCo projects early layers with the offloaded head
        a = vlmfix.generate(ref, processor, make_images(2), PROMPTS[:2], methods=cfg, max_new_tokens=4)
        b = vlmfix.generate(model, proc, make_images(2), PROMPTS[:2], methods=cfg, max_new_tokens=4)
        assert b.token_ids == a.token_ids


def test_placement_arguments_are_checked():
    with pytest.raises(ConfigError, match="pass one of them"):
        vlmfix.load("tiny-random", device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match="only apply with device_map"):
        vlmfix.load("tiny-random", max_memory={"cpu": "1GiB"})


def test_device_map_cli_flag(tmp_path, capsys):
    from vlmfix.cli import main

    out = tmp_path / "c.jsonl"
    args = ["caption", str(tmp_path), "--model", "tiny-random", "--max-new-tokens", "2", "--no-progress"]
    make_images(1)[0].save(tmp_path / "a.png")
    assert main([*args, "--out", str(out), "--device-map", "auto"]) == 0
    assert main([*args, "--out", str(tmp_path / "d.jsonl"), "--device-map", "auto", "--device", "cpu"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_device_map_is_refused_under_several_processes():
    import argparse

    from vlmfix.cli_common import rank_device
    from vlmfix.shard import DistContext

    args = argparse.Namespace(device=None, device_map="auto")
    with pytest.raises(ConfigError, match="runs 2 processes"):
        rank_device(args, DistContext(0, 2, device="cuda:0"))
    args = argparse.Namespace(device=None, device_map=None)
    rank_device(args, DistContext(1, 2, device="cuda:1"))
    assert args.device == "cuda:1"
    rank_device(args := argparse.Namespace(device="cpu", device_map=None), DistContext(1, 2, device="cuda:1"))
    assert args.device == "cpu"  # an explicit device is kept


def test_token_maps_are_copied_once_per_forward_and_device():
    model, processor = tiny("llava")
    with vlmfix.attach(model) as handle:
        inputs = prepare_inputs(processor, make_images(1), PROMPTS[:1])
        with torch.no_grad():
            model(**inputs)
        ctrl = handle.controller
        layout = ctrl.layout
        assert ctrl.layout_on(layout, layout.labels.device) is layout
        meta = ctrl.layout_on(layout, torch.device("meta"))  # stands in for a second GPU
        assert meta.labels.device.type == "meta" and meta.length == layout.length
        assert ctrl.layout_on(layout, torch.device("meta")) is meta
        ctrl.begin_forward(is_prefill=False)
        assert ctrl.layout_on(layout, torch.device("meta")) is not meta  # a new forward, a new copy
