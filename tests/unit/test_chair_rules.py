"""CHAIR words that are not objects: one test per rule class, on sentences written here."""

from __future__ import annotations

import pytest

from vlmfix.eval.chair import extract_mentions
from vlmfix.eval.chair.rules import is_unit, verb_base_ok
from vlmfix.eval.chair.text import tokenize, verb_base_candidates
from vlmfix.eval.chair.vocab import NON_OBJECT_COMPOUNDS, POSSESSIVE_COMPOUNDS, WORD_TO_CATEGORY


def cats(caption: str, normalizer: str = "lemma") -> list[str]:
    return [m.category for m in extract_mentions(caption, normalizer)[0]]


# ------------------------------------------------------------------ verb forms: spelling


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("A nurse caring for an old man.", ["person", "person"]),  # care, not car
        ("The girl cared about the kitten.", ["person", "cat"]),
        ("Two boys are biking.", ["person", "bicycle"]),  # bike + ing
        ("A woman skiing down a slope.", ["person", "skis"]),  # ski + ing
        ("A girl with her hair tied back.", ["person", "tie"]),  # tie + d (WordNet reading)
        ("The boy cupped the ball in his hands.", ["person", "cup", "sports ball"]),  # doubled: cup
    ],
)
def test_verb_forms_follow_spelling_rules(caption, expected):
    assert cats(caption) == expected


@pytest.mark.parametrize(
    "base,form,ok",
    [
        ("car", "caring", False),  # a CVC monosyllable doubles: "carring"
        ("car", "cared", False),
        ("care", "caring", True),
        ("bat", "batted", True),  # doubled
        ("bat", "bated", False),
        ("ski", "skiing", True),  # ends in a vowel
        ("seat", "seated", True),  # two vowels before the consonant: no doubling
        ("bow", "bowed", True),  # w never doubles
        ("skateboard", "skateboarding", True),  # several syllables
    ],
)
def test_consonant_doubling_rule(base, form, ok):
    assert verb_base_ok(base, form) is ok


def test_verb_base_candidates_drop_impossible_bases():
    assert verb_base_candidates("caring") == ["care"]
    assert verb_base_candidates("stopped")[-1] == "stop"


# ------------------------------------------------------------------ verb forms: context


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("They went to a bowling alley.", []),  # after a determiner: a noun, not "bowl"
        ("The slope is perfect for skiing.", []),  # after a preposition: a gerund
        ("The mirror is for grooming.", []),  # not a groom
        ("A man skiing and a dog.", ["person", "skis", "dog"]),  # after a noun: a verb
        ("A woman is seated at the desk.", ["person", "chair", "dining table"]),
    ],
)
def test_part_of_speech_from_context(caption, expected):
    assert cats(caption) == expected


def test_plural_normalizer_never_reads_verb_forms():
    assert cats("A woman skiing.", "plural") == ["person"]


# ------------------------------------------------------------------ compounds


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("Gravel between the train tracks.", []),
        ("The batter stands at home plate.", ["person"]),
        ("A train on the train tracks.", ["train"]),  # the train itself still counts
        ("A tram car climbs the hill.", []),  # neither a train nor a car
        ("Two cable cars over the valley.", []),
        ("A train at the train station.", ["train", "train"]),  # stations stay mentions
    ],
)
def test_non_object_compounds(caption, expected):
    assert cats(caption) == expected


def test_compound_lists_are_consistent():
    assert {"home plate", "train track"} <= set(NON_OBJECT_COMPOUNDS)  # as the original pipeline
    for c in NON_OBJECT_COMPOUNDS:
        assert c not in WORD_TO_CATEGORY, c
    for key, value in POSSESSIVE_COMPOUNDS.items():
        assert " 's " in key and (value in WORD_TO_CATEGORY or "'" in value), key


# ------------------------------------------------------------------ possessives


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("A bird's-eye view of the city.", []),  # possessive inside a hyphenated word
        ("A bird's eye view of a harbor with boats.", ["boat"]),
        ("A catcher's mitt lies on the grass.", ["baseball glove"]),  # no person
        ("Fresh produce at a farmer's market.", []),
        ("The sign of a men's room.", []),
        ("The man's dog sleeps.", ["person", "dog"]),  # an owner still counts
    ],
)
def test_possessives(caption, expected):
    assert cats(caption) == expected


def test_hyphenated_possessive_is_one_token():
    assert [t.text for t in tokenize("a bird's-eye view")] == ["a", "bird's-eye", "view"]


# ------------------------------------------------------------------ units


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("The giraffe is 5.5 meters tall.", ["giraffe"]),
        ("A wall two meters high.", []),
        ("The dog stands a few meters away.", ["dog"]),
        ("A room of 20 square meters.", []),
        ("A row of parking meters on the street.", ["parking meter"]),
        ("Two meters line the curb next to a car.", ["car"]),  # number then meter: read as unit
        ("A meter by the curb.", ["parking meter"]),  # no number: the object
    ],
)
def test_units_after_numbers(caption, expected):
    assert cats(caption) == expected


def test_is_unit_needs_a_unit_word():
    toks = tokenize("5 dogs")
    assert not is_unit(toks, 1)


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("A girl with a Hello Kitty backpack.", ["person", "backpack"]),
        ("Hello Kitty stickers on a laptop.", ["laptop"]),
        ("A hydrant painted as Mickey Mouse.", ["fire hydrant"]),
        ('The bus reads "City Bus" on its side.', ["bus"]),
        ("One TV is on the wall and a Kitty sits below.", ["tv", "cat"]),  # acronym; lone capital
        ("A cat sleeps. Cat toys lie around.", ["cat", "cat"]),  # sentence start is no name
        ("A DOG AND A CAT ON A SOFA.", ["dog", "cat", "couch"]),  # all capitals: no signal
        ("The laptop is an Apple MacBook Pro.", ["laptop", "laptop"]),  # a brand that is the object
    ],
)
def test_capitalized_names_are_not_objects(caption, expected):
    assert cats(caption) == expected
