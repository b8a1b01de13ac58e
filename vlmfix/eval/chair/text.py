"""Tokenizer and plural-to-singular normalizer used by CHAIR.

Both are vlmfix's own. The tokenizer follows the conventions of the Penn Treebank
tokenizer that the reference CHAIR implementations use (punctuation is its own token,
clitics such as ``n't`` and ``'s`` are split off, hyphenated words and decimal numbers
stay whole, and so does a hyphenated word holding a possessive, "bird's-eye"), and it keeps each token's character span in the original caption so that
hallucinated words can be highlighted.

The normalizer turns English plural nouns into their singular ("men" -> "man",
"knives" -> "knife", "buses" -> "bus", "ties" -> "tie", "skis" -> "ski") and leaves
everything else as it is. It is deliberately not a lemmatizer: verbs and gerunds are not
touched ("seated" stays "seated", so it is never read as the noun "seat"), and it avoids
the known faults of ``pattern.en.singularize`` ("bus" -> "bu", "ties" -> "ty",
"glass" -> "glas").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Token", "tokenize", "singularize", "verb_base_candidates"]


@dataclass(frozen=True)
class Token:
    """One word token: lowercased ``text`` and its span ``[start, end)`` in the caption."""

    text: str
    start: int
    end: int


# Order matters: the first alternative that matches at a position wins.
_CLITIC = r"(?:s|re|ve|ll|d|m)\b"
_TOKEN_RE = re.compile(
    rf"""
      \w+(?=n['’]t\b)                 # "is" of "isn't"; the clitic comes next
    | n['’]t\b
    | ['’]{_CLITIC}                    # clitics: 's 're 've 'll 'd 'm
    | \d+(?:[.,:]\d+)+                # 3.5  1,000  10:30
    | \w+['’]s(?:-\w+)+               # a possessive inside a hyphenated word: bird's-eye
    | \w+(?:-\w+|['’](?!{_CLITIC})\w+)*  # words, hyphenated words, o'clock
    | \.\.\.|--                       # ellipsis, dash
    | [^\w\s\x00-\x1f\x7f-\x9f]        # other punctuation; control characters are skipped
    """,
    re.VERBOSE | re.IGNORECASE,
)


def tokenize(text: str) -> list[Token]:
    """Split a caption into lowercased word and punctuation tokens with character spans.

    Args:
        text: the caption.

    Returns:
        Tokens in order; ``text[t.start:t.end].lower() == t.text`` for every token.

    Example:
        >>> [t.text for t in tokenize("A dog isn't on the sofa.")]
        ['a', 'dog', 'is', "n't", 'on', 'the', 'sofa', '.']
    """
    return [Token(m.group().lower(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


# --------------------------------------------------------------------------- normalizer

# Plurals that no suffix rule gets right.
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "children": "child",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "mice": "mouse",
    "lice": "louse",
    "oxen": "ox",
    "dice": "die",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    "criteria": "criterion",
    "phenomena": "phenomenon",
    "indices": "index",
    "appendices": "appendix",
    "matrices": "matrix",
    "vertices": "vertex",
    "crises": "crisis",
    "analyses": "analysis",
    "theses": "thesis",
    "oases": "oasis",
    "diagnoses": "diagnosis",
    "hypotheses": "hypothesis",
    "parentheses": "parenthesis",
    "axes": "axe",
    "buses": "bus",
    "busses": "bus",
    "quizzes": "quiz",
    "hooves": "hoof",
    "lenses": "lens",
    "gases": "gas",
    "canvases": "canvas",
    "atlases": "atlas",
    "irises": "iris",
}

# Words ending in -s that are not plurals, or plurals whose singular means something
# else. They are returned unchanged.
_UNCHANGED = frozenset(
    """
    is was has his this its us yes does goes thus plus minus perhaps always towards
    afterwards whereas besides sideways nowadays overseas lens news species series
    physics mathematics athletics gymnastics aerobics politics economics ethics
    clothes jeans pants shorts trousers pajamas pyjamas tights leggings scissors tongs
    pliers binoculars sunglasses eyeglasses goggles headphones earphones
    sheep deer fish moose bison aircraft swiss chaos kudos cosmos ethos pathos
    asbestos texas christmas gas canvas atlas alias bias pampas tennis chassis trellis ibis penis pelvis mantis
    paris elvis louis dennis davis lewis
    """.split()
)

# Nouns whose singular ends in -ie (so "-ies" -> "-ie", not "-y").
_IE_SINGULARS = frozenset(
    """
    tie necktie bowtie pie lie die cookie movie brownie hoodie goalie calorie rookie zombie hippie
    selfie smoothie birdie collie veggie beanie genie bookie prairie pixie sweetie
    cutie auntie budgie boogie eyrie lassie doggie
    """.split()
)

# Nouns whose plural is -ves but whose singular ends in -f / -fe.
_F_SINGULARS = {
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "loaves": "loaf",
    "shelves": "shelf",
    "halves": "half",
    "calves": "calf",
    "wolves": "wolf",
    "scarves": "scarf",
    "thieves": "thief",
    "elves": "elf",
    "selves": "self",
    "sheaves": "sheaf",
    "wharves": "wharf",
}

# Nouns whose singular ends in -o and whose plural takes -es.
_OES_SINGULARS = frozenset(
    """
    tomato potato hero echo volcano mosquito torpedo veto domino buffalo mango
    tornado cargo motto embargo avocado flamingo
    """.split()
)

# Nouns whose singular ends in -che (so "-ches" loses only the "s").
_CHE_SINGULARS = frozenset("headache moustache mustache avalanche niche cache cliche quiche creche douche".split())

# Nouns whose singular ends in -us (so "-uses" loses "es").
_US_SINGULARS = frozenset(
    """
    virus campus bonus cactus octopus walrus circus census hippopotamus citrus fungus
    chorus status platypus abacus syllabus thesaurus sinus focus genus bus
    """.split()
)

# -men words that are not compounds of "man".
_MEN_SINGULAR = frozenset(
    "specimen abdomen omen stamen semen hymen amen ramen yemen regimen acumen bitumen lumen albumen cyclamen".split()
)

# -is words that are plurals of -i nouns (everything else ending in -is is singular).
_I_PLURALS = frozenset(
    """
    skis taxis kiwis safaris bikinis semis yetis alibis chilis martinis zucchinis
    broccolis rotis wikis emojis minis sushis salamis
    """.split()
)

# -us words that are plurals of -u nouns.
_U_PLURALS = frozenset("menus emus gnus tutus gurus haikus tofus zulus".split())


def singularize(word: str) -> str:
    """Return the singular of an English plural noun; any other word is returned as is.

    Args:
        word: one lowercased token.

    Returns:
        The singular form, e.g. "men" -> "man", "knives" -> "knife", "buses" -> "bus",
        "ties" -> "tie", "skis" -> "ski", "glasses" -> "glass", "boxes" -> "box".
        Non-plurals ("bus", "glass", "is", "sheep", "scissors") come back unchanged.

    Example:
        >>> [singularize(w) for w in ["people", "benches", "bus", "ponies", "hot"]]
        ['person', 'bench', 'bus', 'pony', 'hot']
    """
    w = word
    if len(w) < 3 or not w.isalpha():
        return _IRREGULAR.get(w, w)
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _UNCHANGED:
        return w
    if w.endswith("women"):
        return w[:-5] + "woman"
    if w.endswith("men") and w not in _MEN_SINGULAR:
        return w[:-3] + "man"
    if w.endswith("children"):
        return w[:-8] + "child"
    if w.endswith("people"):
        return w
    if not w.endswith("s"):
        return w
    # from here on the word ends in -s
    if w.endswith(("ss", "sis", "itis")):
        return w
    if w.endswith("us"):
        return w[:-1] if w in _U_PLURALS else w
    if w.endswith("is"):
        return w[:-1] if w in _I_PLURALS else w
    if w.endswith("ies"):
        return w[:-1] if w[:-1] in _IE_SINGULARS else w[:-3] + "y"
    if w.endswith("ves"):
        return _F_SINGULARS.get(w, w[:-1])
    if w.endswith(("sses", "shes", "xes", "zzes")):
        return w[:-2]
    if w.endswith("ches"):
        return w[:-1] if w[:-1] in _CHE_SINGULARS else w[:-2]
    if w.endswith("uses"):
        return w[:-2] if w[:-2] in _US_SINGULARS else w[:-1]
    if w.endswith("oes"):
        return w[:-2] if w[:-2] in _OES_SINGULARS else w[:-1]
    return w[:-1]


# -ing / -ed words that a POS tagger reads as nouns or adjectives ("seating area",
# "a training room", "a battered suitcase", "a crowded street"), so WordNet leaves them.
_NOT_VERB_FORMS = frozenset("seating training battered crowded bedding".split())


def verb_base_candidates(word: str) -> list[str]:
    """Return possible base forms of an ``-ing`` / ``-ed`` verb form, most likely first.

    Used only by CHAIR's ``lemma`` normalizer, which, like a POS-tagged WordNet
    lemmatizer, reads "tied" as "tie" and "skiing" as "ski".

    Bases that English spelling rules out are dropped (:func:`~vlmfix.eval.chair.rules.verb_base_ok`:
    a one-syllable consonant-vowel-consonant base doubles its consonant, so "caring" is
    not "car").

    Example:
        >>> verb_base_candidates("skiing"), verb_base_candidates("tied"), verb_base_candidates("caring")
        (['ski', 'skie'], ['ti', 'tie'], ['care'])
    """
    from vlmfix.eval.chair.rules import verb_base_ok  # rules imports Token from here

    if word in _NOT_VERB_FORMS:
        return []
    for suffix in ("ing", "ed"):
        if len(word) >= len(suffix) + 2 and word.endswith(suffix) and word.isalpha():
            stem = word[: -len(suffix)]
            out = [stem, stem + "e"]
            if len(stem) > 2 and stem[-1] == stem[-2]:
                out.append(stem[:-1])  # "shopping" -> "shop"
            # spelling decides between the bases: "caring" is care + ing, not car + ing
            return [b for b in out if verb_base_ok(b, word)]
    return []
