"""Where the time of a 1-token ``vlmfix.generate`` call goes, with and without pre-LM
token selection, on a random full-size LLaVA-1.5-7B (diagnostic for the pruning figures).

Times, each the median of ``--repeats`` synchronised calls after a warm-up: the processor
alone (``prepare_inputs``), the vision tower + projector alone, stock ``model(**inputs)``
(prefill forward, inputs ready), and ``vlmfix.generate(max_new_tokens=1)`` plain, with
VisionZip-style selection to 64 tokens and with random pre-LM pruning to 64; with
``--cprofile``, a ``cProfile`` of one VisionZip call (host time per function; GPU work shows up where the
host waits for it).

Usage::

    python benchmarks/profile_prefill.py --batch 1 8 [--cprofile]
    python benchmarks/profile_prefill.py --batch 1 8 --methods var pai paint vhr vhr:mode=one_pass --profile-method paint
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules, script use only

import bench_contrastive as bc  # noqa: E402

import vlmfix  # noqa: E402
from vlmfix.bench.models import build_llava_7b, make_batch  # noqa: E402
from vlmfix.generation import prepare_inputs  # noqa: E402


def timed(fn, repeats, device):
    """Median ms of ``fn()`` over ``repeats`` synchronised calls after a warm-up."""
    return bc.measure(fn, device, repeats)[0] * 1e3


def torch_profile(model, processor, images, prompts, methods, label):
    """Top ops by GPU and by host time of one call (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        vlmfix.generate(model, processor, images, prompts, methods, max_new_tokens=1)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"\n{label}: top ops by GPU time")
    print(table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    print(f"{label}: top ops by host time")
    print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def profile(model, processor, device, B, repeats, cprofile=False, trace=False, methods=None, profile_method=None):
    images, prompts = make_batch(B, 336)
    inputs = prepare_inputs(processor, images, prompts, device=device, dtype=torch.float16)
    rows = {}
    rows["processor (prepare_inputs)"] = timed(
        lambda: prepare_inputs(processor, images, prompts, device=device, dtype=torch.float16), repeats, device
    )
    with torch.inference_mode():
        rows["vision tower + projector"] = timed(
            lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                   vision_feature_select_strategy="default"),
            repeats, device,
        )  # fmt: skip
        rows["stock forward (inputs ready)"] = timed(lambda: model(**inputs, logits_to_keep=1), repeats, device)
    variants = {
        "vlmfix plain": lambda: [],
        "vlmfix VisionZip 64": lambda: [vlmfix.VisionZip()],
        "vlmfix random pre-LM 64": lambda: [vlmfix.RandomPrune(layer=0, ratio=1 - 64 / 576)],
    }
    if methods:
        from vlmfix.testbed.results import parse_method_spec

        variants = {"vlmfix plain": lambda: []}
        variants.update({f"vlmfix {spec}": (lambda s=spec: parse_method_spec(s)) for spec in methods})
    for name, methods in variants.items():
        rows[name] = timed(
            lambda m=methods: vlmfix.generate(model, processor, images, prompts, m(), max_new_tokens=1),
            repeats,
            device,
        )
    print(f"\nbatch {B}, prompt {inputs['input_ids'].shape[1]} tokens: ms per call (median of {repeats})")
    for name, ms in rows.items():
        ratio = f"  {ms / rows['vlmfix plain']:.2f}x plain" if name.startswith("vlmfix ") else ""
        print(f"  {name:32s} {ms:8.1f}{ratio}")
    if profile_method:
        from vlmfix.testbed.results import parse_method_spec

        torch_profile(model, processor, images, prompts, parse_method_spec(profile_method),
                      f"batch {B}, {profile_method}")  # fmt: skip
        host_profile(model, processor, images, prompts, parse_method_spec(profile_method), device, top=20)
    if trace:
        torch_profile(model, processor, images, prompts, [], f"batch {B}, vlmfix plain")
        torch_profile(model, processor, images, prompts, [vlmfix.RandomPrune(layer=0, ratio=1 - 64 / 576)],
                      f"batch {B}, random pre-LM 64")  # fmt: skip
    if cprofile:
        host_profile(model, processor, images, prompts, [vlmfix.VisionZip()], device, top=25)


def host_profile(model, processor, images, prompts, methods, device, top):
    """A ``cProfile`` of one 1-token call, the ``top`` functions by own host time."""
    prof = cProfile.Profile()
    prof.enable()
    vlmfix.generate(model, processor, images, prompts, methods, max_new_tokens=1)
    torch.cuda.synchronize(device)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print("\n".join(s.getvalue().splitlines()[: top + 20]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cprofile", action="store_true", help="also print a cProfile of one VisionZip call")
    parser.add_argument("--trace", action="store_true", help="also print torch.profiler tables of plain and random")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="time these method specs (e.g. paint var vhr:mode=one_pass) instead of the pruning rows",
    )
    parser.add_argument(
        "--profile-method",
        default=None,
        help="print torch.profiler tables and a cProfile of one call with this method spec",
    )
    args = parser.parse_args(argv)
    torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device("cuda")
    model, processor = build_llava_7b(device)
    print(f"{torch.cuda.get_device_name(device)}; image processor {type(processor.image_processor).__name__}")
    for B in args.batch:
        profile(model, processor, device, B, args.repeats, args.cprofile, args.trace, args.methods, args.profile_method)


if __name__ == "__main__":
    main()
