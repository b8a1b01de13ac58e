"""Batched generation with methods attached: :func:`vlmfix.generate`.

vlmfix runs its own short decoding loop (prefill, then one token per step on a
``DynamicCache``) instead of copying transformers' ``_sample``: it needs a seeded
``torch.Generator`` for sampling, per-step access to the logits of every method, and
(for contrastive methods) extra rows per sample. Position ids and masks follow
transformers' ``generate`` exactly, so with no method attached the tokens are the same.

Contrastive methods add branch rows (see :mod:`vlmfix.branches`): every sample gets one
extra row per branch in the same batch, all rows are left-padded jointly, and one forward
per step serves all of them. The combined logits choose one token per sample, which is
appended to every row of that sample.

Beam search (``num_beams > 1``, see :mod:`vlmfix.beam`) gives every sample ``num_beams``
rows, in the main block and in every branch block alike, so each branch row follows its
beam; after each step the rows, the KV cache (``reorder_cache``) and the per-row state of
the attached methods (:meth:`vlmfix.methods.Method.reorder_rows`) follow the surviving
beams.

Random numbers come from one ``torch.Generator`` on the model's device, seeded with
``seed``: first each branch's ``pixels`` transform draws its noise (methods in application
order, branches in declaration order), then each sampling step draws one
``torch.multinomial`` over the ``[B, V]`` probabilities of :func:`sample_next`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmfix import _compat
from vlmfix.attachment import attach
from vlmfix.beam import BeamSearch
from vlmfix.branches import BranchSpec, RowMap
from vlmfix.errors import ConfigError, DataError
from vlmfix.layout import positions_from_mask
from vlmfix.loading import devices, input_device
from vlmfix.methods.base import MethodConfig

__all__ = ["GenerationOutput", "generate", "prepare_inputs", "prepare_rows", "sample_next"]

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        texts: decoded continuation per prompt (special tokens removed).
        token_ids: generated token ids per prompt (EOS included when produced, no padding).
        scores: if requested, per prompt a ``[T, V]`` fp32 tensor of the final
            (post-method) next-token logits at each step; else None.
        stats: per-method telemetry, keyed by method name.
        prompt_lengths: number of prompt tokens per sample (padding excluded).
        sequence_scores: with ``num_beams > 1``, per prompt the beam score of the returned
            hypothesis (sum of log-probabilities / length ** length_penalty); else None.
        decode: how the decode steps ran: ``path`` (``"graph"``, ``"static"`` or
            ``"eager"``), ``requested`` (the ``decode_path`` argument), ``fallback`` (why
            the path is not the requested one, else None), ``capture_s`` (CUDA graph
            capture time), ``replays`` (steps served by graph replays), ``reused``
            (whether the step's buffers, and graph, came from an earlier call).
    """

    texts: list[str]
    token_ids: list[list[int]]
    scores: list[torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    sequence_scores: list[float] | None = None
    decode: dict[str, Any] = field(default_factory=dict)


def _open_image(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    if isinstance(img, (str, Path)):
        try:
            with Image.open(img) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"image file {str(img)!r} does not exist") from None
    raise DataError(f"images must be PIL images or file paths; got {type(img).__name__}")


def build_prompt(processor, prompt: str, with_image: bool = True, system: str | None = None) -> str:
    """Apply the processor's chat template to one user turn (image first, then text)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": content}]
    if system is not None:
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError("the processor has no chat template; pass templated prompts with apply_chat_template=False")
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def processor_device(processor, device) -> dict[str, str]:
    """``{"device": ...}`` for the processor call when its image processor can run on the
    model's CUDA device (transformers' torchvision backend: resizing and normalising a
    batch there takes a few ms instead of tens on the host), else ``{}``."""
    if device is None or torch.device(device).type != "cuda":
        return {}
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # pragma: no cover - transformers without backends
        return {}
    image_processor = getattr(processor, "image_processor", None)
    return {"device": str(torch.device(device))} if isinstance(image_processor, TorchvisionBackend) else {}


def _process(processor, images, texts, device):
    """One left-padded processor call (images on the model's GPU where they can be)."""
    return processor(
        images=images,
        text=texts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        **processor_device(processor, device),
    )


def prepare_inputs(processor, images, prompts, *, apply_chat_template: bool = True, device=None, dtype=None):
    """Tokenise prompts and preprocess images as one left-padded batch.

    Returns:
        The processor's ``BatchFeature`` (``input_ids``, ``attention_mask``,
        ``pixel_values`` and, for any-res models, ``image_sizes``), on ``device``.
    """
    if len(images) != len(prompts):
        raise DataError(f"got {len(images)} images but {len(prompts)} prompts; pass one image per prompt")
    if not prompts:
        raise DataError("prompts is empty; pass at least one prompt")
    pil = [_open_image(im) for im in images]
    texts = [build_prompt(processor, p) if apply_chat_template else p for p in prompts]
    inputs = _process(processor, pil, texts, device)
    if device is not None:
        inputs = inputs.to(device)
    if dtype is not None and "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def _row_text(processor, prompt: str, spec: BranchSpec | None, apply_chat_template: bool) -> str:
    with_image = spec is None or spec.with_image
    system = None if spec is None else spec.system
    if apply_chat_template:
        return build_prompt(processor, prompt, with_image=with_image, system=system)
    if system is not None:
        raise ConfigError(
            f"apply_chat_template=False cannot be combined with branch {spec.name!r}, which swaps the system "
            "prompt; pass untemplated prompts with apply_chat_template=True"
        )
    if with_image:
        return prompt
    return prompt.replace(getattr(processor, "image_token", "<image>"), "")


def prepare_rows(
    processor,
    images,
    prompts,
    branches: list[BranchSpec],
    *,
    generator: torch.Generator,
    apply_chat_template: bool = True,
    device=None,
    dtype=None,
):
    """Tokenise the main rows and every branch's rows as one left-padded batch.

    Rows are ``[main_0..main_{B-1}, branch1_0..branch1_{B-1}, ...]``; image tensors
    (``pixel_values``, ``image_sizes``) hold the rows that have an image, in row order.
    Each branch's ``pixels`` transform is applied to its slice of the normalised pixel
    tensor in fp32, drawing from ``generator``, before the cast to ``dtype``.

    Returns:
        The processor's ``BatchFeature`` for all rows, on ``device``.
    """
    if not branches:
        return prepare_inputs(
            processor, images, prompts, apply_chat_template=apply_chat_template, device=device, dtype=dtype
        )
    if len(images) != len(prompts):
        raise DataError(f"got {len(images)} images but {len(prompts)} prompts; pass one image per prompt")
    if not prompts:
        raise DataError("prompts is empty; pass at least one prompt")
    pil = [_open_image(im) for im in images]
    groups: list[BranchSpec | None] = [None, *branches]
    texts, row_images = [], []
    for spec in groups:
        texts.extend(_row_text(processor, p, spec, apply_chat_template) for p in prompts)
        if spec is None or spec.with_image:
            row_images.extend(pil)
    inputs = _process(processor, row_images, texts, device)
    if device is not None:
        inputs = inputs.to(device)
    pixels = inputs["pixel_values"]
    B, k = len(prompts), 0
    for spec in groups:
        if spec is not None and not spec.with_image:
            continue
        if spec is not None and spec.pixels is not None:
            part = slice(k * B, (k + 1) * B)
            pixels[part] = spec.pixels(pixels[part].float(), generator).to(pixels.dtype)
        k += 1
    if dtype is not None:
        inputs["pixel_values"] = pixels.to(dtype)
    return inputs


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Choose the next token per row from fp32 logits ``[B, V]`` (greedy or sampling)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop tokens once the mass *before* them reaches top_p (keeps at least one)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_ids(model, processor) -> set[int]:
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


@torch.inference_mode()
def generate(
    model,
    processor,
    images: list,
    prompts: list[str],
    methods: list[MethodConfig] | tuple = (),
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    use_cache: bool = True,
    return_scores: bool = False,
    apply_chat_template: bool = True,
    backend: str = "auto",
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    decode_path: str = "auto",
) -> GenerationOutput:
    """Generate answers for a batch of (image, prompt) pairs with methods attached.

    Args:
        model, processor: from :func:`vlmfix.load`.
        images: one PIL image or path per prompt.
        prompts: user prompts; the processor's chat template is applied unless
            ``apply_chat_template=False`` (then each prompt must contain the image token).
        methods: method configs, e.g. ``[vlmfix.methods.get("baseline")()]``. Contrastive
            methods (``vlmfix.VCD()`` ...) add branch rows to the batch; see :mod:`vlmfix.branches`.
        max_new_tokens: generation length cap.
        do_sample, temperature, top_p, top_k: decoding policy (greedy by default).
        seed: seeds the ``torch.Generator`` used for sampling and by methods (branch
            noise is drawn first, then one multinomial draw per sampling step).
        use_cache: decode with a KV cache (False recomputes the full sequence each step).
        return_scores: also return the per-step logits used to pick each token.
        backend: attention backend: ``"auto"`` (default: ``$VLMFIX_BACKEND`` when set, else
            ``"triton"`` on CUDA, ``"reference"`` elsewhere), ``"reference"`` or ``"triton"``.
        num_beams: beams per sample (1: greedy or sampling). Beam search is deterministic
            (``do_sample=False``) and follows transformers' ``generate(num_beams=...)``;
            every method works with it (beams are rows, see :mod:`vlmfix.beam`).
        length_penalty: beam search: finished scores are divided by ``length ** length_penalty``.
        early_stopping: beam search: ``True`` stops a sample at ``num_beams`` finished
            hypotheses; ``False`` (default) when the best running beam cannot win any more;
            ``"never"``: the canonical bound with the maximum length.
        decode_path: ``"auto"`` (default: ``"graph"`` on CUDA, ``"eager"`` elsewhere),
            ``"graph"`` (static KV cache, the decode step captured once as a CUDA graph and
            replayed), ``"static"`` (the same static step, run uncaptured: any device) or
            ``"eager"`` (a growing cache, one Python step per token: the off switch). All
            give the same tokens; see :mod:`vlmfix.fastpath`. Requests the static step
            cannot serve (no cache, beam search, a method that declares a reason) run eagerly,
            with the reason in :attr:`GenerationOutput.decode` and the log.

    Returns:
        A :class:`GenerationOutput`.

    Example:
        >>> out = vlmfix.generate(model, processor, [img], ["Describe the image."])  # doctest: +SKIP
        >>> out.texts[0]  # doctest: +SKIP
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if do_sample and temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0 when do_sample=True")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0 disables top-k)")
    if num_beams < 1:
        raise ConfigError(f"num_beams={num_beams} must be >= 1 (1 disables beam search)")
    if num_beams > 1 and do_sample:
        raise ConfigError("num_beams > 1 with do_sample=True (beam sampling) is not supported; pass do_sample=False")
    if early_stopping not in (True, False, "never"):
        raise ConfigError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    device = input_device(model)  # with a device_map: where the input embeddings run
    from vlmfix import fastpath

    path = fastpath.resolve_decode_path(decode_path, device)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = _eos_ids(model, processor)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = next(iter(eos)) if eos else 0

    with attach(model, *methods, backend=backend) as handle:
        branches = [(m, spec) for m in handle.methods for spec in m.branches()]
        B = len(prompts)
        # probe-only rows come last: they leave the batch after the probe forward
        branches = [b for b in branches if not b[1].probe_only] + [b for b in branches if b[1].probe_only]
        rows = RowMap(B * num_beams, tuple((m.name, spec.name) for m, spec in branches if not spec.probe_only))
        inputs = prepare_rows(
            processor,
            images,
            prompts,
            [spec for _, spec in branches],
            generator=generator,
            apply_chat_template=apply_chat_template,
            device=device,
            dtype=dtype,
        )
        prompt_lengths = inputs["attention_mask"][:B].sum(-1).tolist()
        beam = None
        if num_beams > 1:
            inputs = _repeat_rows(inputs, 1 + len(branches), B, num_beams)
            eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device)
            beam = BeamSearch(
                B, num_beams, max_new_tokens, eos_t, pad_id, length_penalty, early_stopping, device, return_scores
            )
        handle.controller.rows = rows
        handle.controller.decode_capacity = max_new_tokens
        decode = {
            "requested": decode_path,
            "path": path,
            "fallback": None,
            "capture_s": 0.0,
            "replays": 0,
            "reused": False,
        }
        if path != "eager" and max_new_tokens == 1:
            decode.update(path="eager", fallback="max_new_tokens=1: no decode step to run")
        if decode["path"] != "eager":
            why = fastpath.blockers(handle.methods, use_cache=use_cache, num_beams=num_beams)
            if path == "graph" and len(devices(model)) > 1:
                # one CUDA graph captures one device's stream: run the static step uncaptured
                decode.update(path="static", fallback="the model is spread over several devices (device_map)")
            if why:
                decode.update(path="eager", fallback="; ".join(why))
                (logger.info if decode_path == "auto" else logger.warning)(
                    "vlmfix: decoding eagerly: %s", decode["fallback"]
                )
        try:
            tokens, scores = _decode_loop(
                model,
                handle,
                inputs,
                rows=rows,
                branches=branches,
                max_new_tokens=max_new_tokens,
                eos=eos,
                pad_id=pad_id,
                use_cache=use_cache,
                return_scores=return_scores,
                pick=lambda logits: sample_next(
                    logits, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
                ),
                beam=beam,
                decode=decode,
                generator=generator if do_sample else None,
            )
        finally:
            handle.controller.rows = None
            handle.controller.exit_static()
        stats = handle.stats()

    token_ids: list[list[int]] = []
    for row in tokens.tolist():
        out = []
        for t in row:
            out.append(t)
            if t in eos:
                break
        token_ids.append(out)
    tok = getattr(processor, "tokenizer", processor)
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
    per_sample_scores = None
    if return_scores:
        per_sample_scores = [scores[i, : len(token_ids[i])] for i in range(len(token_ids))]
    return GenerationOutput(
        texts=texts,
        token_ids=token_ids,
        scores=per_sample_scores,
        stats=stats,
        prompt_lengths=prompt_lengths,
        sequence_scores=beam.best()[1].tolist() if beam is not None else None,
        decode=decode,
    )


def _repeat_rows(inputs, groups: int, batch: int, num_beams: int):
    """Give every row ``num_beams`` consecutive copies, within each row group.

    Rows are ``groups`` blocks of ``batch`` rows (main, then each branch); images are in
    row order, at most one per row. Both become beam-major within their sample, as the
    rows of :class:`~vlmfix.branches.RowMap` with ``num_samples = batch * num_beams``.
    """
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            # row tensors and per-image tensors alike: each entry belongs to one row
            value = value.repeat_interleave(num_beams, dim=0)
        out[key] = value
    if out["input_ids"].shape[0] != groups * batch * num_beams:
        raise DataError(f"internal: expected {groups * batch} rows, got {inputs['input_ids'].shape[0]}")
    return out


def _main_rows(inputs, n: int) -> dict[str, Any]:
    """The main rows' inputs: every tensor's first ``n`` entries (main rows and their images
    come first in both the row order and the image order)."""
    return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _embeds_hook(rows: RowMap, edits: list[tuple[int, BranchSpec]], prompt_length: int):
    """Forward pre-hook of the language model applying the branches' ``embeds`` edits."""

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        # Only full-batch forwards that cover the prompt: the prefill, or every step
        # without a cache (the probe forward has main rows only).
        if embeds is None or embeds.shape[0] != rows.num_rows or embeds.shape[1] < prompt_length:
            return None
        embeds = embeds.clone()
        for k, spec in edits:
            part = rows.branch_rows(k)
            embeds[part] = spec.embeds(embeds[part], prompt_length)
        kwargs["inputs_embeds"] = embeds
        return args, kwargs

    return hook


@dataclass
class _Run:
    """What both decoding loops share: the model, the prepared rows and the policy."""

    model: Any
    handle: Any
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    extra: dict[str, Any]
    rows: RowMap
    max_new_tokens: int
    eos: set[int]
    pad_id: int
    return_scores: bool
    pick: Any
    apply_methods: Any


def _decode_loop(
    model,
    handle,
    inputs,
    *,
    rows,
    branches,
    max_new_tokens,
    eos,
    pad_id,
    use_cache,
    return_scores,
    pick,
    beam=None,
    decode=None,
    generator=None,
):
    """Prefill then decode every row; returns the answers' ``(tokens[B, T], scores[B, T, V] or None)``.

    With ``beam`` (a :class:`~vlmfix.beam.BeamSearch`) the main rows are the beams and the
    answer of each sample is its best finished hypothesis. ``decode["path"]`` chooses the
    eager loop or the static step of :mod:`vlmfix.fastpath` (which updates ``decode``)."""
    from dataclasses import replace

    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    B = rows.num_samples
    position_ids = positions_from_mask(attention_mask)
    n_rows = rows.num_rows
    per_method = {
        id(m): [k for k, (owner, _) in enumerate(branches[: len(rows.branches)]) if owner is m] for m in handle.methods
    }

    probers = [m for m in handle.methods if any((s.probe or s.probe_only) for o, s in branches if o is m)]
    if probers:
        # main rows, then the probe-only rows (the last rows of the batch; they have no image).
        # The probe forward measures for its owners; no other method acts in it.
        probe = torch.cat([torch.arange(B), torch.arange(n_rows, input_ids.shape[0])]).to(input_ids.device)
        only = tuple((m.name, spec.name) for m, spec in branches if spec.probe_only)
        handle.controller.rows = replace(rows, branches=only, probing=True)
        try:
            with handle.controller.only(probers):
                model(
                    input_ids=input_ids[probe],
                    attention_mask=attention_mask[probe],
                    position_ids=position_ids[probe],
                    use_cache=False,
                    logits_to_keep=1,
                    **_main_rows(extra, B),
                )
        finally:
            handle.controller.rows = rows
        input_ids, attention_mask, position_ids = input_ids[:n_rows], attention_mask[:n_rows], position_ids[:n_rows]
    edits = [(k, spec) for k, (_, spec) in enumerate(branches) if spec.embeds is not None]
    hook = None
    if edits:
        lm = handle.adapter.get(model, "language_model")
        hook = lm.register_forward_pre_hook(_embeds_hook(rows, edits, input_ids.shape[1]), with_kwargs=True)

    def apply_methods(step, all_logits):
        logits = all_logits[:B]
        for m in handle.methods:
            if per_method[id(m)]:
                logits = m.combine(step, logits, [all_logits[rows.branch_rows(k)] for k in per_method[id(m)]])
            logits = m.process_logits(step, logits)
        return logits

    run = _Run(
        model=model,
        handle=handle,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        extra=extra,
        rows=rows,
        max_new_tokens=max_new_tokens,
        eos=eos,
        pad_id=pad_id,
        return_scores=return_scores,
        pick=pick,
        apply_methods=apply_methods,
    )
    try:
        if decode is not None and decode["path"] != "eager":
            return _static_loop(run, decode=decode, generator=generator)
        return _eager_loop(run, use_cache=use_cache, beam=beam)
    finally:
        if hook is not None:
            hook.remove()


def _eager_loop(run: _Run, *, use_cache, beam):
    """One Python step per token on a growing ``DynamicCache`` (or none)."""
    from transformers import DynamicCache

    B, copies = run.rows.num_samples, 1 + len(run.rows.branches)
    cache = DynamicCache(config=run.model.config.get_text_config()) if use_cache else None
    cache_kw = _compat.cache_kwarg(run.model)
    R, L = run.input_ids.shape
    dev = run.input_ids.device
    # Preallocated sequence buffers: a step writes one column, nothing grows.
    seq_ids = torch.full((R, L + run.max_new_tokens), run.pad_id, dtype=run.input_ids.dtype, device=dev)
    seq_mask = torch.ones((R, L + run.max_new_tokens), dtype=run.attention_mask.dtype, device=dev)
    seq_pos = torch.zeros((R, L + run.max_new_tokens), dtype=run.position_ids.dtype, device=dev)
    seq_ids[:, :L], seq_mask[:, :L], seq_pos[:, :L] = run.input_ids, run.attention_mask, run.position_ids
    generated = torch.full((B, run.max_new_tokens), run.pad_id, dtype=run.input_ids.dtype, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    eos_t = torch.tensor(sorted(run.eos), device=dev) if run.eos else None
    finished = _AllDone(dev)
    all_scores = []
    steps = 0
    for step in range(run.max_new_tokens):
        n = L + step  # sequence length before this step's token
        kwargs = dict(attention_mask=seq_mask[:, :n], use_cache=use_cache, logits_to_keep=1)
        kwargs[cache_kw] = cache
        if step == 0 or not use_cache:
            kwargs.update(run.extra)
            out = run.model(input_ids=seq_ids[:, :n], position_ids=seq_pos[:, :n], **kwargs)
        else:
            out = run.model(input_ids=seq_ids[:, n - 1 : n], position_ids=seq_pos[:, n - 1 : n], **kwargs)
        logits = run.apply_methods(step, out.logits[:, -1, :].float())
        if run.return_scores:
            all_scores.append(logits)
        if beam is not None:
            penalty = None
            for m in run.handle.methods:
                p = m.beam_penalty(step)
                if p is not None:
                    penalty = p if penalty is None else penalty + p
            nxt, source = beam.step(step, logits, penalty)
            index = (source[None, :] + torch.arange(copies, device=dev)[:, None] * B).reshape(-1)
            _reorder_rows(run.handle, cache, index, (seq_ids, seq_mask, seq_pos), n)
            seq_ids[:, n] = nxt.repeat(copies)
            seq_pos[:, n] = seq_pos[:, n - 1] + 1
            steps = step + 1
            if finished.update(beam.stopped):
                break
            continue
        nxt = run.pick(logits)
        nxt = torch.where(done, torch.full_like(nxt, run.pad_id), nxt)
        generated[:, step] = nxt
        steps = step + 1
        if eos_t is not None:
            done = done | torch.isin(nxt, eos_t)
        seq_ids[:, n] = nxt.repeat(copies)
        seq_pos[:, n] = seq_pos[:, n - 1] + 1
        # EOS check without a blocking sync per step: the flag of this step is copied
        # to the host asynchronously and read at the next step (one extra step at most).
        if eos_t is not None and finished.update(done):
            break
    if beam is not None:
        tokens = beam.best()[0][:, :steps]
        scores = None
        if run.return_scores:
            # the logits row that chose each answer token: beam `path` of sample b at step t
            path = beam.best_path()[:, :steps]  # [S, T]
            per_step = torch.stack(all_scores, dim=1).view(beam.B, beam.n, steps, -1)
            scores = torch.take_along_dim(per_step, path[:, None, :, None], dim=1)[:, 0]
        return tokens, scores
    tokens = generated[:, :steps]
    scores = torch.stack(all_scores, dim=1) if run.return_scores else None
    return tokens, scores


def _static_loop(run: _Run, *, decode, generator):
    """The fast path (:mod:`vlmfix.fastpath`): the prefill as on the eager path, into a
    static cache; then one step function of device buffers, replayed as a CUDA graph."""
    from vlmfix import fastpath

    B, copies = run.rows.num_samples, 1 + len(run.rows.branches)
    R, L = run.input_ids.shape
    T = run.max_new_tokens
    dev = run.input_ids.device
    ctrl = run.handle.controller
    cache_kw = _compat.cache_kwarg(run.model)
    eos_t = torch.tensor(sorted(run.eos), device=dev) if run.eos else None
    finished = _AllDone(dev)
    # A captured step serves later calls of the same shapes when the methods keep no
    # per-sequence tensors (greedy, no per-step scores: see vlmfix.fastpath).
    reuse = generator is None and not run.return_scores and fastpath.reusable(run.handle.methods)
    if reuse:
        C = fastpath.bucket(L + T)
        key = (decode["path"], R, C, B, run.rows.branches, str(dev), ctrl.backend, tuple(sorted(run.eos)), run.pad_id,
               tuple((m.name, m.config) for m in run.handle.methods))  # fmt: skip
        bufs = fastpath.take(run.model, key)
    else:
        C, key, bufs = L + T, None, None
    if bufs is None:
        # at most one static cache per model is alive: free the kept one before allocating
        fastpath.release(run.model)
        bufs = fastpath.new_buffers(
            run.model, key, R, C, B, dev, run.input_ids.dtype, run.attention_mask.dtype, run.eos
        )
    if reuse:
        # method buffers sized to the prompt's layout take the bucket's capacity, so that
        # the per-sequence tensors of every call in the bucket have the kept step's shapes
        ctrl.decode_capacity = C - L
    cache, generated, done = bufs.cache, bufs.generated, bufs.done
    generated.fill_(run.pad_id)
    done.zero_()
    scores = None

    # Step 0: the prefill, exactly as the eager loop runs it.
    out = run.model(
        input_ids=run.input_ids,
        position_ids=run.position_ids,
        attention_mask=run.attention_mask,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
        **run.extra,
    )
    logits = run.apply_methods(0, out.logits[:, -1, :].float())
    del out
    if run.return_scores:
        scores = torch.zeros((B, T, logits.shape[-1]), dtype=logits.dtype, device=dev)
        scores[:, 0] = logits
    nxt = run.pick(logits)
    generated[:, 0] = nxt
    if eos_t is not None:
        done |= torch.isin(nxt, eos_t)
    steps = 1
    if T == 1 or (eos_t is not None and finished.update(done)):
        if reuse:
            fastpath.keep(run.model, bufs)
        return generated[:, :steps].clone(), scores[:, :steps] if scores is not None else None

    # The decode step's inputs, in the step's buffers.
    ids_in, pos_in, step_t, mask_in = bufs.ids_in, bufs.pos_in, bufs.step, bufs.mask_in
    ids_in.copy_(nxt.repeat(copies)[:, None])
    pos_in.copy_(run.position_ids[:, -1:] + 1)
    step_t.fill_(1)
    bufs.base.fill_(L)
    pad, eos_t = bufs.pad, bufs.eos if eos_t is not None else None
    pad.fill_(run.pad_id)
    ctrl.enter_static(fastpath.StaticDecode(capacity=C, q_pos=pos_in, step=step_t, base=bufs.base), into=bufs.maps)
    if bufs.runner is not None and bufs.runner.graph is not None:
        # the kept graph reads the kept method state: hand it this call's values
        why = fastpath.adopt(bufs, run.handle.methods)
        if why is not None:
            logger.info("vlmfix fast path: capturing the decode step again: %s", why)
            bufs.runner = bufs.states = None
    decode["reused"] = bufs.runner is not None

    def step_fn():
        o = run.model(
            input_ids=ids_in,
            position_ids=pos_in,
            attention_mask=mask_in,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        lg = run.apply_methods(step_t, o.logits[:, -1, :].float())
        col = step_t.view(1)
        if scores is not None:
            scores.index_copy_(1, col, lg[:, None])
        tok = torch.where(done, pad, run.pick(lg))
        generated.index_copy_(1, col, tok[:, None])
        if eos_t is not None:
            done.logical_or_(torch.isin(tok, eos_t))
        ids_in.copy_(tok.repeat(copies)[:, None])
        pos_in.add_(1)
        step_t.add_(1)

    runner = bufs.runner
    if runner is None:
        runner = bufs.runner = fastpath.GraphRunner(step_fn, decode["path"], dev, generator)
    if runner.graph is None:
        # this call's closure (same buffers) for any eager run or capture; a captured
        # graph keeps the closure it was captured from, and with it every tensor it reads
        runner.fn = step_fn
    replays_before, capture_before = runner.replays, runner.capture_s
    had_graph = runner.graph is not None
    for _ in range(1, T):
        runner()
        steps += 1
        if eos_t is not None and finished.update(done):
            break
    replays = runner.replays - replays_before
    if runner.graph is not None and not had_graph:
        # Python ran the captured step once; the graph ran it `replays` times.
        ctrl.account_replays(replays - 1)
        if reuse:
            bufs.states = fastpath.states(run.handle.methods)
            bufs.marked = ctrl.marked_last_forward()
    elif had_graph:
        # a reused step: Python ran no decode step of this call
        ctrl.account_reused(bufs.marked, replays)
    if runner.fallback is not None:
        decode.update(path="static", fallback=runner.fallback)
    decode.update(capture_s=round(runner.capture_s - capture_before, 4), replays=replays)
    if reuse and runner.fallback is None:
        fastpath.keep(run.model, bufs)
    return generated[:, :steps].clone(), scores[:, :steps] if scores is not None else None


def _reorder_rows(handle, cache, index: torch.Tensor, buffers, n: int) -> None:
    """Let row ``r`` continue old row ``index[r]``: the KV cache, the sequence buffers'
    first ``n`` columns and the attached methods' per-row state (beam search)."""
    if cache is not None:
        _compat.reorder_cache(cache, index)
    for buf in buffers:
        buf[:, :n] = buf[index, :n]
    for m in handle.methods:
        m.reorder_rows(index)


class _AllDone:
    """Whether every sample has finished, learnt without a blocking sync per step.

    :meth:`update` starts a non-blocking copy of ``done.all()`` to pinned host memory and
    answers with the flag copied at the previous call (on CUDA, once its copy has landed);
    on the CPU there is nothing to overlap and it answers at once.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def update(self, done: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(done.all())
        answer = self.pending and self.event.query() and bool(self.host)
        self.host.copy_(done.all(), non_blocking=True)
        self.event.record()
        self.pending = True
        return answer
