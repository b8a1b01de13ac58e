"""Options and helpers shared by every CLI command that runs a model."""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["default_model", "add_model_options", "build_from_args", "run_metadata", "versions", "git_hash"]


def default_model() -> str:
    """``"testbed"`` when its weights are installed, else ``"tiny-random"``."""
    try:
        from vlmfix import testbed

        path = testbed.model_path()
        if Path(path).is_dir():
            return "testbed"
    except Exception:  # no shipped weights (e.g. a source checkout before training)
        pass
    return "tiny-random"


def add_model_options(parser: argparse.ArgumentParser, *, batch_size: int = 8, max_new_tokens: int = 64) -> None:
    """Add ``--model --dtype --device --method --method-config --seed --batch-size
    --max-new-tokens --do-sample --temperature --top-p --top-k --backend``."""
    g = parser.add_argument_group("model and decoding")
    g.add_argument(
        "--model",
        default=None,
        help="local HF folder, hub id, 'testbed[:VARIANT]' or 'tiny-random[:FAMILY]' "
        "(default: testbed if installed, else tiny-random)",
    )
    g.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME",
        help="decoding method (repeatable, applied together); see `vlmfix methods`",
    )
    g.add_argument(
        "--method-config",
        action="append",
        default=[],
        metavar="FILE|KEY=VAL",
        help="YAML preset file, or KEY=VALUE / METHOD.KEY=VALUE override (repeatable)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"images per forward (default: {batch_size})")
    g.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"generation cap (default: {max_new_tokens})"
    )
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy/sampling; CHAIR papers: 5)")
    g.add_argument("--backend", default="reference", choices=["reference"], help="attention backend")


def build_methods(args: argparse.Namespace) -> list:
    from vlmfix import methods

    return methods.parse(args.method, args.method_config)


def build_from_args(args: argparse.Namespace):
    """Load the model and build the methods named by :func:`add_model_options` args.

    Returns:
        ``(model, processor, methods, model_id)``.
    """
    from vlmfix.errors import ConfigError
    from vlmfix.loading import load

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    methods = build_methods(args)  # validate before the (slow) model load
    name = args.model or default_model()
    model, processor = load(name, dtype=args.dtype, device=args.device)
    return model, processor, methods, name


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        seed=args.seed,
        backend=args.backend,
    )


def git_hash() -> str | None:
    """The git commit of the vlmfix source tree, if it is a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import torch
    import transformers

    import vlmfix

    return {
        "vlmfix": vlmfix.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_metadata(model_id: str, methods: list, seed: int, device: str | None = None) -> dict[str, Any]:
    """Self-describing run metadata: model, method configs, seed, versions, git hash, device."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {
        "model": model_id,
        "methods": [m.to_dict() for m in methods],
        "seed": seed,
        "versions": versions(),
        "git": git_hash(),
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        meta["device_name"] = torch.cuda.get_device_name()
    return meta
