"""Measure the disease before any method: image attention, attention sinks, hallucination.

PAI and PAINT treat *under-attention to the image* (too little attention mass on image
tokens in the middle layers); VAR treats *visual attention sinks* (image tokens with
massive activations in a few fixed hidden dims soaking up attention). Whether a method can
help a model depends on whether the model has that disease, so this module measures it,
with no method attached, on held-out testbed scenes:

- **image attention mass per layer**: attention of the *last prompt row* (the query that
  emits the first answer token) on image keys, averaged over heads; one eager forward per
  batch whose ``[B, H, T, T]`` attention matrices are reduced to that row at once and
  dropped (nothing dense is kept).
- **sinks per layer** with VAR's own rule (:mod:`vlmfix.methods.var`):
  ``phi(x) = max_{d in D} |RMSNorm(x)[d]|`` on the layer's *input* hidden state, at the
  paper's ``tau = 20`` and at :func:`~vlmfix.methods.var.scaled_tau` (the same share of the
  ``sqrt(hidden)`` bound). ``D`` is the known table for LLaMA-2 LMs, else discovered as
  VAR does: per sample and layer, the ``num_dims`` largest ``|RMSNorm(x)|`` dims of the
  first non-pad token (the BOS). Reported: image-token and text-token sinks per sample,
  the BOS ``phi``, the most frequent discovered dims and the massive-activation ratio
  ``max |x| / median |x|`` (Sun et al. 2024 call ~1e3 massive; a fresh model has ~5).
- **hallucination**: caption recall, CHAIR_i / CHAIR_s, partner-hallucination rate
  (:mod:`.measure`'s definitions), POPE (random on the natural split, adversarial on the
  adversarial split) with the official parser.
- **does hallucination rise as image attention falls?** the mean middle-layer image mass
  of adversarial captions that name an absent partner vs. those that do not.

Every number carries a seeded percentile-bootstrap 95% interval over scenes
(:mod:`vlmfix.eval.bootstrap`). Command line (writes ``disease.json`` / ``disease.md`` to a
run folder)::

    python -m vlmfix.testbed.disease testbed:caption_noise --n 200 [--out runs/disease-x]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmfix.errors import ConfigError
from vlmfix.testbed.catalog import CAPTION_PROMPTS

DEFAULT_PROMPT = CAPTION_PROMPTS[0]  # "describe the image."

__all__ = [
    "attention_and_sinks",
    "hallucination_counts",
    "measure_disease",
    "measure_folder_disease",
    "markdown_report",
    "main",
]

logger = logging.getLogger(__name__)

PAPER_TAU = 20.0
RMS_EPS = 1e-6  # as VAR (the released code's eps)


@torch.no_grad()
def attention_and_sinks(
    model: Any,
    processor: Any,
    images: list,
    prompt: str,
    *,
    batch_size: int = 32,
    num_dims: int = 2,
    taus: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Per image and layer: last-row image attention mass and sink counts (no method).

    Args:
        model: an HF LLaVA-family model (its attention implementation is switched to
            ``eager`` for the pass and restored).
        images, prompt: PIL images and one user prompt for all.
        num_dims: dims discovered from the BOS when the LM has no known sink dims.
        taus: sink thresholds (default: the paper's 20 and the scaled one).

    Returns:
        ``{"image_mass": [N, L], "image_sinks": {tau: [N, L]}, "text_sinks": {tau: [N, L]},
        "bos_phi": [N, L], "massive_ratio": [N, L], "dims": {layer: [[dim, count], ...]},
        "dims_source": "table" | "discovered", "taus": [...], "hidden_size": E}`` (numpy).
    """
    from vlmfix.adapters import get_adapter
    from vlmfix.methods._attn_utils import rms_normalise
    from vlmfix.methods.var import known_sink_dims, scaled_tau
    from vlmfix.testbed.processing import prompt_text

    adapter = get_adapter(model)
    text_config = adapter.text_config(model)
    hidden = int(text_config.hidden_size)
    taus = tuple(taus or (PAPER_TAU, round(scaled_tau(hidden, PAPER_TAU), 3)))
    fixed = known_sink_dims(text_config)
    image_id = adapter.image_token_id(model)
    dev = next(model.parameters()).device
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    mass, bos_phi, ratio = [], [], []
    img_sinks: dict[float, list] = {t: [] for t in taus}
    txt_sinks: dict[float, list] = {t: [] for t in taus}
    dims_count: dict[int, Counter] = {}
    try:
        for lo in range(0, len(images), batch_size):
            ims = images[lo : lo + batch_size]
            enc = processor(text=[prompt_text(processor, prompt)] * len(ims), images=ims, return_tensors="pt",
                            padding=True)  # fmt: skip
            enc = {k: v.to(dev) for k, v in enc.items()}
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            out = model(**enc, output_attentions=True, output_hidden_states=True, use_cache=False)
            ids = enc["input_ids"]
            valid = enc.get("attention_mask", torch.ones_like(ids)).bool()
            is_img = ids == image_id  # [B, T]
            first = valid.to(torch.int8).argmax(-1)  # first non-pad token: the BOS
            rows = torch.arange(ids.shape[0], device=dev)
            m_l, phi_l, r_l = [], [], []
            s_img: dict[float, list] = {t: [] for t in taus}
            s_txt: dict[float, list] = {t: [] for t in taus}
            for layer, attn in enumerate(out.attentions):
                last = attn[:, :, -1, :].float()  # [B, H, T]: the row of the first answer token
                m_l.append((last * is_img[:, None, :]).sum(-1).mean(1))
                h = rms_normalise(out.hidden_states[layer], RMS_EPS)  # layer input, [B, T, E]
                if fixed:
                    dims = torch.tensor(fixed, device=dev).expand(h.shape[0], -1)
                else:
                    dims = h[rows, first].abs().topk(min(num_dims, hidden), dim=-1).indices  # [B, k]
                counter = dims_count.setdefault(layer, Counter())
                counter.update(int(d) for d in dims.flatten().tolist())
                phi = h.gather(-1, dims[:, None, :].expand(-1, h.shape[1], -1)).abs().amax(-1)  # [B, T]
                phi_l.append(phi[rows, first])
                raw = out.hidden_states[layer].float().abs()
                med = raw.median(dim=-1).values.clamp_min(1e-12)  # [B, T]
                r_l.append(torch.where(valid, raw.amax(-1) / med, torch.zeros_like(med)).amax(-1))
                for t in taus:
                    sink = (phi > t) & valid
                    s_img[t].append((sink & is_img).sum(-1))
                    s_txt[t].append((sink & ~is_img).sum(-1))
                del attn
            mass.append(torch.stack(m_l, 1).cpu())
            bos_phi.append(torch.stack(phi_l, 1).cpu())
            ratio.append(torch.stack(r_l, 1).cpu())
            for t in taus:
                img_sinks[t].append(torch.stack(s_img[t], 1).cpu())
                txt_sinks[t].append(torch.stack(s_txt[t], 1).cpu())
            del out
    finally:
        model.set_attn_implementation(previous)
    return {
        "image_mass": torch.cat(mass).numpy(),
        "image_sinks": {t: torch.cat(v).numpy().astype(float) for t, v in img_sinks.items()},
        "text_sinks": {t: torch.cat(v).numpy().astype(float) for t, v in txt_sinks.items()},
        "bos_phi": torch.cat(bos_phi).numpy(),
        "massive_ratio": torch.cat(ratio).numpy(),
        "dims": {layer: [list(x) for x in c.most_common(4)] for layer, c in dims_count.items()},
        "dims_source": "table" if fixed else "discovered",
        "taus": list(taus),
        "hidden_size": hidden,
    }


def hallucination_counts(batch, captions: list[str]) -> np.ndarray:
    """Per-scene caption counts ``[N, 8]``: found, gt, mentions, absent mentions,
    caption has an absent mention, 1 (caption), partner instances, partners named."""
    from vlmfix.testbed import catalog as cat
    from vlmfix.testbed.measure import mentions

    partner = {cat.category_index(a): cat.category_index(b) for a, b in cat.PAIRS}
    labelled = batch.labelled.cpu()
    rows = []
    for i, text in enumerate(captions):
        gt = set(labelled[i].nonzero().flatten().tolist())
        m = mentions(text)
        named = set(m)
        partners = {partner[a] for a in gt if a in partner and partner[a] not in gt}
        absent = [c for c in m if c not in gt]
        rows.append([len(named & gt), len(gt), len(m), len(absent), bool(absent), 1, len(partners),
                     len(partners & named)])  # fmt: skip
    return np.asarray(rows, dtype=float)


def _caption_fn(t: np.ndarray) -> dict[str, np.ndarray]:
    from vlmfix.eval.bootstrap import safe_div

    return {
        "recall": safe_div(t[:, 0], t[:, 1]),
        "chair_i": safe_div(t[:, 3], t[:, 2]),
        "chair_s": safe_div(t[:, 4], t[:, 5]),
        "partner_rate": safe_div(t[:, 7], t[:, 6]),
    }


def _pope_fn(t: np.ndarray) -> dict[str, np.ndarray]:
    from vlmfix.eval.bootstrap import safe_div

    tp, fp, fn, tn = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
    prec, rec = safe_div(tp, tp + fp), safe_div(tp, tp + fn)
    return {
        "accuracy": safe_div(tp + tn, tp + fp + fn + tn),
        "f1": safe_div(2 * prec * rec, prec + rec),
        "yes_ratio": safe_div(tp + fp, tp + fp + fn + tn),
    }


def _mass_diff_fn(t: np.ndarray) -> dict[str, np.ndarray]:
    from vlmfix.eval.bootstrap import safe_div

    return {"difference": safe_div(t[:, 0], t[:, 1]) - safe_div(t[:, 2], t[:, 3])}


def _point_and_ci(counts: np.ndarray, fn, spec) -> dict[str, dict[str, Any]]:
    from vlmfix.eval.bootstrap import bootstrap_intervals

    point = {k: float(v[0]) for k, v in fn(counts.sum(0, keepdims=True)).items()}
    ci = bootstrap_intervals(counts, fn, spec)
    return {k: {"value": point[k], "ci": ci[k]} for k in point}


def _per_layer(values: np.ndarray, spec) -> list[dict[str, Any]]:
    """Mean over scenes of each column of ``[N, L]``, with a bootstrap interval over scenes."""
    from vlmfix.eval.bootstrap import bootstrap_intervals

    n, n_layers = values.shape
    counts = np.concatenate([values, np.ones((n, 1))], axis=1)

    def fn(t):
        return {str(layer): t[:, layer] / t[:, -1] for layer in range(n_layers)}

    ci = bootstrap_intervals(counts, fn, spec)
    return [{"value": float(values[:, layer].mean()), "ci": ci[str(layer)]} for layer in range(n_layers)]


def measure_disease(
    model: Any,
    processor: Any,
    *,
    n: int = 200,
    seed: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    bootstrap_resamples: int = 1000,
    prompt: str | None = None,
) -> dict[str, Any]:
    """The disease record of a testbed model (see module doc) on ``n`` scenes per split.

    ``prompt``: the caption prompt, also the one whose last row gives the image mass
    (default "describe the image."); e.g. a distracting instruction before it measures how
    image attention and hallucination move with it. POPE questions are unchanged.
    """
    from vlmfix.eval.bootstrap import BootstrapSpec, bootstrap_intervals
    from vlmfix.testbed import catalog as cat
    from vlmfix.testbed import scenes
    from vlmfix.testbed.measure import HELD_OUT_SEED, PARSER, generate_texts, pope_answer, pope_questions

    if n < 2:
        raise ConfigError(f"n={n!r} must be >= 2 (intervals need two scenes)")
    seed = HELD_OUT_SEED if seed is None else seed
    spec = BootstrapSpec(n_resamples=bootstrap_resamples, seed=0)
    co = scenes.cooccurrence()
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if not prompt.strip():
        raise ConfigError("prompt is empty; pass a caption prompt such as 'describe the image.'")
    record: dict[str, Any] = {
        "config": {"n": n, "seed": seed, "prompt": prompt, "parser": PARSER, "max_new_tokens": max_new_tokens,
                   "decoding": "greedy", "attention_row": "last prompt token", "bootstrap": spec.to_dict()},
    }  # fmt: skip
    for kind in scenes.KINDS:
        batch = scenes.sample(seed, range(n), kind=kind)
        images = scenes.to_pil(scenes.render(batch))
        att = attention_and_sinks(model, processor, images, prompt, batch_size=batch_size)
        caps = generate_texts(model, processor, images, [prompt] * n, batch_size=batch_size,
                              max_new_tokens=max_new_tokens)  # fmt: skip
        counts = hallucination_counts(batch, caps)
        mode = "random" if kind == "natural" else "adversarial"
        qs = pope_questions(batch, mode, seed=seed, cooccur=co)
        answers = generate_texts(model, processor, [images[i] for i, _, _ in qs],
                                 [cat.QUESTION_TEMPLATES[0].format(cat.CATEGORY_NAMES[c]) for _, c, _ in qs],
                                 batch_size=batch_size, max_new_tokens=4)  # fmt: skip
        pope = np.zeros((n, 4))
        for (i, _, label), a in zip(qs, answers):
            pred = pope_answer(a)
            pope[i, {("yes", "yes"): 0, ("yes", "no"): 1, ("no", "yes"): 2, ("no", "no"): 3}[(pred, label)]] += 1
        n_layers = att["image_mass"].shape[1]
        middle = att["image_mass"][:, 1 : max(2, n_layers - 1)].mean(1)  # layers 1 .. L-2
        res: dict[str, Any] = {
            "image_mass": _per_layer(att["image_mass"], spec),
            "middle_image_mass": _per_layer(middle[:, None], spec)[0],
            "sinks": {
                str(t): {
                    "image": _per_layer(att["image_sinks"][t], spec),
                    "text": _per_layer(att["text_sinks"][t], spec),
                }
                for t in att["taus"]
            },
            "bos_phi": _per_layer(att["bos_phi"], spec),
            "massive_ratio": _per_layer(att["massive_ratio"], spec),
            "dims": {str(k): v for k, v in att["dims"].items()},
            "captions": _point_and_ci(counts, _caption_fn, spec),
            f"pope_{mode}": _point_and_ci(pope, _pope_fn, spec),
            "examples": [{"index": i, "caption": caps[i]} for i in range(min(3, n))],
        }
        hall = counts[:, 7] > 0
        if kind == "adversarial" and hall.any() and (~hall).any():
            # Does hallucination come with less image attention? Middle-layer mass of the
            # captions naming an absent partner vs the others (a bootstrap over scenes of
            # the difference of the two group means).
            m_counts = np.stack([middle * hall, hall, middle * ~hall, ~hall], 1).astype(float)
            diff_ci = bootstrap_intervals(m_counts, _mass_diff_fn, spec)["difference"]
            res["mass_vs_hallucination"] = {
                "hallucinated": float(middle[hall].mean()),
                "clean": float(middle[~hall].mean()),
                "difference": float(middle[hall].mean() - middle[~hall].mean()),
                "ci": diff_ci,
                "n_hallucinated": int(hall.sum()),
            }
        record[kind] = res
    record["taus"] = att["taus"]
    record["hidden_size"] = att["hidden_size"]
    record["dims_source"] = att["dims_source"]
    record["num_layers"] = n_layers
    return record


def _v(x: dict[str, Any], pct: bool = True, digits: int = 1) -> str:
    s = 100 if pct else 1
    return f"{s * x['value']:.{digits}f} [{s * x['ci'][0]:.{digits}f}, {s * x['ci'][1]:.{digits}f}]"


def markdown_report(record: dict[str, Any], name: str = "") -> str:
    """The disease record as Markdown tables (95% bootstrap intervals in brackets)."""
    t_paper, t_scaled = record["taus"][0], record["taus"][-1]
    lines = [f"### Disease of {name or 'the model'} (n={record['config']['n']} scenes per split, no method)", ""]
    if record["config"]["prompt"] != DEFAULT_PROMPT:
        lines += [f"Caption prompt: `{record['config']['prompt']}` (POPE questions unchanged).", ""]
    lines += [
        f"Per layer, adversarial split, last prompt row. Sinks: tokens per scene with phi > tau "
        f"(paper tau={t_paper}, scaled tau={t_scaled} for hidden {record['hidden_size']}; dims "
        f"{record['dims_source']}). Massive ratio: max|x| / median|x| of the layer input.",
        "",
        f"| layer | image mass % | image sinks tau={t_paper} | image sinks tau={t_scaled} | "
        f"text sinks tau={t_scaled} | BOS phi | massive ratio | top dims |",
        "|---|---|---|---|---|---|---|---|",
    ]
    adv = record["adversarial"]
    for layer in range(record["num_layers"]):
        dims = ", ".join(f"{d}×{c}" for d, c in adv["dims"].get(str(layer), [])[:2])
        lines.append(
            f"| {layer} | {_v(adv['image_mass'][layer])} | {_v(adv['sinks'][str(t_paper)]['image'][layer], False, 2)} | "
            f"{_v(adv['sinks'][str(t_scaled)]['image'][layer], False, 2)} | "
            f"{_v(adv['sinks'][str(t_scaled)]['text'][layer], False, 2)} | {_v(adv['bos_phi'][layer], False)} | "
            f"{_v(adv['massive_ratio'][layer], False)} | {dims} |"
        )
    lines += ["", "| split | middle image mass % | recall % | CHAIR_i % | CHAIR_s % | partner rate % | POPE acc % | "
              "POPE F1 % | yes % |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("natural", "adversarial"):
        r = record[kind]
        c = r["captions"]
        p = r.get("pope_random") or r["pope_adversarial"]
        mode = "random" if "pope_random" in r else "adversarial"
        lines.append(
            f"| {kind} (POPE {mode}) | {_v(r['middle_image_mass'])} | {_v(c['recall'])} | {_v(c['chair_i'])} | "
            f"{_v(c['chair_s'])} | {_v(c['partner_rate'])} | {_v(p['accuracy'])} | {_v(p['f1'])} | {_v(p['yes_ratio'])} |"
        )
    mv = adv.get("mass_vs_hallucination")
    if mv:
        lines += ["", f"Middle-layer image mass of adversarial captions naming an absent partner "
                  f"({mv['n_hallucinated']}): {100 * mv['hallucinated']:.1f}% vs {100 * mv['clean']:.1f}% for the "
                  f"others; difference {100 * mv['difference']:+.1f} points "
                  f"[{100 * mv['ci'][0]:+.1f}, {100 * mv['ci'][1]:+.1f}]."]  # fmt: skip
    return "\n".join(lines)


def measure_folder_disease(
    folder: str | Path, *, n: int = 200, device: str = "auto", out: str | Path | None = None
) -> dict[str, Any]:
    """Measure a saved testbed folder and write ``disease.json`` / ``disease.md`` (default: in
    ``folder``, beside ``metrics.json``; :func:`scripts/train_testbed.py --measure` does this).

    Returns:
        The record, plus ``"markdown"``.
    """
    import vlmfix

    folder = Path(folder)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float16" if device.startswith("cuda") else "float32"
    model, processor = vlmfix.load(str(folder), dtype=dtype, device=device)
    record = measure_disease(model, processor, n=n, batch_size=128 if device.startswith("cuda") else 32)
    record["model"] = str(folder)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "disease.json").write_text(json.dumps(record, indent=1))
    md = markdown_report(record, folder.name)
    (out / "disease.md").write_text(md + "\n")
    return {**record, "markdown": md}


def main(argv: list[str] | None = None) -> int:
    import vlmfix

    ap = argparse.ArgumentParser(prog="python -m vlmfix.testbed.disease", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="testbed:VARIANT, or a folder written by train_testbed.py")
    ap.add_argument("--n", type=int, default=200, help="scenes per split (default 200)")
    ap.add_argument("--seed", type=int, default=None, help="held-out seed (default 1000003)")
    ap.add_argument("--out", default=None, help="run folder (default runs/disease-NAME-TIMESTAMP)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bootstrap-resamples", type=int, default=1000)
    ap.add_argument("--prompt", default=None, help="caption prompt (default 'describe the image.')")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name = Path(args.model).name if Path(args.model).is_dir() else args.model.replace(":", "-")
    out = Path(args.out or f"runs/disease-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    model, processor = vlmfix.load(args.model, dtype="float32", device=args.device or "cpu")
    record = measure_disease(model, processor, n=args.n, seed=args.seed, batch_size=args.batch_size,
                             bootstrap_resamples=args.bootstrap_resamples, prompt=args.prompt)  # fmt: skip
    record["model"] = args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "disease.json").write_text(json.dumps(record, indent=1))
    md = markdown_report(record, args.model)
    (out / "disease.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out}/disease.json, disease.md")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
