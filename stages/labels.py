"""Label stage: semantic mask -> COCO instances (RLE, boxes) and per-sample quality scores.

Instances are the 4-connected components of each class's pixels in ``semantic_mask`` whose area
fraction lies in [``spec.filters.min_area_fraction``, ``spec.filters.max_area_fraction``];
components outside the bounds are counted in the scores, not annotated. Ignore pixels (255)
belong to no instance.

Attention statistics use the same maps as the mask stage (``masks.class_maps`` on ``attn`` or
``attn_raw``): ``peak`` values are on the model's attention scale, means and contrasts on the
per-class min-max normalised scale ([0, 1]). "Outside" a class means the pixels that are neither
that class nor ignore.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from .base import Batch, Stage, passthrough
from .masks import IGNORE, class_maps


def categories(spec: Any) -> list[dict]:
    """COCO ``categories``: id = 1 + position in ``spec.classes``."""
    return [{"id": i + 1, "name": c.name} for i, c in enumerate(spec.classes)]


def category_ids(spec: Any) -> dict[str, int]:
    """Class name -> COCO category id, consistent with :func:`categories`."""
    return {c["name"]: c["id"] for c in categories(spec)}


def components(region: np.ndarray, min_area: float, max_area: float) -> tuple[list[np.ndarray], int]:
    """(instance masks within the area bounds, number of all components) of a bool mask."""
    lab, count = ndimage.label(region)
    if count == 0:
        return [], 0
    areas = np.bincount(lab.ravel(), minlength=count + 1)[1:]
    keep = [k + 1 for k, a in enumerate(areas) if min_area <= a <= max_area]
    return [lab == k for k in keep], count


def rle_fields(rle: dict) -> dict:
    """The JSON fields of a COCO annotation from one pycocotools RLE: ``segmentation`` (counts as str,
    size as ints), ``bbox`` [x, y, w, h] (floats) and ``area`` (pixels, int). The one place an RLE
    becomes JSON: labels, ``import-coco``, the shapes world's COCO export and ``synthgen eval``."""
    counts = rle["counts"]
    return {"segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(mask_utils.area(rle))}


def encode_mask(mask: np.ndarray) -> dict:
    """The pycocotools RLE of one HxW mask (bool or 0/1)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def encode_instances(masks: list[np.ndarray]) -> list[dict]:
    """:func:`rle_fields` (COCO RLE, bbox, area) of each bool mask."""
    if not masks:
        return []
    return [rle_fields(rle) for rle in mask_utils.encode(np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8)))]


def _r(x: float) -> float:
    return round(float(x), 4)


class LabelStage(Stage):
    """Adds ``annotations`` (JSON list of COCO annotations) and ``scores`` (JSON object)."""

    name = "labels"
    kind = "task"
    reads = ("classes", "masks", "filters")  # masks.use_raw; filters: the instance size bounds
    inputs = ("image", "class_names", "attn", "attn_raw", "semantic_mask")
    outputs = ("annotations", "scores")

    def __init__(self, spec: Any):
        super().__init__(spec)
        self.ids = category_ids(self.spec)
        self.column = "attn_raw" if self.spec.masks.use_raw else "attn"

    def __call__(self, batch: Batch) -> Batch:
        annotations, scores = [], []
        for row, names_json in enumerate(batch["class_names"]):
            anns, sc = self.label_row(json.loads(str(names_json)), batch[self.column][row],
                                      batch["semantic_mask"][row])
            annotations.append(json.dumps(anns, separators=(",", ":")))
            scores.append(json.dumps(sc, separators=(",", ":")))
        return passthrough(batch, annotations=np.array(annotations, dtype=str),
                           scores=np.array(scores, dtype=str))

    def label_row(self, names: list[str], attn: np.ndarray, sem: np.ndarray) -> tuple[list[dict], dict]:
        """Annotations and scores of one image."""
        unknown = [n for n in names if n not in self.ids]
        if unknown:
            raise ValueError(f"class_names {unknown} are not in the job's classes")
        raw, norm = class_maps(attn, len(names), sem.shape)
        pixels = sem.size
        f = self.spec.filters
        ignore = sem == IGNORE
        anns, per_class = [], []
        for i, name in enumerate(names):
            region = sem == i + 1
            outside = ~region & ~ignore
            mean_in = norm[i][region].mean() if region.any() else 0.0
            mean_out = norm[i][outside].mean() if outside.any() else 0.0
            found, n_comp = components(region, f.min_area_fraction * pixels, f.max_area_fraction * pixels)
            for inst, enc in zip(found, encode_instances(found)):
                inst_mean = _r(norm[i][inst].mean())
                anns.append({"category_id": self.ids[name], **enc, "iscrowd": 0, "score": inst_mean,
                             "attn_peak": _r(raw[i][inst].max()), "attn_mean_in": inst_mean,
                             "attn_mean_out": _r(mean_out)})
            per_class.append({"name": name, "category_id": self.ids[name], "peak": _r(raw[i].max()),
                              "contrast": _r(mean_in - mean_out), "area_fraction": _r(region.sum() / pixels),
                              "n_components": n_comp, "n_instances": len(found),
                              "n_prompted": names.count(name)})
        scores = {
            "per_class": per_class,
            "ignore_fraction": _r(ignore.sum() / pixels),
            "min_contrast": min((c["contrast"] for c in per_class), default=0.0),
            "n_instances": len(anns),
            "n_prompted": len(names),
        }
        return anns, scores
