"""The CPU stage-cost benchmark runs and reports finite figures; the stages' fast paths give the plain ones' bytes.

The label and mask stages' speed-ups (issue 35, ``benchmarks/stage_cost.py``) must not change a byte: each is
checked here against the straightforward code it replaced, on random inputs with ties and edge cases.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from benchmarks import stage_cost
from stages import labels, masks


def test_the_benchmark_reports_every_stage_at_a_tiny_size(tmp_path):
    out = tmp_path / "stage_cost.json"
    stage_cost.main(["--sizes", "64,128", "--images", "4", "--sources", "scenes", "--repeats", "1",
                     "--cache", str(tmp_path / "cache"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"command", "date", "machine", "job", "images", "repeats", "targets_core_s_per_image",
            "results"} <= set(result)
    for size in ("64", "128"):
        r = result["results"]["scenes"][size]
        assert r["images"] == 4 and r["map_grid"] == [int(size) // 8] * 2
        cost = r["core_s_per_image"]
        assert set(cost) == {*stage_cost.STAGE_NAMES, "total"}
        assert all(math.isfinite(v) and v >= 0 for v in cost.values())
        assert cost["total"] == pytest.approx(sum(cost[s] for s in stage_cost.STAGE_NAMES))
        assert r["instances_per_image"] > 0 and 1 <= r["classes_per_image"] <= 3


def _label_pixels_plain(norm, t_fg, t_ign, margin):
    """The mask stage's labelling as first written (argmax and np.partition over the class axis)."""
    n, height, width = norm.shape
    sem = np.zeros((height, width), np.uint8)
    if n == 0:
        return sem
    cand = np.where(norm >= t_fg[:, None, None], norm, -1.0)
    best = cand.argmax(axis=0)
    best_val = np.take_along_axis(cand, best[None], axis=0)[0]
    has_fg = best_val >= 0
    sem[has_fg] = (best[has_fg] + 1).astype(np.uint8)
    uncertain = ~has_fg & (norm >= t_ign[:, None, None]).any(axis=0)
    if n > 1 and margin > 0:
        second = np.partition(cand, n - 2, axis=0)[n - 2]
        uncertain |= has_fg & (second >= 0) & (best_val - second < margin)
    sem[uncertain] = masks.IGNORE
    return sem


def test_label_pixels_equals_argmax_and_partition():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(0, 6))
        norm = rng.random((n, 9, 11)).astype(np.float32)
        if trial % 2:  # ties between classes and with the thresholds
            norm = (np.round(norm * 4) / 4).astype(np.float32)
        t_fg = rng.choice([0.25, 0.5, rng.random()], n).astype(np.float32)
        t_ign = (t_fg * 0.7).astype(np.float32)
        for margin in (0.0, 0.05, 0.3):
            fast = masks.label_pixels(norm, t_fg, t_ign, margin)
            assert (fast == _label_pixels_plain(norm, t_fg, t_ign, margin)).all()


def test_unit_histogram_and_otsu_equal_numpys():
    rng = np.random.default_rng(1)
    edge = [0.0, 1.0, 0.5, 0.25, np.nextafter(np.float32(1), np.float32(0)), 1 / 256, -0.001, 1.001]
    for dtype in (np.float32, np.float64, np.float16):
        values = np.concatenate([rng.random(5000) ** 3, edge]).astype(dtype)
        for bins in (256, 64, 100):
            counts, edges = masks.unit_histogram(values, bins)
            want, want_edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
            assert counts.tolist() == want.tolist() and edges.tobytes() == want_edges.tobytes()
    values = (rng.random(10000) ** 2).astype(np.float32)
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    between = w0 * w1 * (s0 / np.maximum(w0, 1) - (s0[-1] - s0) / np.maximum(w1, 1)) ** 2
    assert masks.otsu_threshold(values) == float(edges[int(np.argmax(between[:-1])) + 1])


def test_instance_rles_from_boxes_equal_pycocotools():
    rng = np.random.default_rng(2)
    for trial in range(400):
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        region = ndimage.binary_dilation(rng.random((height, width)) < 0.06, iterations=int(rng.integers(0, 3)))
        if trial % 5 == 0:
            region[:] = True  # one instance touching every border
        boxed, _ = labels._components_boxed(region, 0, region.size)
        full, _ = labels.components(region, 0, region.size)
        if not full:
            continue
        want = [labels.rle_fields(r) for r in mask_utils.encode(np.asfortranarray(np.stack(full, -1).astype(np.uint8)))]
        assert labels._encode_boxed(boxed, region.shape) == want
        assert labels.encode_instances(full) == want
        for (box, inst), whole in zip(boxed, full):  # the box holds all of the instance's pixels
            placed = np.zeros_like(whole)
            placed[box] = inst
            assert (placed == whole).all()


def test_the_label_stage_reuses_the_mask_stages_maps_without_changing_them():
    rng = np.random.default_rng(3)
    attn = rng.random((3, 16, 16)).astype(np.float16)
    kept = masks._class_maps_kept(attn, 2, (64, 48))
    reused = masks._class_maps_reused(attn, 2, (64, 48))
    assert reused[0] is kept[0] and reused[1] is kept[1]  # handed over once ...
    again = masks._class_maps_reused(attn, 2, (64, 48))
    assert again[0] is not kept[0]  # ... then computed
    plain = masks.class_maps(attn, 2, (64, 48))
    for a, b, c in zip(kept, again, plain):
        assert a.tobytes() == b.tobytes() == c.tobytes() and a.dtype == c.dtype == np.float32
    assert masks._class_maps_reused(attn, 3, (64, 48))[0].shape == (3, 64, 48)  # another class count: its own
