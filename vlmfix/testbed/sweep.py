"""A tuning frontier: one method over a small grid of its settings, hallucination vs recall.

A comparison at one setting (what papers publish) hides the trade-off a user must pick:
pushing a method harder removes hallucinated objects *and* real ones. ``vlmfix sweep``
runs every point of a grid of one method's settings (plus the method's paper default and
the unmodified model) on the same images and writes, in a run folder:

- ``sweep.json``: one row per point: settings, CHAIR_i / CHAIR_s / Recall / Len on
  captions, POPE-adversarial F1 / accuracy / yes-ratio, each with its seeded bootstrap
  95% interval over images (:mod:`vlmfix.eval.bootstrap`, through the evaluators), and
  ``pareto``: no other point has both lower CHAIR_i and higher Recall;
- ``sweep.md``: the same as a Markdown table (the paper default is marked ``*``);
- ``sweep.png``: CHAIR_i against Recall and POPE-adversarial F1 against caption length,
  with interval bars, the Pareto front joined, the default starred (matplotlib, Agg).

Data: the testbed's held-out scenes by default (``adversarial`` split: every pair head
without its partner, POPE negatives from the natural world's co-occurrence), or any model
with a COCO ``instances.json`` and its images (``--instances``, ``--images``).

Command line::

    vlmfix sweep --method var --grid tau=2,5,20 p=0.3,0.6 --model testbed:caption_noise --n 100
    python -m vlmfix.testbed.sweep ...   # the same

Example:
    >>> [p.label for p in grid_points("var", ["tau=2,5", "p=0.6"])]
    ['baseline', 'default', 'tau=2,p=0.6', 'tau=5,p=0.6']
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmfix.errors import ConfigError

__all__ = ["GridPoint", "grid_points", "pareto_front", "run_sweep", "markdown_table", "plot", "register", "main"]

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 1_000_003
CAPTION_PROMPT = "describe the image."
_METRICS = ("chair_i", "chair_s", "recall", "length", "pope_adv_f1", "pope_adv_acc", "pope_adv_yes_ratio")


@dataclass
class GridPoint:
    """One setting of the swept method: ``overrides`` of its paper defaults.

    ``kind``: ``"baseline"`` (no method), ``"default"`` (the paper defaults) or ``"grid"``.
    """

    kind: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return "baseline"
        if not self.overrides:
            return "default"
        return ",".join(f"{k}={v}" for k, v in self.overrides.items())


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def grid_points(method: str, grid: list[str], *, baseline: bool = True) -> list[GridPoint]:
    """Expand ``["tau=2,5", "p=0.3,0.6"]`` into the cartesian product of settings.

    Args:
        method: a registered method name (``vlmfix methods`` lists them).
        grid: ``KEY=V1,V2,...`` items; every key must be an option of ``method``.
        baseline: add the unmodified model as the first point.

    Returns:
        baseline (optional), the paper default, then every grid point that differs from it;
        each config is validated by building it.

    Raises:
        ConfigError: unknown method or option, a malformed item, or an invalid value.
    """
    from vlmfix import methods

    cls = methods.get(method)  # raises with "did you mean" on a typo
    defaults = cls().to_dict()
    options = {o["name"] for o in cls.options()}
    axes: list[tuple[str, list[Any]]] = []
    for item in grid:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not values.strip():
            raise ConfigError(f"grid item {item!r} must be KEY=V1,V2,... (e.g. tau=5,10,20)")
        if key not in options:
            raise ConfigError(f"{method} has no option {key!r}; its options are {sorted(options)}")
        if any(k == key for k, _ in axes):
            raise ConfigError(f"grid option {key!r} given twice; list all its values in one item")
        axes.append((key, [_parse_value(v.strip()) for v in values.split(",")]))
    points = [GridPoint("baseline")] if baseline else []
    points.append(GridPoint("default"))
    seen = {json.dumps({}, sort_keys=True)}
    for combo in itertools.product(*(vals for _, vals in axes)) if axes else ():
        over = {k: v for (k, _), v in zip(axes, combo)}
        methods.build_config(method, over)  # validate now, not after an hour of generation
        norm = {k: v for k, v in over.items() if defaults.get(k) != v}
        key = json.dumps(norm, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        points.append(GridPoint("grid", over))
    return points


def pareto_front(rows: list[dict[str, Any]], x: str = "recall", y: str = "chair_i") -> list[bool]:
    """Flags of the rows no other row beats on both ``x`` (higher) and ``y`` (lower)."""
    flags = []
    for r in rows:
        dominated = any(o is not r and o[x] >= r[x] and o[y] <= r[y] and (o[x] > r[x] or o[y] < r[y]) for o in rows)
        flags.append(not dominated)
    return flags


def _testbed_data(root: Path, n: int, seed: int) -> dict[str, Path]:
    from vlmfix.testbed import scenes

    nat = scenes.write_split(root / "natural", n=n, seed=seed, kind="natural")
    adv = scenes.write_split(root / "adversarial", n=n, seed=seed, kind="adversarial")
    return {"images": adv["images"], "instances": adv["instances"], "cooccur_instances": nat["instances"]}


def run_sweep(
    model_id: str,
    method: str,
    grid: list[str],
    out: str | Path,
    *,
    n: int = 100,
    seed: int = HELD_OUT_SEED,
    instances: str | Path | None = None,
    images: str | Path | None = None,
    prompt: str = CAPTION_PROMPT,
    template: str = "plain",
    max_new_tokens: int = 24,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str = "auto",
    bootstrap_resamples: int = 1000,
) -> dict[str, Any]:
    """Run the grid and write ``sweep.json``, ``sweep.md`` and ``sweep.png`` in ``out``.

    Args:
        model_id: anything :func:`vlmfix.load` takes (``"testbed:caption_noise"``, a folder).
        method, grid: see :func:`grid_points`.
        out: run folder (created; per-point POPE/CHAIR runs go below it).
        n: images (testbed: scenes per split; real data: at most this many images).
        instances, images: a COCO ``instances.json`` and its image folder; both or
            neither (neither = testbed scenes, only for testbed models).
        prompt, template: caption prompt and POPE prompt template.
        max_new_tokens: caption length cap (POPE answers use 4).

    Returns:
        The ``sweep.json`` record.
    """
    import vlmfix
    from vlmfix import methods as registry
    from vlmfix.eval.bootstrap import BootstrapSpec
    from vlmfix.eval.chair import image_samples, load_ground_truth, run_chair
    from vlmfix.eval.pope import build_questions, load_coco_objects, run_pope

    if n < 1:
        raise ConfigError(f"n={n!r} must be >= 1")
    if (instances is None) != (images is None):
        raise ConfigError(
            "pass both --instances and --images (a COCO annotation file and its image folder), or neither"
        )
    points = grid_points(method, grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if instances is None:
        if not str(model_id).startswith("testbed"):
            raise ConfigError(f"model {model_id!r} is not a testbed model; pass --instances and --images for its data")
        data = _testbed_data(out / "data", n, seed)
    else:
        data = {"images": Path(images), "instances": Path(instances), "cooccur_instances": Path(instances)}
    objects = load_coco_objects(data["instances"])
    if data["cooccur_instances"] != data["instances"]:
        objects.cooccur = load_coco_objects(data["cooccur_instances"]).cooccur  # negatives follow the world's priors
    questions = build_questions(objects, "adversarial", n_images=n, seed=seed)
    gt = load_ground_truth(data["instances"])
    samples = image_samples(data["images"], gt, n=n, seed=seed, prompt=prompt)
    spec = BootstrapSpec(n_resamples=bootstrap_resamples, seed=0)
    model, processor = vlmfix.load(model_id, dtype=dtype, device=device)
    rows: list[dict[str, Any]] = []
    for i, point in enumerate(points):
        configs = [] if point.kind == "baseline" else [registry.build_config(method, point.overrides)]
        t0 = time.perf_counter()

        def gen(ims, prs, _c=configs, _m=max_new_tokens):
            return vlmfix.generate(model, processor, ims, prs, _c, max_new_tokens=_m).texts

        folder = out / "points" / f"{i:02d}"
        info = {"model_id": model_id, "methods": [c.to_dict() for c in configs]}
        pope = run_pope(
            {"adversarial": questions}, data["images"], folder / "pope",
            lambda ims, prs, _g=gen: _g(ims, prs, _m=4),
            template=template, batch_size=batch_size, run_info=info, bootstrap=spec,
        )["splits"]["adversarial"]  # fmt: skip
        chair = run_chair(samples, gt, folder / "chair", gen, batch_size=batch_size, bootstrap=spec)["metrics"]
        row = {
            "point": i,
            "kind": point.kind,
            "label": point.label,
            "overrides": point.overrides,
            "methods": info["methods"],
            "chair_i": chair["CHAIR_i"],
            "chair_s": chair["CHAIR_s"],
            "recall": chair["Recall"],
            "length": chair["Len"],
            "pope_adv_f1": pope["f1"],
            "pope_adv_acc": pope["accuracy"],
            "pope_adv_yes_ratio": pope["yes_ratio"],
            "ci": {
                "chair_i": chair["ci"]["CHAIR_i"],
                "chair_s": chair["ci"]["CHAIR_s"],
                "recall": chair["ci"]["Recall"],
                "length": chair["ci"].get("Len"),
                "pope_adv_f1": pope["ci"]["f1"],
                "pope_adv_acc": pope["ci"]["accuracy"],
                "pope_adv_yes_ratio": pope["ci"].get("yes_ratio"),
            },
            "seconds": round(time.perf_counter() - t0, 1),
            "folder": str(folder.relative_to(out)),
        }
        logger.info("sweep %s %s: CHAIR_i %.3f recall %.3f F1 %.3f", method, point.label, row["chair_i"],
                    row["recall"], row["pope_adv_f1"])  # fmt: skip
        rows.append(row)
    for r, flag in zip(rows, pareto_front(rows)):
        r["pareto"] = flag
    record = {
        "model_id": model_id,
        "method": method,
        "grid": grid,
        "paper_default": registry.get(method)().to_dict(),
        "data": {k: str(v) for k, v in data.items()},
        "n": n,
        "seed": seed,
        "prompt": prompt,
        "pope_template": template,
        "max_new_tokens": max_new_tokens,
        "bootstrap": spec.to_dict(),
        "vlmfix": vlmfix.__version__,
        "rows": rows,
    }
    (out / "sweep.json").write_text(json.dumps(record, indent=1, default=str))
    (out / "sweep.md").write_text(markdown_table(record) + "\n")
    plot(record, out / "sweep.png")
    return record


def _cell(row: dict[str, Any], key: str, pct: bool = True) -> str:
    v = row[key]
    ci = row["ci"].get(key)
    scale = 100 if pct else 1
    s = f"{scale * v:.1f}"
    if ci is not None:
        s += f" [{scale * ci[0]:.1f}, {scale * ci[1]:.1f}]"
    return s


def markdown_table(record: dict[str, Any]) -> str:
    """The sweep as Markdown: one row per point, 95% intervals in brackets."""
    lines = [
        f"Sweep of `{record['method']}` on `{record['model_id']}` (n={record['n']}, seed {record['seed']}); "
        "`*` = paper default, `P` = on the CHAIR_i/Recall Pareto front; 95% bootstrap intervals over images.",
        "",
        "| point | setting | CHAIR_i | CHAIR_s | Recall | Len | POPE adv F1 | POPE adv acc | yes-ratio | front |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        mark = " *" if r["kind"] == "default" else ""
        lines.append(
            f"| {r['point']} | {r['label']}{mark} | {_cell(r, 'chair_i')} | {_cell(r, 'chair_s')} | "
            f"{_cell(r, 'recall')} | {_cell(r, 'length', pct=False)} | {_cell(r, 'pope_adv_f1')} | "
            f"{_cell(r, 'pope_adv_acc')} | {_cell(r, 'pope_adv_yes_ratio')} | {'P' if r.get('pareto') else ''} |"
        )
    return "\n".join(lines)


def plot(record: dict[str, Any], path: str | Path) -> Path:
    """Two panels: CHAIR_i vs Recall (Pareto front joined) and POPE-adv F1 vs Len."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (xk, yk, xl, yl) in zip(
        axes,
        (("recall", "chair_i", "Recall", "CHAIR_i (lower is better)"),
         ("length", "pope_adv_f1", "caption length (tokens)", "POPE adversarial F1")),
    ):  # fmt: skip
        for r in rows:
            x, y = r[xk], r[yk]
            xe = r["ci"].get(xk) or [x, x]
            ye = r["ci"].get(yk) or [y, y]
            fmt, size = {"baseline": ("kx", 9), "default": ("r*", 14)}.get(r["kind"], ("C0o", 6))
            ax.errorbar(
                x, y, xerr=[[x - xe[0]], [xe[1] - x]], yerr=[[y - ye[0]], [ye[1] - y]],
                fmt=fmt, ms=size, ecolor="0.7", elinewidth=1,
            )  # fmt: skip
            ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if xk == "recall":
            front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[xk])
            ax.plot([r[xk] for r in front], [r[yk] for r in front], "g--", lw=1, label="Pareto front")
            ax.legend(fontsize=7)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.suptitle(f"{record['method']} on {record['model_id']} (red star: paper default, x: no method)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(sub) -> None:
    """Add the ``sweep`` subcommand to a ``vlmfix`` subparsers object."""
    p = sub.add_parser("sweep", help="tuning frontier: one method over a grid of its settings (CHAIR/POPE vs recall)")
    add_arguments(p)
    p.set_defaults(func=_cmd)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="method to sweep (see `vlmfix methods`)")
    p.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2,... items; their cartesian product is run")
    p.add_argument("--model", default="testbed", help="model id or folder (default: testbed)")
    p.add_argument("--out", default=None, help="run folder (default: runs/sweep-METHOD-TIMESTAMP)")
    p.add_argument("--n", type=int, default=100, help="images (testbed: held-out scenes); default 100")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--instances", default=None, help="COCO instances.json of your images (non-testbed models)")
    p.add_argument("--images", default=None, help="folder of the images that --instances describes")
    p.add_argument("--prompt", default=CAPTION_PROMPT, help="caption prompt")
    p.add_argument("--template", default="plain", help="POPE prompt template (default plain)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="caption length cap")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--bootstrap-resamples", type=int, default=1000)


def _cmd(args: argparse.Namespace) -> int:
    out = args.out or f"runs/sweep-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    record = run_sweep(
        args.model, args.method, args.grid, out, n=args.n, seed=args.seed, instances=args.instances,
        images=args.images, prompt=args.prompt, template=args.template, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        bootstrap_resamples=args.bootstrap_resamples,
    )  # fmt: skip
    print(markdown_table(record))
    print(f"\nwrote {out}/sweep.json, sweep.md, sweep.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmfix.testbed.sweep", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _cmd(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
