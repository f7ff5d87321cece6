"""Outline-guided inpainting (``references.mode: inpaint``): what a sample repaints, and how its labels
and its attention check come from the reference.

A sample repaints one annotated instance of a reference image (``cond["reference"]``: key, instance
id, dilation, prompt mode, fill). At the generation size (the reference fitted as ``ReferenceImages``
fits it):

* the **outline** is the instance's mask; the **repaint mask** is the outline dilated by
  ``dilation`` pixels (a square structuring element), so the object's edge is repainted too;
* with ``fill: palette`` the outline is first painted in the colour of the prompt's attribute
  (``fill_rgb``), a silhouette the model re-draws; with ``keep`` the reference's pixels stay;
* after the pipeline call every pixel outside the repaint mask is the reference's own, exactly (the
  pipeline's VAE round trip changes them slightly; they are pasted back);
* the **labels** are the reference's annotations, all of them, at the generation size: the repainted
  instance keeps its outline, the others are copied (``reference_labels``); the semantic mask paints
  them largest first, so smaller objects stay on top;
* the **check**: the class's cross-attention, captured as for any sample, is compared with the
  outline: ``mass_inside`` (the share of the class map's mass inside the repaint mask) and ``iou``
  (the class's attention mask, thresholded by the job's ``masks`` rule, against the outline). The
  filter stage rejects with ``outline:<class>`` below ``references.inpaint.min_mass_inside`` /
  ``min_iou``. An empty prompt names no class token: no check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .references import Outline, fit_mask, inpaint_references


def repaint_mask(outline: np.ndarray, dilation: int) -> np.ndarray:
    """The outline grown by ``dilation`` pixels (8-connected: a square of side 2 x dilation + 1)."""
    if dilation <= 0:
        return outline.copy()
    return ndimage.binary_dilation(outline, structure=np.ones((3, 3), bool), iterations=dilation)


@dataclass(frozen=True)
class Label:
    """One reference annotation at the generation size."""

    id: int
    class_name: str
    mask: np.ndarray


class ReferenceOutlines:
    """The job's reference annotations, fitted to the generation size on first use (per key)."""

    def __init__(self, spec: Any):
        self.outlines: dict[str, list[Outline]] = inpaint_references(spec).outlines
        self.height, self.width = spec.generation.height, spec.generation.width
        self._fitted: dict[str, list[Label]] = {}

    def labels(self, key: str) -> list[Label]:
        """Every annotation of reference ``key`` (id order) as a bool mask at the generation size."""
        if key not in self._fitted:
            self._fitted[key] = [Label(o.id, o.class_name, fit_mask(o.rle, self.height, self.width))
                                 for o in self.outlines[key]]
        return self._fitted[key]

    def outline(self, reference: dict) -> np.ndarray:
        """The repainted instance's outline (bool, generation size) of a ``cond["reference"]``."""
        return next(lab.mask for lab in self.labels(reference["key"]) if lab.id == reference["instance"])


def prepare(image: np.ndarray, outline: np.ndarray, reference: dict) -> tuple[np.ndarray, np.ndarray]:
    """(pipeline input image uint8, repaint mask bool) of one sample: the silhouette filled when asked."""
    start = image.copy()
    if reference.get("fill") == "palette" and reference.get("fill_rgb"):
        start[outline] = np.asarray(reference["fill_rgb"], np.uint8)
    return start, repaint_mask(outline, int(reference["dilation"]))


def paste_back(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``generated`` inside ``mask``, ``original`` everywhere else (uint8 HxWx3)."""
    return np.where(mask[..., None], generated, original)


def semantic_mask(labels: list[Label], names: list[str]) -> np.ndarray:
    """uint8 HxW: 1 + names.index(class) per annotation, largest painted first (smaller ones on top)."""
    height, width = labels[0].mask.shape if labels else (0, 0)
    sem = np.zeros((height, width), np.uint8)
    for lab in sorted(labels, key=lambda lab: (-int(lab.mask.sum()), lab.id)):
        sem[lab.mask] = names.index(lab.class_name) + 1
    return sem


def outline_check(raw: np.ndarray, attention_mask: np.ndarray, outline: np.ndarray,
                  repaint: np.ndarray) -> dict[str, float]:
    """``mass_inside``: share of the (non-negative) class map's mass inside the repaint mask; ``iou``: the
    attention mask against the outline. A map without mass scores 0."""
    total = float(raw.sum())
    inside = float(raw[repaint].sum()) / total if total > 0 else 0.0
    union = int((attention_mask | outline).sum())
    iou = int((attention_mask & outline).sum()) / union if union else 0.0
    return {"mass_inside": round(inside, 4), "iou": round(iou, 4)}


def redraw_strength(spec: Any, attempt: int) -> float | None:
    """The strength redraw ``attempt`` (1, 2, ...) of an inpainting sample uses (``references.inpaint.
    redraw_strengths``: the attempt-th, the last for later ones), or None: the sample's own."""
    refs = getattr(spec, "references", None)
    ladder = refs.redraw_ladder if refs is not None else []
    if not ladder or attempt < 1:
        return None
    return ladder[min(attempt, len(ladder)) - 1]


def restrengthen(cond: str, curriculum: str, strength: float) -> tuple[str, str]:
    """An inpainting row's ``cond`` and ``curriculum`` JSON at another strength (its level and group stay)."""
    import json

    from .sampling import variation_curriculum

    c, cur = json.loads(cond), json.loads(curriculum)
    c["reference"]["strength"] = strength
    return (json.dumps(c, sort_keys=True),
            json.dumps(variation_curriculum(cur["level"], strength, cur["group_id"]), sort_keys=True))

