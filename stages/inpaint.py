"""Outline-guided inpainting (``references.mode: inpaint``): what a sample repaints, and how its labels
and its attention check come from the reference.

A sample repaints one annotated instance of a reference image (``cond["reference"]``: key, instance
id, dilation, prompt mode, fill). At the generation size (the reference fitted as ``ReferenceImages``
fits it):

* the **outline** is the instance's mask; the **repaint mask** is the outline dilated by
  ``dilation`` pixels (a square structuring element), so the object's edge is repainted too;
* with ``fill: palette`` the outline is first painted in the colour of the prompt's attribute
  (``fill_rgb``), a silhouette the model re-draws; with ``keep`` the reference's pixels stay;
* with ``crop_padding`` (``references.inpaint.crop_padding``) the call repaints a crop instead of the whole
  image: the repaint mask's bounding box grown by that many pixels and widened to the image's aspect ratio
  (diffusers' ``VaeImageProcessor.get_crop_region``, the box its ``padding_mask_crop`` uses), resized to the
  generation size, so a small outline gets the model's full resolution (``to_crop``); the result is resized
  back into its box (``from_crop``) and the captured maps are warped into the whole image's grid
  (``maps_from_crop``);
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


Box = tuple[int, int, int, int]  # x1, y1, x2, y2: pixels [y1:y2, x1:x2]


def crop_box(repaint: np.ndarray, padding: int) -> Box:
    """The crop a repaint mask is inpainted in: its bounding box grown by ``padding`` pixels and widened to
    the image's aspect ratio, inside the image (diffusers' ``get_crop_region``, as ``padding_mask_crop``)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    height, width = repaint.shape
    return tuple(int(v) for v in VaeImageProcessor.get_crop_region(
        Image.fromarray(repaint.astype(np.uint8) * 255), width, height, pad=padding))


def whole(box: Box, shape: tuple[int, ...]) -> bool:
    return box == (0, 0, shape[1], shape[0])


def to_crop(image: np.ndarray, repaint: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, repaint mask bool HxW) of ``box``, resized to the image's own size (Lanczos for the
    image, nearest for the mask); the image itself when the box is all of it."""
    from PIL import Image

    if whole(box, repaint.shape):
        return image, repaint
    size = (repaint.shape[1], repaint.shape[0])
    crop = Image.fromarray(image).crop(box).resize(size, Image.Resampling.LANCZOS)
    mask = Image.fromarray(repaint.astype(np.uint8) * 255).crop(box).resize(size, Image.Resampling.NEAREST)
    return np.asarray(crop), np.asarray(mask) > 127


def call_views(prepared: list[tuple[np.ndarray, np.ndarray]], paddings: list[int | None]
               ) -> tuple[list[np.ndarray], np.ndarray, list[Box]]:
    """What the pipeline call sees of each prepared (image, repaint mask): (images, repaint masks (B, H, W),
    boxes); the whole image where the row's ``crop_padding`` is None."""
    height, width = prepared[0][1].shape if prepared else (0, 0)
    boxes = [(0, 0, width, height) if pad is None else crop_box(mask, pad)
             for (_, mask), pad in zip(prepared, paddings)]
    views = [to_crop(image, mask, box) for (image, mask), box in zip(prepared, boxes)]
    return [v[0] for v in views], np.stack([v[1] for v in views]), boxes


def from_crop(generated: np.ndarray, box: Box) -> np.ndarray:
    """A crop's generated image (uint8 HxWx3) resized back into ``box`` of an image of the same size (Lanczos;
    pixels outside the box are zero: ``paste_back`` keeps only those inside the repaint mask)."""
    from PIL import Image

    height, width = generated.shape[:2]
    if whole(box, (height, width)):
        return generated
    x1, y1, x2, y2 = box
    out = np.zeros_like(generated)
    out[y1:y2, x1:x2] = np.asarray(Image.fromarray(generated).resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS))
    return out


def maps_from_crop(maps: "torch.Tensor", boxes: list[Box], height: int, width: int) -> "torch.Tensor":
    """Per-class maps (B, K, h, w) captured on a crop's grid, warped (bilinear, zero outside the box) onto the
    whole image's grid of the same size and max-normalised again (every map the capture returns is)."""
    import torch
    import torch.nn.functional as F

    theta = torch.zeros(len(boxes), 2, 3, dtype=maps.dtype, device=maps.device)
    for b, (x1, y1, x2, y2) in enumerate(boxes):  # the whole image's [-1, 1] in the crop's [-1, 1]
        sx, sy = width / (x2 - x1), height / (y2 - y1)
        theta[b, 0, 0], theta[b, 1, 1] = sx, sy
        theta[b, 0, 2] = sx * (1 - (x1 + x2) / width)
        theta[b, 1, 2] = sy * (1 - (y1 + y2) / height)
    grid = F.affine_grid(theta, list(maps.shape), align_corners=False)
    warped = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_min(0)
    keep = torch.tensor([whole(box, (height, width)) for box in boxes], device=maps.device)
    if bool(keep.all()):  # no crop in this call
        return maps
    warped = warped / warped.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return torch.where(keep[:, None, None, None], maps, warped)


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

