"""Context rules that decide when a CHAIR vocabulary word is *not* an object mention.

Each rule is a class of misreading, not a list of examples; ``docs/eval.md`` lists them.
They apply after tokenizing, normalizing and phrase merging:

- **verb forms** (``lemma`` normalizer only, :func:`verb_reading_allowed`): an ``-ing`` /
  ``-ed`` word is read as the verb of an object word ("skiing" -> ski) only when English
  spelling allows that base (a one-syllable base ending consonant-vowel-consonant doubles
  its last letter: "car" gives "carring", so "caring" comes from "care", not "car") and
  when the word stands where a verb can (not right after a determiner, possessive or
  preposition, where "a bowling alley", "her seated friend", "perfect for skiing" are a
  noun or an adjective).
- **units** (:func:`is_unit`): a word that is also a unit of measure ("meter") right
  after a number or before a dimension word is the unit ("5.5 meters", "two meters
  tall"), not the object (parking meter).
- **names** (:func:`is_name_part`): a capitalized word inside a run of capitalized words
  that is not at the start of a sentence belongs to a name ("Hello Kitty",
  "Mickey Mouse", "Burger King"), not to the object the word means in lowercase.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmfix.eval.chair.text import Token

__all__ = ["verb_base_ok", "verb_reading_allowed", "is_unit", "is_name_part", "UNIT_WORDS"]

_VOWELS = set("aeiou")

# Words after which a word is a noun or an adjective, not a finite or participle verb:
# determiners, possessives, quantifiers and prepositions.
_NOUN_CONTEXT = frozenset(
    """
    a an the this that these those some any each every no another such
    my your his her its our their 's whose
    of for in on at with without by from into onto about over under near behind beside
    between during after before through across toward towards to like
    """.split()
)

# Function words that never make a neighbouring capitalized word part of a name.
_FUNCTION_WORDS = frozenset(
    """
    a an the this that these those i it its there here in on at of and or but with to for as by
    is are was were be his her their our my your we he she they you some no
    one two three four five six seven eight nine ten several many
    """.split()
)

_NUMBER_WORDS = frozenset(
    """
    one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
    hundred hundreds thousand thousands half few several dozen dozens
    """.split()
)
_NUMERIC = re.compile(r"^\d+(?:[.,:]\d+)*$")

#: Vocabulary words that are also units of measure.
UNIT_WORDS = frozenset({"meter", "metre"})
_UNIT_BEFORE = frozenset({"square", "cubic", "per"})
_DIMENSIONS = frozenset({"away", "tall", "long", "high", "wide", "deep", "apart", "thick", "across", "above", "below"})

# Vocabulary words that are brand names of the object itself: capitalized, they still
# name it ("an Apple MacBook Pro" is a laptop, "a Jeep" a car).
_BRAND_OBJECTS = frozenset({"macbook", "iphone", "jeep", "frisbee", "airbus", "televison"})

_SENTENCE_END = frozenset({".", "!", "?", ":", ";", "...", '"', "“", "”"})


def verb_base_ok(base: str, form: str) -> bool:
    """Whether ``form`` (an ``-ing`` / ``-ed`` word) can be spelled from ``base``.

    A one-syllable base that ends consonant-vowel-consonant (last letter not w, x or y)
    doubles that consonant before the suffix ("stop" -> "stopping", "car" -> "carring"),
    so an undoubled form is not from it: "caring"/"cared" come from "care", not "car";
    "skiing" is "ski" + "ing"; "tied" is "tie" + "d".

    Example:
        >>> verb_base_ok("car", "caring"), verb_base_ok("care", "caring"), verb_base_ok("cup", "cupped")
        (False, True, True)
    """
    groups = re.findall(r"[aeiou]+", base)
    cvc = (
        len(base) >= 3
        and len(groups) == 1
        and base[-1] not in _VOWELS | {"w", "x", "y"}
        and base[-2] in _VOWELS
        and base[-3] not in _VOWELS
    )
    if not cvc:
        return True
    # the form must show the doubled consonant: base + last letter + suffix
    return form.startswith(base + base[-1])


def verb_reading_allowed(tokens: Sequence[Token], i: int) -> bool:
    """Whether token ``i`` stands where a verb form can stand (its part of speech from context).

    Right after a determiner, possessive, quantifier or preposition an ``-ing`` / ``-ed``
    word is a noun or an adjective ("a bowling alley", "the seated crowd", "perfect for
    skiing"), so it is not read as the verb of an object word.
    """
    return i == 0 or tokens[i - 1].text not in _NOUN_CONTEXT


def _is_number(text: str) -> bool:
    return bool(_NUMERIC.match(text)) or text in _NUMBER_WORDS


def is_unit(tokens: Sequence[Token], i: int) -> bool:
    """Whether token ``i`` (a normalized word) is a unit of measure in this context.

    A word of :data:`UNIT_WORDS` is a unit right after a number ("5.5 meters", "two
    meters", "a few meters"), after "square"/"cubic"/"per", or right before a dimension
    or distance word ("meters tall", "meters away").
    """
    if tokens[i].text not in UNIT_WORDS:
        return False
    prev = tokens[i - 1].text if i > 0 else ""
    nxt = tokens[i + 1].text if i + 1 < len(tokens) else ""
    return _is_number(prev) or prev in _UNIT_BEFORE or nxt in _DIMENSIONS


def _capitalized(caption: str, tok: Token) -> bool:
    return caption[tok.start : tok.end][:1].isupper()


def _sentence_initial(tokens: Sequence[Token], i: int, caption: str) -> bool:
    if i == 0:
        return True
    prev = tokens[i - 1]
    return prev.text in _SENTENCE_END or "\n" in caption[prev.end : tokens[i].start]


def is_name_part(tokens: Sequence[Token], i: int, caption: str) -> bool:
    """Whether token ``i`` is part of a proper name rather than a common noun.

    True when the token is capitalized (not an all-capitals acronym such as "TV"), is not
    the first word of a sentence, and a neighbouring token is a capitalized content word
    (not "A", "The", "One", "I", ...): "a Hello Kitty backpack", "a Mickey Mouse doll",
    a sign reading "City Bus". Brand names that are the object itself ("MacBook",
    "iPhone", "Jeep") stay mentions. Captions written mostly in capitals
    (more than 60% of the words) carry no such signal and are left alone.
    """
    tok = tokens[i]
    surface = caption[tok.start : tok.end]
    if not tok.text[:1].isalpha() or not _capitalized(caption, tok) or _sentence_initial(tokens, i, caption):
        return False
    if len(surface) > 1 and surface.replace(" ", "").isupper():
        return False  # an acronym written as always ("TV"), not a capitalized name
    if tok.text in _BRAND_OBJECTS:
        return False
    words = [t for t in tokens if t.text[:1].isalpha()]
    if words and sum(_capitalized(caption, t) for t in words) > 0.6 * len(words):
        return False
    for j in (i - 1, i + 1):
        if 0 <= j < len(tokens):
            other = tokens[j]
            if other.text[:1].isalpha() and other.text not in _FUNCTION_WORDS and _capitalized(caption, other):
                # the neighbour must touch this token (no punctuation between them)
                between = caption[min(tok.end, other.end) : max(tok.start, other.start)]
                if between.strip() == "":
                    return True
    return False
