"""CHAIR object-mention extraction and metrics.

CHAIR (Rohrbach et al., EMNLP 2018, https://arxiv.org/abs/1809.02156) measures object
hallucination in captions:

- CHAIR_s = captions with at least one hallucinated mention / captions
- CHAIR_i = hallucinated mentions / mentions (a repeated word counts each time)
- Recall  = ground-truth objects mentioned / ground-truth objects (summed over captions)
- Len     = mean word tokens per caption, counted after two-word merging, punctuation
  included (the convention of the reference implementations)

Pipeline per caption: tokenize (with character spans) -> singularize each token ->
merge two-word phrases -> drop "seat" when a toilet is mentioned (a toilet seat is not
a chair) -> map words to the 80 COCO categories.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from vlmfix.errors import ConfigError
from vlmfix.eval.bootstrap import BootstrapSpec, bootstrap_intervals, group_counts, safe_div
from vlmfix.eval.chair.rules import is_name_part, is_unit, verb_reading_allowed
from vlmfix.eval.chair.text import Token, singularize, tokenize, verb_base_candidates
from vlmfix.eval.chair.vocab import PHRASES, WORD_TO_CATEGORY

__all__ = [
    "Mention",
    "CaptionScore",
    "merged_tokens",
    "extract_mentions",
    "score_caption",
    "chair_metrics",
    "CHAIR_METRIC_VERSION",
    "NORMALIZERS",
    "DEFAULT_NORMALIZER",
    "categories_in",
    "check_normalizer",
    "CHAIR_RATIOS",
    "chair_unit_counts",
    "chair_metric_fn",
    "chair_intervals",
]

logger = logging.getLogger(__name__)

#: Bumped whenever tokenizer, normalizer, vocabulary or metric definitions change.
CHAIR_METRIC_VERSION = "vlmfix-chair-2"

#: Normalizer names.
#: ``lemma`` (default): plural nouns -> singular, and ``-ed``/``-ing`` forms of object
#: words read as the object ("skiing" -> skis, "seated" -> seat -> chair, "tied" -> tie),
#: as the POS-tagged WordNet lemmatizer of OPERA's ``chair.py`` does; numbers are
#: comparable with those published with that pipeline.
#: ``plural``: plural nouns -> singular, nothing else (stricter: "hair tied back" is
#: not a necktie).
NORMALIZERS = ("lemma", "plural")
DEFAULT_NORMALIZER = "lemma"

# Words that are dropped as object mentions when the caption also mentions the object
# they are part of ("the seat of the toilet" must not count a chair).
_PART_OF = {"seat": "toilet"}


@dataclass(frozen=True)
class Mention:
    """One object mention: caption ``word`` (normalized), its COCO ``category`` and the
    character span ``[start, end)`` in the caption."""

    word: str
    category: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return {"word": self.word, "category": self.category, "start": self.start, "end": self.end}


@dataclass
class CaptionScore:
    """CHAIR result of one caption against one ground-truth set."""

    caption: str
    n_tokens: int
    mentions: list[Mention]
    hallucinated: list[Mention]
    ground_truth: list[str]
    found: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "mentions": [m.to_dict() for m in self.mentions],
            "hallucinated": [m.to_dict() for m in self.hallucinated],
            "ground_truth": self.ground_truth,
            "found": self.found,
        }


def check_normalizer(name: str) -> str:
    """Return ``name`` if it is a known normalizer, else raise :class:`ConfigError`."""
    if name not in NORMALIZERS:
        raise ConfigError(f"unknown CHAIR normalizer {name!r}; choose one of {list(NORMALIZERS)}")
    return name


def _normalize(tokens: list[Token], i: int, normalizer: str) -> str:
    word = tokens[i].text
    norm = singularize(word)
    if normalizer == "lemma" and norm not in WORD_TO_CATEGORY and verb_reading_allowed(tokens, i):
        for base in verb_base_candidates(norm):
            if base in WORD_TO_CATEGORY:
                return base
    return norm


_MAX_PHRASE = max(len(k.split(" ")) for k in PHRASES)


def merged_tokens(caption: str, normalizer: str = DEFAULT_NORMALIZER) -> list[Token]:
    """Tokenize, normalize and merge multi-word phrases (longest first).

    Args:
        caption: the caption.
        normalizer: one of :data:`NORMALIZERS`.

    Returns:
        Tokens whose ``text`` is the normalized (and possibly merged) word and whose span
        covers the original words. ``len(merged_tokens(c))`` is CHAIR's Len for ``c``.
    """
    check_normalizer(normalizer)
    raw = tokenize(caption)
    norm = [Token(_normalize(raw, i, normalizer), t.start, t.end) for i, t in enumerate(raw)]
    out: list[Token] = []
    i = 0
    while i < len(norm):
        for n in range(min(_MAX_PHRASE, len(norm) - i), 1, -1):
            merged = PHRASES.get(" ".join(t.text for t in norm[i : i + n]))
            if merged is not None:
                out.append(Token(merged, norm[i].start, norm[i + n - 1].end))
                i += n
                break
        else:
            out.append(norm[i])
            i += 1
    return out


def extract_mentions(caption: str, normalizer: str = DEFAULT_NORMALIZER) -> tuple[list[Mention], int]:
    """Return the COCO object mentions of a caption (repeats kept) and its Len.

    A vocabulary word is not a mention when it is a unit after a number ("5.5 meters")
    or part of a capitalized name ("Hello Kitty"); see :mod:`vlmfix.eval.chair.rules`.

    Example:
        >>> ms, n = extract_mentions("Two men eat hot dogs at a table.")
        >>> [(m.word, m.category) for m in ms], n
        ([('man', 'person'), ('hot dog', 'hot dog'), ('table', 'dining table')], 8)
    """
    tokens = merged_tokens(caption, normalizer)
    mentions = [
        Mention(t.text, WORD_TO_CATEGORY[t.text], t.start, t.end)
        for i, t in enumerate(tokens)
        if t.text in WORD_TO_CATEGORY and not is_unit(tokens, i) and not is_name_part(tokens, i, caption)
    ]
    present = {m.category for m in mentions}
    mentions = [m for m in mentions if _PART_OF.get(m.word) not in present]
    return mentions, len(tokens)


def categories_in(caption: str, normalizer: str = DEFAULT_NORMALIZER) -> set[str]:
    """Return the set of COCO categories mentioned in ``caption``."""
    return {m.category for m in extract_mentions(caption, normalizer)[0]}


def score_caption(caption: str, ground_truth: Iterable[str], normalizer: str = DEFAULT_NORMALIZER) -> CaptionScore:
    """Score one caption against the COCO categories present in its image.

    Args:
        caption: the generated caption (an empty one has no tokens and no mentions).
        ground_truth: COCO category names present in the image.
        normalizer: one of :data:`NORMALIZERS`.

    Returns:
        A :class:`CaptionScore` with every mention, the hallucinated ones (category not
        in the ground truth) and the ground-truth categories that were mentioned.
    """
    gt = set(ground_truth)
    mentions, n_tokens = extract_mentions(caption, normalizer)
    hallucinated = [m for m in mentions if m.category not in gt]
    found = sorted({m.category for m in mentions if m.category in gt})
    return CaptionScore(caption, n_tokens, mentions, hallucinated, sorted(gt), found)


def chair_metrics(scores: Iterable[CaptionScore | dict]) -> dict:
    """Aggregate CHAIR over captions.

    Args:
        scores: :class:`CaptionScore` objects or their ``to_dict()`` forms.

    Returns:
        ``{"CHAIR_s", "CHAIR_i", "Recall", "Len"}`` (the first three as fractions in
        [0, 1]) plus the counts they come from. A ratio with a zero denominator (no
        captions, no mentions, no ground-truth objects) is 0.0 and is logged.
    """
    n_caps = n_tokens = n_mentions = n_hall = n_hall_caps = n_gt = n_found = 0
    for s in scores:
        d = s.to_dict() if isinstance(s, CaptionScore) else s
        n_caps += 1
        n_tokens += d["n_tokens"]
        n_mentions += len(d["mentions"])
        n_hall += len(d["hallucinated"])
        n_hall_caps += bool(d["hallucinated"])
        n_gt += len(d["ground_truth"])
        n_found += len(d["found"])
    return {
        "CHAIR_s": _ratio(n_hall_caps, n_caps, "CHAIR_s", "captions"),
        "CHAIR_i": _ratio(n_hall, n_mentions, "CHAIR_i", "object mentions"),
        "Recall": _ratio(n_found, n_gt, "Recall", "ground-truth objects"),
        "Len": _ratio(n_tokens, n_caps, "Len", "captions"),
        "n_captions": n_caps,
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_hall,
        "n_hallucinated_captions": n_hall_caps,
        "n_gt_objects": n_gt,
        "n_found_objects": n_found,
        "n_tokens": n_tokens,
    }


#: The ratio metrics that carry a bootstrap interval (Len is a mean, it gets one too).
CHAIR_RATIOS = ("CHAIR_s", "CHAIR_i", "Recall", "Len")


def _count_vector(d: dict) -> list[int]:
    # captions, hallucinated captions, mentions, hallucinated mentions, GT objects, found, tokens
    return [
        1,
        bool(d["hallucinated"]),
        len(d["mentions"]),
        len(d["hallucinated"]),
        len(d["ground_truth"]),
        len(d["found"]),
        d["n_tokens"],
    ]


def chair_unit_counts(records: Iterable[dict]) -> tuple[list, np.ndarray]:
    """Per-image CHAIR counts for the bootstrap: ``(image ids, [images, 7] counts)``.

    Records are scored captions (``CaptionScore.to_dict()`` plus ``image_id``); error
    records are skipped. Several captions of one image are one unit.
    """
    ok = [r for r in records if "error" not in r]
    return group_counts(ok, lambda r: r.get("image_id", r.get("key")), _count_vector)


def chair_metric_fn(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised CHAIR metrics for :mod:`vlmfix.eval.bootstrap`: ``[R, 7]`` -> ``{metric: [R]}``."""
    caps, hall_caps, mentions, hall, gt, found, tokens = (totals[:, j] for j in range(7))
    return {
        "CHAIR_s": safe_div(hall_caps, caps),
        "CHAIR_i": safe_div(hall, mentions),
        "Recall": safe_div(found, gt),
        "Len": safe_div(tokens, caps),
    }


def chair_intervals(records: Iterable[dict], spec: BootstrapSpec | None = None) -> tuple[dict[str, list[float]], int]:
    """Bootstrap intervals of CHAIR_s, CHAIR_i, Recall and Len over images.

    Returns:
        ``({metric: [low, high]}, n_images)``.
    """
    images, counts = chair_unit_counts(records)
    if not images:
        counts = np.zeros((0, 7))
    return bootstrap_intervals(counts, chair_metric_fn, spec), len(images)


def _ratio(num: int, den: int, name: str, what: str) -> float:
    if den == 0:
        logger.warning("%s: no %s to divide by; reporting 0.0", name, what)
        return 0.0
    return num / den
