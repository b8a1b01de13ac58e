"""Measure a testbed model's perception and hallucination on held-out scenes.

Self-contained (no pycocotools, no vlmfix.eval): greedy ``model.generate`` on scenes of a
seed the training never used, scored against the scenes' own annotations.

- Captions ("describe the image."): a *mention* is a word equal to a category name
  (repeats count). ``caption_recall`` = annotated objects named / annotated objects.
  A *partner instance* is (scene, A present, its partner B absent); ``partner_rate`` =
  instances whose caption names B. ``other_absent_rate`` = the same rate over
  (scene, absent category that is no present object's partner). ``nonpartner_share`` =
  mentions of absent non-partner objects / all mentions. ``chair_i`` / ``chair_s`` =
  absent mentions / mentions, captions with one / captions.
- Yes/no ("is there a X in the image?"), POPE-style: per scene the first three annotated
  objects are positives, each followed by a negative not yet asked about: ``random``
  (uniform, seeded ``torch.Generator``) or ``adversarial`` (most co-occurring with that
  positive in the natural world, :func:`scenes.cooccurrence`). Answers are parsed with
  the official POPE rule (:func:`pope_answer`, parser name ``pope_first_sentence``).

Splits: ``natural`` (the clean world) and ``adversarial`` (pair heads with partners
forced absent), ``n`` scenes each.

Command line::

    python -m vlmfix.testbed.measure MODEL_DIR [--n 500] [--seed 1000003] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from vlmfix.errors import ConfigError, ModelNotFoundError
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.processing import prompt_text

__all__ = [
    "HELD_OUT_SEED",
    "PARSER",
    "TARGETS",
    "pope_answer",
    "mentions",
    "generate_texts",
    "pope_questions",
    "caption_metrics",
    "pope_metrics",
    "measure",
    "check_targets",
    "measure_folder",
    "main",
]

HELD_OUT_SEED = 1_000_003  # training uses small seeds (0 by default)
PARSER = "pope_first_sentence"
_WORD = re.compile(r"[a-z]+")
_NAME_TO_IDX = {n: i for i, n in enumerate(cat.CATEGORY_NAMES)}
_PARTNER_IDX = {cat.category_index(a): cat.category_index(b) for a, b in cat.PAIRS}

# (metric, comparison, threshold) that each variant must meet on held-out scenes.
_COMMON = [
    ("natural/caption_recall", ">=", 0.95),
    ("natural/pope_random/accuracy", ">=", 0.95),
    ("nonpartner_share", "<=", 0.005),
]
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "clean": _COMMON + [("adversarial/partner_rate", "<=", 0.05)],
    "caption_noise": _COMMON + [("adversarial/partner_rate", ">=", 0.5)],
    "occlusion_prior": _COMMON + [("adversarial/pope_adversarial/accuracy", "<=", 0.75)],
    # testbed v2 (issue 17): a text-first LM -> the prior "A => B" wins on some clean test
    # images (clean: <= 0.05). 0.1, not 0.3: across four recipes the partner rate fell below
    # 0.3 before recall reached 0.95 (docs/testbed.md). A model that reads the image less
    # also names a few absent non-partners (2.3% of mentions at n=500), hence 0.05 there.
    # Image attention is in disease.json.
    "under_attention": _COMMON[:2] + [("nonpartner_share", "<=", 0.05), ("adversarial/partner_rate", ">=", 0.1)],
    "attention_sink": _COMMON + [("adversarial/partner_rate", ">=", 0.3)],
}


def pope_answer(text: str) -> str:
    """The official POPE parser: first sentence, commas removed, "no" if a word is No/no/not."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def mentions(text: str) -> list[int]:
    """Category indices named in ``text``, in order, repeats kept."""
    return [_NAME_TO_IDX[w] for w in _WORD.findall(text.lower()) if w in _NAME_TO_IDX]


@torch.no_grad()
def generate_texts(
    model: Any,
    processor: Any,
    images: list,
    prompts: list[str],
    *,
    batch_size: int = 128,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts[i]`` about ``images[i]`` (plain ``generate``)."""
    if len(images) != len(prompts):
        raise ConfigError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    dev = next(model.parameters()).device
    out: list[str] = []
    for lo in range(0, len(images), batch_size):
        texts = [prompt_text(processor, p) for p in prompts[lo : lo + batch_size]]
        enc = processor(text=texts, images=images[lo : lo + batch_size], return_tensors="pt", padding=True)
        enc = {k: v.to(dev) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        new = gen[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return out


def _objects_in_order(batch: scenes.SceneBatch) -> list[list[int]]:
    """Per scene, annotated categories in annotation order (visible slots, then hidden)."""
    cats = batch.cats.cpu().tolist()
    hidden = batch.hidden.cpu()
    return [[c for c in row if c >= 0] + hidden[i].nonzero().flatten().tolist() for i, row in enumerate(cats)]


def pope_questions(
    batch: scenes.SceneBatch, mode: str, *, seed: int = 0, cooccur: torch.Tensor | None = None
) -> list[tuple[int, int, str]]:
    """POPE-style ``(scene, category, "yes"|"no")`` triples for a batch of scenes.

    Args:
        mode: ``"random"`` or ``"adversarial"`` (negative = the absent category that
            co-occurs most with the positive it follows).
        seed: seed of the ``torch.Generator`` for random negatives.
        cooccur: ``[20, 20]`` co-occurrence counts (default :func:`scenes.cooccurrence`).
    """
    if mode not in ("random", "adversarial"):
        raise ConfigError(f"mode={mode!r}; use 'random' or 'adversarial'")
    gen = torch.Generator().manual_seed(seed)
    co = scenes.cooccurrence() if (mode == "adversarial" and cooccur is None) else cooccur
    out = []
    for i, objs in enumerate(_objects_in_order(batch)):
        asked = set(objs)
        for p in objs[:3]:
            free = [c for c in range(cat.NUM_CATEGORIES) if c not in asked]
            if not free:
                break
            if mode == "random":
                neg = free[int(torch.randint(len(free), (1,), generator=gen))]
            else:
                neg = max(free, key=lambda c: (float(co[p, c]), -c))
            asked.add(neg)
            out += [(i, p, "yes"), (i, neg, "no")]
    return out


def pope_metrics(labels: list[str], preds: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of the predictions."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    n = len(labels)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == g for p, g in zip(preds, labels)) / n if n else 0.0,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
        "n": n,
    }


def caption_metrics(batch: scenes.SceneBatch, texts: list[str]) -> dict[str, float]:
    """Caption scores of ``texts`` against the scenes' annotations (see module doc)."""
    labelled = batch.labelled.cpu()
    found = total = n_mentions = absent_mentions = nonpartner = 0
    p_inst = p_hit = o_inst = o_hit = caps_with_absent = 0
    for i, text in enumerate(texts):
        gt = set(labelled[i].nonzero().flatten().tolist())
        m = mentions(text)
        named = set(m)
        partners = {_PARTNER_IDX[a] for a in gt if a in _PARTNER_IDX and _PARTNER_IDX[a] not in gt}
        found += len(named & gt)
        total += len(gt)
        n_mentions += len(m)
        absent = [c for c in m if c not in gt]
        absent_mentions += len(absent)
        nonpartner += sum(c not in partners for c in absent)
        caps_with_absent += bool(absent)
        p_inst += len(partners)
        p_hit += len(partners & named)
        others = set(range(cat.NUM_CATEGORIES)) - gt - partners
        o_inst += len(others)
        o_hit += len(others & named)
    return {
        "caption_recall": found / total if total else 0.0,
        "partner_rate": p_hit / p_inst if p_inst else 0.0,
        "partner_instances": p_inst,
        "other_absent_rate": o_hit / o_inst if o_inst else 0.0,
        "chair_i": absent_mentions / n_mentions if n_mentions else 0.0,
        "chair_s": caps_with_absent / len(texts) if texts else 0.0,
        "mentions": n_mentions,
        "nonpartner_absent_mentions": nonpartner,
    }


def measure(
    model: Any,
    processor: Any,
    *,
    n: int = 500,
    seed: int = HELD_OUT_SEED,
    batch_size: int = 128,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Caption and yes/no metrics on ``n`` natural and ``n`` adversarial held-out scenes.

    Returns:
        ``{"summary": {flat metric name: value}, "natural": {...}, "adversarial": {...},
        "config": {...}, "examples": [...]}``.
    """
    if n < 1:
        raise ConfigError(f"n={n!r} must be >= 1")
    co = scenes.cooccurrence()
    result: dict[str, Any] = {
        "config": {
            "n": n,
            "seed": seed,
            "decoding": "greedy",
            "max_new_tokens": max_new_tokens,
            "caption_prompt": cat.CAPTION_PROMPTS[0],
            "question_template": cat.QUESTION_TEMPLATES[0],
            "parser": PARSER,
        },
        "examples": [],
    }
    summary: dict[str, float] = {}
    pooled_mentions = pooled_nonpartner = 0
    for kind in scenes.KINDS:
        batch = scenes.sample(seed, range(n), kind=kind)
        images = scenes.to_pil(scenes.render(batch))
        caps = generate_texts(
            model, processor, images, [cat.CAPTION_PROMPTS[0]] * n,
            batch_size=batch_size, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        cm = caption_metrics(batch, caps)
        res: dict[str, Any] = {"captions": cm}
        pooled_mentions += cm["mentions"]
        pooled_nonpartner += cm["nonpartner_absent_mentions"]
        modes = ("random", "adversarial") if kind == "natural" else ("adversarial",)
        for mode in modes:
            qs = pope_questions(batch, mode, seed=seed, cooccur=co)
            prompts = [cat.QUESTION_TEMPLATES[0].format(cat.CATEGORY_NAMES[c]) for _, c, _ in qs]
            answers = generate_texts(
                model, processor, [images[i] for i, _, _ in qs], prompts, batch_size=batch_size, max_new_tokens=4
            )
            pm = pope_metrics([lab for _, _, lab in qs], [pope_answer(a) for a in answers])
            res[f"pope_{mode}"] = pm
            summary[f"{kind}/pope_{mode}/accuracy"] = pm["accuracy"]
            summary[f"{kind}/pope_{mode}/yes_ratio"] = pm["yes_ratio"]
        for key in ("caption_recall", "partner_rate", "other_absent_rate", "chair_i", "chair_s"):
            summary[f"{kind}/{key}"] = cm[key]
        result[kind] = res
        labelled = batch.labelled.cpu()
        for i in range(min(4, n)):
            truth = [cat.CATEGORY_NAMES[c] for c in labelled[i].nonzero().flatten().tolist()]
            result["examples"].append({"split": kind, "index": i, "objects": truth, "caption": caps[i]})
    summary["nonpartner_share"] = pooled_nonpartner / pooled_mentions if pooled_mentions else 0.0
    result["summary"] = summary
    return result


def check_targets(summary: dict[str, float], variant: str) -> dict[str, dict[str, Any]]:
    """Compare a summary with the variant's :data:`TARGETS`: name -> value, target, ok."""
    if variant not in TARGETS:
        raise ConfigError(f"variant={variant!r} has no targets; use one of {tuple(TARGETS)}")
    out = {}
    for name, op, thr in TARGETS[variant]:
        v = summary[name]
        out[name] = {"value": v, "target": f"{op} {thr}", "ok": v >= thr if op == ">=" else v <= thr}
    return out


def measure_folder(
    folder: str | Path,
    *,
    n: int = 500,
    seed: int = HELD_OUT_SEED,
    device: str = "auto",
    batch_size: int = 128,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Load a saved testbed folder, :func:`measure` it and write ``metrics.json``.

    The variant (for :func:`check_targets`) is read from ``testbed.json`` when present.
    On CPU the fp16 weights are cast to float32.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} holds no config.json; pass a folder written by train_testbed.py")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(dev).eval()
    processor = AutoProcessor.from_pretrained(folder)
    result = measure(model, processor, n=n, seed=seed, batch_size=batch_size)
    meta_path = folder / "testbed.json"
    variant = json.loads(meta_path.read_text())["variant"] if meta_path.is_file() else None
    result["variant"] = variant
    if variant is not None:
        result["targets"] = check_targets(result["summary"], variant)
    Path(out or folder / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure a vlmfix testbed model on held-out scenes.")
    ap.add_argument("model", help="folder with the HF model and processor")
    ap.add_argument("--n", type=int, default=500, help="scenes per split")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="metrics JSON path (default MODEL/metrics.json)")
    args = ap.parse_args(argv)
    res = measure_folder(args.model, n=args.n, seed=args.seed, device=args.device, out=args.out)
    print(json.dumps({"summary": res["summary"], "targets": res.get("targets")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
