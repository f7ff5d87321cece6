"""Filter stage: reasons, their order, and near-duplicate detection."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.shapes.world import render_scene
from stages.filters import FilterStage, hamming, phash, verdict


def make_spec(min_contrast=0.3, dedup_threshold=4, max_extra_instances=None):
    return SimpleNamespace(filters=SimpleNamespace(min_area_fraction=0.005, max_area_fraction=0.95,
                                                   min_contrast=min_contrast, dedup_threshold=dedup_threshold,
                                                   max_extra_instances=max_extra_instances),
                           shard_size=4)


def cls_score(name, n_components=1, n_instances=1, contrast=0.6):
    return {"name": name, "n_components": n_components, "n_instances": n_instances, "contrast": contrast}


def scores(*classes):
    return json.dumps({"per_class": list(classes)})


GOOD = scores(cls_score("circle"), cls_score("star"))


def make_batch(images, score_list, first_index=0):
    index = np.arange(first_index, first_index + len(images), dtype=np.int64)
    index.setflags(write=False)
    images = np.stack(images)
    images.setflags(write=False)
    col = np.array(score_list)
    col.setflags(write=False)
    return {"index": index, "image": images, "scores": col}


def scene(seed):
    return render_scene(seed, size=64).image


@pytest.mark.parametrize("classes, reason", [
    ([cls_score("circle"), cls_score("star")], ""),
    ([cls_score("circle"), cls_score("star", 0, 0)], "missing:star"),
    ([cls_score("circle", 3, 0), cls_score("star")], "area:circle"),
    ([cls_score("circle", contrast=0.1), cls_score("star")], "low_contrast"),
    # the first failing check wins, whatever the class order
    ([cls_score("circle", 2, 0, contrast=0.1), cls_score("star", 0, 0)], "missing:star"),
    ([cls_score("circle", contrast=0.0), cls_score("star", 2, 0)], "area:star"),
])
def test_verdict_reasons_and_order(classes, reason):
    assert verdict({"per_class": classes}, min_contrast=0.3) == reason


def test_instance_count_check_is_off_by_default_and_counts_prompted_objects():
    two = [cls_score("circle", 2, 2) | {"n_prompted": 1}, cls_score("star") | {"n_prompted": 1}]
    assert verdict({"per_class": two}, min_contrast=0.3) == ""
    assert verdict({"per_class": two}, min_contrast=0.3, max_extra_instances=1) == ""
    assert verdict({"per_class": two}, min_contrast=0.3, max_extra_instances=0) == "count:circle"
    twice = [cls_score("circle", 2, 2) | {"n_prompted": 2}]
    assert verdict({"per_class": twice}, min_contrast=0.3, max_extra_instances=0) == ""
    # missing and area come first
    assert verdict({"per_class": two + [cls_score("ring", 0, 0)]}, 0.3, 0) == "missing:ring"


def test_stage_marks_rows_and_never_drops_them():
    bad = scores(cls_score("circle"), cls_score("star", 0, 0))
    low = scores(cls_score("circle", contrast=0.05))
    batch = make_batch([scene(1), scene(2), scene(3)], [GOOD, bad, low])
    out = FilterStage(make_spec())(batch)
    assert out["keep"].dtype == bool and out["keep"].tolist() == [True, False, False]
    assert out["reject_reason"].tolist() == ["", "missing:star", "low_contrast"]
    for row in range(3):
        sc = json.loads(out["scores"][row])
        assert sc["per_class"] == json.loads(batch["scores"][row])["per_class"]
        assert int(sc["phash"], 16) == int(phash(batch["image"][row]))


def test_duplicates_within_a_shard_across_batches_but_not_across_shards():
    a, b = scene(10), scene(11)
    a_noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    assert hamming(phash(a), np.array([phash(b)]))[0] > 4  # different scenes, different hashes
    stage = FilterStage(make_spec())
    out = stage(make_batch([a, b, a_noisy], [GOOD] * 3))
    assert out["reject_reason"].tolist() == ["", "", "duplicate"]
    # same shard (indices 0-3, shard_size 4): the next batch's copy of ``b`` is a duplicate
    out2 = stage(make_batch([b], [GOOD], first_index=3))
    assert out2["reject_reason"].tolist() == ["duplicate"]
    # the next shard starts afresh, so a resumed run (which starts at a shard) decides the same
    out3 = stage(make_batch([b, b], [GOOD] * 2, first_index=4))
    assert out3["reject_reason"].tolist() == ["", "duplicate"]
    assert FilterStage(make_spec())(make_batch([b, b], [GOOD] * 2, first_index=4))["reject_reason"].tolist() == \
        out3["reject_reason"].tolist()


def test_rejected_images_do_not_count_as_originals():
    a = scene(20)
    bad = scores(cls_score("circle", 0, 0))
    out = FilterStage(make_spec())(make_batch([a, a], [bad, GOOD]))
    assert out["reject_reason"].tolist() == ["missing:circle", ""]


@pytest.mark.parametrize("threshold", [None, -1])
def test_dedup_can_be_turned_off(threshold):
    a = scene(30)
    out = FilterStage(make_spec(dedup_threshold=threshold))(make_batch([a, a], [GOOD, GOOD]))
    assert out["keep"].tolist() == [True, True]
