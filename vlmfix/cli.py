"""The ``vlmfix`` command line: ``caption``, ``eval``, ``methods``, ``sweep``, ``bench``."""

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
    import contextlib

    from vlmfix.caption import caption_files, check_fresh_output, find_images
    from vlmfix.cli_common import (
        check_args,
        default_model,
        generation_kwargs,
        load_from_args,
        model_settings,
        rank_device,
        run_metadata,
    )
    from vlmfix.io import OutputLock, check_writable
    from vlmfix.loading import placement
    from vlmfix.shard import dist_context

    # Everything that can be checked is checked before the model loads.
    out = check_writable(args.out)
    found = find_images(args.paths)
    if not found:
        print(f"no images found under {args.paths}", file=sys.stderr)
        return 1
    files = found[: args.limit] if args.limit is not None else found
    ctx = dist_context()  # several processes under accelerate launch / torchrun
    rank_device(args, ctx)
    methods = check_args(args)
    # A second run on the same file is refused here, not by timing; the ranks of one
    # launch share the output, so only rank 0 locks it (each rank locks its part file).
    with OutputLock(out) if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:  # other ranks would see this launch's part files
            check_fresh_output(out, args.resume)
        name = args.model or default_model()
        model, processor = load_from_args(args, name)
        meta = run_metadata(name, methods, args.seed, device=placement(model))
        meta.pop("device_name", None)
        meta.pop("methods", None)  # recorded (and checked on resume) with the settings
        meta["inputs"] = {"paths": list(args.paths), "limit": args.limit, "images_found": len(found)}
        if ctx.is_sharded:
            meta["num_processes"] = ctx.world_size
        counts = caption_files(
            model,
            processor,
            files,
            out,
            prompt=args.prompt,
            methods=methods,
            metadata=meta,
            settings=model_settings(args, model, methods, name),
            batch_size=args.batch_size,
            resume=args.resume,
            retry_errors=not args.keep_errors,
            max_pixels=args.max_pixels,
            progress=not args.no_progress and ctx.is_main,
            generate_kwargs=generation_kwargs(args),
            ctx=ctx,
        )
    if not ctx.is_main:  # rank 0 reports the whole run
        return 0
    retried = f", {counts['retried']} earlier errors retried" if counts["retried"] else ""
    ranks = f" by {ctx.world_size} processes" if ctx.is_sharded else ""
    print(
        f"{args.out}: {counts['done']} captioned, {counts['errors']} errors, "
        f"{counts['skipped']} already done{retried}{ranks}",
        file=sys.stderr,
    )
    if len(files) < len(found):
        print(f"--limit {args.limit}: {len(found) - len(files)} more images were not captioned", file=sys.stderr)
    if counts["errors"] and not counts["done"] and not counts["skipped"]:
        print(f"vlmfix: error: every image failed; see the 'error' records in {args.out}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vlmfix import __version__
    from vlmfix.caption import DEFAULT_MAX_PIXELS
    from vlmfix.cli_common import add_model_options, positive_int

    parser = argparse.ArgumentParser(prog="vlmfix", description="Decoding-time hallucination fixes for LLaVA models.")
    parser.add_argument("--version", action="version", version=f"vlmfix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption image files/folders into a JSON-lines file")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--prompt", default="Describe this image in detail.", help="user prompt for every image")
    p.add_argument("--out", default="captions.jsonl", help="output JSON-lines file (default: captions.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue an existing output file, skipping done images")
    p.add_argument(
        "--keep-errors",
        action="store_true",
        help="with --resume, keep error records as final (default: retry those images)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="caption only the first N images found")
    p.add_argument(
        "--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="larger images become error records"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_options(p)
    p.set_defaults(func=_cmd_caption, interrupt_hint="Re-run the same command with --resume to continue.")

    p = sub.add_parser("methods", help="list methods and their defaults")
    p.add_argument("--json", action="store_true", help="print defaults as JSON")
    p.set_defaults(func=_cmd_methods)

    from vlmfix.testbed import sweep

    sweep.register(sub)

    from vlmfix import bench

    bench.register(sub)

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
        hint = getattr(args, "interrupt_hint", "")
        print(f"interrupted; finished records are saved. {hint}".rstrip(), file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except VlmfixError as exc:
        print(f"vlmfix: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written
        print(f"vlmfix: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
