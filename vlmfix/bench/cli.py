"""The ``vlmfix bench`` subcommand."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vlmfix.bench.measure import check_environment, run_suite
from vlmfix.bench.report import RESULT_FILES, markdown_report
from vlmfix.bench.suite import DEFAULT_SUITE, STOCK_KINDS, Suite, load_suite, shipped_suites
from vlmfix.errors import ConfigError, DataError

__all__ = ["register"]


def register(sub) -> None:
    """Add the ``bench`` subcommand to a ``vlmfix`` subparsers object."""
    p = sub.add_parser(
        "bench",
        help="decoding speed of stock transformers and vlmfix variants on random full-size LLaVA models",
        description="Time the variants of a bench suite (YAML) and write results.json, results.md and decode.png.",
    )
    p.add_argument(
        "suite_file",
        nargs="?",
        default=None,
        metavar="SUITE.yaml",
        help=f"suite file (default: the shipped '{DEFAULT_SUITE}' suite)",
    )
    p.add_argument("--suite", default=None, metavar="NAME", help=f"a shipped suite: {', '.join(shipped_suites())}")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-SUITE-TIMESTAMP)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--check", action="store_true", help="validate the suite, print the plan and exit")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from vlmfix.io import OutputLock, check_writable

    if args.suite_file and args.suite:
        raise ConfigError(f"give a suite file ({args.suite_file}) or --suite {args.suite}, not both")
    suite = load_suite(args.suite or args.suite_file)
    if args.check:
        print(_plan(suite))
        return 0
    out = Path(args.out or f"runs/bench-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(out, folder=True)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise DataError(f"--out {out} already holds files ({held}); pass --force to overwrite, or choose another --out")
    check_environment(suite)  # device, backend, matplotlib: before the lock and any model
    with OutputLock(out, folder=True):
        for name in RESULT_FILES:  # --force: no file of an earlier run may pass for this one's
            (out / name).unlink(missing_ok=True)
        record = run_suite(suite, out, command=_command(args), progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown_report(record))
    print(f"wrote {', '.join(str(out / f) for f in RESULT_FILES)}", file=sys.stderr)
    rows = record["rows"]
    if rows and not any(r.get("ok") for r in rows):
        print(f"vlmfix: error: every variant failed; see the errors in {out / 'results.md'}", file=sys.stderr)
        return 1
    return 0


def _command(args: argparse.Namespace) -> list[str]:
    """The command line as the parsed arguments give it (when ``main`` got an argv list)."""
    cmd = ["vlmfix", "bench"]
    cmd += [args.suite_file] if args.suite_file else []
    cmd += ["--suite", args.suite] if args.suite else []
    cmd += ["--out", args.out] if args.out else []
    cmd += ["--force"] if args.force else []
    return cmd


def _plan(suite: Suite) -> str:
    """What a suite will run, for ``--check``."""
    lines = [f"suite {suite.name} ({suite.source}): valid"]
    lines.append(
        f"  models {', '.join(suite.models)}; {suite.dtype}; device {suite.device}; batches "
        f"{list(suite.batch_sizes)}; {suite.new_tokens} new tokens; {suite.repeats} rounds"
    )
    for v in suite.variants:
        what = (
            v.kind
            if v.kind in STOCK_KINDS
            else f"vlmfix [{', '.join(m.name for m in v.methods)}] decode_path {v.decode_path}"
        )
        lines.append(f"  - {v.name}: {what}")
    return "\n".join(lines)
