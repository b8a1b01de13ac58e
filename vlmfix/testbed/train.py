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


# Per-variant recipe overrides of TrainConfig's defaults (testbed v2, issue 17). The
# attention-sink study (Gu et al., "When Attention Sink Emerges in Language Models", ICLR
# 2025) finds sinks emerge after effective optimisation on enough data, with softmax
# attention and a fixed first token, and grow with weight decay; so attention_sink trains
# twice as long (2 x 2888 steps, ~3M sequences) with weight decay 0.1 and a longer warmup
# for the wider LM. Every sequence starts with the same <s> "USER:" tokens.
VARIANT_RECIPES: dict[str, dict[str, Any]] = {
    "attention_sink": {"steps": 5776, "weight_decay": 0.1, "warmup_steps": 300},
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


def make_batch(batch: scenes.SceneBatch, table: PromptTable, cfg: TrainConfig) -> TrainBatch:
    """Training tensors for one batch of scenes (one sequence per scene)."""
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
    targets = ids.masked_fill(in_prompt | ~valid, _IGNORE)
    return TrainBatch(ids, targets, normalize(scenes.render(batch)), prow)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
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
    from vlmfix.testbed.modeling import arch_for, build_model, count_parameters

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
            k = min(cfg.chunk_steps, cfg.steps - step)
            lo = step * cfg.batch_size
            idx = torch.arange(lo, lo + k * cfg.batch_size, device=dev)
            sb = scenes.sample(cfg.seed, idx, variant=cfg.variant, strength=cfg.strength)
            tb = make_batch(sb, table, cfg)
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
                    cfg.steps = max(fit, cfg.warmup_steps + 1)
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
    train_s = time.perf_counter() - t0

    model.eval()
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    with open(out / "train_log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "elapsed_s"])
        w.writeheader()
        w.writerows(log_rows)
    import transformers

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
    ap.add_argument("--steps", type=int, default=None, help="default: the variant's recipe (2888; attention_sink 5776)")
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
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (4 steps of 4) to check the pipeline")
    ap.add_argument("--measure", action="store_true", help="evaluate on held-out scenes, write metrics.json")
    ap.add_argument("--measure-n", type=int, default=500, help="held-out scenes per split for --measure")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    recipe = TrainConfig.for_variant(args.variant)
    cfg = TrainConfig.for_variant(
        args.variant,
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

        disease = measure_folder_disease(args.out, n=4 if args.smoke else min(args.measure_n, 200), device=cfg.device)
        print(disease["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
