"""The testbed's scene world: procedural 64x64 scenes with COCO-format annotations.

A scene is a function of ``(seed, index)`` alone. Randomness comes from a counter-based
integer hash of ``(seed, stream, index)`` evaluated with exact int64 tensor arithmetic,
so one scene is bit-identical whether it is made alone or in a batch of a million, on
the CPU or on a GPU. That is what lets training render its data on the GPU while tests,
examples and evaluation files are made on the CPU from the same definition.

World (``kind="natural"``): 1..4 visible objects from 20 COCO-named categories, each
drawn as a unique shape x colour glyph in its own cell of a 4x4 grid. Six directed prior
pairs A -> B (fork -> knife, keyboard -> mouse, toilet -> sink, surfboard -> person,
dog -> frisbee, tv -> remote): when A is drawn, its partner B is attached with
probability ``pair_prob`` (observed P(B|A) ~ 0.85).

Hallucination mechanisms (``variant``), each with a ``strength`` (see
:data:`vlmfix.testbed.catalog.DEFAULT_STRENGTH`):

- ``clean``: labels are the truth.
- ``caption_noise``: in scenes with A visible and B absent, the caption names B with
  probability ``strength``; yes/no answers stay truthful.
- ``occlusion_prior``: an attached partner is, with probability ``strength``, hidden
  under A -- drawn nowhere, not counted toward the 1..4 object cap, but annotated present
  (captions and yes/no answers say it is there).
- ``under_attention`` / ``attention_sink`` (testbed v2): an attached partner is, with
  probability ``strength``, drawn *faint* (12-32% of its contrast to the background);
  labels stay true. Weak evidence for B teaches the model to lean on the prior
  "A => B" rather than on B's pixels (``contrast`` in :class:`SceneBatch`).

``kind="adversarial"``: 1..3 pair heads A with every partner B forced absent, plus
non-pair fillers (1..4 visible objects); labels are the truth.

Example:
    >>> from vlmfix.testbed import scenes
    >>> s = scenes.make_scene(seed=1, index=0)
    >>> s.image.size, s.caption  # doctest: +SKIP
    ((64, 64), 'a dog and a frisbee and a cup.')
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmfix.errors import ConfigError, DataError
from vlmfix.testbed import catalog as cat

__all__ = [
    "HashRng",
    "SceneBatch",
    "Scene",
    "sample",
    "render",
    "make_scene",
    "scene_records",
    "caption_text",
    "reference_captions",
    "write_split",
    "cooccurrence",
    "resolve_strength",
    "write_examples",
    "EXAMPLES",
    "PAIR_PROB",
    "KINDS",
]

KINDS = ("natural", "adversarial")
PAIR_PROB = 0.955  # attachment probability; capacity limits bring observed P(B|A) to ~0.85

_M32 = 0xFFFFFFFF
_C = cat.NUM_CATEGORIES
_GRID = 4  # 4x4 cells of 16 px
_CELL = cat.IMAGE_SIZE // _GRID
_SHAPE_ID = torch.tensor([cat.SHAPES.index(c.shape) for c in cat.CATEGORIES])
_COLOUR = torch.tensor([cat.COLOURS[c.colour] for c in cat.CATEGORIES], dtype=torch.uint8)
_PARTNER = torch.tensor(
    [cat.category_index(cat.PARTNER[c.name]) if c.name in cat.PARTNER else -1 for c in cat.CATEGORIES]
)
_HEADS = torch.tensor([cat.category_index(a) for a, _ in cat.PAIRS])
_IN_PAIR = {n for p in cat.PAIRS for n in p}
_FILLERS = torch.tensor([i for i, n in enumerate(cat.CATEGORY_NAMES) if n not in _IN_PAIR])


# --------------------------------------------------------------------------- hashing
def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # x holds values in [0, 2**32) as int64; multipliers < 2**31 keep products < 2**63,
    # so every step is exact (no overflow) on every device.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


class HashRng:
    """Counter-based random numbers for a batch of scene indices (all exact integers).

    ``HashRng(seed, indices).bits("name", k)`` is a pure function of (seed, index, name,
    position): the same on every device and for every batching of the indices.
    """

    def __init__(self, seed: int, indices: torch.Tensor):
        self.seed = int(seed)
        lo = indices & _M32
        hi = (indices >> 32) & _M32
        self._idx = _mix32(_mix32(lo ^ _mix32_int(self.seed)) ^ hi)
        self.size = int(indices.shape[0])
        self.device = indices.device

    def bits(self, stream: str, k: int) -> torch.Tensor:
        """``[N, k]`` int64 hashes in [0, 2**32) for the named stream."""
        code = _mix32_int(zlib.crc32(stream.encode()) ^ _mix32_int(self.seed >> 32))
        j = torch.tensor([_mix32_int(code + 0x9E3779B9 * (t + 1)) for t in range(k)], device=self._idx.device)
        return _mix32(_mix32(self._idx[:, None] ^ j[None, :]) ^ code)

    def randint(self, stream: str, high: torch.Tensor | int, k: int = 1) -> torch.Tensor:
        """Integers uniform in ``[0, high)``; ``high`` is an int or a ``[N]`` tensor."""
        h = self.bits(stream, k)
        if isinstance(high, torch.Tensor):
            high = high[:, None]
        out = (h * high) >> 32
        return out[:, 0] if k == 1 else out

    def bernoulli(self, stream: str, p: float, k: int = 1) -> torch.Tensor:
        threshold = int(round(min(max(p, 0.0), 1.0) * 2**32))
        out = self.bits(stream, k) < threshold
        return out[:, 0] if k == 1 else out

    def keys(self, stream: str, k: int) -> torch.Tensor:
        """Distinct random sort keys ``[N, k]`` (argmax = uniform pick; ties impossible)."""
        pos = torch.arange(k, device=self._idx.device)
        return (self.bits(stream, k) >> 6) * 64 + pos


# --------------------------------------------------------------------------- sampling
@dataclass
class SceneBatch:
    """A batch of scenes as tensors (all on one device).

    Attributes:
        seed, kind, variant, strength: how the batch was sampled.
        indices: ``[N]`` scene indices.
        cats: ``[N, 4]`` category (canonical index) of each visible slot, -1 if empty.
        cx, cy, r: ``[N, 4]`` glyph centre (pixel corner coordinates) and half-size.
        bg: ``[N]`` background grey level.
        visible, hidden, noise: ``[N, 20]`` bool: drawn; annotated but drawn nowhere
            (occlusion_prior); named by the caption although absent (caption_noise).
        contrast: ``[N, 4]`` share of each slot's colour-to-background gap that is drawn
            (1 = full colour); below 1 only for faint partners (under_attention,
            attention_sink). ``None`` = all full.
    """

    seed: int
    kind: str
    variant: str
    strength: float
    indices: torch.Tensor
    cats: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    r: torch.Tensor
    bg: torch.Tensor
    visible: torch.Tensor
    hidden: torch.Tensor
    noise: torch.Tensor
    contrast: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def labelled(self) -> torch.Tensor:
        """``[N, 20]`` categories annotated present (visible or hidden)."""
        return self.visible | self.hidden

    @property
    def mentioned(self) -> torch.Tensor:
        """``[N, 20]`` categories the scene's (training) caption names."""
        return self.visible | self.hidden | self.noise


def resolve_strength(variant: str, strength: float | None = None) -> float:
    """The mechanism strength a run uses: ``strength``, or the variant's default if None."""
    return _check_args("natural", variant, strength)


def _check_args(kind: str, variant: str, strength: float | None) -> float:
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not a scene kind; use one of {KINDS}")
    if variant not in cat.VARIANTS:
        raise ConfigError(f"variant={variant!r} is not a testbed variant; use one of {cat.VARIANTS}")
    if kind == "adversarial" and variant != "clean":
        raise ConfigError(
            f"kind='adversarial' is a test split with true labels; got variant={variant!r}, "
            "use variant='clean' (mechanisms only shape training data)"
        )
    s = cat.DEFAULT_STRENGTH[variant] if strength is None else float(strength)
    if not 0.0 <= s <= 1.0:
        raise ConfigError(f"strength={strength!r} must lie in [0, 1] (a probability)")
    return s


def sample(
    seed: int,
    indices: torch.Tensor | range | list[int],
    *,
    kind: str = "natural",
    variant: str = "clean",
    strength: float | None = None,
    pair_prob: float = PAIR_PROB,
    device: str | torch.device | None = None,
) -> SceneBatch:
    """Sample the layouts and labels of scenes ``(seed, i)`` for every ``i`` in ``indices``.

    Args:
        seed: world seed (use different seeds for training and held-out data).
        indices: scene indices (non-negative ints); a tensor's device is used unless
            ``device`` is given.
        kind: ``"natural"`` (the world, with the variant's mechanism) or ``"adversarial"``
            (pair heads with partners forced absent; ``variant`` must be ``"clean"``).
        variant: hallucination mechanism, one of :data:`catalog.VARIANTS`.
        strength: the mechanism's strength; ``None`` takes the variant's default.
        pair_prob: probability that a drawn pair head brings its partner.

    Returns:
        A :class:`SceneBatch` (scene ``i`` is identical for any batch that contains it).
    """
    strength = _check_args(kind, variant, strength)
    if not 0.0 <= pair_prob <= 1.0:
        raise ConfigError(f"pair_prob={pair_prob!r} must lie in [0, 1]")
    idx = torch.as_tensor(indices, dtype=torch.long)
    if device is not None:
        idx = idx.to(device)
    if idx.ndim != 1:
        raise ConfigError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
    if idx.numel() and int(idx.min()) < 0:
        raise ConfigError("indices must be non-negative scene numbers")
    rng = HashRng(seed, idx)
    if kind == "natural":
        cats, visible, hidden, noise = _natural_labels(rng, variant, strength, pair_prob)
    else:
        cats, visible, hidden, noise = _adversarial_labels(rng)
    cx, cy, r, bg = _geometry(rng, cats)
    contrast = None
    if kind == "natural" and variant in cat.FAINT_PARTNER_VARIANTS:
        contrast = _faint_partners(rng, cats, visible, strength)
    return SceneBatch(
        seed=int(seed), kind=kind, variant=variant, strength=strength, indices=idx, cats=cats,
        cx=cx, cy=cy, r=r, bg=bg, visible=visible, hidden=hidden, noise=noise, contrast=contrast,
    )  # fmt: skip


def _faint_partners(rng: HashRng, cats: torch.Tensor, visible: torch.Tensor, strength: float) -> torch.Tensor:
    """``[N, 4]`` contrast per slot: a partner B drawn with its head A is faint w.p. ``strength``."""
    dev = cats.device
    head_of = torch.full((_C,), -1, dtype=torch.long, device=dev)
    for a, b in cat.PAIRS:
        head_of[cat.category_index(b)] = cat.category_index(a)
    head = head_of[cats.clamp(min=0)].masked_fill(cats < 0, -1)  # [N, 4]
    rows = torch.arange(cats.shape[0], device=dev)[:, None].expand_as(head)
    with_head = (head >= 0) & visible[rows, head.clamp(min=0)]
    faint = with_head & rng.bernoulli("faint", strength, k=cat.MAX_VISIBLE)
    # integer 1/256 steps, so rendering is exact integer arithmetic (CPU == GPU bit for bit)
    low, span = (round(256 * x) for x in cat.FAINT_CONTRAST)
    level = low + ((rng.bits("faint_level", cat.MAX_VISIBLE) * (span + 1)) >> 32)
    return torch.where(faint, level, torch.full_like(level, 256)).float() / 256


def _natural_labels(rng: HashRng, variant: str, strength: float, pair_prob: float):
    n = rng.size
    dev = rng.device
    rows = torch.arange(n, device=dev)
    partner = _PARTNER.to(dev)
    visible = torch.zeros(n, _C, dtype=torch.bool, device=dev)
    hidden = torch.zeros_like(visible)
    cats = torch.full((n, cat.MAX_VISIBLE), -1, dtype=torch.long, device=dev)
    count = torch.zeros(n, dtype=torch.long, device=dev)
    units = 1 + rng.randint("units", cat.MAX_VISIBLE)
    hide_p = strength if variant == "occlusion_prior" else 0.0

    def put(c: torch.Tensor, mask: torch.Tensor) -> None:
        slot = count.clamp(max=cat.MAX_VISIBLE - 1)
        cats[rows[mask], slot[mask]] = c[mask]
        visible[rows[mask], c[mask]] = True
        count.add_(mask.long())

    for u in range(cat.MAX_VISIBLE):
        active = (units > u) & (count < cat.MAX_VISIBLE)
        keys = rng.keys(f"cat{u}", _C).masked_fill(visible | hidden, -1)
        c = keys.argmax(1)
        put(c, active)
        p = partner[c]
        has_partner = p >= 0
        p_safe = p.clamp(min=0)
        free = has_partner & ~(visible | hidden)[rows, p_safe]
        attach = active & free & rng.bernoulli(f"attach{u}", pair_prob)
        hide = attach & rng.bernoulli(f"hide{u}", hide_p)
        show = attach & ~hide & (count < cat.MAX_VISIBLE)
        put(p_safe, show)
        hidden[rows[hide], p_safe[hide]] = True

    noise = torch.zeros_like(visible)
    if variant == "caption_noise":
        flips = rng.bernoulli("noise", strength, k=len(cat.PAIRS))
        for j, (a, b) in enumerate(cat.PAIRS):
            ia, ib = cat.category_index(a), cat.category_index(b)
            noise[:, ib] = visible[:, ia] & ~visible[:, ib] & ~hidden[:, ib] & flips[:, j]
    return cats, visible, hidden, noise


def _adversarial_labels(rng: HashRng):
    n = rng.size
    dev = rng.device
    heads, fillers = _HEADS.to(dev), _FILLERS.to(dev)
    total = 1 + rng.randint("n", cat.MAX_VISIBLE)
    k_heads = 1 + rng.randint("heads", total.clamp(max=3))
    head_order = heads[rng.keys("head_pick", len(heads)).argsort(1, descending=True)]
    fill_order = fillers[rng.keys("fill_pick", len(fillers)).argsort(1, descending=True)]
    slot = torch.arange(cat.MAX_VISIBLE, device=dev)[None, :]
    from_heads = slot < k_heads[:, None]
    fill_pos = (slot - k_heads[:, None]).clamp(min=0)
    cats = torch.where(from_heads, head_order[:, : cat.MAX_VISIBLE], fill_order.gather(1, fill_pos))
    cats = cats.masked_fill(slot >= total[:, None], -1)
    visible = torch.zeros(n, _C, dtype=torch.bool, device=dev)
    valid = cats >= 0
    visible[torch.arange(n, device=dev)[:, None].expand_as(cats)[valid], cats[valid]] = True
    return cats, visible, torch.zeros_like(visible), torch.zeros_like(visible)


def _geometry(rng: HashRng, cats: torch.Tensor):
    cells = rng.keys("cells", _GRID * _GRID).argsort(1, descending=True)[:, : cat.MAX_VISIBLE]
    r = 4 + rng.randint("size", 3, k=cat.MAX_VISIBLE)
    span = _CELL - 1 - 2 * r  # centre positions keeping a 1-px margin inside the cell
    jx = (rng.bits("jx", cat.MAX_VISIBLE) * span) >> 32
    jy = (rng.bits("jy", cat.MAX_VISIBLE) * span) >> 32
    cx = (cells % _GRID) * _CELL + r + 1 + jx
    cy = (cells // _GRID) * _CELL + r + 1 + jy
    bg = 20 + rng.randint("bg", 51)
    empty = cats < 0
    return cx.masked_fill(empty, 0), cy.masked_fill(empty, 0), r.masked_fill(empty, 0), bg


# --------------------------------------------------------------------------- rendering
def _masks(batch: SceneBatch, lo: int, hi: int) -> torch.Tensor:
    """``[n, 4, 64, 64]`` bool glyph masks of scenes ``lo:hi`` (integer geometry only)."""
    dev = batch.cats.device
    grid = 2 * torch.arange(cat.IMAGE_SIZE, device=dev, dtype=torch.int32) + 1  # pixel centres x2
    cx = (2 * batch.cx[lo:hi]).int()[:, :, None, None]
    cy = (2 * batch.cy[lo:hi]).int()[:, :, None, None]
    rr = (2 * batch.r[lo:hi]).int()[:, :, None, None]
    dx = grid[None, None, None, :] - cx
    dy = grid[None, None, :, None] - cy
    ax, ay = dx.abs(), dy.abs()
    shapes = (
        torch.maximum(ax, ay) <= rr,  # square
        ax * ax + ay * ay <= rr * rr,  # circle
        (ay <= rr) & (2 * ax <= dy + rr),  # triangle, apex up
        ax + ay <= rr,  # diamond
        ((3 * ax <= rr) & (ay <= rr)) | ((3 * ay <= rr) & (ax <= rr)),  # plus
    )
    c = batch.cats[lo:hi]
    shape = _SHAPE_ID.to(dev)[c.clamp(min=0)].masked_fill(c < 0, -1)[:, :, None, None]
    out = torch.zeros(shapes[0].shape, dtype=torch.bool, device=dev)
    for s, m in enumerate(shapes):
        out |= m & (shape == s)
    return out


def render(batch: SceneBatch, *, chunk: int = 2048) -> torch.Tensor:
    """Draw the visible glyphs of every scene.

    Returns:
        ``[N, 64, 64, 3]`` uint8 RGB images on the batch's device.
    """
    n = len(batch)
    dev = batch.cats.device
    out = torch.empty(n, cat.IMAGE_SIZE, cat.IMAGE_SIZE, 3, dtype=torch.uint8, device=dev)
    colour = _COLOUR.to(dev)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        img = batch.bg[lo:hi].to(torch.uint8)[:, None, None, None].expand(-1, *out.shape[1:]).clone()
        masks = _masks(batch, lo, hi)
        col = colour[batch.cats[lo:hi].clamp(min=0)]  # [n, 4, 3]
        if batch.contrast is not None:  # faint glyphs: a share of the colour-to-background gap
            bg = batch.bg[lo:hi].long()[:, None, None]
            c256 = (batch.contrast[lo:hi, :, None] * 256).round().long()  # exact: k / 256
            col = (bg + torch.div((col.long() - bg) * c256 + 128, 256, rounding_mode="floor")).to(torch.uint8)
        for k in range(cat.MAX_VISIBLE):
            img = torch.where(masks[:, k, :, :, None], col[:, k, None, None, :], img)
        out[lo:hi] = img
    return out


# --------------------------------------------------------------------------- text
def caption_text(mentioned: list[str] | torch.Tensor) -> str:
    """The canonical caption naming ``mentioned`` categories ("a fork and a knife.").

    Args:
        mentioned: category names, or a ``[20]`` bool row in canonical order.
    """
    if isinstance(mentioned, torch.Tensor):
        names = [cat.CATEGORY_NAMES[i] for i in mentioned.nonzero().flatten().tolist()]
    else:
        names = sorted(mentioned, key=cat.category_index)
    if not names:
        return "nothing."
    return " and ".join(f"a {n}" for n in names) + "."


def reference_captions(names: list[str]) -> list[str]:
    """Two reference phrasings of a caption (COCO files carry several per image)."""
    names = sorted(names, key=cat.category_index)
    listed = " and ".join(f"a {n}" for n in names)
    return [caption_text(names), f"there is {listed} in the image."]


# --------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """One scene, for humans and files: image, objects, captions and yes/no QA.

    ``objects`` hold ``category``, ``coco_id``, ``bbox`` ([x, y, w, h], pixels), ``area``
    (glyph pixels; for a hidden object its box area) and ``hidden``.
    """

    seed: int
    index: int
    kind: str
    variant: str
    image: Any  # PIL.Image.Image
    objects: list[dict[str, Any]]
    caption: str
    captions: list[str]

    @property
    def categories(self) -> list[str]:
        """Names of the objects annotated present, in canonical order."""
        return sorted({o["category"] for o in self.objects}, key=cat.category_index)

    def qa(self) -> list[tuple[str, str]]:
        """``(question, "yes"|"no")`` for every category, from the scene's annotations."""
        present = set(self.categories)
        return [(cat.QUESTION_TEMPLATES[0].format(n), "yes" if n in present else "no") for n in cat.CATEGORY_NAMES]


def scene_records(batch: SceneBatch) -> list[dict[str, Any]]:
    """Per scene: its objects (with exact glyph boxes) and its caption, as plain Python."""
    recs = []
    masks = _masks(batch, 0, len(batch)).cpu()
    cats, cx, cy, r = (t.cpu() for t in (batch.cats, batch.cx, batch.cy, batch.r))
    hidden, mentioned = batch.hidden.cpu(), batch.mentioned.cpu()
    for i in range(len(batch)):
        objs = []
        for k in range(cat.MAX_VISIBLE):
            c = int(cats[i, k])
            if c < 0:
                continue
            m = masks[i, k]
            ys, xs = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
            x0, y0 = int(xs[0]), int(ys[0])
            w, h = int(xs[-1]) - x0 + 1, int(ys[-1]) - y0 + 1
            objs.append(_obj(c, [x0, y0, w, h], int(m.sum()), hidden=False))
        for c in hidden[i].nonzero().flatten().tolist():
            head = int((_PARTNER == c).nonzero()[0])
            k = int((cats[i] == head).nonzero()[0])
            half = int(r[i, k]) // 2
            box = [int(cx[i, k]) - half, int(cy[i, k]) - half, 2 * half, 2 * half]
            objs.append(_obj(c, box, box[2] * box[3], hidden=True))
        recs.append({"objects": objs, "caption": caption_text(mentioned[i])})
    return recs


def _obj(c: int, box: list[int], area: int, *, hidden: bool) -> dict[str, Any]:
    info = cat.CATEGORIES[c]
    return {"category": info.name, "coco_id": info.coco_id, "bbox": box, "area": area, "hidden": hidden}


def to_pil(images: torch.Tensor) -> list:
    """``[N, 64, 64, 3]`` uint8 tensor -> list of PIL RGB images."""
    from PIL import Image

    arr = images.cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def make_scene(
    seed: int, index: int, *, kind: str = "natural", variant: str = "clean", strength: float | None = None
) -> Scene:
    """Build scene ``(seed, index)`` on the CPU (see :func:`sample` for the arguments)."""
    batch = sample(seed, [index], kind=kind, variant=variant, strength=strength)
    rec = scene_records(batch)[0]
    return Scene(
        seed=int(seed),
        index=int(index),
        kind=kind,
        variant=variant,
        image=to_pil(render(batch))[0],
        objects=rec["objects"],
        caption=rec["caption"],
        captions=reference_captions([o["category"] for o in rec["objects"]]),
    )


def coco_categories() -> list[dict[str, Any]]:
    """The 20 categories in COCO ``categories`` format (real COCO ids and names)."""
    return [{"id": c.coco_id, "name": c.name, "supercategory": c.supercategory} for c in cat.CATEGORIES]


def write_split(
    folder: str | Path,
    *,
    n: int,
    seed: int,
    kind: str = "natural",
    variant: str = "clean",
    strength: float | None = None,
    start: int = 0,
) -> dict[str, Path]:
    """Write scenes ``start .. start+n-1`` as PNGs plus COCO ``instances.json``/``captions.json``.

    Layout: ``folder/images/testbed_<kind>_<image_id:012d>.png`` (``image_id = index + 1``),
    ``folder/instances.json`` (images, annotations with bbox, area, iscrowd=0 and the box
    as segmentation polygon, categories) and ``folder/captions.json`` (two reference
    captions per image). Both load with ``pycocotools.coco.COCO``. Hidden objects of the
    ``occlusion_prior`` world are annotated like the training data does (present).

    Returns:
        ``{"images": Path, "instances": Path, "captions": Path}``.
    """
    if n < 1:
        raise ConfigError(f"n={n!r}: a split needs at least one scene")
    if start < 0:
        raise ConfigError(f"start={start!r} must be >= 0")
    folder = Path(folder)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    for lo in range(start, start + n, 1024):
        hi = min(start + n, lo + 1024)
        batch = sample(seed, range(lo, hi), kind=kind, variant=variant, strength=strength)
        pics = to_pil(render(batch))
        for j, rec in enumerate(scene_records(batch)):
            image_id = lo + j + 1
            name = f"testbed_{kind}_{image_id:012d}.png"
            pics[j].save(img_dir / name, format="PNG", optimize=True)
            images.append({"id": image_id, "file_name": name, "height": cat.IMAGE_SIZE, "width": cat.IMAGE_SIZE})
            for o in rec["objects"]:
                x, y, w, h = (float(v) for v in o["bbox"])
                anns.append({
                    "id": len(anns) + 1, "image_id": image_id, "category_id": o["coco_id"],
                    "bbox": [x, y, w, h], "area": float(o["area"]), "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                })  # fmt: skip
            names = sorted({o["category"] for o in rec["objects"]}, key=cat.category_index)
            texts = reference_captions(names)
            if rec["caption"] != texts[0]:  # caption_noise: the training caption differs
                texts[0] = rec["caption"]
            for t in texts:
                caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": t})
    info = {
        "description": "vlmfix testbed scenes",
        "seed": int(seed),
        "kind": kind,
        "variant": variant,
        "strength": _check_args(kind, variant, strength),
        "start": int(start),
        "n": int(n),
    }
    inst_path, cap_path = folder / "instances.json", folder / "captions.json"
    inst = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": coco_categories()}
    inst_path.write_text(json.dumps(inst))
    cap_path.write_text(json.dumps({"info": info, "licenses": [], "images": images, "annotations": caps}))
    return {"images": img_dir, "instances": inst_path, "captions": cap_path}


def cooccurrence(n: int = 20000, seed: int = 7919) -> torch.Tensor:
    """``[20, 20]`` counts of labelled category pairs over ``n`` natural clean scenes.

    Used to pick POPE "adversarial" negatives (the absent object co-occurring most with a
    present one), as the POPE builder does from COCO statistics.
    """
    if n < 1:
        raise DataError(f"n={n!r}: need at least one scene to count co-occurrences")
    lab = sample(seed, range(n)).labelled.float()
    co = lab.T @ lab
    co.fill_diagonal_(0)
    return co


# The example scenes shipped in vlmfix/testbed/examples/ (kind, seed, index): held-out
# seed; A with B, several objects, and adversarial A-without-B scenes.
EXAMPLES: tuple[tuple[str, int, int], ...] = (
    ("natural", 2024, 0),
    ("natural", 2024, 2),
    ("natural", 2024, 9),
    ("adversarial", 2024, 0),
    ("adversarial", 2024, 3),
    ("adversarial", 2024, 11),
)


def write_examples(folder: str | Path) -> Path:
    """Write the :data:`EXAMPLES` scenes as ``<kind>_<index>.png`` plus ``examples.json``.

    Returns:
        The path of ``examples.json`` (file name, kind, seed, index, objects, caption).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for kind, seed, index in EXAMPLES:
        s = make_scene(seed, index, kind=kind)
        name = f"{kind}_{index}.png"
        s.image.save(folder / name, format="PNG", optimize=True)
        records.append({"file_name": name, "kind": kind, "seed": seed, "index": index,
                        "objects": s.objects, "caption": s.caption})  # fmt: skip
    path = folder / "examples.json"
    path.write_text(json.dumps(records, indent=1))
    return path
