"""The testbed scene world: determinism, priors, mechanisms, splits and COCO files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from vlmfix.errors import ConfigError
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes

N = 12000  # enough for +-0.03 on the priors (seeded, so the checks are deterministic)


@pytest.fixture(scope="module")
def natural():
    return scenes.sample(11, range(N))


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_catalog_glyphs_are_unique_and_pairs_never_share_a_colour():
    glyphs = [(c.shape, c.colour) for c in cat.CATEGORIES]
    assert len(set(glyphs)) == len(glyphs) == 20
    assert len({c.coco_id for c in cat.CATEGORIES}) == 20
    real = {"person": 1, "car": 3, "dog": 18, "fork": 48, "knife": 49, "tv": 72, "mouse": 74, "sink": 81, "clock": 85}
    assert all(cat.CATEGORIES[cat.category_index(n)].coco_id == i for n, i in real.items())
    for a, b in cat.PAIRS:
        ca, cb = cat.CATEGORIES[cat.category_index(a)], cat.CATEGORIES[cat.category_index(b)]
        assert ca.colour != cb.colour, (a, b)
        assert cat.category_index(b) == cat.category_index(a) + 1  # captions say "a A and a B"


@pytest.mark.parametrize(
    "kind,variant", [("natural", "clean"), ("natural", "occlusion_prior"), ("adversarial", "clean")]
)
def test_same_seed_and_index_give_identical_scenes(kind, variant):
    a = scenes.make_scene(5, 17, kind=kind, variant=variant)
    b = scenes.make_scene(5, 17, kind=kind, variant=variant)
    assert _png(a.image) == _png(b.image)
    assert a.objects == b.objects and a.caption == b.caption
    # a scene does not depend on the batch it was made in
    big = scenes.sample(5, range(40), kind=kind, variant=variant)
    assert np.array_equal(np.asarray(a.image), scenes.render(big)[17].numpy())
    assert scenes.scene_records(big)[17]["objects"] == a.objects
    # and another seed or index gives another scene
    others = [
        scenes.make_scene(6, 17, kind=kind, variant=variant),
        scenes.make_scene(5, 18, kind=kind, variant=variant),
    ]
    assert all(_png(o.image) != _png(a.image) for o in others)


def test_pair_priors_hold(natural):
    lab = natural.labelled.float()
    for a, b in cat.PAIRS:
        ia, ib = cat.category_index(a), cat.category_index(b)
        p_b_given_a = (lab[:, ia] * lab[:, ib]).sum() / lab[:, ia].sum()
        assert 0.80 <= float(p_b_given_a) <= 0.90, (a, b, float(p_b_given_a))
        p_b_without_a = (lab[:, ib] * (1 - lab[:, ia])).sum() / (1 - lab[:, ia]).sum()
        assert float(p_b_without_a) < 0.15
    # no prior between non-pair categories: P(y | x) stays near the base rate
    car, cup = cat.category_index("car"), cat.category_index("cup")
    assert abs(float((lab[:, car] * lab[:, cup]).sum() / lab[:, car].sum() - lab[:, cup].mean())) < 0.04


def test_object_counts_and_every_category_occurs(natural):
    count = natural.visible.sum(1)
    assert int(count.min()) == 1 and int(count.max()) == cat.MAX_VISIBLE
    assert torch.equal(count, (natural.cats >= 0).sum(1))
    assert bool(natural.visible.any(0).all())
    assert not natural.hidden.any() and not natural.noise.any()


def test_occlusion_prior_hides_partners_outside_the_object_cap():
    b = scenes.sample(11, range(N), variant="occlusion_prior")
    assert b.hidden.any()
    assert not (b.hidden & b.visible).any()
    heads = torch.tensor([cat.category_index(a) for a, _ in cat.PAIRS])
    partners = heads + 1
    assert not b.hidden[:, [i for i in range(20) if i not in partners.tolist()]].any()
    assert torch.equal(b.hidden[:, partners] & ~b.visible[:, heads], torch.zeros_like(b.hidden[:, partners]))
    # hidden partners do not count toward the 1..4 visible objects: full scenes still hide some
    full = b.visible.sum(1) == cat.MAX_VISIBLE
    assert bool((full & b.hidden.any(1)).any())
    # strength = P(hidden | partner attached)
    attached = b.labelled[:, partners] & b.visible[:, heads]
    rate = float(b.hidden[:, partners][attached].float().mean())
    assert abs(rate - cat.DEFAULT_STRENGTH["occlusion_prior"]) < 0.06
    # the hidden partner is drawn nowhere: only background and visible glyph colours appear
    imgs = scenes.render(scenes.sample(11, range(200), variant="occlusion_prior"))
    sub = scenes.sample(11, range(200), variant="occlusion_prior")
    for i in range(200):
        seen = {tuple(p) for p in imgs[i].reshape(-1, 3).tolist()}
        want = {(int(sub.bg[i]),) * 3} | {cat.COLOURS[cat.CATEGORIES[c].colour] for c in sub.cats[i].tolist() if c >= 0}
        assert seen == want


def test_caption_noise_names_absent_partners_at_the_strength():
    b = scenes.sample(11, range(N), variant="caption_noise")
    heads = torch.tensor([cat.category_index(a) for a, _ in cat.PAIRS])
    partners = heads + 1
    eligible = b.visible[:, heads] & ~b.labelled[:, partners]
    assert not b.noise[:, partners][~eligible].any()
    assert not b.noise[:, [i for i in range(20) if i not in partners.tolist()]].any()
    rate = float(b.noise[:, partners][eligible].float().mean())
    assert abs(rate - cat.DEFAULT_STRENGTH["caption_noise"]) < 0.06
    # same scenes as the clean world: noise touches captions, not images or annotations
    clean = scenes.sample(11, range(N))
    assert torch.equal(clean.visible, b.visible) and torch.equal(clean.cats, b.cats)


def test_adversarial_split_has_heads_without_partners():
    b = scenes.sample(2, range(2000), kind="adversarial")
    heads = torch.tensor([cat.category_index(a) for a, _ in cat.PAIRS])
    assert bool(b.visible[:, heads].any(1).all())  # every scene has some A ...
    assert not b.labelled[:, heads + 1].any()  # ... and no B at all
    count = b.visible.sum(1)
    assert int(count.min()) == 1 and int(count.max()) == cat.MAX_VISIBLE
    assert bool((b.visible[:, heads].sum(1) >= 2).any())


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        scenes.sample(0, [0], kind="weird")
    with pytest.raises(ConfigError, match="variant"):
        scenes.sample(0, [0], variant="noisy")
    with pytest.raises(ConfigError, match="adversarial"):
        scenes.sample(0, [0], kind="adversarial", variant="caption_noise")
    with pytest.raises(ConfigError, match="strength"):
        scenes.sample(0, [0], variant="caption_noise", strength=2.0)
    with pytest.raises(ConfigError, match="non-negative"):
        scenes.sample(0, [-1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy-2 warning
def test_write_split_is_coco_and_loads_in_pycocotools(tmp_path):
    coco_mod = pytest.importorskip("pycocotools.coco")
    from PIL import Image

    paths = scenes.write_split(tmp_path / "val", n=30, seed=4, variant="occlusion_prior")
    coco = coco_mod.COCO(str(paths["instances"]))
    assert len(coco.getImgIds()) == 30
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert names == set(cat.CATEGORY_NAMES)
    batch = scenes.sample(4, range(30), variant="occlusion_prior")
    images = scenes.render(batch)
    for i, img_id in enumerate(sorted(coco.getImgIds())):
        info = coco.loadImgs(img_id)[0]
        pixels = np.asarray(Image.open(paths["images"] / info["file_name"]))
        assert np.array_equal(pixels, images[i].numpy())  # PNG is lossless
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        got = sorted(coco.loadCats(a["category_id"])[0]["name"] for a in anns)
        want = sorted(cat.CATEGORY_NAMES[c] for c in batch.labelled[i].nonzero().flatten().tolist())
        assert got == want
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and a["area"] > 0 and 0 <= x and x + w <= 64 and y + h <= 64
            mask = coco.annToMask(a)  # the polygon is the box
            assert int(mask.sum()) == int(w * h)
    caps = coco_mod.COCO(str(paths["captions"]))
    assert len(caps.getAnnIds()) == 60
    first = caps.loadAnns(caps.getAnnIds(imgIds=1))[0]["caption"]
    assert first == scenes.caption_text(batch.mentioned[0])
    assert json.loads(paths["instances"].read_text())["info"]["variant"] == "occlusion_prior"


def test_visible_boxes_are_tight_around_the_glyph_pixels():
    s = scenes.make_scene(9, 3)
    arr = np.asarray(s.image)
    for o in s.objects:
        x, y, w, h = o["bbox"]
        colour = np.array(cat.COLOURS[cat.CATEGORIES[cat.category_index(o["category"])].colour])
        hit = (arr == colour).all(-1)
        inside = hit[y : y + h, x : x + w]
        assert inside.any(0).all() and inside.any(1).all()  # every row and column of the box is touched
        assert int(inside.sum()) == o["area"]


def test_captions_follow_the_canonical_order():
    assert scenes.caption_text(["knife", "cup", "fork"]) == "a fork and a knife and a cup."
    assert scenes.reference_captions(["dog"]) == ["a dog.", "there is a dog in the image."]
    s = scenes.make_scene(3, 1)
    assert s.caption == scenes.caption_text(s.categories)
    assert sum(a == "yes" for _, a in s.qa()) == len(s.categories)


def test_shipped_examples_match_the_world_definition():
    """The shipped models were trained on this world; any change to it shows up here."""
    from PIL import Image

    import vlmfix.testbed as tb

    records = json.loads((tb.EXAMPLES_DIR / "examples.json").read_text())
    assert [(r["kind"], r["seed"], r["index"]) for r in records] == list(scenes.EXAMPLES)
    for r in records:
        s = scenes.make_scene(r["seed"], r["index"], kind=r["kind"])
        shipped = np.asarray(Image.open(tb.EXAMPLES_DIR / r["file_name"]).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(s.image))
        assert r["objects"] == s.objects and r["caption"] == s.caption
