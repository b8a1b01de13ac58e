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
    "load_from_args",
    "rank_device",
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
    """Add ``--model --dtype --device --device-map --method --method-config --seed
    --batch-size --max-new-tokens --do-sample --temperature --top-p --top-k --backend
    --decode-path``."""
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
        "--device-map",
        default=None,
        choices=DEVICE_MAPS,
        help="spread one model over every visible GPU (and CPU memory when they are full), for models "
        "that do not fit one GPU; 'auto' is the usual choice (instead of --device)",
    )
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
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy/sampling; CHAIR papers: 5)")
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "reference", "triton"],
        help="attention backend: auto ($VLMFIX_BACKEND if set, else triton on CUDA, reference elsewhere), "
        "reference (pure torch) or triton (fused kernels)",
    )
    g.add_argument(
        "--decode-path",
        default="auto",
        choices=["auto", "eager", "static", "graph"],
        help="decode steps: auto (a CUDA graph of the step on CUDA, eager elsewhere), graph, static "
        "(the same step uncaptured) or eager (the off switch); all give the same tokens",
    )


#: ``--device-map`` values: accelerate's placement strategies.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


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
    if getattr(args, "device_map", None) is not None and args.device is not None:
        raise ConfigError(
            f"--device {args.device} and --device-map {args.device_map} both place the model; pass one of them"
        )
    # The attention backend is resolved here ("auto" -> what will run), so a forced triton
    # that cannot run fails before the model loads and records state the backend used.
    import torch

    from vlmfix.attention import resolve_backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.backend = resolve_backend(getattr(args, "backend", "auto"), device)
    from vlmfix.fastpath import resolve_decode_path

    resolve_decode_path(getattr(args, "decode_path", "auto"), device)  # e.g. graph without CUDA
    return build_methods(args)


def build_from_args(args: argparse.Namespace):
    """Load the model and build the methods named by :func:`add_model_options` args.

    Every option is checked (:func:`check_args`) before the (slow) model load.

    Returns:
        ``(model, processor, methods, model_id)``.
    """
    methods = check_args(args)
    name = args.model or default_model()
    model, processor = load_from_args(args, name)
    return model, processor, methods, name


def load_from_args(args: argparse.Namespace, name: str):
    """:func:`vlmfix.load` with ``--dtype``, ``--device`` and ``--device-map``."""
    from vlmfix.loading import load

    return load(name, dtype=args.dtype, device=args.device, device_map=getattr(args, "device_map", None))


def rank_device(args: argparse.Namespace, ctx) -> None:
    """Under a launch of several processes, put this rank's model on its own device.

    ``--device`` unset or ``cuda`` becomes the rank's device (``cuda:LOCAL_RANK``, or
    ``cpu`` without GPUs); an explicit ``cuda:N`` is kept (every rank then shares it, with
    a warning).

    Args:
        args: parsed options (``device``, ``device_map``).
        ctx: the :class:`vlmfix.shard.DistContext` of this process.

    Raises:
        ConfigError: ``--device-map`` under several processes (each rank would spread its
            model over every GPU of the host).
    """
    from vlmfix.errors import ConfigError

    if not ctx.is_sharded:
        return
    if getattr(args, "device_map", None) is not None:
        raise ConfigError(
            f"--device-map {args.device_map} spreads one model over every visible GPU, but this launch runs "
            f"{ctx.world_size} processes, which would all do so; use one process with --device-map, or "
            "several processes without it (one model per GPU)"
        )
    if args.device is None or args.device == "cuda":
        args.device = ctx.device
    elif str(args.device).startswith("cuda"):
        logger.warning(
            "--device %s under %d processes: every rank loads its model on that one GPU", args.device, ctx.world_size
        )


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Every decoding setting passed to :func:`vlmfix.generate` (recorded as ``generation``).

    ``num_beams`` is recorded only when beam search is on, so records of greedy runs (and
    resuming them) are unchanged."""
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        backend=args.backend,
    )
    if getattr(args, "num_beams", 1) != 1:
        kwargs["num_beams"] = args.num_beams
    if getattr(args, "decode_path", "auto") != "auto":  # recorded only when chosen
        kwargs["decode_path"] = args.decode_path
    return kwargs


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
    """The git commit of the vlmfix source tree, if it is a checkout; ``-dirty`` is
    appended when tracked files differ from that commit (the record then says the code
    that ran was not exactly the commit)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if changes else head


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
