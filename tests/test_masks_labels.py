"""Mask, label and encode stages on synthetic attention maps (fast; no diffusion model needed)."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from pipeline.shapes.world import CLASSES, render_scene
from stages.encode import EncodeStage
from stages.labels import LabelStage, categories
from stages.masks import MaskStage, class_maps, otsu_threshold

SIZE, LATENT, K = 64, 16, 3


def make_spec(threshold="fixed", class_thresholds=None, margin=0.1, min_area=0.005, max_area=0.95,
              image_refine="none"):
    return SimpleNamespace(
        classes=[SimpleNamespace(name=c) for c in CLASSES],
        prompts=SimpleNamespace(max_classes_per_image=K),
        masks=SimpleNamespace(threshold=threshold, fg_threshold=0.6, ignore_threshold=0.5,
                              class_thresholds=class_thresholds or {}, use_raw=False,
                              ambiguity_margin=margin, image_refine=image_refine, superpixel_scale=10.0,
                              superpixel_min_area=0.005),
        filters=SimpleNamespace(min_area_fraction=min_area, max_area_fraction=max_area,
                                min_contrast=0.3, dedup_threshold=4),
        output=SimpleNamespace(jpeg_quality=95),
    )


def blob(cy: float, cx: float, sigma: float = 1.5, amp: float = 0.2) -> np.ndarray:
    """A Gaussian bump on the latent grid (coordinates in latent cells)."""
    yy, xx = np.mgrid[0:LATENT, 0:LATENT]
    return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def make_batch(rows: list[tuple[list[str], list[np.ndarray]]], images=None) -> dict:
    """A batch as the synthesis stage hands it on: maps zero-padded to K classes."""
    attn = np.zeros((len(rows), K, LATENT, LATENT), np.float16)
    for r, (_, maps) in enumerate(rows):
        for i, m in enumerate(maps):
            attn[r, i] = m
    if images is None:
        images = np.random.default_rng(0).integers(0, 255, (len(rows), SIZE, SIZE, 3), dtype=np.uint8)
    n = len(rows)
    return {
        "key": np.array([f"t-{i:09d}" for i in range(n)]),
        "index": np.arange(n, dtype=np.int64),
        "seed": np.arange(100, 100 + n, dtype=np.int64),
        "prompt": np.array([" and ".join(f"a {c}" for c in names) for names, _ in rows]),
        "class_names": np.array([json.dumps(names) for names, _ in rows]),
        "token_index": np.array([json.dumps([[2 + 3 * i] for i in range(len(names))]) for names, _ in rows]),
        "cond": np.array([""] * n),
        "curriculum": np.array([json.dumps({"level": 0})] * n),
        "gen": np.array([json.dumps({"model": "test", "steps": 4})] * n),
        "image": images,
        "attn": attn,
        "attn_raw": attn,
    }


def run(spec, batch):
    return LabelStage(spec)(MaskStage(spec)(batch))


def test_semantic_mask_labels_classes_and_background():
    batch = make_batch([(["circle", "square"], [blob(4, 4), blob(11, 11)])])
    out = MaskStage(make_spec())(batch)
    sem = out["semantic_mask"]
    assert sem.dtype == np.uint8 and sem.shape == (1, SIZE, SIZE)
    assert sem[0, 4 * 4 + 2, 4 * 4 + 2] == 1  # latent cell (4, 4) -> circle
    assert sem[0, 11 * 4 + 2, 11 * 4 + 2] == 2  # latent cell (11, 11) -> square
    assert sem[0, 0, SIZE - 1] == 0 and sem[0, SIZE - 1, 0] == 0
    assert set(np.unique(sem[0])) <= {0, 1, 2, 255}


def test_ignore_band_exactly_where_the_map_is_uncertain():
    batch = make_batch([(["star"], [blob(8, 8, sigma=2.5)])])
    sem = MaskStage(make_spec())(batch)["semantic_mask"][0]
    _, norm = class_maps(batch["attn"][0], 1, (SIZE, SIZE))
    band = (norm[0] >= 0.5) & (norm[0] < 0.6)
    assert band.sum() > 20
    np.testing.assert_array_equal(sem == 255, band)
    np.testing.assert_array_equal(sem == 1, norm[0] >= 0.6)


def test_ignore_band_where_two_class_maps_are_close():
    # two equal blobs overlapping: along the bisector both maps are high and equal
    maps = [blob(8, 6, sigma=2.5), blob(8, 10, sigma=2.5)]
    batch = make_batch([(["circle", "ring"], maps)])
    sem = MaskStage(make_spec(margin=0.2))(batch)["semantic_mask"][0]
    mid = sem[30:39, 33:35]  # the bisector of the centres: cell x = 8, pixel x = 4 * 8 + 1.5
    assert (mid == 255).all()
    assert sem[34, 6 * 4 + 2] == 1 and sem[34, 10 * 4 + 2] == 2
    # both maps are above fg_threshold there: without the margin the same pixels get a class
    sem0 = MaskStage(make_spec(margin=0.0))(batch)["semantic_mask"][0]
    assert np.isin(sem0[30:39, 33:35], [1, 2]).all()


def test_otsu_threshold_splits_a_bimodal_histogram():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.2, 0.03, 4000), rng.normal(0.8, 0.03, 1000)]).clip(0, 1)
    assert 0.3 < otsu_threshold(values) < 0.7
    batch = make_batch([(["cross"], [blob(8, 8, sigma=2.0)])])
    sem = MaskStage(make_spec("otsu"))(batch)["semantic_mask"][0]
    _, norm = class_maps(batch["attn"][0], 1, (SIZE, SIZE))
    t = otsu_threshold(norm[0])
    np.testing.assert_array_equal(sem == 1, norm[0] >= t)


def test_calibrated_thresholds_come_from_the_spec():
    maps = [blob(4, 4, sigma=2.0), blob(11, 11, sigma=2.0)]  # identical shapes, two classes
    batch = make_batch([(["circle", "square"], maps)])
    thresholds = {c: 0.5 for c in CLASSES} | {"square": 0.85}
    sem = MaskStage(make_spec("calibrated", thresholds))(batch)["semantic_mask"][0]
    assert (sem == 2).sum() < 0.6 * (sem == 1).sum()  # the stricter threshold gives a smaller mask
    # the ignore band keeps the fixed band's proportion (0.5 / 0.6 of each class's threshold)
    _, norm = class_maps(batch["attn"][0], 2, (SIZE, SIZE))
    band = (norm[1] >= 0.85 * 0.5 / 0.6) & (norm[1] < 0.85) & (norm[0] < 0.5 * 0.5 / 0.6)
    assert band.sum() > 20
    np.testing.assert_array_equal((sem == 255) & band, band)
    low = MaskStage(make_spec("calibrated", {c: 0.06 for c in CLASSES}))(batch)["semantic_mask"][0]
    assert (low == 0).sum() > 0.3 * low.size  # a low threshold still leaves background
    # a missing class threshold or an unknown mode is the job file's error (tests/test_bad_input.py), not the stage's


def test_coco_rle_round_trips_and_boxes_match_the_mask():
    batch = make_batch([
        (["circle", "square"], [blob(4, 4) + blob(4, 12), blob(12, 8, sigma=2.0)]),  # two circles
        (["triangle"], [blob(9, 6, sigma=2.2)]),
    ])
    out = run(make_spec(), batch)
    spec_ids = {c["name"]: c["id"] for c in categories(make_spec())}
    for row in range(2):
        sem = out["semantic_mask"][row]
        names = json.loads(out["class_names"][row])
        anns = json.loads(out["annotations"][row])
        for i, name in enumerate(names):
            lab, n = ndimage.label(sem == i + 1)
            mine = [a for a in anns if a["category_id"] == spec_ids[name]]
            assert len(mine) == n
            for a in mine:
                m = mask_utils.decode(a["segmentation"]).astype(bool)
                comp = np.unique(lab[m])
                assert len(comp) == 1 and comp[0] > 0
                np.testing.assert_array_equal(m, lab == comp[0])  # exactly one component
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert a["area"] == m.sum() and a["iscrowd"] == 0
                assert 0.6 <= a["score"] <= 1.0 and a["attn_mean_in"] > a["attn_mean_out"]
    circles = [a for a in json.loads(out["annotations"][0]) if a["category_id"] == spec_ids["circle"]]
    assert len(circles) == 2  # two separated blobs of one class -> two instances


def test_area_bounds_drop_components_and_are_counted():
    batch = make_batch([(["circle"], [blob(4, 4, sigma=2.0) + blob(12, 12, sigma=0.8)])])
    out = run(make_spec(min_area=0.03), batch)
    anns = json.loads(out["annotations"][0])
    c = json.loads(out["scores"][0])["per_class"][0]
    assert c["n_components"] == 2 and c["n_instances"] == 1 and len(anns) == 1
    assert anns[0]["area"] >= 0.03 * SIZE * SIZE


def test_scores_describe_the_sample():
    batch = make_batch([(["circle", "star"], [blob(4, 4), np.full((LATENT, LATENT), 0.05)])])
    out = run(make_spec(), batch)
    sc = json.loads(out["scores"][0])
    sem = out["semantic_mask"][0]
    assert sc["ignore_fraction"] == pytest.approx((sem == 255).mean(), abs=1e-4)
    circle, star = sc["per_class"]
    assert circle["contrast"] > 0.5 and circle["n_instances"] == 1 and circle["n_prompted"] == 1
    assert circle["peak"] == pytest.approx(0.2, abs=0.02)  # the model's scale, not normalised
    assert star["n_components"] == 0 and star["contrast"] == 0.0  # a flat map labels nothing
    assert sc["n_prompted"] == 2 and sc["n_instances"] == 1 and sc["min_contrast"] == 0.0


def freeze(batch: dict) -> dict:
    for v in batch.values():
        v.setflags(write=False)
    return batch


def test_read_only_inputs_are_not_modified():
    batch = freeze(make_batch([(["circle", "square"], [blob(4, 4), blob(11, 11)])]))
    before = {k: v.copy() for k, v in batch.items()}
    masked = freeze(MaskStage(make_spec())(batch))
    labelled = freeze(LabelStage(make_spec())(masked))
    for k, v in before.items():
        np.testing.assert_array_equal(labelled[k], v)


def shapes_batch(seeds, noise: float, rng: np.random.Generator, sigma: float = 2.0):
    """Shapes-world scenes with attention made from their true masks: blurred, 4x downsampled, noisy."""
    rows, truths, images = [], [], []
    for seed in seeds:
        scene = render_scene(seed, size=SIZE)
        maps = []
        for obj in scene.objects:
            soft = ndimage.gaussian_filter(obj.mask.astype(np.float32), sigma=sigma)
            small = soft.reshape(LATENT, 4, LATENT, 4).mean(axis=(1, 3))
            maps.append(0.3 * small + rng.normal(0.02, noise, small.shape).clip(0))
        rows.append(([o.cls for o in scene.objects], maps))
        truth = np.zeros((SIZE, SIZE), np.uint8)
        for i, obj in enumerate(scene.objects):
            truth[obj.mask] = i + 1
        truths.append(truth)
        images.append(scene.image)
    return make_batch(rows, np.stack(images)), truths


def shapes_scores(out, truths) -> tuple[float, float]:
    """(mIoU with ignore pixels counted as errors, mean best box IoU) of a labelled shapes batch."""
    ious, box_ious = [], []
    for row, truth in enumerate(truths):
        sem = out["semantic_mask"][row]
        anns = json.loads(out["annotations"][row])
        for c in range(1, truth.max() + 1):
            pred, true = sem == c, truth == c
            ious.append((pred & true).sum() / (pred | true).sum())  # ignore pixels count as errors
        true_rles = [mask_utils.encode(np.asfortranarray((truth == c).astype(np.uint8)))
                     for c in range(1, truth.max() + 1)]
        pred_boxes = [a["bbox"] for a in anns]
        true_boxes = [mask_utils.toBbox(r).tolist() for r in true_rles]
        if pred_boxes:
            box_ious.extend(mask_utils.iou(true_boxes, pred_boxes, [0] * len(pred_boxes)).max(axis=1))
        else:
            box_ious.extend([0.0] * len(true_boxes))
    return float(np.mean(ious)), float(np.mean(box_ious))


@pytest.mark.parametrize("mode", ["fixed", "otsu"])
def test_shapes_world_masks_match_the_truth(mode):
    batch, truths = shapes_batch(range(24), noise=0.01, rng=np.random.default_rng(7))
    miou, box_iou = shapes_scores(run(make_spec(mode), batch), truths)
    print(f"{mode}: mIoU {miou:.3f}, mean box IoU {box_iou:.3f}")
    assert miou > 0.7 and box_iou > 0.65, f"{mode}: mIoU {miou:.3f}, mean box IoU {box_iou:.3f}"


def test_superpixel_refinement_snaps_blurred_maps_to_the_image_edges():
    """Attention made 2x blurrier than above: thresholding it misplaces the edges; averaging it over the
    image's Felzenszwalb segments puts them back on the objects' outlines."""
    batch, truths = shapes_batch(range(24), noise=0.0, rng=np.random.default_rng(0), sigma=4.0)
    plain, _ = shapes_scores(run(make_spec("otsu", margin=0.0), batch), truths)
    refined, _ = shapes_scores(run(make_spec("otsu", margin=0.0, image_refine="superpixels"), batch), truths)
    print(f"blurred maps: mIoU {plain:.3f} plain, {refined:.3f} with superpixels")
    assert refined > plain + 0.05 and refined > 0.8


def test_encode_produces_decodable_deterministic_bytes():
    batch, _ = shapes_batch([3, 4], noise=0.01, rng=np.random.default_rng(0))
    labelled = run(make_spec(), batch)
    labelled = dict(labelled, keep=np.array([True, False]), reject_reason=np.array(["", "low_contrast"]))
    stage = EncodeStage(make_spec())
    out = stage(freeze(labelled))
    again = stage(labelled)
    for col in ("jpg", "seg_png", "json", "cls"):
        assert out[col].dtype == object and all(isinstance(b, bytes) for b in out[col])
        assert list(out[col]) == list(again[col])
    ids = {c["name"]: c["id"] for c in categories(make_spec())}
    for row in range(2):
        jpg = np.asarray(Image.open(io.BytesIO(out["jpg"][row])))
        assert jpg.shape == (SIZE, SIZE, 3)
        assert np.abs(jpg.astype(int) - labelled["image"][row]).mean() < 4
        png = Image.open(io.BytesIO(out["seg_png"][row]))
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), labelled["semantic_mask"][row])
        rec = json.loads(out["json"][row])
        assert rec["key"] == labelled["key"][row] and rec["index"] == row and rec["seed"] == 100 + row
        assert rec["class_names"] == json.loads(labelled["class_names"][row])
        assert rec["annotations"] == json.loads(labelled["annotations"][row])
        assert rec["width"] == rec["height"] == SIZE and rec["cond"] is None
        assert rec["keep"] is (row == 0) and rec["reject_reason"] == ["", "low_contrast"][row]
        assert set(rec) >= {"prompt", "token_index", "gen", "scores", "curriculum"}
        assert out["cls"][row] == str(ids[rec["class_names"][0]]).encode()


def test_superpixel_pool_on_a_large_image_keeps_size_and_follows_edges():
    """Images over SUPERPIXEL_MAX_SIDE are segmented at a reduced size; the result is still full size."""
    from stages.masks import SUPERPIXEL_MAX_SIDE, superpixel_pool

    side = 2 * SUPERPIXEL_MAX_SIDE + 24
    image = np.full((side, side, 3), 120, np.uint8)
    image[100:300, 150:400] = (230, 40, 40)  # a sharp red rectangle
    yy, xx = np.mgrid[0:side, 0:side]
    blurry = np.exp(-(((yy - 200) / 140.0) ** 2 + ((xx - 275) / 170.0) ** 2)).astype(np.float32)[None]
    out = superpixel_pool(blurry, image, 10.0, 0.005)
    assert out.shape == blurry.shape
    inside = np.zeros((side, side), bool)
    inside[100:300, 150:400] = True
    core = np.zeros_like(inside)
    core[110:290, 160:390] = True  # away from the edge, which the reduced segmentation may blur by a pixel
    assert np.ptp(out[0][core]) < 1e-6  # one value over the rectangle
    assert out[0][core].min() > out[0][~inside].max()
