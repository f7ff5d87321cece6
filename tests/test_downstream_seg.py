"""benchmarks.downstream_seg: reading a synthgen output into global class ids, the IoU metric,
and a short training run that must lower the loss (the full benchmark is not run here)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import downstream_seg as ds
from pipeline.shapes.world import CLASSES


def test_to_global_maps_by_the_samples_class_names():
    local = np.array([[0, 1, 2], [255, 2, 1]], np.uint8)
    out = ds.to_global(local, ["star", "circle"])
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1 + CLASSES.index("star"), 1], [255, 1, 1 + CLASSES.index("star")]]
    with pytest.raises(ValueError, match="'dog' is not a shapes-world class"):
        ds.to_global(local, ["star", "dog"])
    with pytest.raises(ValueError, match=r"values \[3\] name no class"):
        ds.to_global(np.array([[3, 1]], np.uint8), ["star", "circle"])


def read_members(out) -> dict[str, dict]:
    """{key: {"json": dict, "seg": uint8 array}} straight from the tars, in member order."""
    samples: dict[str, dict] = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                if ext == "json":
                    samples.setdefault(key, {})["json"] = json.loads(data)
                elif ext == "seg.png":
                    samples.setdefault(key, {})["seg"] = np.asarray(Image.open(io.BytesIO(data)))
    return samples


def test_load_synthetic_maps_every_sample_to_global_ids(dataset):
    syn = ds.load_synthetic(dataset.out)
    members = read_members(dataset.out)
    assert syn.keys == list(members) and len(syn.keys) == dataset.summary["kept"] == syn.counts["samples"]
    assert syn.not_kept == 0 and all(m["json"]["keep"] for m in members.values())
    assert syn.images.shape == (len(syn.keys), 64, 64, 3) and syn.images.dtype == np.uint8
    remapped = 0
    for key, mask in zip(syn.keys, syn.masks):
        local, names = members[key]["seg"], members[key]["json"]["class_names"]
        for value in np.unique(local):
            expected = value if value in (0, 255) else 1 + CLASSES.index(names[value - 1])
            assert (mask[local == value] == expected).all(), (key, value)
            remapped += int(expected != value)
    assert remapped > 0  # some sample's local ids differ from the global ones, so the mapping is exercised
    assert ((syn.masks > 0) & (syn.masks < 255)).any()

    first = ds.load_synthetic(dataset.out, limit=3)
    assert first.keys == syn.keys[:3] and (first.masks == syn.masks[:3]).all()


def test_iou_report_on_known_arrays():
    target = np.zeros((2, 8, 8), np.uint8)
    target[0, :4, :4] = 1 + CLASSES.index("star")
    target[1, 4:, 4:] = 1 + CLASSES.index("ring")
    target[1, 0, :] = 255

    perfect = ds.iou_report(ds.confusion(np.where(target == 255, 0, target), target))
    assert perfect["miou"] == 1.0 and perfect["background"] == 1.0 and perfect["miou_with_background"] == 1.0
    assert perfect["per_class"]["star"] == 1.0 and perfect["per_class"]["circle"] is None  # absent class

    background = ds.iou_report(ds.confusion(np.zeros_like(target), target))
    assert background["miou"] == 0.0 and background["per_class"]["ring"] == 0.0
    valid = int((target != 255).sum())
    assert background["background"] == pytest.approx((target == 0).sum() / valid, abs=1e-4)

    half = target.copy()
    half[0, :2, :4] = 0  # half the star predicted as background
    assert ds.iou_report(ds.confusion(np.where(half == 255, 0, half), target))["per_class"]["star"] == 0.5


def test_training_on_a_tiny_batch_lowers_the_loss_and_is_scored_per_pixel():
    images, masks = ds.render_real(ds.REAL_TRAIN_SEED, 4, 32)
    masks = masks.copy()
    masks[:, :2] = 255
    # 20 steps on the same 4 images: the loss must fall (by 10-20 % for seeds 0-4; seed 0 here)
    model, stats = ds.train(images, masks, ds.TrainSettings(steps=20, batch_size=4, width=4))
    assert np.isfinite(stats["first_loss"]) and np.isfinite(stats["final_loss"])
    assert stats["final_loss"] < 0.95 * stats["first_loss"], stats
    test_x, test_y = ds.render_real(ds.TEST_SEED, 3, 32)
    report = ds.evaluate(model, test_x, test_y)
    pred = ds.predict(model, test_x)
    assert pred.shape == test_y.shape and pred.dtype == np.uint8
    expected = {}
    for k, name in enumerate(("background", *CLASSES)):  # IoU by hand from the model's own predictions
        t, p = test_y == k, pred == k
        union = int((t | p).sum())
        expected[name] = None if union == 0 else round(int((t & p).sum()) / union, 4)
    assert report["background"] == expected.pop("background")
    assert report["per_class"] == expected
    present = [v for v in expected.values() if v is not None]
    assert report["miou"] == pytest.approx(np.mean(present), abs=1e-4)
    assert report["pixel_accuracy"] == pytest.approx((pred == test_y).mean(), abs=1e-4)
    assert ds.masked_ce(torch.zeros(1, ds.NUM_CLASSES, 4, 4), torch.full((1, 4, 4), 255)).item() == 0.0


def test_cli_rejects_a_dir_that_is_not_a_synthgen_output(tmp_path, capsys):
    assert ds.main(["--synthetic", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
