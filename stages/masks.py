"""Mask stage: per-class attention maps -> one semantic mask per image.

Per row, for the first ``n = len(class_names)`` maps of ``attn`` (or ``attn_raw`` when
``spec.masks.use_raw``):

1. bicubic upsampling to the image size, clamped at 0 (bicubic overshoots);
2. per-class min-max normalisation to [0, 1] (a flat map becomes all zeros: no object);
   with ``spec.masks.image_refine: superpixels`` each normalised map is then averaged within the
   segments of scikit-image's Felzenszwalb graph segmentation of the generated image (image-guided
   refinement in the spirit of DiffuMask's CRF: the 16×16 attention decides *which* segments
   belong to a class, the image's own edges decide *where* the mask ends);
3. per-class thresholds ``t_fg`` / ``t_ign``:
   * ``fixed``: ``spec.masks.fg_threshold`` / ``spec.masks.ignore_threshold`` for every class;
   * ``otsu``: ``t_fg`` = Otsu's threshold of the class's normalised map;
   * ``calibrated``: ``t_fg`` = ``spec.masks.class_thresholds[name]`` (from a calibration run,
     stored in the job's manifest);
   for ``otsu`` and ``calibrated`` the ignore band keeps the fixed band's *proportion*:
   ``t_ign = t_fg * ignore_threshold / fg_threshold`` (a class calibrated at 0.1 gets a band
   [0.07, 0.1), not one reaching down to 0 that would mark the whole background ignore);
4. background handling and labels: a pixel gets class ``1 + i`` when map ``i`` is the largest of
   the maps at or above their own ``t_fg``; background (0) when no map reaches its ``t_ign``;
   ignore (255) when no map reaches ``t_fg`` but one reaches ``t_ign`` (uncertain extent) or
   when the two best foreground maps are within ``spec.masks.ambiguity_margin`` (uncertain class).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from .base import Batch, Stage, passthrough

IGNORE = 255
SUPERPIXEL_MAX_SIDE = 256  # Felzenszwalb runs on at most 256 px a side (a 512² image: ~0.3 s, not ~1.5 s)


def inpaint_outlines(spec: Any):
    """The reference annotations of an inpainting job (``stages.inpaint.ReferenceOutlines``), else None."""
    refs = getattr(spec, "references", None)
    if refs is None or getattr(refs, "mode", "img2img") != "inpaint":
        return None
    from .inpaint import ReferenceOutlines

    return ReferenceOutlines(spec)


def inpainted(conds: Any, row: int) -> dict | None:
    """The ``cond["reference"]`` of an inpainting row (None for any other row)."""
    if conds is None or not str(conds[row]):
        return None
    reference = json.loads(str(conds[row])).get("reference") or {}
    return reference if reference.get("mode") == "inpaint" else None


def class_maps(attn: np.ndarray, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Upsampled maps of the first ``n`` classes of one row's ``attn`` (K, h, w).

    Returns ``(raw, norm)``, both float32 (n, H, W) for ``size = (H, W)``: ``raw`` is the
    bicubic-upsampled attention clamped at 0 (the model's own scale, for peak scores) and
    ``norm`` its per-class min-max normalisation to [0, 1].
    """
    if attn.ndim != 3:
        raise ValueError(f"attn row must be (K, h, w), got shape {attn.shape}")
    if n > attn.shape[0]:
        raise ValueError(f"row names {n} classes but attn holds only {attn.shape[0]} maps")
    height, width = size
    raw = np.empty((n, height, width), np.float32)
    for i in range(n):
        small = Image.fromarray(np.asarray(attn[i], np.float32))  # mode "F"
        raw[i] = np.asarray(small.resize((width, height), Image.BICUBIC), np.float32)
    np.maximum(raw, 0.0, out=raw)
    lo = raw.min(axis=(1, 2), keepdims=True)
    span = raw.max(axis=(1, 2), keepdims=True) - lo
    norm = np.where(span > 1e-12, (raw - lo) / np.maximum(span, 1e-12), 0.0).astype(np.float32)
    return raw, norm


def superpixel_pool(norm: np.ndarray, image: np.ndarray, scale: float, min_area: float) -> np.ndarray:
    """Average each map of ``norm`` (n, H, W) within the Felzenszwalb segments of ``image`` (H, W, 3)."""
    from skimage.segmentation import felzenszwalb

    if norm.shape[1:] != image.shape[:2]:
        raise ValueError(f"maps {norm.shape[1:]} and image {image.shape[:2]} differ in size")
    height, width = image.shape[:2]
    factor = max(1, -(-max(height, width) // SUPERPIXEL_MAX_SIDE))  # segment big images at a reduced size
    small = image if factor == 1 else np.asarray(
        Image.fromarray(image).resize((max(1, width // factor), max(1, height // factor)), Image.BOX))
    seg = felzenszwalb(small, scale=scale, sigma=0.5, min_size=max(1, int(min_area * small.shape[0] * small.shape[1])))
    if factor > 1:
        seg = np.asarray(Image.fromarray(seg.astype(np.int32)).resize((width, height), Image.NEAREST))
    flat = seg.ravel()
    count = np.bincount(flat).astype(np.float64)
    out = np.empty_like(norm)
    for k, cmap in enumerate(norm):
        out[k] = (np.bincount(flat, weights=cmap.ravel()) / np.maximum(count, 1))[seg]
    return out


def refined_maps(attn: np.ndarray, image: np.ndarray, n: int, masks: Any) -> np.ndarray:
    """The normalised (and, if configured, image-refined) maps the thresholds are applied to."""
    _, norm = class_maps(attn, n, image.shape[:2])
    if masks.image_refine == "superpixels" and n:
        norm = superpixel_pool(norm, image, masks.superpixel_scale, masks.superpixel_min_area)
    return norm


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def thresholds(m: Any, names: list[str], norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (t_fg, t_ign) of a ``masks`` section for one row's classes and normalised maps (rule 3 above)."""
    if m.threshold == "fixed":
        t_fg = np.full(len(names), m.fg_threshold, np.float32)
        return t_fg, np.full(len(names), m.ignore_threshold, np.float32)
    if m.threshold == "otsu":
        t_fg = np.array([otsu_threshold(c) for c in norm], np.float32)
    else:
        t_fg = np.array([m.class_thresholds[name] for name in names], np.float32)
    band = float(m.ignore_threshold / m.fg_threshold) if m.fg_threshold > 0 else 1.0
    return t_fg, (t_fg * band).astype(np.float32)


def label_pixels(norm: np.ndarray, t_fg: np.ndarray, t_ign: np.ndarray, margin: float) -> np.ndarray:
    """uint8 (H, W) semantic mask from normalised maps (n, H, W) and per-class thresholds (n,)."""
    n, height, width = norm.shape
    sem = np.zeros((height, width), np.uint8)
    if n == 0:
        return sem
    fg = norm >= t_fg[:, None, None]
    cand = np.where(fg, norm, -1.0)
    best = cand.argmax(axis=0)
    best_val = np.take_along_axis(cand, best[None], axis=0)[0]
    has_fg = best_val >= 0
    sem[has_fg] = (best[has_fg] + 1).astype(np.uint8)
    uncertain = ~has_fg & (norm >= t_ign[:, None, None]).any(axis=0)
    if n > 1 and margin > 0:
        second = np.partition(cand, n - 2, axis=0)[n - 2]
        uncertain |= has_fg & (second >= 0) & (best_val - second < margin)
    sem[uncertain] = IGNORE
    return sem


class MaskStage(Stage):
    """Adds ``semantic_mask`` uint8 (B, H, W): 0 background, 1 + i = class_names[i], 255 ignore."""

    name = "masks"
    kind = "task"
    reads = ("masks", "references", "generation", "classes")  # inpainting: the reference's masks are the labels
    inputs = ("image", "class_names", "attn", "attn_raw")  # and ``cond`` when present (inpainting)
    outputs = ("semantic_mask",)

    def __init__(self, spec: Any):
        super().__init__(spec)
        m = self.spec.masks
        self.column = "attn_raw" if m.use_raw else "attn"
        self.outlines = inpaint_outlines(self.spec)

    def thresholds(self, names: list[str], norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-class (t_fg, t_ign) for one row's classes and normalised maps."""
        return thresholds(self.spec.masks, names, norm)

    def __call__(self, batch: Batch) -> Batch:
        attn, images = batch[self.column], batch["image"]
        height, width = images.shape[1:3]
        masks = np.zeros((len(images), height, width), np.uint8)
        conds = batch.get("cond")
        for row, names_json in enumerate(batch["class_names"]):
            names = json.loads(str(names_json))
            reference = inpainted(conds, row)
            if reference is not None:  # labels by construction: the reference's annotations
                from .inpaint import semantic_mask

                masks[row] = semantic_mask(self.outlines.labels(reference["key"]), names)
                continue
            norm = refined_maps(attn[row], images[row], len(names), self.spec.masks)
            t_fg, t_ign = self.thresholds(names, norm)
            masks[row] = label_pixels(norm, t_fg, t_ign, float(self.spec.masks.ambiguity_margin))
        return passthrough(batch, semantic_mask=masks)
