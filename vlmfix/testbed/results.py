"""Every method on every testbed variant: POPE, CHAIR and partner hallucination.

One command evaluates and writes a run folder (``rows.json``, ``results.png`` and the
table in ``results.md``; default ``runs/testbed-results``)::

    python -m vlmfix.testbed.results --out runs/testbed-results --n 200

Regenerating the documentation is an explicit choice: ``--update-docs`` writes
``docs/results/`` and the table block of ``docs/results.md`` instead.

Every metric carries the evaluators' seeded bootstrap 95% interval over images, and every
method row its paired-bootstrap difference from the baseline (:mod:`.intervals`).

For each shipped variant (``clean``, ``caption_noise``, ``occlusion_prior``,
``under_attention``) and each registered method (paper defaults), on held-out
``clean``-world scenes of a seed that training never used:

- POPE ``random`` on the natural split and POPE ``adversarial`` on the adversarial split
  (negatives = the category that co-occurs most with each positive in the natural
  split, i.e. the absent prior partner), both built by :mod:`vlmfix.eval.pope`, prompt
  template ``plain``, parser ``pope_official``;
- CHAIR (:mod:`vlmfix.eval.chair`, instances-only ground truth) on natural and
  adversarial captions;
- partner-hallucination rate on the adversarial split: over (scene, A present, its
  prior partner B absent), how often the caption names B, and where: after the word
  for A, before it, or with A not named.

``--prompt TEXT --tag NAME`` captions with another prompt (e.g. a distracting
instruction); those rows read ``VARIANT [NAME]`` and sit beside the default prompt's.

Everything goes through the public API (``vlmfix.load``, ``vlmfix.generate``), greedy
unless a row asks for beam search: ``ROW@beamN`` (e.g. ``baseline@beam5``, ``helpd@beam5``)
decodes both the POPE answers and the captions with ``num_beams=N``. A beam row is
labelled "baseline (beam 5)" in the table and compared with the baseline of the same
decoding (``baseline@beam5``; the beam baseline itself with the greedy baseline).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError, VlmfixError

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 1_000_003
CAPTION_PROMPT = "describe the image."


def _split_objects(instances: Path) -> dict[int, set[str]]:
    data = json.loads(instances.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict[int, set[str]] = {im["id"]: set() for im in data["images"]}
    for a in data["annotations"]:
        out[a["image_id"]].add(names[a["category_id"]])
    return out


def partner_stats(captions: dict[int, str], objects: dict[int, set[str]]) -> dict[str, float]:
    """Partner hallucination over (scene, A present, partner B absent) instances.

    Args:
        captions: image id -> caption.
        objects: image id -> categories present.

    Returns:
        ``rate`` (B named), and among those, shares where B first appears ``after`` the
        first mention of A, ``before`` it, or with A ``unnamed``; ``instances``.
    """
    from vlmfix.testbed import catalog as cat

    inst = hit = after = before = unnamed = 0
    for image_id, text in captions.items():
        words = re.findall(r"[a-z]+", text.lower())
        present = objects.get(image_id, set())
        for a, b in cat.PAIRS:
            if a not in present or b in present:
                continue
            inst += 1
            if b not in words:
                continue
            hit += 1
            if a not in words:
                unnamed += 1
            elif words.index(b) > words.index(a):
                after += 1
            else:
                before += 1
    return {
        "instances": inst,
        "rate": hit / inst if inst else 0.0,
        "after_a": after / hit if hit else 0.0,
        "before_a": before / hit if hit else 0.0,
        "a_unnamed": unnamed / hit if hit else 0.0,
    }


def parse_method_spec(spec: str) -> list:
    """``"vcd"`` or ``"var:tau=5,p=0.6"`` -> method configs (``"baseline"`` -> none).

    Several methods compose with ``+``: ``"var:tau=5+vcd"``.
    """
    import yaml

    import vlmfix

    configs = []
    for part in spec.split("+"):
        name, _, opts = part.partition(":")
        if name.strip() == "baseline":
            continue
        overrides = {}
        for item in filter(None, opts.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"method spec {spec!r}: option {item!r} must be KEY=VALUE")
            overrides[key.strip()] = yaml.safe_load(value)
        configs.append(vlmfix.methods.build_config(name.strip(), overrides))
    return configs


_BEAM_SUFFIX = re.compile(r"@beam(\d+)$")


def parse_row_spec(spec: str) -> tuple[str, int]:
    """``"vcd"`` -> ``("vcd", 1)`` (greedy); ``"vcd@beam5"`` -> ``("vcd", 5)`` (beam search).

    The ``@beamN`` suffix applies to the whole row, composed methods included
    (``"pai+vcd@beam5"``).

    Raises:
        ConfigError: an ``@`` suffix other than ``@beamN`` with ``N >= 2``.
    """
    method, at, suffix = spec.rpartition("@")
    if not at:
        return spec, 1
    match = _BEAM_SUFFIX.fullmatch("@" + suffix)
    if not method or match is None or int(match.group(1)) < 2:
        raise ConfigError(
            f"row spec {spec!r}: the decoding suffix must be @beamN with N >= 2 (e.g. {method or 'baseline'}@beam5); "
            "leave it out for greedy decoding"
        )
    return method, int(match.group(1))


def reference_spec(spec: str) -> str | None:
    """The row a method row is compared with: the baseline of the same decoding
    (``"helpd@beam5"`` -> ``"baseline@beam5"``), and for a beam baseline the greedy one
    (``"baseline@beam5"`` -> ``"baseline"``); ``None`` for the greedy baseline."""
    method, beams = parse_row_spec(spec)
    if method.strip() == "baseline":
        return None if beams == 1 else "baseline"
    return "baseline" if beams == 1 else f"baseline@beam{beams}"


def row_label(row: dict[str, Any]) -> str:
    """The method cell of a row: its spec, with beam search spelled out ("baseline (beam 5)")."""
    method, beams = parse_row_spec(row["method"])
    return f"{method} (beam {beams})" if beams > 1 else method


def _write_splits(root: Path, n: int, seed: int) -> dict[str, dict[str, Path]]:
    from vlmfix.testbed import scenes

    return {kind: scenes.write_split(root / kind, n=n, seed=seed, kind=kind) for kind in ("natural", "adversarial")}


def evaluate(
    variant: str,
    method_names: list[str],
    splits: dict[str, dict[str, Path]],
    work: Path,
    *,
    n: int,
    seed: int,
    batch_size: int = 64,
    device: str | None = None,
    prompt: str = CAPTION_PROMPT,
    tag: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate methods (default settings) on one variant; returns one row per method.

    ``prompt`` is the caption prompt (POPE questions are unchanged); ``tag`` names a run
    under another prompt: its rows' variant reads ``VARIANT [TAG]``, so that they sit beside
    the default prompt's rows instead of replacing them.

    ``method_names`` are row specs (:func:`parse_row_spec`): a method spec, optionally with
    ``@beamN`` for beam search (POPE answers and captions alike). Every row records its
    ``num_beams``; a row whose reference (:func:`reference_spec`) ran in the same call gets
    ``vs_baseline``, its paired differences from that reference, and ``vs_reference``.
    """
    import vlmfix
    from vlmfix.eval.chair import image_samples, load_ground_truth, run_chair
    from vlmfix.eval.pope import build_questions, load_coco_objects, run_pope

    model, processor = vlmfix.load(f"testbed:{variant}", dtype="float32", device=device or "cpu")
    natural = load_coco_objects(splits["natural"]["instances"])
    adversarial = load_coco_objects(splits["adversarial"]["instances"])
    adversarial.cooccur = natural.cooccur  # negatives follow the world's priors
    questions = {
        "random": build_questions(natural, "random", n_images=n, seed=seed),
        "adversarial": build_questions(adversarial, "adversarial", n_images=n, seed=seed),
    }
    from vlmfix.testbed import intervals

    label = f"{variant} [{tag}]" if tag else variant
    rows = []
    units: dict[str, dict[str, tuple]] = {}  # method -> source -> (image ids, counts, metric_fn)
    for name in method_names:
        method_spec, num_beams = parse_row_spec(name)
        configs = parse_method_spec(method_spec)
        t0 = time.perf_counter()

        def generate_fn(images, prompts, _configs=configs, max_new_tokens=24, _beams=num_beams):
            return vlmfix.generate(
                model, processor, images, prompts, _configs, max_new_tokens=max_new_tokens, num_beams=_beams
            ).texts

        run_info = {"model_id": f"testbed:{variant}", "methods": [c.to_dict() for c in configs]}
        if num_beams > 1:  # as the CLI records it: only when beam search is on
            run_info["generation"] = {"num_beams": num_beams}
        row: dict[str, Any] = {"variant": label, "method": name, "num_beams": num_beams, "ci": {}}
        if prompt != CAPTION_PROMPT:
            row["prompt"] = prompt
        units[name] = {}
        for split_name, qs in questions.items():
            kind = "natural" if split_name == "random" else "adversarial"
            res = run_pope(
                {split_name: qs},
                splits[kind]["images"],
                work / label / name / f"pope_{split_name}",
                lambda im, pr: generate_fn(im, pr, max_new_tokens=4),
                template="plain",
                batch_size=batch_size,
                run_info=run_info,
            )
            m = res["splits"][split_name]
            row[f"pope_{split_name}_acc"] = m["accuracy"]
            row[f"pope_{split_name}_f1"] = m["f1"]
            row["ci"].update({f"pope_{split_name}_{k}": m["ci"][v] for k, v in (("acc", "accuracy"), ("f1", "f1"))})
            units[name][f"pope_{split_name}"] = intervals.unit_counts(
                f"pope_{split_name}", work / label / name / f"pope_{split_name}"
            )
        for kind in ("natural", "adversarial"):
            gt = load_ground_truth(splits[kind]["instances"])
            samples = image_samples(splits[kind]["images"], gt, n=None, prompt=prompt)
            out = work / label / name / f"chair_{kind}"
            res = run_chair(samples, gt, out, generate_fn, batch_size=batch_size, run_info=run_info)
            metrics = res["metrics"]
            row[f"chair_s_{kind}"] = metrics["CHAIR_s"]
            row[f"chair_i_{kind}"] = metrics["CHAIR_i"]
            row[f"recall_{kind}"] = metrics["Recall"]
            row["ci"].update({f"{k.lower()}_{kind}": metrics["ci"][k] for k in ("CHAIR_s", "CHAIR_i", "Recall")})
            units[name][f"chair_{kind}"] = intervals.unit_counts(f"chair_{kind}", out)
            if kind == "adversarial":
                from vlmfix.io import read_jsonl

                caps = {
                    r["image_id"]: r.get("caption") or r.get("text") or "" for r in read_jsonl(out / "samples.jsonl")
                }
                objs = _split_objects(splits[kind]["instances"])
                row.update({f"partner_{k}": v for k, v in partner_stats(caps, objs).items()})
                pc = intervals.partner_counts(caps, objs)
                row["ci"]["partner_rate"] = intervals.partner_interval(pc)
                units[name]["partner"] = intervals.unit_counts("partner", out, pc)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        logger.info("%s / %s done in %.1fs", label, name, row["seconds"])
        rows.append(row)
    for row in rows:
        ref = reference_spec(row["method"])
        if ref in units:
            row["vs_baseline"] = intervals.paired_vs_baseline(units[ref], units[row["method"]])
            row["vs_reference"] = ref
    return rows


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table; cells carry ``[95% interval]`` when the row has one."""
    from vlmfix.testbed.intervals import interval_cell as _c

    head = (
        "| variant | method | POPE rand acc | POPE rand F1 | POPE adv acc | POPE adv F1 | CHAIR_s nat | "
        "CHAIR_i nat | CHAIR_s adv | CHAIR_i adv | Recall adv | partner rate | after A | before A | A unnamed |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {row_label(r)} | {_c(r, 'pope_random_acc')} | {_c(r, 'pope_random_f1')} | "
            f"{_c(r, 'pope_adversarial_acc')} | {_c(r, 'pope_adversarial_f1')} | {_c(r, 'chair_s_natural')} | "
            f"{_c(r, 'chair_i_natural')} | {_c(r, 'chair_s_adversarial')} | {_c(r, 'chair_i_adversarial')} | "
            f"{_c(r, 'recall_adversarial')} | {_c(r, 'partner_rate')} | {_fmt(r['partner_after_a'])} | "
            f"{_fmt(r['partner_before_a'])} | {_fmt(r['partner_a_unnamed'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    width = 0.8 / len(methods)
    # 40 distinct colours before any repeats; beam-search rows are hatched
    colours = [plt.get_cmap(name)(k) for name in ("tab20", "tab20b") for k in range(20)]
    for ax, key, title in (
        (axes[0], "partner_rate", "partner hallucination rate (adversarial captions)"),
        (axes[1], "pope_adversarial_acc", "POPE adversarial accuracy"),
    ):
        for j, m in enumerate(methods):
            vals = [next((r[key] for r in rows if r["variant"] == v and r["method"] == m), 0.0) for v in variants]
            ax.bar(
                [i + j * width for i in range(len(variants))], vals, width, label=row_label({"method": m}),
                color=colours[j % len(colours)], hatch="///" if parse_row_spec(m)[1] > 1 else None,
            )  # fmt: skip
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], variants)
        ax.set_title(title)
        ax.set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=min(len(methods), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(methods) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DEFAULT_OUT = "runs/testbed-results"
DOCS_OUT, DOCS_MARKDOWN = "docs/results", "docs/results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmfix.testbed.results", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=None, help=f"run folder for rows.json, the plot and results.md (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--markdown", default=None, help="where to write the table (default: OUT/results.md)")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"regenerate the documentation: --out {DOCS_OUT} and --markdown {DOCS_MARKDOWN}",
    )
    parser.add_argument("--n", type=int, default=200, help="scenes per split (default 200, at least 3)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--variants", nargs="*", default=None, help="default: every shipped variant")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="row specs (NAME, NAME:KEY=VAL,..., A+B to compose; @beamN for beam search, e.g. baseline@beam5); "
        "default: every registered method, greedy",
    )
    parser.add_argument("--append", action="store_true", help="add rows to an existing rows.json instead of replacing")
    parser.add_argument(
        "--prompt", default=CAPTION_PROMPT, help=f"caption prompt (default {CAPTION_PROMPT!r}; POPE questions unchanged)"
    )
    parser.add_argument("--tag", default=None, help="name of a --prompt run: its rows read 'VARIANT [TAG]'")
    parser.add_argument("--from-rows", action="store_true", help="only rebuild the table and plot from rows.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.n < 3:
        parser.error(f"--n {args.n} must be >= 3 (each split needs positives and negatives)")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be >= 1")
    if not args.prompt.strip():
        parser.error("--prompt is empty; give a caption prompt such as 'describe the image.'")
    if args.prompt != CAPTION_PROMPT and not args.tag:
        parser.error("--prompt needs --tag NAME, so that its rows sit beside the default prompt's rows")
    if args.update_docs:
        if args.out is not None or args.markdown is not None:
            parser.error("--update-docs sets --out and --markdown itself; give either, not both")
        args.out, args.markdown = DOCS_OUT, DOCS_MARKDOWN
    args.out = args.out or DEFAULT_OUT
    args.markdown = args.markdown or str(Path(args.out) / "results.md")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except VlmfixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import vlmfix
    from vlmfix import testbed

    variants = args.variants or testbed.available_variants()
    methods = args.methods or vlmfix.methods.available()
    for spec in methods:
        parse_method_spec(parse_row_spec(spec)[0])  # every spec checked before hours of evaluation
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.from_rows:
        if not (out / "rows.json").is_file():
            raise ConfigError(f"--from-rows: {out / 'rows.json'} does not exist; run without --from-rows first")
        args.append, variants, methods = True, [], []
    with tempfile.TemporaryDirectory() as tmp:
        splits = _write_splits(Path(tmp) / "scenes", args.n, args.seed) if variants else {}
        for variant in variants:
            rows += evaluate(
                variant, methods, splits, Path(tmp) / "runs", n=args.n, seed=args.seed,
                batch_size=args.batch_size, device=args.device, prompt=args.prompt, tag=args.tag,
            )  # fmt: skip
    if args.append and (out / "rows.json").exists():
        new_keys = {(r["variant"], r["method"]) for r in rows}
        old_rows = json.loads((out / "rows.json").read_text())
        rows = [r for r in old_rows if (r["variant"], r["method"]) not in new_keys] + rows
        order = {v: i for i, v in enumerate(testbed.VARIANTS)}
        rows.sort(  # per variant: greedy rows, then each beam width; the baseline first in each
            key=lambda r: (
                order.get(r["variant"].split(" [")[0], len(order)),  # a tagged run after its variant
                r["variant"],
                r.get("num_beams", 1),
                parse_row_spec(r["method"])[0] != "baseline",
                r["method"],
            )
        )
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "results.png")
    table = markdown_table(rows)
    md = Path(args.markdown)
    md.parent.mkdir(parents=True, exist_ok=True)
    text = md.read_text() if md.exists() else ""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    from vlmfix.testbed.intervals import reading

    read = reading(rows)
    if read:
        table += "\n\nPaired bootstrap vs baseline (same scenes; 95% interval of the difference excludes 0):\n\n" + read
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    md.write_text(text)
    print(table)
    print(f"wrote {out / 'rows.json'}, {out / 'results.png'} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
