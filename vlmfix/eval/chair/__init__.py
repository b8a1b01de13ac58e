"""CHAIR: object hallucination in captions (Rohrbach et al., EMNLP 2018).

Public API::

    from vlmfix.eval.chair import load_ground_truth, score_caption, chair_metrics
    gt = load_ground_truth("coco2014_gt_objects.json")      # or COCO annotations
    s = score_caption("A dog on a sofa.", gt.objects[42])
    chair_metrics([s])   # {"CHAIR_s", "CHAIR_i", "Recall", "Len", counts...}
"""

from vlmfix.eval.chair.ground_truth import (
    GroundTruth,
    ground_truth_from_coco,
    image_id_from_path,
    load_ground_truth,
)
from vlmfix.eval.chair.scorer import (
    CHAIR_METRIC_VERSION,
    DEFAULT_NORMALIZER,
    NORMALIZERS,
    CaptionScore,
    Mention,
    categories_in,
    chair_intervals,
    chair_metrics,
    extract_mentions,
    merged_tokens,
    score_caption,
)
from vlmfix.eval.chair.task import DEDUPE_CHOICES, DEFAULT_PROMPT, caption_samples, image_samples, run_chair
from vlmfix.eval.chair.text import singularize, tokenize
from vlmfix.eval.chair.vocab import (
    COCO_CATEGORIES,
    NON_OBJECT_COMPOUNDS,
    PHRASES,
    POSSESSIVE_COMPOUNDS,
    SYNONYMS,
    category_of,
)

__all__ = [
    "CHAIR_METRIC_VERSION",
    "COCO_CATEGORIES",
    "DEFAULT_NORMALIZER",
    "DEDUPE_CHOICES",
    "NON_OBJECT_COMPOUNDS",
    "NORMALIZERS",
    "PHRASES",
    "POSSESSIVE_COMPOUNDS",
    "SYNONYMS",
    "DEFAULT_PROMPT",
    "CaptionScore",
    "GroundTruth",
    "Mention",
    "caption_samples",
    "categories_in",
    "chair_intervals",
    "category_of",
    "chair_metrics",
    "extract_mentions",
    "ground_truth_from_coco",
    "image_id_from_path",
    "image_samples",
    "load_ground_truth",
    "merged_tokens",
    "run_chair",
    "score_caption",
    "singularize",
    "tokenize",
]
