"""Helpers for naive references: one sample at a time, no padding, no cache, stock forwards.

A naive reference recomputes the whole sequence of one sample each step with plain model
calls (eager attention where attention maps are needed) and combines logits in the test's
own code, so that vlmfix's batched, cached, one-forward-per-step implementation is checked
against something that shares none of its tricks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from vlmfix.attachment import _attn_snapshot


def template(processor, prompt):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def encode(processor, images, prompts):
    """The batch as vlmfix tokenises it (left padding); slice one sample with :func:`sample`."""
    texts = [template(processor, p) for p in prompts]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left"))


def sample(inputs, b):
    """``(input_ids[T], extra)`` of sample ``b`` with its padding removed."""
    keep = inputs["attention_mask"][b].bool()
    extra = {k: v[b : b + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return inputs["input_ids"][b][keep], extra


@contextmanager
def eager(model):
    before = _attn_snapshot(model)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before[""])


def forward(model, ids, extra, tokens, **kw):
    seq = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])[None]
    with torch.no_grad():
        return model(input_ids=seq, use_cache=False, **extra, **kw), seq[0]


def vcd_noise(pixels, seed=0):
    """VCD's noise (T=500 of 1000) drawn as vlmfix draws it: first thing from the seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[500].item()
    return math.sqrt(abar) * pixels + math.sqrt(1 - abar) * torch.randn(pixels.shape, generator=generator)


def vcd(logits, contrast, alpha=1.0, beta=0.1):
    out = (1 + alpha) * logits - alpha * contrast
    probs = logits.softmax(-1)
    return out.masked_fill(probs < beta * probs.max(), float("-inf"))


def greedy(next_logits, steps, eos=2):
    """Greedy decoding of one sample: ``next_logits(tokens) -> [V]``; returns (tokens, logits[T, V])."""
    tokens, scores = [], []
    for _ in range(steps):
        logits = next_logits(tokens)
        tokens.append(int(logits.argmax()))
        scores.append(logits)
        if tokens[-1] == eos:
            break
    return tokens, torch.stack(scores)


def naive_beam(next_fn, num_beams, max_new_tokens, eos, length_penalty=1.0):
    """Beam search over one sample (``early_stopping=False``), one hypothesis at a time.

    ``next_fn(tokens) -> logits[V]`` or ``(logits[V], penalty)``: the penalty of the
    hypothesis is subtracted from the score of each of its continuations.
    Returns ``(tokens, score, per-step logits of the answer)``."""
    K = max(2, 1 + len(eos)) * num_beams
    running = [(0.0, [], [])]  # (score, tokens, logits per step)
    finished: list = []
    for t in range(max_new_tokens):
        cands = []
        for total, toks, hist in running:
            out = next_fn(toks)
            logits, penalty = out if isinstance(out, tuple) else (out, 0.0)
            values, ids = logits.log_softmax(-1).topk(K)
            cands += [(total - penalty + float(v), toks + [int(i)], hist + [logits]) for v, i in zip(values, ids)]
        cands = sorted(cands, key=lambda c: -c[0])[:K]
        ended = [c[1][-1] in eos or t == max_new_tokens - 1 for c in cands]
        for rank, (c, end) in enumerate(zip(cands, ended)):
            if end and rank < num_beams:
                finished.append((c[0] / (t + 1) ** length_penalty, c[1], c[2]))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        running = [c for c, end in zip(cands, ended) if not end][:num_beams]
        if not running:
            break
        best = running[0][0] / (t + 1) ** length_penalty
        if len(finished) == num_beams and best <= finished[-1][0]:
            break  # no running beam can beat the worst finished one
    score, tokens, hist = finished[0]
    return tokens, score, torch.stack(hist)
