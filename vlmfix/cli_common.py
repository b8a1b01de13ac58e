"""Options and helpers shared by every CLI command that runs a model."""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "default_model",
    "add_model_options",
    "positive_int",
    "check_args",
    "check_device",
    "build_from_args",
    "generation_kwargs",
    "resolve_model",
    "model_settings",
    "run_metadata",
    "versions",
    "git_hash",
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--limit``, ``--n``, ``--batch-size`` ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a whole number >= 1")
    return value


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
        metavar="FILE|PRESET|KEY=VAL",
        help="YAML preset file or shipped preset name (e.g. vcd), or KEY=VALUE / METHOD.KEY=VALUE "
        "override (repeatable); a method both named and in a preset is applied once",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help=f"images per forward (default: {batch_size})"
    )
    g.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        help=f"generation cap (default: {max_new_tokens})",
    )
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "reference", "triton"],
        help="attention backend: auto ($VLMFIX_BACKEND if set, else triton on CUDA, reference elsewhere), "
        "reference (pure torch) or triton (fused kernels)",
    )


def build_methods(args: argparse.Namespace) -> list:
    from vlmfix import methods

    return methods.parse(args.method, args.method_config)


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before the model loads.

    Raises:
        ConfigError: not a torch device string, or CUDA asked for where there is none
            (or an index past the last GPU).
    """
    import torch

    from vlmfix.errors import ConfigError

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} asked for CUDA, but torch {torch.__version__} sees no CUDA GPU here "
                "(a CPU-only torch build, or no driver); drop --device or pass --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"--device {device!r} is not supported; use cpu or cuda[:N]")


def check_args(args: argparse.Namespace) -> list:
    """Validate every model option that can be checked without the model; return the
    method configs. Run it before any slow work (model load, output creation).

    Raises:
        ConfigError: a bad batch size, decoding setting, device, dtype or method option.
    """
    from vlmfix.errors import ConfigError
    from vlmfix.loading import resolve_dtype

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature} must be > 0")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k} must be >= 0 (0 = off)")
    resolve_dtype(args.dtype)
    check_device(args.device)
    # The attention backend is resolved here ("auto" -> what will run), so a forced triton
    # that cannot run fails before the model loads and records state the backend used.
    import torch

    from vlmfix.attention import resolve_backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.backend = resolve_backend(getattr(args, "backend", "auto"), device)
    return build_methods(args)


def build_from_args(args: argparse.Namespace):
    """Load the model and build the methods named by :func:`add_model_options` args.

    Every option is checked (:func:`check_args`) before the (slow) model load.

    Returns:
        ``(model, processor, methods, model_id)``.
    """
    from vlmfix.loading import load

    methods = check_args(args)
    name = args.model or default_model()
    model, processor = load(name, dtype=args.dtype, device=args.device)
    return model, processor, methods, name


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Every decoding setting passed to :func:`vlmfix.generate` (recorded as ``generation``).

    ``vlmfix.generate`` decodes one sequence per prompt (no beams), so there is no
    ``num_beams`` to record.
    """
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        backend=args.backend,
    )


def resolve_model(name: str) -> str:
    """What a model name stands for: ``testbed:<variant> (<folder>)`` for the testbed, the
    absolute path of a local folder, else the name itself (hub id, ``tiny-random``)."""
    if name == "testbed" or name.startswith("testbed:"):
        try:
            from vlmfix import testbed

            variant = name.split(":", 1)[1] if ":" in name else testbed.DEFAULT_VARIANT
            return f"testbed:{variant} ({testbed.model_path(variant)})"
        except Exception:  # an unknown variant is reported by load()
            return name
    if name.startswith("tiny-random"):
        return name if ":" in name else "tiny-random:llava"
    folder = Path(name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name


def model_settings(args: argparse.Namespace, model, methods: list, name: str) -> dict[str, Any]:
    """The settings that shape every output of a run, as recorded (and compared on resume):
    resolved model, loaded dtype, method configs and every generation setting."""
    return {
        "model_resolved": resolve_model(name),
        "dtype": str(getattr(model, "dtype", args.dtype)).replace("torch.", ""),
        "methods": [m.to_dict() for m in methods],
        "generation": generation_kwargs(args),
    }


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
