"""The ``vlmfix`` command line: ``caption``, ``eval``, ``methods``, ``sweep``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from vlmfix.errors import VlmfixError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("vlmfix")


def _cmd_methods(args: argparse.Namespace) -> int:
    from vlmfix import methods

    names = methods.available()
    if args.json:
        print(json.dumps({n: methods.get(n)().to_dict() for n in names}, indent=2))
        return 0
    for name in names:
        cls = methods.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name}: {doc}")
        for opt in cls.options():
            print(f"    {opt['name']} = {opt['default']!r}  {opt['help']}")
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from vlmfix.caption import caption_files, find_images
    from vlmfix.cli_common import build_from_args, generation_kwargs, run_metadata

    files = find_images(args.paths)
    if not files:
        print(f"no images found under {args.paths}", file=sys.stderr)
        return 1
    model, processor, methods, model_id = build_from_args(args)
    meta = run_metadata(model_id, methods, args.seed, device=str(next(model.parameters()).device))
    meta.pop("device_name", None)
    counts = caption_files(
        model,
        processor,
        files,
        args.out,
        prompt=args.prompt,
        methods=methods,
        metadata=meta,
        batch_size=args.batch_size,
        resume=args.resume,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
        generate_kwargs=generation_kwargs(args),
    )
    print(
        f"{args.out}: {counts['done']} captioned, {counts['errors']} errors, {counts['skipped']} already done",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vlmfix import __version__
    from vlmfix.caption import DEFAULT_MAX_PIXELS
    from vlmfix.cli_common import add_model_options

    parser = argparse.ArgumentParser(prog="vlmfix", description="Decoding-time hallucination fixes for LLaVA models.")
    parser.add_argument("--version", action="version", version=f"vlmfix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption image files/folders into a JSON-lines file")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--prompt", default="Describe this image in detail.", help="user prompt for every image")
    p.add_argument("--out", default="captions.jsonl", help="output JSON-lines file (default: captions.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue an existing output file, skipping done images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images become error records")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_options(p)
    p.set_defaults(func=_cmd_caption)

    p = sub.add_parser("methods", help="list methods and their defaults")
    p.add_argument("--json", action="store_true", help="print defaults as JSON")
    p.set_defaults(func=_cmd_methods)

    from vlmfix.testbed import sweep

    sweep.register(sub)

    p = sub.add_parser("eval", help="evaluate hallucination (POPE, CHAIR)")
    eval_sub = p.add_subparsers(dest="task", required=True)
    try:
        from vlmfix.eval import cli as eval_cli
    except ImportError as exc:  # pragma: no cover - only in a broken install
        logger.debug("evaluation CLI unavailable: %s", exc)
    else:
        eval_cli.register(eval_sub)
    return parser


def _terminate(signum, frame):  # SIGTERM -> orderly shutdown between record writes
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished records are saved. Re-run with --resume to continue.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except VlmfixError as exc:
        print(f"vlmfix: error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
