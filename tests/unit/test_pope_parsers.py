"""POPE answer parsers and prompt templates."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError
from vlmfix.eval.pope import PARSERS, apply_template, get_parser, get_template

TABLE = ["NO", "Not sure", "There isn't a dog", "Yes, but it is not clearly visible.", "No.", "yes", "Yes.\nNo", ""]


def official_restated(answer: str) -> str:
    """The LLaVA/POPE rule, written independently of vlmfix: scan characters up to the
    first '.', drop commas, cut at single spaces, look for the exact words No/no/not."""
    sentence = ""
    for ch in answer:
        if ch == ".":
            break
        if ch != ",":
            sentence += ch
    words, word = [], ""
    for ch in sentence:
        if ch == " ":
            words.append(word)
            word = ""
        else:
            word += ch
    words.append(word)
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


@pytest.mark.parametrize("answer", TABLE)
def test_official_parser_matches_independent_restatement(answer):
    assert get_parser("pope_official")(answer) == official_restated(answer)


def test_official_parser_table_values():
    # the official rule's known quirks: case-sensitive, contractions and hedges read as yes
    expected = ["yes", "yes", "yes", "no", "no", "yes", "yes", "yes"]
    assert [get_parser("pope_official")(a) for a in TABLE] == expected


def test_official_parser_splits_on_single_spaces_only():
    # "No\nthere" is one word under split(' '), so it is not the word "No"
    assert get_parser("pope_official")("No\nthere is a cat") == "yes"
    assert get_parser("pope_official")("There is no cat") == "no"
    assert get_parser("pope_official")("No, there is not") == "no"


def test_yes_no_unknown_table():
    expected = ["no", "unknown", "no", "yes", "no", "yes", "yes", "unknown"]
    assert [get_parser("yes_no_unknown")(a) for a in TABLE] == expected


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("I can't tell from the picture.", "unknown"),
        ("It is unclear whether there is a dog", "unknown"),
        ("None that I can see", "no"),
        ("there doesn’t seem to be one", "no"),
        ("A cat", "unknown"),
        ("  YES  ", "yes"),
        ("Nope.", "no"),
        ("Yeah, there is one.", "yes"),
    ],
)
def test_yes_no_unknown_more(answer, expected):
    assert get_parser("yes_no_unknown")(answer) == expected


def test_parsers_have_names_and_versions():
    for name, parser in PARSERS.items():
        assert parser.name == name
        assert parser.version
        assert parser.to_dict() == {"name": name, "version": parser.version}


def test_unknown_parser_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'pope_official'"):
        get_parser("pope_oficial")


def test_templates():
    q = "Is there a dog in the image?"
    assert apply_template("plain", q) == q
    assert apply_template("llava", q) == q + "\nAnswer the question using a single word or phrase."
    with pytest.raises(ConfigError, match="llava"):
        get_template("lava")
