"""Train a testbed variant: scenes rendered on the fly (on the GPU when there is one).

One command per variant::

    python scripts/train_testbed.py --variant caption_noise --out vlmfix/testbed/models/caption_noise --measure

Every training sequence is the processor's chat template applied to
``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]``
with ``add_generation_prompt=True``, tokenized by the saved processor (so ``<image>``
expands to 64 tokens), followed by the answer and ``</s>``. The loss covers the answer
and ``</s>`` only. Half the sequences are captions ("describe the image." and "please
describe this image in detail."), half yes/no questions ("is there a X in the image?",
30% with the LLaVA POPE suffix), with half "yes" (a random annotated object) and half
"no" (a random unannotated one).

Sequence ``j`` of the run uses scene ``(seed, j)`` and draws its task from the same
counter-based hash, so a run is a function of its arguments. The prompt token table
is made once through the real processor; answers are assembled from word ids, and a
unit test checks both against the processor end to end.

Outputs in ``--out``: the HF model (fp16 safetensors) and processor files,
``train_log.csv`` (step, loss, lr, elapsed), ``testbed.json`` (recipe, parameter
count, timings) and, with ``--measure``, ``metrics.json`` (see :mod:`.measure`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmfix.errors import ConfigError
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.processing import VOCAB, build_processor, normalize, prompt_text

__all__ = [
    "TrainConfig",
    "VARIANT_RECIPES",
    "PromptTable",
    "TrainBatch",
    "caption_answers",
    "make_batch",
    "train",
    "main",
]

logger = logging.getLogger(__name__)

_IGNORE = -100
_BUDGET_PROBE = (10, 40)  # steps timed to size a run to time_budget_s
_MAX_ANSWER = 3 * 8 + 2  # up to 8 named objects: "a x" + 7 x "and a x" + "." + "</s>"


# Per-variant recipe overrides of TrainConfig's defaults (testbed v2, issue 17).
#
# under_attention: a text-only first stage, then vision. For 600 steps every image is the
# scene's empty background, so the LM learns the captions' prior ("A => B") before it can
# see, as an LLM does before visual instruction tuning; then 4000 steps with images at a
# constant lr of 5e-4. Stopped there (recall ~95%), the model reads the image less than the
# v1 models do and names absent partners; trained on, it outgrows the disease (docs/testbed.md
# has the trajectory). The constant second-stage lr makes a snapshot at step k the same
# model as a run with steps=k.
#
# attention_sink: the attention-sink study (Gu et al., "When Attention Sink Emerges in
# Language Models", ICLR 2025) finds sinks emerge after effective optimisation on enough
# data with softmax attention and a fixed first token, and grow with weight decay and
# learning rate; so a long text-only stage scored on every text token (LM pretraining) at
# lr 3e-3 and weight decay 0.1, then images. None of three attempts (docs/testbed.md) produced
# massive activations.
VARIANT_RECIPES: dict[str, dict[str, Any]] = {
    "under_attention": {"blind_steps": 600, "finetune_lr": 5e-4, "steps": 4600},
    "attention_sink": {
        "blind_steps": 6000, "prompt_loss": True, "lr": 3e-3, "finetune_lr": 1e-3, "steps": 8000,
        "weight_decay": 0.1, "warmup_steps": 300,
    },  # fmt: skip
}


@dataclass
class TrainConfig:
    """Recipe of one training run (defaults: the shipped models)."""

    variant: str = cat.DEFAULT_VARIANT
    strength: float | None = field(default=None, metadata={"help": "mechanism strength; None = variant default"})
    steps: int = 2888  # the shipped models: 1.48M sequences, ~140 s on one H100
    batch_size: int = 512
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    caption_fraction: float = 0.5
    pope_suffix_fraction: float = 0.3
    long_caption_prompt_fraction: float = 0.3
    chunk_steps: int = 16
    log_every: int = 50
    time_limit_s: float | None = None
    time_budget_s: float | None = None
    device: str = "auto"
    blind_steps: int = field(default=0, metadata={"help": "first steps on blank images (a text-only LM stage)"})
    finetune_lr: float | None = field(default=None, metadata={"help": "constant lr after blind_steps (None: one cosine)"})
    finetune_warmup: int = 50
    prompt_loss: bool = False
    save_at: tuple[int, ...] = ()

    @classmethod
    def for_variant(cls, variant: str, **overrides: Any) -> TrainConfig:
        """The recipe of ``variant``: defaults, then :data:`VARIANT_RECIPES`, then ``overrides``."""
        return cls(**{"variant": variant, **VARIANT_RECIPES.get(variant, {}), **overrides})

    def __post_init__(self):
        if self.variant not in cat.VARIANTS:
            raise ConfigError(f"variant={self.variant!r} is not a testbed variant; use one of {cat.VARIANTS}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"strength={self.strength!r} must lie in [0, 1]")
        for name in ("steps", "batch_size", "chunk_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.time_budget_s is not None and self.warmup_steps < _BUDGET_PROBE[1]:
            raise ConfigError(f"time_budget_s needs warmup_steps >= {_BUDGET_PROBE[1]} (steps are fixed during warmup)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr!r} must be > 0")
        if not 0 <= self.blind_steps < self.steps:
            raise ConfigError(
                f"blind_steps={self.blind_steps!r} must lie in [0, steps={self.steps}): the run needs image steps"
            )
        if self.finetune_lr is not None and (self.finetune_lr <= 0 or not self.blind_steps):
            raise ConfigError(f"finetune_lr={self.finetune_lr!r} needs blind_steps > 0 and must be > 0")
        if self.finetune_warmup < 1:
            raise ConfigError(f"finetune_warmup={self.finetune_warmup!r} must be >= 1")
        bad = [k for k in self.save_at if not 0 < k < self.steps]
        if bad:
            raise ConfigError(f"save_at steps {bad} must lie in (0, steps={self.steps}); the last step is saved anyway")
        for name in ("caption_fraction", "pope_suffix_fraction", "long_caption_prompt_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must lie in [0, 1]")


class PromptTable:
    """Token ids of every training prompt, made through the real processor.

    Rows: the caption prompts, then for each category ``c`` the question about ``c``
    without and with the POPE suffix (row ``n_caption + 2 * c + suffix``).
    """

    def __init__(self, processor: Any, device: torch.device | str = "cpu"):
        from PIL import Image

        texts = list(cat.CAPTION_PROMPTS)
        for name in cat.CATEGORY_NAMES:
            q = cat.QUESTION_TEMPLATES[0].format(name)
            texts += [q, q + cat.POPE_SUFFIX]
        self.texts = texts
        blank = Image.new("RGB", (cat.IMAGE_SIZE, cat.IMAGE_SIZE))
        rows = []
        for t in texts:
            enc = processor(text=[prompt_text(processor, t)], images=[blank], return_tensors="pt")
            rows.append(enc["input_ids"][0])
        self.lengths = torch.tensor([len(r) for r in rows], device=device)
        self.ids = torch.full((len(rows), int(self.lengths.max())), VOCAB["<pad>"], dtype=torch.long)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = r
        self.ids = self.ids.to(device)
        self.n_caption = len(cat.CAPTION_PROMPTS)

    def question_row(self, category: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        return self.n_caption + 2 * category + suffix.long()


def caption_answers(mentioned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids of the canonical captions (+ ``</s>``) of ``mentioned`` ``[N, 20]`` rows.

    Returns:
        ``(ids [N, 26], lengths [N])``, padded with ``<pad>``.
    """
    n = mentioned.shape[0]
    dev = mentioned.device
    ans = torch.full((n, _MAX_ANSWER), VOCAB["<pad>"], dtype=torch.long, device=dev)
    rows = torch.arange(n, device=dev)
    rank = mentioned.long().cumsum(1) - 1  # j-th named object of the caption
    count = mentioned.sum(1)
    if int(count.max()) > 8 or int(count.min()) < 1:
        raise ConfigError("captions must name between 1 and 8 objects")
    word = torch.tensor([VOCAB[c] for c in cat.CATEGORY_NAMES], device=dev)
    for k in range(cat.NUM_CATEGORIES):
        m = mentioned[:, k]
        j = rank[:, k]
        first = m & (j == 0)
        later = m & (j > 0)
        start = 3 * j - 1
        ans[rows[first], 0] = VOCAB["a"]
        ans[rows[first], 1] = word[k]
        ans[rows[later], start[later]] = VOCAB["and"]
        ans[rows[later], start[later] + 1] = VOCAB["a"]
        ans[rows[later], start[later] + 2] = word[k]
    end = 3 * count - 1
    ans[rows, end] = VOCAB["."]
    ans[rows, end + 1] = VOCAB["</s>"]
    return ans, end + 2


@dataclass
class TrainBatch:
    """Tensors of one training batch.

    Attributes:
        input_ids: ``[N, T]`` prompt + answer + ``</s>``, right-padded with ``<pad>``.
        targets: ``[N, T]`` the token at each answer / ``</s>`` position, else -100.
        pixel_values: ``[N, 3, 64, 64]`` normalised images.
        prompt_rows: ``[N]`` row of :class:`PromptTable` each sequence's prompt came from.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    pixel_values: torch.Tensor
    prompt_rows: torch.Tensor


def make_batch(batch: scenes.SceneBatch, table: PromptTable, cfg: TrainConfig, *, blind: bool = False) -> TrainBatch:
    """Training tensors for one batch of scenes (one sequence per scene).

    ``blind``: every image is the scene's empty background (no glyphs), as in the text-only
    stage of a ``blind_steps`` recipe; the texts are the scenes' own. ``cfg.prompt_loss``
    adds the prompt's text tokens (not ``<image>``) to the loss, as in LM pretraining.
    """
    dev = batch.indices.device
    n = len(batch)
    rng = scenes.HashRng(cfg.seed ^ 0x5EED, batch.indices)
    is_caption = rng.bernoulli("task", cfg.caption_fraction)
    long_prompt = rng.bernoulli("long_caption", cfg.long_caption_prompt_fraction)
    suffix = rng.bernoulli("pope_suffix", cfg.pope_suffix_fraction)
    want_yes = rng.bernoulli("yes", 0.5)
    labelled = batch.labelled
    keys = rng.keys("question", cat.NUM_CATEGORIES)
    yes_cat = keys.masked_fill(~labelled, -1).argmax(1)
    no_cat = keys.masked_fill(labelled, -1).argmax(1)
    q_cat = torch.where(want_yes, yes_cat, no_cat)

    cap_ids, cap_len = caption_answers(batch.mentioned)
    qa_ids = torch.full_like(cap_ids, VOCAB["<pad>"])
    qa_ids[:, 0] = torch.where(want_yes, VOCAB["yes"], VOCAB["no"])
    qa_ids[:, 1] = VOCAB["</s>"]
    ans = torch.where(is_caption[:, None], cap_ids, qa_ids)
    ans_len = torch.where(is_caption, cap_len, torch.full_like(cap_len, 2))
    prow = torch.where(is_caption, long_prompt.long(), table.question_row(q_cat, suffix))

    p_len = table.lengths[prow]
    total = p_len + ans_len
    t_max = int(total.max())
    t_max = -(-t_max // 8) * 8
    t = torch.arange(t_max, device=dev)[None, :]
    in_prompt = t < p_len[:, None]
    valid = t < total[:, None]
    p_ids = table.ids[prow].gather(1, t.clamp(max=table.ids.shape[1] - 1).expand(n, -1))
    a_ids = ans.gather(1, (t - p_len[:, None]).clamp(0, ans.shape[1] - 1))
    ids = torch.where(in_prompt, p_ids, a_ids).masked_fill(~valid, VOCAB["<pad>"])
    unscored = ~valid | (in_prompt & ((ids == VOCAB["<image>"]) | (not cfg.prompt_loss)))
    targets = ids.masked_fill(unscored, _IGNORE)
    if blind:
        images = batch.bg.to(torch.uint8)[:, None, None, None].expand(-1, cat.IMAGE_SIZE, cat.IMAGE_SIZE, 3)
    else:
        images = scenes.render(batch)
    return TrainBatch(ids, targets, normalize(images), prow)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup then cosine to ``min_lr_ratio * lr`` at ``steps``; with ``finetune_lr``, the
    cosine ends at ``blind_steps`` and the image stage warms up to a constant ``finetune_lr``
    (so a snapshot at step k is the same model as a run of ``steps=k``)."""
    if cfg.finetune_lr is not None and step >= cfg.blind_steps:
        return cfg.finetune_lr * min(1.0, (step - cfg.blind_steps + 1) / cfg.finetune_warmup)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    end = cfg.blind_steps if cfg.finetune_lr is not None else cfg.steps
    frac = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: TrainConfig, out: str | Path) -> dict[str, Any]:
    """Train one variant and save it as an HF folder in ``out``.

    Returns:
        The run summary also written to ``out/testbed.json``.
    """
    from vlmfix.testbed.modeling import arch_for, build_model

    cfg = replace(cfg)  # time_budget_s may lower steps; keep the caller's object intact
    steps_requested = cfg.steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(cfg.device)
    processor = build_processor()
    table = PromptTable(processor, dev)
    arch = arch_for(cfg.variant)
    model = build_model(cfg.seed, arch).to(dev)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=dev.type == "cuda",
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    log_rows: list[dict[str, Any]] = []
    loss_acc = torch.zeros((), device=dev)
    t0 = time.perf_counter()
    step = 0
    probe: dict[int, float] = {}
    stopped_early = False
    chunk: list = []
    while step < cfg.steps:
        if not chunk:
            blind = step < cfg.blind_steps
            k = min(cfg.chunk_steps, (cfg.blind_steps if blind else cfg.steps) - step)
            lo = step * cfg.batch_size
            idx = torch.arange(lo, lo + k * cfg.batch_size, device=dev)
            sb = scenes.sample(cfg.seed, idx, variant=cfg.variant, strength=cfg.strength)
            tb = make_batch(sb, table, cfg, blind=blind)
            chunk = list(zip(*(t.split(cfg.batch_size) for t in (tb.input_ids, tb.targets, tb.pixel_values))))
        ids, tgt, pix = chunk.pop(0)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        with autocast:
            logits = model(input_ids=ids, pixel_values=pix).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=_IGNORE
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_acc += loss.detach()
        step += 1
        if cfg.time_budget_s is not None and step in _BUDGET_PROBE:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            probe[step] = time.perf_counter()
            if step == _BUDGET_PROBE[1]:
                per_step = (probe[step] - probe[_BUDGET_PROBE[0]]) / (_BUDGET_PROBE[1] - _BUDGET_PROBE[0])
                fit = int((cfg.time_budget_s - (probe[step] - t0)) / per_step) + step
                if fit < cfg.steps:
                    logger.warning(
                        "%.1f ms/step: %d steps fit the %.0fs budget (asked %d)",
                        1e3 * per_step,
                        fit,
                        cfg.time_budget_s,
                        cfg.steps,
                    )
                    cfg.steps = max(fit, cfg.warmup_steps + 1, cfg.blind_steps + 1)
        if step in cfg.save_at and step < cfg.steps:
            snap = out / f"step-{step}"
            dt = _save(copy.deepcopy(model), processor, snap, log_rows)
            _write_summary(snap, cfg, arch, model, steps_requested, step, False, time.perf_counter() - t0, log_rows, dt)
            logger.info("snapshot at step %d -> %s", step, snap)
        if step % cfg.log_every == 0 or step == cfg.steps:
            n_avg = step % cfg.log_every or cfg.log_every
            elapsed = time.perf_counter() - t0
            row = {"step": step, "loss": float(loss_acc) / n_avg, "lr": _lr_at(step - 1, cfg), "elapsed_s": elapsed}
            log_rows.append(row)
            loss_acc.zero_()
            logger.info("step %d loss %.4f lr %.2e %.0fs", step, row["loss"], row["lr"], elapsed)
            if cfg.time_limit_s is not None and elapsed > cfg.time_limit_s and step < cfg.steps:
                logger.warning("time limit %.0fs reached at step %d of %d; stopping", cfg.time_limit_s, step, cfg.steps)
                stopped_early = True
                break
    dt = _save(model, processor, out, log_rows)
    train_s = time.perf_counter() - t0
    return _write_summary(out, cfg, arch, model, steps_requested, step, stopped_early, train_s, log_rows, dt)


_FP16_MAX = 65504.0


def _save(model: torch.nn.Module, processor: Any, out: Path, log_rows: list[dict[str, Any]]) -> str:
    """Write ``model`` (cast in place), the processor and the training log so far.

    Returns the dtype written: fp16, unless a weight exceeds fp16's range (a cast would write
    inf), then fp32 with a warning naming the largest weights.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    peaks = {n: float(p.detach().abs().max()) for n, p in model.named_parameters() if p.numel()}
    over = sorted(((v, n) for n, v in peaks.items() if v > _FP16_MAX), reverse=True)
    dtype = torch.float32 if over else torch.float16
    if over:
        logger.warning("weights beyond fp16's range (%s); saving %s in float32",
                       ", ".join(f"{n}: {v:.3g}" for v, n in over[:3]), out)  # fmt: skip
    model.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    with open(out / "train_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "elapsed_s"])
        w.writeheader()
        w.writerows(log_rows)
    return str(dtype).removeprefix("torch.")


def _write_summary(
    out: Path, cfg: TrainConfig, arch: dict[str, Any], model: torch.nn.Module, steps_requested: int,
    step: int, stopped_early: bool, train_s: float, log_rows: list[dict[str, Any]], saved_dtype: str = "float16",
) -> dict[str, Any]:  # fmt: skip
    """``testbed.json`` of a model saved after ``step`` steps (a snapshot: ``steps_done < steps``)."""
    import transformers

    from vlmfix.testbed.modeling import count_parameters

    dev = next(model.parameters()).device
    summary = {
        "variant": cfg.variant,
        "strength": scenes.resolve_strength(cfg.variant, cfg.strength),
        "config": asdict(cfg),
        "arch": arch,
        "parameters": count_parameters(model),
        "steps_requested": steps_requested,
        "steps_done": step,
        "sequences_seen": step * cfg.batch_size,
        "stopped_early": stopped_early,
        "train_seconds": round(train_s, 1),
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "saved_dtype": saved_dtype,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (out / "testbed.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python scripts/train_testbed.py --variant V --out DIR [--measure]``."""
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description="Train a vlmfix testbed variant (HF LLaVA folder).")
    ap.add_argument("--variant", default=defaults.variant, choices=cat.VARIANTS)
    ap.add_argument("--out", required=True, help="output folder (HF model + processor)")
    ap.add_argument("--strength", type=float, default=None)
    ap.add_argument(
        "--steps", type=int, default=None, help="default: the variant's recipe (2888; under_attention 4600; attention_sink 8000)"
    )
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=None, help=f"default: the variant's recipe ({defaults.lr})")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--device", default=defaults.device)
    ap.add_argument("--log-every", type=int, default=defaults.log_every)
    ap.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument(
        "--time-budget", type=float, default=None,
        help="time steps 10..40, then lower --steps to what fits this many seconds (recorded in testbed.json)",
    )  # fmt: skip
    ap.add_argument("--blind-steps", type=int, default=None, help="first steps on blank images (default: the recipe's)")
    ap.add_argument("--finetune-lr", type=float, default=None, help="constant lr of the image stage after --blind-steps")
    ap.add_argument("--prompt-loss", action="store_true", default=None, help="also score the prompt's text tokens")
    ap.add_argument("--save-at", type=int, nargs="*", default=None, help="also save snapshots after these steps")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (4 steps of 4) to check the pipeline")
    ap.add_argument("--measure", action="store_true", help="evaluate on held-out scenes, write metrics.json")
    ap.add_argument("--measure-n", type=int, default=500, help="held-out scenes per split for --measure")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipe = TrainConfig.for_variant(args.variant)
    stages = {
        k: v
        for k, v in {
            "blind_steps": 2 if args.smoke and recipe.blind_steps else args.blind_steps,
            "finetune_lr": args.finetune_lr,
            "prompt_loss": args.prompt_loss,
            "save_at": tuple(args.save_at) if args.save_at is not None else (3,) if args.smoke else None,
        }.items()
        if v is not None
    }
    cfg = TrainConfig.for_variant(
        args.variant,
        **stages,
        strength=args.strength,
        steps=4 if args.smoke else (args.steps or recipe.steps),
        batch_size=4 if args.smoke else args.batch_size,
        lr=args.lr or recipe.lr,
        warmup_steps=2 if args.smoke else recipe.warmup_steps,
        seed=args.seed,
        device="cpu" if args.smoke else args.device,
        log_every=2 if args.smoke else args.log_every,
        chunk_steps=2 if args.smoke else defaults.chunk_steps,
        time_limit_s=args.time_limit,
        time_budget_s=None if args.smoke else args.time_budget,
    )
    summary = train(cfg, args.out)
    print(json.dumps({k: summary[k] for k in ("variant", "parameters", "steps_done", "train_seconds", "final_loss")}))
    if args.measure:
        from vlmfix.testbed.measure import measure_folder

        metrics = measure_folder(args.out, n=8 if args.smoke else args.measure_n, device=cfg.device)
        print(json.dumps(metrics["summary"], indent=2))
        from vlmfix.testbed.disease import measure_folder_disease

        n_disease = 4 if args.smoke else min(args.measure_n, 200)
        disease = measure_folder_disease(args.out, n=n_disease, device=cfg.device)
        print(disease["markdown"])
        trajectory = [
            (k, measure_folder_disease(Path(args.out) / f"step-{k}", n=n_disease, device=cfg.device))
            for k in sorted(cfg.save_at)
            if k < summary["steps_done"]
        ] + [(summary["steps_done"], disease)]
        print("\n".join(["", "Snapshots (adversarial split):", _TRAJECTORY_HEADER]))
        print("\n".join(trajectory_line(k, rec) for k, rec in trajectory))
    return 0


_TRAJECTORY_HEADER = (
    "| step | middle image mass % | recall % | partner rate % | CHAIR_i % | POPE acc % | "
    "image sinks at tau=20, max over layers | BOS phi, max | massive ratio, max |\n|---|---|---|---|---|---|---|---|---|"
)


def trajectory_line(step: int, record: dict[str, Any]) -> str:
    """One Markdown row of a snapshot's disease record (adversarial split)."""
    adv = record["adversarial"]
    c, p = adv["captions"], adv["pope_adversarial"]
    tau = str(record["taus"][0])
    sinks = max(x["value"] for x in adv["sinks"][tau]["image"])
    phi = max(x["value"] for x in adv["bos_phi"])
    ratio = max(x["value"] for x in adv["massive_ratio"])
    return (
        f"| {step} | {100 * adv['middle_image_mass']['value']:.1f} | {100 * c['recall']['value']:.1f} | "
        f"{100 * c['partner_rate']['value']:.1f} | {100 * c['chair_i']['value']:.1f} | "
        f"{100 * p['accuracy']['value']:.1f} | {sinks:.2f} | {phi:.1f} | {ratio:.1f} |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
