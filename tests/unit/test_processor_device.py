"""Image preprocessing runs on the model's GPU when transformers' torchvision backend can."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vlmfix.generation import prepare_inputs, processor_device
from vlmfix.testing import build_tiny

TORCHVISION = importlib.util.find_spec("torchvision") is not None


class _Processor:
    def __init__(self, image_processor):
        self.image_processor = image_processor


def test_only_a_torchvision_image_processor_on_cuda_gets_the_device():
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    tv = object.__new__(type("TV", (TorchvisionBackend,), {}))  # no torchvision needed to build it
    pil = object.__new__(type("PIL", (PilBackend,), {}))
    assert processor_device(_Processor(tv), "cuda") == {"device": "cuda"}
    assert processor_device(_Processor(tv), torch.device("cuda", 1)) == {"device": "cuda:1"}
    assert processor_device(_Processor(tv), "cpu") == {}
    assert processor_device(_Processor(tv), None) == {}
    assert processor_device(_Processor(pil), "cuda") == {}
    assert processor_device(object(), "cuda") == {}


@pytest.mark.skipif(not (torch.cuda.is_available() and TORCHVISION), reason="needs CUDA and torchvision")
def test_pixels_made_on_the_gpu_match_the_host_ones():
    from vlmfix.bench.models import build_llava_7b, make_batch

    _, processor = build_llava_7b("meta")
    images, prompts = make_batch(4, 336)
    host = prepare_inputs(processor, images, prompts)
    gpu = prepare_inputs(processor, images, prompts, device="cuda")
    assert gpu["pixel_values"].device.type == "cuda"
    assert torch.equal(gpu["input_ids"].cpu(), host["input_ids"])
    torch.testing.assert_close(gpu["pixel_values"].cpu(), host["pixel_values"], rtol=0, atol=0.05)
    model, proc = build_tiny("llava")  # the tiny processor takes the same path
    prepare_inputs(proc, images[:1], prompts[:1], device="cuda")
