"""benchmarks.downstream_det: the records' boxes read into the world's classes, boxes turned with their
images, targets and decoding that invert each other, COCO box AP, and a short training run that must
lower the loss (the full benchmark is not run here)."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import downstream_det as det
from benchmarks import downstream_seg as seg
from pipeline.shapes.world import CLASSES


def test_synthetic_boxes_are_the_records_boxes_in_world_classes(dataset):
    boxes = det.load_synthetic_boxes(dataset.out)
    records = {}
    for tar_path in sorted((dataset.out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    records[m.name.split(".", 1)[0]] = json.loads(tar.extractfile(m).read())
    assert boxes.keys == list(records) and len(boxes) == dataset.summary["kept"]
    n_boxes = 0
    for key, b, lab in zip(boxes.keys, boxes.boxes, boxes.labels):
        rec = records[key]
        names = {c["category_id"]: c["name"] for c in rec["scores"]["per_class"]}
        assert b.tolist() == [a["bbox"] for a in rec["annotations"]]
        assert [CLASSES[i] for i in lab] == [names[a["category_id"]] for a in rec["annotations"]]
        n_boxes += len(b)
    assert n_boxes >= len(boxes)  # the tiny job's samples hold objects


def test_real_boxes_enclose_each_objects_visible_pixels():
    real = det.render_boxes(seg.REAL_TRAIN_SEED, 5, 64)
    from pipeline.shapes.world import render_scene

    for i in range(5):
        scene = render_scene(seg.REAL_TRAIN_SEED + i, size=64)
        objs = [o for o in scene.objects if o.mask.any()]
        assert [CLASSES[c] for c in real.labels[i]] == [o.cls for o in objs]
        for (x, y, w, h), o in zip(real.boxes[i], objs):
            rows, cols = np.nonzero(o.mask)
            assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_boxes_turn_with_the_image(flip, turns):
    side = 16
    mask = torch.zeros(side, side)
    mask[2:5, 9:15] = 1  # rows 2-4, columns 9-14: box x 9, y 2, w 6, h 3
    moved = torch.rot90(mask.flip(-1) if flip else mask, turns, (-2, -1))
    rows, cols = torch.nonzero(moved, as_tuple=True)
    expected = [cols.min().item(), rows.min().item(), cols.max().item() - cols.min().item() + 1,
                rows.max().item() - rows.min().item() + 1]
    assert det.turn_boxes(np.array([[9, 2, 6, 3]], np.float32), side, flip, turns).tolist() == [expected]


class Fixed(nn.Module):
    """A 'model' that returns given output maps."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out[: len(x)]


def test_decoding_the_targets_gives_back_the_boxes_and_a_perfect_ap():
    truth = det.render_boxes(seg.TEST_SEED, 6, 64)
    heat, reg, _ = det.targets(truth.boxes, truth.labels, 64)
    assert heat.shape == (6, len(CLASSES), 64, 64) and heat.max() == 1.0
    assert int(heat.eq(1).sum()) == sum(len(b) for b in truth.boxes)  # one peak per object
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    found = det.detect(Fixed(torch.cat([logits, reg], 1)), truth.images)
    for dets, boxes, labels in zip(found, truth.boxes, truth.labels):
        top = sorted(dets, key=lambda d: -d["score"])[:len(boxes)]
        assert sorted((d["label"], *np.round(d["bbox"], 3)) for d in top) == \
            sorted((int(c), *np.round(b, 3)) for b, c in zip(boxes, labels))
    report = det.box_ap(found, truth)
    assert report["AP"] == report["AP50"] == 1.0 and report["objects"] == sum(len(b) for b in truth.boxes)
    present = {CLASSES[c] for lab in truth.labels for c in lab}
    assert all(report["per_class"][name] == 1.0 for name in present)
    assert all(report["per_class"][name] is None for name in set(CLASSES) - present)

    shifted = [[{**d, "bbox": [d["bbox"][0] + d["bbox"][2], *d["bbox"][1:]]} for d in dets] for dets in found]
    assert det.box_ap(shifted, truth)["AP50"] == 0.0  # every box moved off its object by its own width


def test_training_on_a_tiny_batch_lowers_the_loss():
    data = det.render_boxes(seg.REAL_TRAIN_SEED, 4, 32)
    model, stats = det.train(data, seg.TrainSettings(steps=20, batch_size=4, width=4))
    assert np.isfinite(stats["first_loss"]) and stats["final_loss"] < 0.8 * stats["first_loss"], stats
    assert all(len(d) <= det.MAX_DETECTIONS for d in det.detect(model, data.images))


def test_cli_rejects_a_dir_that_is_not_a_synthgen_output(tmp_path, capsys):
    assert det.main(["--synthetic", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
