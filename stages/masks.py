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

The label stage needs the same upsampled maps (step 1-2); the stage keeps each row's for it (``_MapCache``,
by content: the two stages run in one worker, one batch after the other), so they are upsampled once.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from .base import Batch, Stage, passthrough

IGNORE = 255
SUPERPIXEL_MAX_SIDE = 256  # Felzenszwalb runs on at most 256 px a side (a 512² image: ~0.3 s, not ~1.5 s)


#: one ReferenceOutlines per references section and generation size in a process: the synthesis stage (and its
#: redraw checks), the masks and the label stages of one worker read the COCO file once and share the fitted masks
_OUTLINES: dict[str, Any] = {}


def inpaint_outlines(spec: Any):
    """The reference annotations of an inpainting job (``stages.inpaint.ReferenceOutlines``, shared by every stage
    of the process), else None."""
    refs = getattr(spec, "references", None)
    if refs is None or getattr(refs, "mode", "img2img") != "inpaint":
        return None
    from .inpaint import ReferenceOutlines

    from pathlib import Path

    from .references import ANNOTATIONS, INDEX

    section = refs.model_dump(mode="json") if hasattr(refs, "model_dump") else repr(refs)
    listing = next((Path(refs.path) / n for n in (ANNOTATIONS, INDEX) if (Path(refs.path) / n).is_file()), None)
    stat = (listing.stat().st_size, listing.stat().st_mtime_ns) if listing is not None else None  # an edit: reread
    key = json.dumps([section, stat, spec.generation.height, spec.generation.width], sort_keys=True, default=str)
    if key not in _OUTLINES:
        _OUTLINES[key] = ReferenceOutlines(spec)
    return _OUTLINES[key]


def inpainted(conds: Any, row: int) -> dict | None:
    """The ``cond["reference"]`` of an inpainting row (None for any other row)."""
    if conds is None or not str(conds[row]):
        return None
    reference = json.loads(str(conds[row])).get("reference") or {}
    return reference if reference.get("mode") == "inpaint" else None


def _pixels(image: Image.Image) -> np.ndarray:
    """A mode-"F" image's pixels, float32 (H, W): a view of its memory through Pillow's Arrow export (Pillow
    >= 11.2; no copy), else ``np.asarray`` (which encodes the image to bytes first: at 1024² a copy that
    costs more than the bicubic resize itself)."""
    try:
        import pyarrow as pa
    except ImportError:
        return np.asarray(image, np.float32)
    try:
        flat = pa.array(image).to_numpy(zero_copy_only=True)
    except (TypeError, ValueError, NotImplementedError, pa.ArrowException):
        flat = None  # an older Pillow, or an image not in one block of memory (large ones): the copy
    if flat is None or flat.dtype != np.float32 or flat.size != image.width * image.height:
        return np.asarray(image, np.float32)
    return flat.reshape(image.height, image.width)


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
        raw[i] = _pixels(small.resize((width, height), Image.BICUBIC))
    np.maximum(raw, 0.0, out=raw)
    lo = raw.min(axis=(1, 2), keepdims=True)
    span = raw.max(axis=(1, 2), keepdims=True) - lo
    # (raw - lo) / max(span, 1e-12) where span > 1e-12, else 0: the same float32 operations, class by class
    # and in place (no (n, H, W) temporaries beyond ``norm`` itself)
    spread, den = span > 1e-12, np.maximum(span, 1e-12)
    norm = np.empty_like(raw)
    for i in range(n):
        if spread[i, 0, 0]:
            np.subtract(raw[i], lo[i], out=norm[i])
            np.divide(norm[i], den[i], out=norm[i])
        else:
            norm[i] = 0.0
    return raw, norm


MAP_CACHE_BYTES = 128 << 20  # class_maps kept for the label stage: at most this many bytes (a 1024² batch of 4)


class _MapCache:
    """:func:`class_maps` of the rows the mask stage just labelled, by content (the attention row's bytes,
    the class count and the size), for the label stage, which needs the same upsampled maps: in a run the
    two stages are one operator (one worker, one batch after the other), so the maps are upsampled once.
    An entry is handed out once (:meth:`take` removes it); the oldest go first beyond ``MAP_CACHE_BYTES``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(attn: np.ndarray, n: int, size: tuple[int, int]) -> bytes:
        maps = np.ascontiguousarray(attn[:n])
        head = f"{maps.dtype.str}|{maps.shape}|{tuple(int(s) for s in size)}|".encode()
        return hashlib.blake2b(head + maps.tobytes(), digest_size=20).digest()

    def put(self, key: bytes, maps: tuple[np.ndarray, np.ndarray]) -> None:
        size = maps[0].nbytes + maps[1].nbytes
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = maps
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (raw, norm) = self.entries.popitem(last=False)
                self.bytes -= raw.nbytes + norm.nbytes

    def take(self, key: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        with self.lock:
            maps = self.entries.pop(key, None)
            if maps is not None:
                self.bytes -= maps[0].nbytes + maps[1].nbytes
            return maps


_MAPS = _MapCache(MAP_CACHE_BYTES)


def _class_maps_kept(attn: np.ndarray, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_maps`, kept for :func:`_class_maps_reused` (the mask stage's rows)."""
    raw, norm = class_maps(attn, n, size)
    _MAPS.put(_MapCache.key(attn, n, size), (raw, norm))
    return raw, norm


def _class_maps_reused(attn: np.ndarray, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`class_maps`: the mask stage's, when it kept them for this row (the label stage), else computed."""
    if attn.ndim == 3 and n <= attn.shape[0]:
        kept = _MAPS.take(_MapCache.key(attn, n, size))
        if kept is not None:
            return kept
    return class_maps(attn, n, size)


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
    return _refined(attn, image, n, masks, class_maps)


def _refined(attn: np.ndarray, image: np.ndarray, n: int, masks: Any, upsample: Any) -> np.ndarray:
    """:func:`refined_maps` with ``upsample`` in place of :func:`class_maps`."""
    _, norm = upsample(attn, n, image.shape[:2])
    if masks.image_refine == "superpixels" and n:
        norm = superpixel_pool(norm, image, masks.superpixel_scale, masks.superpixel_min_area)
    return norm


def unit_histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(values, bins=bins, range=(0.0, 1.0))``, counted in half numpy's passes over the data
    when ``bins`` is a power of two and ``values`` float32 / float64: the edges are then exactly ``i / bins``,
    so ``floor(v * bins)`` (an exact product) is the bin of every ``v`` in [0, 1), 1.0 goes to the last bin
    and values outside [0, 1] to none, as numpy counts them (other inputs: ``np.histogram`` itself)."""
    edges = np.histogram_bin_edges(values, bins=bins, range=(0.0, 1.0))
    v = np.asarray(values)
    if bins < 1 or bins & (bins - 1) or v.dtype not in (np.float32, np.float64):
        return np.histogram(v, bins=bins, range=(0.0, 1.0))
    v = v.ravel()
    scaled = v * v.dtype.type(bins)
    if not (v.size == 0 or (0.0 <= v.min() and v.max() <= 1.0)):  # outside [0, 1] or NaN: not counted
        scaled = scaled[(v >= 0.0) & (v <= 1.0)]
    index = scaled.astype(np.intp)
    np.minimum(index, bins - 1, out=index)
    return np.bincount(index, minlength=bins).astype(np.int64), edges


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = unit_histogram(values, bins)
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
    # one pass over the classes, keeping the best candidate (the first of equal ones, as argmax), its class
    # and the second best (the (n-1)-th order statistic, as np.partition): the same values, compared the same way
    two = n > 1 and margin > 0
    best_val = np.where(norm[0] >= t_fg[0], norm[0], np.float32(-1.0))  # candidate: the map where >= t_fg
    best = np.zeros((height, width), np.uint8 if n <= 256 else np.intp)  # 1 + best wraps in uint8, as before
    second = np.full((height, width), -np.inf, np.float32) if two else None
    above_ign = norm[0] >= t_ign[0]
    cand = np.empty_like(best_val)
    higher = np.empty((height, width), bool)
    for i in range(1, n):
        np.greater_equal(norm[i], t_fg[i], out=higher)
        np.copyto(cand, np.float32(-1.0))
        np.copyto(cand, norm[i], where=higher)
        if two:
            np.maximum(second, np.minimum(best_val, cand), out=second)
        np.greater(cand, best_val, out=higher)
        best[higher] = i
        np.maximum(best_val, cand, out=best_val)
        above_ign |= norm[i] >= t_ign[i]
    has_fg = best_val >= 0
    if best.dtype == np.uint8:
        np.add(best, 1, out=sem, where=has_fg)
    else:
        sem[has_fg] = (best[has_fg] + 1).astype(np.uint8)
    uncertain = ~has_fg & above_ign
    if two:
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
            # the upsampled maps are kept for the label stage (the next in this worker), which needs them too
            norm = _refined(attn[row], images[row], len(names), self.spec.masks, _class_maps_kept)
            t_fg, t_ign = self.thresholds(names, norm)
            masks[row] = label_pixels(norm, t_fg, t_ign, float(self.spec.masks.ambiguity_margin))
        return passthrough(batch, semantic_mask=masks)
