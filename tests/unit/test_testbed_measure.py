"""The testbed's self-contained metrics: POPE parser, question sets, caption scores."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError, ModelNotFoundError
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.measure import (
    TARGETS,
    caption_metrics,
    check_targets,
    measure_folder,
    mentions,
    pope_answer,
    pope_metrics,
    pope_questions,
)


@pytest.mark.parametrize(
    "text,want",
    [
        ("yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("no", "no"),
        ("No.", "no"),
        ("There is not a dog.", "no"),
        ("NO", "yes"),  # the official parser is case-sensitive
        ("Yes. No dog.", "yes"),  # only the first sentence counts
        ("no, there is none", "no"),
    ],
)
def test_pope_parser_is_the_official_rule(text, want):
    assert pope_answer(text) == want


def test_mentions_keep_order_and_repeats():
    assert mentions("A fork and a knife and a fork.") == [cat.category_index(n) for n in ("fork", "knife", "fork")]
    assert mentions("a forklift") == []


def test_caption_metrics_on_known_captions():
    batch = scenes.sample(1, range(300), kind="adversarial")
    truth = [scenes.caption_text(batch.labelled[i]) for i in range(len(batch))]
    m = caption_metrics(batch, truth)
    assert m["caption_recall"] == 1.0 and m["chair_i"] == 0.0 and m["partner_rate"] == 0.0
    assert m["partner_instances"] == int(batch.visible[:, [cat.category_index(a) for a, _ in cat.PAIRS]].sum())
    # name every absent partner: partner rate 1, and those are not "non-partner" mentions
    noisy = [scenes.caption_text(batch.labelled[i] | _partners(batch, i)) for i in range(len(batch))]
    m = caption_metrics(batch, noisy)
    assert m["partner_rate"] == 1.0 and m["nonpartner_absent_mentions"] == 0 and m["other_absent_rate"] == 0.0
    assert m["chair_s"] == 1.0
    # a wrong non-partner object counts as such
    m = caption_metrics(batch, [t + " and a clock" for t in truth])
    absent_clock = sum(not bool(batch.labelled[i, cat.category_index("clock")]) for i in range(len(batch)))
    assert m["nonpartner_absent_mentions"] == absent_clock
    assert m["partner_rate"] == 0.0 and m["caption_recall"] == 1.0


def _partners(batch, i):
    row = batch.labelled[i].clone()
    row[:] = False
    for a, b in cat.PAIRS:
        if batch.labelled[i, cat.category_index(a)]:
            row[cat.category_index(b)] = True
    return row


def test_pope_questions_random_and_adversarial():
    batch = scenes.sample(1, range(200), kind="adversarial")
    co = scenes.cooccurrence(n=4000)
    qs = pope_questions(batch, "adversarial", cooccur=co)
    assert qs == pope_questions(batch, "adversarial", cooccur=co)
    pairs = dict((cat.category_index(a), cat.category_index(b)) for a, b in cat.PAIRS)
    for j in range(0, len(qs), 2):
        (i, pos, y), (i2, neg, n) = qs[j], qs[j + 1]
        assert (y, n) == ("yes", "no") and i == i2
        assert batch.labelled[i, pos] and not batch.labelled[i, neg]
        if pos in pairs:  # a head's adversarial negative is its partner
            assert neg == pairs[pos]
    rq = pope_questions(batch, "random", seed=3)
    assert rq == pope_questions(batch, "random", seed=3) and rq != pope_questions(batch, "random", seed=4)
    assert all(not batch.labelled[i, c] for i, c, lab in rq if lab == "no")
    with pytest.raises(ConfigError):
        pope_questions(batch, "popular")


def test_pope_metrics():
    m = pope_metrics(["yes", "no", "yes", "no"], ["yes", "yes", "no", "no"])
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["yes_ratio"] == 0.5


def test_targets_and_missing_folder(tmp_path):
    summary = {name: 0.0 for v in TARGETS.values() for name, _, _ in v}
    res = check_targets(summary, "clean")
    assert res["adversarial/partner_rate"]["ok"] and not res["natural/caption_recall"]["ok"]
    with pytest.raises(ModelNotFoundError):
        measure_folder(tmp_path)
