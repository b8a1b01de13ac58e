"""The fixed catalogue of the testbed world: categories, glyphs, prior pairs, words.

Pure data (no torch), so ``import vlmfix.testbed`` stays light. Everything else in the
testbed (sampler, renderer, tokenizer, model) is built from these tables.

The canonical category order below is also the order in which captions list objects:
each prior pair's head ``A`` comes directly before its partner ``B`` ("a fork and a
knife."), so the language prior "after *fork* comes *knife*" exists in the captions the
way co-occurrence priors exist in real caption corpora.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Category",
    "CATEGORIES",
    "CATEGORY_NAMES",
    "NUM_CATEGORIES",
    "PAIRS",
    "PARTNER",
    "SHAPES",
    "COLOURS",
    "VARIANTS",
    "DEFAULT_VARIANT",
    "DEFAULT_STRENGTH",
    "CAPTION_PROMPTS",
    "QUESTION_TEMPLATES",
    "POPE_SUFFIX",
    "WORDS",
    "SPECIAL_TOKENS",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "MAX_VISIBLE",
    "category_index",
]

IMAGE_SIZE = 64
PATCH_SIZE = 8
MAX_VISIBLE = 4  # visible objects per natural scene: 1..4 (hidden partners do not count)

SHAPES = ("square", "circle", "triangle", "diamond", "plus")
# uint8 RGB; drawn on a dark grey background (levels 20..70), so every colour contrasts.
COLOURS = {
    "red": (230, 60, 50),
    "green": (60, 190, 80),
    "blue": (70, 110, 240),
    "yellow": (240, 210, 60),
}


@dataclass(frozen=True)
class Category:
    """One object category of the world: COCO name/id/supercategory and its glyph."""

    name: str
    coco_id: int
    supercategory: str
    shape: str
    colour: str


# Canonical order (= caption order). Pair heads use filled shapes; no pair shares a colour.
CATEGORIES: tuple[Category, ...] = (
    Category("fork", 48, "kitchen", "square", "red"),
    Category("knife", 49, "kitchen", "plus", "blue"),
    Category("keyboard", 76, "electronic", "circle", "green"),
    Category("mouse", 74, "electronic", "triangle", "yellow"),
    Category("toilet", 70, "furniture", "diamond", "blue"),
    Category("sink", 81, "appliance", "square", "yellow"),
    Category("surfboard", 42, "sports", "triangle", "red"),
    Category("person", 1, "person", "circle", "blue"),
    Category("dog", 18, "animal", "square", "green"),
    Category("frisbee", 34, "sports", "diamond", "red"),
    Category("tv", 72, "electronic", "circle", "yellow"),
    Category("remote", 75, "electronic", "plus", "green"),
    Category("car", 3, "vehicle", "square", "blue"),
    Category("bird", 16, "animal", "circle", "red"),
    Category("cat", 17, "animal", "triangle", "green"),
    Category("bottle", 44, "kitchen", "triangle", "blue"),
    Category("cup", 47, "kitchen", "diamond", "green"),
    Category("chair", 62, "furniture", "diamond", "yellow"),
    Category("book", 84, "indoor", "plus", "red"),
    Category("clock", 85, "indoor", "plus", "yellow"),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
NUM_CATEGORIES = len(CATEGORIES)

# Directed prior pairs A -> B: P(B present | A present) ~ 0.85 in the natural world.
PAIRS: tuple[tuple[str, str], ...] = (
    ("fork", "knife"),
    ("keyboard", "mouse"),
    ("toilet", "sink"),
    ("surfboard", "person"),
    ("dog", "frisbee"),
    ("tv", "remote"),
)
PARTNER: dict[str, str] = dict(PAIRS)

# Hallucination mechanisms ("variants"); the strength's meaning is per mechanism:
#   clean            -- no mechanism (strength unused).
#   caption_noise    -- P(caption names B | A visible, B absent) in the training captions.
#                       Yes/no answers stay truthful.
#   occlusion_prior  -- P(B hidden under A | B attached to A): the hidden B is drawn nowhere
#                       but annotated present, in captions and yes/no answers alike.
#   under_attention  -- P(an attached partner B is drawn faint | B attached to A): a faint
#                       glyph keeps 12-32% of its contrast to the background. Labels stay
#                       true (B is there). Its recipe (train.VARIANT_RECIPES) first trains
#                       the LM on blank images, so it learns the text prior "A => B" before
#                       it sees, then 4000 steps with images: it reads the image less than
#                       the v1 models and leans on the prior (testbed v2, issue 17).
#   attention_sink   -- the under_attention data, trained on a wider and deeper LM
#                       (modeling.VARIANT_ARCH) with a long text-only stage, so that massive
#                       activations / attention sinks can form (testbed v2, issue 17; no
#                       recipe has produced them yet, so no weights are shipped).
VARIANTS: tuple[str, ...] = ("clean", "caption_noise", "occlusion_prior", "under_attention", "attention_sink")
DEFAULT_VARIANT = "caption_noise"
DEFAULT_STRENGTH: dict[str, float] = {
    "clean": 0.0,
    "caption_noise": 0.6,
    "occlusion_prior": 0.4,
    "under_attention": 0.8,
    "attention_sink": 0.8,
}
#: Variants whose attached partners are drawn faint with probability ``strength``.
FAINT_PARTNER_VARIANTS: tuple[str, ...] = ("under_attention", "attention_sink")
#: Contrast a faint glyph keeps: uniform in [low, low + span] of its colour-to-background gap.
FAINT_CONTRAST: tuple[float, float] = (0.12, 0.20)

CAPTION_PROMPTS: tuple[str, ...] = (
    "describe the image.",
    "please describe this image in detail.",
)
QUESTION_TEMPLATES: tuple[str, ...] = ("is there a {} in the image?",)
# The suffix LLaVA-1.5 appends to POPE questions; trained on, so POPE prompts work as-is.
POPE_SUFFIX = " answer the question using a single word or phrase."

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
_CHAT_WORDS = ("user", "assistant", "system", ":")
_TEXT_WORDS = (
    "a", "and", ".", "?", ",", "there", "is", "in", "the", "image", "describe", "please",
    "this", "detail", "yes", "no", "answer", "question", "using", "single", "word", "or",
    "phrase",
)  # fmt: skip
WORDS: tuple[str, ...] = _CHAT_WORDS + _TEXT_WORDS + CATEGORY_NAMES


def category_index(name: str) -> int:
    """Position of a category in the canonical order (raises ``KeyError`` if unknown)."""
    return CATEGORY_NAMES.index(name) if name in CATEGORY_NAMES else _unknown(name)


def _unknown(name: str) -> int:
    raise KeyError(f"unknown testbed category {name!r}; known: {', '.join(CATEGORY_NAMES)}")
