"""POPE prompt templates and answer parsers, registered by name.

Every parser has a version; the name and version go into every per-sample record and
every results file, so a number can always be traced to the rule that produced it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from vlmfix.eval.registry import lookup

__all__ = [
    "AnswerParser",
    "PARSERS",
    "TEMPLATES",
    "get_parser",
    "get_template",
    "apply_template",
    "parse_official",
    "parse_yes_no_unknown",
]

#: Prompt templates: ``{question}`` is replaced by the POPE question text.
TEMPLATES: dict[str, str] = {
    "plain": "{question}",
    "llava": "{question}\nAnswer the question using a single word or phrase.",
}


def get_template(name: str) -> str:
    """Return the template string registered as ``name`` (see :data:`TEMPLATES`)."""
    return lookup(TEMPLATES, name, "POPE template")


def apply_template(name: str, question: str) -> str:
    """Return the prompt for ``question`` under template ``name``.

    Example:
        >>> apply_template("llava", "Is there a dog in the image?")
        'Is there a dog in the image?\\nAnswer the question using a single word or phrase.'
    """
    return get_template(name).replace("{question}", question)


def parse_official(text: str) -> str:
    """The official POPE / LLaVA rule: return "yes" or "no".

    Take the first sentence (text before the first '.'), delete commas, split on single
    spaces, and answer "no" if one of the words is exactly ``No``, ``no`` or ``not``
    (case-sensitive), otherwise "yes". Consequences worth knowing: "NO", "Not sure",
    "There isn't a dog" and "" are all read as "yes".
    """
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


_HEDGES = re.compile(
    r"\b(?:not sure|unsure|uncertain|unclear|can ?not (?:tell|determine|say)|"
    r"can't (?:tell|determine|say)|don't know|do not know|hard to (?:tell|say)|"
    r"impossible to (?:tell|say|determine))\b"
)
_DECISIVE = re.compile(r"\b(?:yes|yeah|yep|no|not|none|nope)\b|n't\b")
_YES = frozenset({"yes", "yeah", "yep"})


def parse_yes_no_unknown(text: str) -> str:
    """A stricter alternative: return "yes", "no" or "unknown".

    Rule: lowercase the answer and keep its first sentence (up to the first '.', '!',
    '?' or newline). If it hedges ("not sure", "unclear", "can't tell", "don't know",
    "hard to say", ...) the answer is "unknown". Otherwise the first decisive word
    decides: "yes" / "yeah" / "yep" -> "yes"; "no", "not", "none", "nope" or a negated
    contraction ("isn't", "don't") -> "no". With no decisive word the answer is "unknown", so empty or
    off-topic outputs are counted as neither yes nor no.
    """
    first = re.split(r"[.!?\n]", text.strip().lower().replace("’", "'"), maxsplit=1)[0]
    if _HEDGES.search(first):
        return "unknown"
    m = _DECISIVE.search(first)
    if m is None:
        return "unknown"
    return "yes" if m.group() in _YES else "no"


@dataclass(frozen=True)
class AnswerParser:
    """A named, versioned rule that turns a model answer into yes / no (/ unknown)."""

    name: str
    version: str
    fn: Callable[[str], str]
    description: str

    def __call__(self, text: str) -> str:
        return self.fn(text)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version}


PARSERS: dict[str, AnswerParser] = {
    p.name: p
    for p in (
        AnswerParser(
            "pope_official",
            "1",
            parse_official,
            "first sentence, commas removed, 'no' iff a word is No/no/not (case-sensitive)",
        ),
        AnswerParser(
            "yes_no_unknown",
            "1",
            parse_yes_no_unknown,
            "first sentence, case-insensitive, hedges and no decisive word -> unknown",
        ),
    )
}


def get_parser(name: str) -> AnswerParser:
    """Return the answer parser registered as ``name`` (see :data:`PARSERS`)."""
    return lookup(PARSERS, name, "POPE answer parser")
