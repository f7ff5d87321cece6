"""The oracle reads rendered scenes back: masks by colour, classes by template fit (occlusion included)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.shapes.oracle import find_objects
from pipeline.shapes.world import COLORS, HELD_OUT_SEED, render_scene, shape_coverage


@pytest.fixture(scope="module")
def readings():
    """(true object, oracle reading, visible fraction of the whole shape) for 60 held-out scenes (0.25 s each)."""
    rows = []
    for seed in range(HELD_OUT_SEED + 500_000, HELD_OUT_SEED + 500_060):
        scene = render_scene(seed)
        found = find_objects(scene.image, [o.color for o in scene.objects])
        for obj, f in zip(scene.objects, found):
            whole = shape_coverage(obj.cls, obj.cx, obj.cy, obj.size, obj.angle, 64, 64) >= 0.5
            rows.append((obj, f, obj.mask.sum() / whole.sum()))
    return rows


def test_oracle_masks_match_the_renderer(readings):
    ious = [(o.mask & f.mask).sum() / (o.mask | f.mask).sum() for o, f, _ in readings]
    assert np.mean(ious) > 0.95 and min(ious) > 0.6


def test_oracle_reads_every_unoccluded_shape(readings):
    clear = [(o, f) for o, f, vis in readings if vis > 0.98]
    assert len(clear) > 75
    assert all(f.cls == o.cls for o, f in clear)


def test_oracle_reads_occluded_shapes(readings):
    hidden = [(o, f) for o, f, vis in readings if vis < 0.9]
    assert len(hidden) >= 30
    # the centroid-only template sweep read about half of these wrong (0.46 on 300 scenes)
    assert np.mean([f.cls == o.cls for o, f in hidden]) >= 0.85


def test_oracle_joins_a_shape_cut_in_two():
    image = np.full((64, 64, 3), 128, np.uint8)
    square = shape_coverage("square", 32, 32, 34, 0, 64, 64) >= 0.5
    image[square] = COLORS["red"]
    image[28:36, :] = COLORS["blue"]  # a bar across the middle
    assert ndimage.label(image[..., 0] == COLORS["red"][0])[1] == 2
    red, blue = find_objects(image, ["red", "blue"])
    assert red.cls == "square"
    assert red.mask.sum() == (square & ~np.isin(np.arange(64), range(28, 36))[:, None]).sum()


@pytest.mark.parametrize("cls", ["star", "square", "triangle", "circle"])
def test_oracle_reads_shapes_rounded_like_a_decoder_draws_them(cls):
    """A decoded star has rounded points and filled notches (a Gaussian blur, thresholded, is a stand-in):
    matched only against the world's thin star, 4 of these 12 read as other classes; fatter star templates
    must read them all without taking the other classes' rounded shapes."""
    reads = []
    for size in (22, 26, 30, 34):
        for angle in (0, 17, 40):
            image = np.full((64, 64, 3), 128, np.uint8)
            cover = ndimage.gaussian_filter(shape_coverage(cls, 30.3, 33.1, size, angle, 64, 64), 2.2)
            image[cover >= 0.5] = COLORS["red"]
            reads.append(find_objects(image, ["red"])[0].cls)
    assert reads == [cls] * 12
