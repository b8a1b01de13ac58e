"""CHAIR tokenizer, plural normalizer, phrase merging and object mentions."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError
from vlmfix.eval.chair import COCO_CATEGORIES, SYNONYMS, extract_mentions, merged_tokens, singularize, tokenize


@pytest.mark.parametrize(
    "plural,singular",
    [
        ("men", "man"),
        ("women", "woman"),
        ("people", "person"),
        ("children", "child"),
        ("policemen", "policeman"),
        ("knives", "knife"),
        ("buses", "bus"),
        ("busses", "bus"),
        ("glasses", "glass"),
        ("ties", "tie"),
        ("neckties", "necktie"),
        ("bowties", "bowtie"),
        ("skis", "ski"),
        ("mice", "mouse"),
        ("benches", "bench"),
        ("boxes", "box"),
        ("sandwiches", "sandwich"),
        ("ponies", "pony"),
        ("cookies", "cookie"),
        ("shelves", "shelf"),
        ("gloves", "glove"),
        ("tomatoes", "tomato"),
        ("shoes", "shoe"),
        ("giraffes", "giraffe"),
        ("horses", "horse"),
        ("vases", "vase"),
        ("bananas", "banana"),
        ("taxis", "taxi"),
        ("teeth", "tooth"),
        ("cacti", "cactus"),
        ("umbrellas", "umbrella"),
        ("toothbrushes", "toothbrush"),
        ("dishes", "dish"),
    ],
)
def test_plurals(plural, singular):
    assert singularize(plural) == singular


@pytest.mark.parametrize(
    "word",
    ["bus", "glass", "grass", "dress", "is", "this", "his", "was", "has", "its", "sheep", "scissors",
     "tennis", "series", "species", "canvas", "gas", "cactus", "octopus", "analysis", "dog", "hot",
     "seated", "tied", "skiing", "specimen", "a", "3"],
)  # fmt: skip
def test_non_plurals_unchanged(word):
    assert singularize(word) == word


def test_avoids_pattern_en_faults():
    # pattern.en.singularize gives bu, ty and glas for these
    assert [singularize(w) for w in ("bus", "ties", "glass")] == ["bus", "tie", "glass"]


def test_tokenize_spans_and_clitics():
    text = "The man's dog isn't on the SOFA... It's 3.5 m, a t-shirt!"
    toks = tokenize(text)
    assert [t.text for t in toks] == [
        "the", "man", "'s", "dog", "is", "n't", "on", "the", "sofa", "...", "it", "'s", "3.5", "m", ",",
        "a", "t-shirt", "!",
    ]  # fmt: skip
    for t in toks:
        assert text[t.start : t.end].lower() == t.text


def test_tokenize_skips_control_characters():
    assert [t.text for t in tokenize("There\x04\x05\x06 is a cat\x00")] == ["there", "is", "a", "cat"]


def test_two_word_merging_and_len():
    toks = merged_tokens("Two hot dogs, a teddy bear and a traffic light.")
    assert [t.text for t in toks] == ["two", "hot dog", ",", "a", "teddy bear", "and", "a", "traffic light", "."]
    assert "Two hot dogs, a teddy bear and a traffic light."[toks[1].start : toks[1].end] == "hot dogs"


@pytest.mark.parametrize(
    "caption,categories",
    [
        ("A hot dog next to a dog.", ["hot dog", "dog"]),
        ("A teddy bear and a bear.", ["teddy bear", "bear"]),
        ("A stop sign near a fire hydrant and a parking meter.", ["stop sign", "fire hydrant", "parking meter"]),
        ("He holds a cell phone and a tennis racket.", ["cell phone", "tennis racket"]),
        ("A baseball bat, a baseball glove and a wine glass.", ["baseball bat", "baseball glove", "wine glass"]),
        ("A hair drier by the dining table and a potted plant.", ["hair drier", "dining table", "potted plant"]),
        ("Two wine glasses.", ["wine glass"]),
        ("A baby elephant walks.", ["elephant"]),  # not a person
        ("A man in a bow tie.", ["person", "tie"]),
        ("The buses and the knives.", ["bus", "knife"]),
        ("People with skis.", ["person", "skis"]),
        ("A puppy on a couch under the television.", ["dog", "couch", "tv"]),
    ],
)
def test_mentions(caption, categories):
    mentions, _ = extract_mentions(caption)
    assert [m.category for m in mentions] == categories


def test_toilet_seat_is_not_a_chair():
    assert [m.category for m in extract_mentions("The toilet seat is up.")[0]] == ["toilet"]
    # "seat" apart from "toilet" in the same caption is still part of the toilet
    assert [m.category for m in extract_mentions("A toilet with its seat up.")[0]] == ["toilet"]
    assert [m.category for m in extract_mentions("A seat in the park.")[0]] == ["chair"]


def test_repeats_are_counted_with_spans():
    caption = "A dog. Another dog and dogs."
    mentions, n = extract_mentions(caption)
    assert [m.word for m in mentions] == ["dog", "dog", "dog"]
    assert [caption[m.start : m.end] for m in mentions] == ["dog", "dog", "dogs"]
    assert n == 8


def test_normalizers():
    caption = "A girl with her hair tied back is skiing, seated on a bench."
    lemma = [m.category for m in extract_mentions(caption, "lemma")[0]]
    plural = [m.category for m in extract_mentions(caption, "plural")[0]]
    assert lemma == ["person", "tie", "skis", "chair", "bench"]
    assert plural == ["person", "bench"]
    # nouns read as nouns in both: "seating area", "a battered suitcase"
    assert [m.category for m in extract_mentions("A seating area and a battered suitcase.")[0]] == ["suitcase"]
    with pytest.raises(ConfigError, match="unknown CHAIR normalizer"):
        extract_mentions("a dog", "wordnet-ish")


def test_vocabulary_covers_the_80_categories():
    assert len(COCO_CATEGORIES) == 80
    for cat, words in SYNONYMS.items():
        assert cat in words
    words = [w for ws in SYNONYMS.values() for w in ws]
    assert len(words) == len(set(words)), "a word maps to two categories"
