"""``vlmfix eval pope|chair|compare``: command-line front end of the evaluators.

The core CLI calls :func:`register` with its ``eval`` subparsers. Model options
(``--model``, ``--method``, ``--seed``, ...) come from ``vlmfix.cli_common``; the model is
only loaded when something has to be generated (scoring an existing captions file never
loads one). Tests and library users can bypass the model by setting
``args.generate_fn`` to a ``(images, prompts) -> texts`` callable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmfix.cli_common import positive_int
from vlmfix.errors import ConfigError, DataError, VlmfixError
from vlmfix.eval.registry import lookup

__all__ = ["register", "main", "cmd_pope", "cmd_chair", "cmd_compare"]

logger = logging.getLogger(__name__)

_POPE_DEFAULTS: dict[str, Any] = {
    "template": "llava",
    "parser": "pope_official",
    "n_images": 500,
    "max_new_tokens": 16,
    "split": None,
}
_CHAIR_DEFAULTS: dict[str, Any] = {
    "prompt": "Please describe this image in detail.",
    "n": 500,
    "max_new_tokens": 512,
    "normalizer": "lemma",
}


_INTERRUPT_HINT = (
    "Re-run the same command to continue: the --out folder is resumed (passing --resume as well is fine)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pope``, ``chair`` and ``compare`` commands to ``subparsers``.

    Each parser gets ``set_defaults(func=...)``; ``args.func(args)`` returns an exit code.
    """
    p = subparsers.add_parser(
        "pope",
        help="POPE yes/no object probing (accuracy, precision, recall, F1, yes-ratio)",
        description="Ask POPE questions, parse answers with a named parser, score per split.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--questions", action="append", metavar="FILE", help="POPE question file (repeatable)")
    src.add_argument("--build-from", metavar="ANNOTATIONS", help="COCO instances_*.json to build questions from")
    p.add_argument("--images", metavar="DIR", help="folder holding the question images")
    p.add_argument(
        "--answers",
        action="append",
        metavar="FILE",
        help="score existing answers instead of asking a model: one file per --questions file, or one "
        "merged file for all (LLaVA answers, lmms-eval / VLMEvalKit per-sample dumps)",
    )
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME",
        help="split name per --questions file, or splits to build (default: all three)",
    )
    p.add_argument("--template", default=None, help="prompt template: plain | llava (default llava)")
    p.add_argument("--parser", default=None, help="answer parser: pope_official | yes_no_unknown")
    p.add_argument("--n-images", type=positive_int, default=None, help="images per built split (default 500)")
    _common(p)
    p.set_defaults(func=cmd_pope)

    c = subparsers.add_parser(
        "chair",
        help="CHAIR object hallucination in captions (CHAIR_s, CHAIR_i, Recall, Len)",
        description="Score existing captions (--captions) or caption images with a model (--images).",
    )
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", metavar="FILE", help="JSON lines with image_id or path, and caption or text")
    src.add_argument("--images", metavar="DIR", help="folder of COCO images to caption")
    c.add_argument(
        "--annotations",
        required=True,
        metavar="DIR|FILE",
        help="COCO annotations folder / instances file, or ground-truth JSON {image_id: [category]}",
    )
    c.add_argument("--n", type=positive_int, default=None, help="images to caption, seeded sample (default 500)")
    c.add_argument("--image-ids", metavar="FILE", help="caption exactly these image ids (one per line)")
    c.add_argument("--prompt", default=None, help="captioning prompt")
    c.add_argument("--normalizer", default=None, help="lemma (default, WordNet-compatible) | plural")
    c.add_argument(
        "--dedupe",
        choices=("first", "last"),
        default=None,
        help="an image captioned twice in --captions: keep its first or last caption (default: error)",
    )
    _common(c)
    c.set_defaults(func=cmd_chair)

    k = subparsers.add_parser("compare", help="one table and plot for several eval output folders")
    k.add_argument("runs", nargs="+", metavar="DIR", help="run folders holding results.json")
    k.add_argument("--out", required=True, metavar="DIR")
    _bootstrap_options(k)
    k.set_defaults(func=cmd_compare)


def _bootstrap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples of the 95%% intervals (1000)"
    )
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="S", help="seed of the bootstrap (0)")


def _bootstrap_spec(args: argparse.Namespace):
    from vlmfix.eval.bootstrap import BootstrapSpec

    return BootstrapSpec(n_resamples=args.bootstrap, seed=args.bootstrap_seed)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (resumed if it exists)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the --out folder (what eval always does; accepted so `caption`'s habit works here)",
    )
    p.add_argument(
        "--keep-errors",
        action="store_true",
        help="on resume, keep stored error records as final (default: retry those samples)",
    )
    p.add_argument(
        "--config", metavar="YAML", help="task preset: a YAML file or a shipped name (pope_random, chair, ...)"
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate only the first N items (per split); not complete"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--label", default=None, help="name of this run in reports and comparisons")
    _bootstrap_options(p)
    try:
        from vlmfix.cli_common import add_model_options
    except ImportError:  # the core CLI is not installed: keep the options this module uses
        p.add_argument("--seed", type=int, default=0, help="seed for sampling and decoding")
        p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call")
        p.add_argument("--max-new-tokens", type=int, default=None)
    else:
        add_model_options(p)
        for action in p._actions:
            if action.dest == "max_new_tokens":
                action.help = "generation cap (default: from --config, else POPE 16 / CHAIR 512)"
    p.set_defaults(max_new_tokens=None, interrupt_hint=_INTERRUPT_HINT)  # max_new_tokens: preset, then task default


def _resolve(args: argparse.Namespace, defaults: dict[str, Any], task: str) -> dict[str, Any]:
    """Merge task defaults < YAML preset < explicit command-line values into ``args``."""
    cfg = {}
    if args.config:
        from vlmfix.eval.tasks import load_task_config

        cfg = load_task_config(args.config)
        if cfg.get("task", task) != task:
            raise ConfigError(f"--config {args.config} is a {cfg['task']!r} preset, not {task!r}")
        for key in cfg:
            if key != "task":
                lookup({**defaults}, key, f"{task} preset key")
    for key, default in defaults.items():
        if getattr(args, key, None) is None:
            value = cfg.get(key, default)
            if key == "split" and isinstance(value, str):
                value = [value]
            setattr(args, key, value)
    return cfg


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from vlmfix.cli_common import generation_kwargs

        return dict(generation_kwargs(args))
    except (ImportError, AttributeError):  # core CLI absent or options not added
        keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "backend")
        return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _model(args: argparse.Namespace) -> tuple[Callable, dict[str, Any]]:
    """Return ``generate_fn`` and the run info (model id, methods, generation, metadata)."""
    from vlmfix.eval.meta import collect_metadata

    generation = _generation(args)
    fn = getattr(args, "generate_fn", None)
    device = getattr(args, "device", None)
    resolved: dict[str, Any] = {}
    if fn is not None:
        model_id, methods = getattr(args, "model", None) or "custom-generate-fn", []
    else:
        try:
            import vlmfix
            from vlmfix.cli_common import build_from_args, model_settings
        except ImportError as exc:
            raise ConfigError(f"generating needs vlmfix's model core, which is not available ({exc})") from None
        from vlmfix.cli_common import rank_device
        from vlmfix.eval.runner import add_telemetry
        from vlmfix.loading import placement
        from vlmfix.shard import dist_context

        rank_device(args, dist_context())  # one model per rank, each on its own device
        model, processor, methods, model_id = build_from_args(args)
        device = placement(model)
        settings = model_settings(args, model, methods, model_id)
        resolved = {"model_resolved": settings["model_resolved"], "dtype": settings["dtype"]}

        def fn(images, prompts):
            out = vlmfix.generate(model, processor, images=images, prompts=prompts, methods=methods, **generation)
            add_telemetry(telemetry, out.stats)
            return out.texts

    telemetry: dict[str, Any] = {}
    info = {
        "model_id": model_id,
        "methods": [{"name": getattr(m, "name", type(m).__name__), **m.to_dict()} for m in methods],
        "generation": generation,
        "batch_size": getattr(args, "batch_size", 1),
        "metadata": collect_metadata(model_id, methods, getattr(args, "seed", None), device),
        # filled while generating; results.json is written after the last batch
        "method_stats": telemetry,
    }
    info.update(resolved)
    return fn, info


def cmd_pope(args: argparse.Namespace) -> int:
    """Run ``vlmfix eval pope``; return the exit code."""
    from vlmfix.eval.pope import (
        SPLITS,
        build_questions,
        load_coco_objects,
        load_questions,
        load_split_answers,
        split_name,
        write_questions,
    )
    from vlmfix.eval.pope.task import run_pope

    _resolve(args, _POPE_DEFAULTS, "pope")
    out = _check_out(args)
    splits: dict[str, list] = {}
    if args.questions:
        names = args.split or [split_name(q) for q in args.questions]
        if len(names) != len(args.questions):
            raise ConfigError(
                f"{len(args.questions)} --questions files but {len(names)} --split names; give one per file"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"split names repeat ({names}); name each file with --split")
        for name, path in zip(names, args.questions, strict=True):
            splits[name] = load_questions(path)
    elif args.build_from:
        coco = load_coco_objects(args.build_from)
        for name in args.split or SPLITS:
            qs = build_questions(coco, name, n_images=args.n_images, seed=args.seed)
            splits[name] = qs
            out.mkdir(parents=True, exist_ok=True)
            write_questions(qs, out / f"questions_{name}.jsonl")
    else:
        raise ConfigError("give --questions FILE or --build-from ANNOTATIONS")
    answers = None
    if args.answers:  # checked against the full question files, before --limit
        if not args.questions:
            raise ConfigError("--answers needs the --questions files the answers were generated from")
        answers = load_split_answers(args.answers, splits)
    limited = args.limit is not None and any(len(v) > args.limit for v in splits.values())
    if args.limit is not None:
        splits = {k: v[: args.limit] for k, v in splits.items()}
    if answers is None and args.images is None:
        raise ConfigError("give --images DIR (to ask the model) or --answers FILE (to score existing answers)")
    if answers is None:
        _check_pope_images(args.images, splits)
    with _lock(out):  # before the model loads: a second run on --out is refused at once
        if answers is not None:
            fn, info = None, {"model_id": None, "methods": [], "answers": args.answers}
        else:
            fn, info = _model(args)
        if args.label:
            info["label"] = args.label
        info["questions"] = args.questions or {
            "built_from": args.build_from,
            "n_images": args.n_images,
            "seed": args.seed,
        }
        info.update(images=None if args.images is None else str(args.images), limit=args.limit, limited=limited)
        results = run_pope(
            splits,
            args.images,
            out,
            fn,
            answers=answers,
            template=args.template,
            parser=args.parser,
            batch_size=getattr(args, "batch_size", 1),
            run_info=info,
            progress=not args.no_progress,
            retry_errors=not args.keep_errors,
            bootstrap=_bootstrap_spec(args),
        )
    return _summary(results, out)


def cmd_chair(args: argparse.Namespace) -> int:
    """Run ``vlmfix eval chair``; return the exit code."""
    from vlmfix.eval.chair import load_ground_truth
    from vlmfix.eval.chair.task import caption_samples, image_samples, run_chair

    _resolve(args, _CHAIR_DEFAULTS, "chair")
    out = _check_out(args)
    gt = load_ground_truth(args.annotations, args.normalizer)
    if args.captions:
        samples = caption_samples(args.captions, gt, dedupe=args.dedupe)
        fn, info = None, {"captions": str(args.captions), "model_id": None, "methods": []}
        info["label"] = args.label or Path(args.captions).stem
    else:
        ids = None
        if args.image_ids:
            ids = _read_ids(args.image_ids)
        samples = image_samples(args.images, gt, n=args.n, seed=args.seed, image_ids=ids, prompt=args.prompt)
        chosen = samples[: args.limit] if args.limit is not None else samples
        if chosen and all(s.error is not None for s in chosen):  # checked before the model loads
            raise DataError(
                f"none of the {len(chosen)} chosen images in {args.images} can be scored "
                f"(first: {chosen[0].error}); check --images and --annotations"
            )
    limited = args.limit is not None and len(samples) > args.limit
    if args.limit is not None:
        samples = samples[: args.limit]
    with _lock(out):  # before the model loads: a second run on --out is refused at once
        if not args.captions:
            fn, info = _model(args)
            info["prompt"] = args.prompt
            if args.label:
                info["label"] = args.label
            info["images"] = {"dir": str(args.images), "n": args.n, "seed": args.seed, "image_ids": args.image_ids}
        info.update(limit=args.limit, limited=limited)
        results = run_chair(
            samples,
            gt,
            out,
            fn,
            normalizer=args.normalizer,
            batch_size=getattr(args, "batch_size", 1),
            run_info=info,
            progress=not args.no_progress,
            retry_errors=not args.keep_errors,
            bootstrap=_bootstrap_spec(args),
        )
    return _summary(results, out)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``vlmfix eval compare``; return the exit code."""
    from vlmfix.eval.report import compare_runs

    path = compare_runs(args.runs, args.out, bootstrap=_bootstrap_spec(args))
    print(path.read_text(encoding="utf-8"))
    return 0


def _read_ids(path: str) -> list[int]:
    from vlmfix.errors import DataError

    ids = []
    from vlmfix.io import read_text

    if not Path(path).is_file():
        raise DataError(f"--image-ids file {path} does not exist")
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                ids.append(int(line.strip()))
            except ValueError:
                raise DataError(f"{path}:{lineno}: {line.strip()!r} is not an integer image id") from None
    return ids


def _check_out(args: argparse.Namespace) -> Path:
    """``--out`` must be a folder we can create or write, checked before any slow work."""
    from vlmfix.io import check_writable

    return check_writable(args.out, folder=True)


def _lock(out: Path):
    """Exclusive lock on the run folder (rank 0 only: the ranks of one launch share it)."""
    import contextlib

    from vlmfix.io import OutputLock
    from vlmfix.shard import dist_context

    if not dist_context().is_main:
        return contextlib.nullcontext()
    return OutputLock(out, folder=True)


def _check_pope_images(images: str, splits: dict[str, list]) -> None:
    """Before the model loads: the folder exists and holds the questions' images."""
    folder = Path(images)
    if not folder.is_dir():
        raise DataError(f"--images {images} is not a folder; pass the folder holding the question images")
    names = sorted({q.image for qs in splits.values() for q in qs})
    missing = [n for n in names if not (folder / n).is_file()]
    if names and len(missing) == len(names):
        raise DataError(
            f"none of the {len(names)} images the questions name is in {folder} (e.g. {missing[0]}); "
            "is --images the right folder?"
        )
    if missing:
        logger.warning(
            "%d of %d question images are missing from %s (e.g. %s); their questions become error records",
            len(missing),
            len(names),
            folder,
            missing[0],
        )


def _summary(results: dict[str, Any] | None, out: Path) -> int:
    if results is None:  # not rank 0
        return 0
    print((out / "report.md").read_text(encoding="utf-8").split("\n![")[0])
    for note in (results.get("method_stats") or {}).get("method_warnings", []):
        print(f"WARNING: {note}", file=sys.stderr)
    if results.get("limited"):
        print(f"NOTE: --limit {results.get('limit')}: a partial run, not marked complete", file=sys.stderr)
    if results.get("n_errors"):
        print(
            f"WARNING: {results['n_errors']} samples failed and are excluded from the metrics; "
            f"see 'error' records in {out / 'samples.jsonl'}",
            file=sys.stderr,
        )
        if results["n_errors"] >= results.get("n_samples", 0):
            print("vlmfix: error: every sample failed; the metrics mean nothing", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m vlmfix.eval.cli pope|chair|compare ...``."""
    parser = argparse.ArgumentParser(prog="vlmfix eval")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except VlmfixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
