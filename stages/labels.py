"""Label stage: semantic mask -> COCO instances (RLE, boxes) and per-sample quality scores.

Instances are the 4-connected components of each class's pixels in ``semantic_mask`` whose area
fraction lies in [``spec.filters.min_area_fraction``, ``spec.filters.max_area_fraction``];
components outside the bounds are counted in the scores, not annotated. Ignore pixels (255)
belong to no instance.

Attention statistics use the same maps as the mask stage (``masks.class_maps`` on ``attn`` or
``attn_raw``): ``peak`` values are on the model's attention scale, means and contrasts on the
per-class min-max normalised scale ([0, 1]). "Outside" a class means the pixels that are neither
that class nor ignore.

Several instances of one class: when the prompt asks for ``k > 1`` instances of a class (``cond["counts"]``,
written by the sampling stage with ``prompts.max_instances_per_class > 1``), that class's components are
split into objects (:func:`split_instances`): first by the image's own colour segments (two touching
objects of different colours), then by the distance transform's peaks (two touching objects of one colour
meet at a neck: a watershed from the peaks cuts there, and pieces whose shared border is nearly as thick as
their centres are merged back: a cross's arms or a ring are one object); while fewer objects than prompted are
found, the largest piece is cut in two where its shape has two centres, or across its long axis when it is
clearly larger than the class's other pieces (two overlapping objects). A class prompted once keeps the
plain components (the labels of single-instance data are exactly as before). ``per_class`` records
``n_prompted`` (the prompt's count) and ``n_instances`` (the objects found).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from .base import Batch, Stage, passthrough
from .masks import IGNORE, _class_maps_reused, class_maps, inpaint_outlines, inpainted, refined_maps, thresholds


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


def _components_boxed(region: np.ndarray, min_area: float, max_area: float
                      ) -> tuple[list[tuple[tuple[slice, slice], np.ndarray]], int]:
    """:func:`components` as (bounding-box slices, the instance's mask inside its box) pairs, same order:
    what is done per instance then costs its box, not the image."""
    lab, count = ndimage.label(region)
    if count == 0:
        return [], 0
    areas = np.bincount(lab.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(lab)
    return [(boxes[k], lab[boxes[k]] == k + 1) for k, a in enumerate(areas) if min_area <= a <= max_area], count


SPLIT_MERGE = 0.9  # pieces whose border thickness is >= this fraction of the thinner centre are one object
SPLIT_MERGE_EXTRA = 0.65  # ... and >= this while there are more pieces than the prompt asked for
SPLIT_MERGE_PIXELS = 1.5  # ... or when the border is at most this many pixels thinner (thin shapes: rings)
COLOR_SPLIT_MIN = 0.12  # a colour segment seeds its own object when it covers this fraction of the component
COLOR_SPLIT_DISTANCE = 60.0  # ... and its mean colour is this far (RGB) from the other seeds'


def _color_pieces(comp: np.ndarray, segments: np.ndarray, image: np.ndarray) -> np.ndarray:
    """int HxW: the component split into the image segments that cover enough of it with distinct colours
    (1..n; 0 outside). One piece when the component is one colour."""
    area = comp.sum()
    labels, counts = np.unique(segments[comp], return_counts=True)
    big = [(lab, c) for lab, c in zip(labels, counts) if c >= COLOR_SPLIT_MIN * area]
    seeds: list[tuple[int, np.ndarray]] = []
    for lab, _ in sorted(big, key=lambda x: -x[1]):
        colour = image[comp & (segments == lab)].reshape(-1, 3).astype(np.float32).mean(0)
        if all(np.linalg.norm(colour - other) >= COLOR_SPLIT_DISTANCE for _, other in seeds):
            seeds.append((int(lab), colour))
    out = np.zeros(comp.shape, np.int32)
    if len(seeds) < 2:
        out[comp] = 1
        return out
    # every component pixel joins the seed colour nearest to its own colour (anti-aliased edges included)
    palette = np.stack([c for _, c in seeds])
    px = image[comp].reshape(-1, 3).astype(np.float32)
    out[comp] = 1 + np.linalg.norm(px[:, None] - palette[None], axis=-1).argmin(1)
    return out


def _shape_pieces(piece: np.ndarray, expected: int) -> list[np.ndarray]:
    """A one-colour piece split at its necks: watershed of the distance transform from its peaks, then
    neighbours merged while their shared border is nearly as thick as their centres."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(piece) & ~piece)
    if n_holes >= 2:  # objects with a hole (rings): one object per hole, each pixel to the nearest hole
        sizes = np.bincount(holes.ravel())[1:]
        big = [k + 1 for k, a in enumerate(sizes) if a >= max(4, 0.02 * piece.sum())]
        if len(big) >= 2:
            seeds = np.where(np.isin(holes, big), holes, 0)
            _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            owner = np.where(piece, seeds[iy, ix], 0)
            return [owner == k for k in big]
    dist = ndimage.distance_transform_edt(np.pad(piece, 1))[1:-1, 1:-1]
    if dist.max() < 2:
        return [piece]
    peaks = peak_local_max(dist, min_distance=max(2, int(dist.max() * 0.6)), threshold_abs=0.4 * dist.max(),
                           labels=piece.astype(np.int32), exclude_border=False)
    if len(peaks) < 2:
        return [piece]
    markers = np.zeros(piece.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    lab = watershed(-dist, markers, mask=piece)
    while True:
        ids = [k for k in np.unique(lab) if k]
        if len(ids) < 2:
            break
        peak = {k: dist[lab == k].max() for k in ids}
        best, pair = -1.0, None
        for a in ids:  # borders: a pixel of a with a 4-neighbour in b
            grown = ndimage.binary_dilation(lab == a) & (lab > a)
            for b in np.unique(lab[grown]):
                border = ((lab == a) & ndimage.binary_dilation(lab == b)) | (grown & (lab == b))
                centre = min(peak[a], peak[b])
                ratio = dist[border].max() / max(centre, 1e-6)
                if centre - dist[border].max() <= SPLIT_MERGE_PIXELS:
                    ratio = max(ratio, SPLIT_MERGE)
                if ratio > best:
                    best, pair = ratio, (a, int(b))
        if pair is None or not (best >= SPLIT_MERGE or (best >= SPLIT_MERGE_EXTRA and len(ids) > expected)):
            break
        lab[lab == pair[1]] = pair[0]
    return [lab == k for k in np.unique(lab) if k]


TRIM_MAX_DISTANCE = 45.0  # RGB distance from the surrounding background above which a pixel is always object
SPLIT_MIN_SHARE = 0.25  # a piece under this fraction of its class's largest piece is a speck, not an object
SPLIT_AREA_EVIDENCE = 1.4  # a piece this many times the median area of its class's other pieces holds two


def _split_in_two(piece: np.ndarray, peaks_only: bool = False) -> list[np.ndarray]:
    """A piece cut in two: watershed of the distance transform from its two strongest separated peaks, or
    (one peak, unless ``peaks_only``) 2-means of its pixel coordinates (a cut across its long axis)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(np.pad(piece, 1))[1:-1, 1:-1]
    peaks = peak_local_max(dist, min_distance=max(2, int(dist.max() * 0.6)), num_peaks=2,
                           labels=piece.astype(np.int32), exclude_border=False)
    if len(peaks) < 2 and peaks_only:
        return [piece]
    if len(peaks) == 2:
        markers = np.zeros(piece.shape, np.int32)
        markers[tuple(peaks.T)] = [1, 2]
        lab = watershed(-dist, markers, mask=piece)
    else:
        ys, xs = np.nonzero(piece)
        pts = np.stack([ys, xs], 1).astype(np.float32)
        centre, axis = pts.mean(0), np.linalg.svd(pts - pts.mean(0), full_matrices=False)[2][0]
        side = (pts - centre) @ axis > 0
        lab = np.zeros(piece.shape, np.int32)
        lab[ys, xs] = 1 + side
    parts = [lab == k for k in (1, 2)]
    return parts if all(p.any() for p in parts) else [piece]


def trim_to_objects(region: np.ndarray, background: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The pixels of ``region`` whose colour stands out from the background just around it (the nearest of
    up to 300 colours of a 1-4 px ring of ``background`` pixels; Otsu's cut of those distances, at most
    :data:`TRIM_MAX_DISTANCE`): attention
    spills onto the background between objects and fills the necks that separate them."""
    from .masks import otsu_threshold

    ring = ndimage.binary_dilation(region, iterations=4) & ~ndimage.binary_dilation(region) & background
    if not region.any() or ring.sum() < 10:
        return region
    px = image.astype(np.float32)
    bg = px[ring]
    if len(bg) > 300:
        bg = bg[np.linspace(0, len(bg) - 1, 300).astype(int)]
    d = np.sqrt(((px[region][:, None, :] - bg[None]) ** 2).sum(-1)).min(1)
    top = max(float(d.max()), 1e-6)
    keep = np.zeros_like(region)
    keep[region] = d > min(otsu_threshold(d / top) * top, TRIM_MAX_DISTANCE)  # never cut between two objects
    return ndimage.binary_opening(keep)


def split_instances(region: np.ndarray, image: np.ndarray, expected: int, min_area: float, max_area: float,
                    segments: np.ndarray | None = None, background: np.ndarray | None = None
                    ) -> tuple[list[np.ndarray], int]:
    """(object masks within the area bounds, number of components) of one class's pixels when the prompt asks
    for ``expected`` objects: trimmed to the pixels that stand out from ``background`` (when given), each
    component split by colour (``segments``: the image's Felzenszwalb segments) and at its necks (see the
    module docstring); ``number of components`` counts the untrimmed region's."""
    count = ndimage.label(region)[1]
    if background is not None:
        region = trim_to_objects(region, background, image)
    lab, n_lab = ndimage.label(region)
    if count == 0:
        return [], 0
    if segments is None:
        from skimage.segmentation import felzenszwalb

        segments = felzenszwalb(image, scale=10.0, sigma=0.5, min_size=max(1, int(0.005 * region.size)))
    found = []
    for k in range(1, n_lab + 1):
        comp = lab == k
        if comp.sum() < min_area:
            continue
        colours = _color_pieces(comp, segments, image)
        for c in range(1, colours.max() + 1):
            piece = colours == c
            piece_lab, n_piece = ndimage.label(piece)  # a colour can be cut in two by another
            for j in range(1, n_piece + 1):
                found += _shape_pieces(piece_lab == j, expected)
    found = [m for m in found if m.sum() >= min_area]
    if len(found) > 1:  # specks beside the objects (attention spilled onto the background) are no object
        largest = max(int(m.sum()) for m in found)
        found = [m for m in found if m.sum() >= SPLIT_MIN_SHARE * largest]
    # fewer objects than prompted: a piece clearly larger than the others holds more than one
    while 0 < len(found) < expected:
        areas = [int(m.sum()) for m in found]
        big = int(np.argmax(areas))
        others = areas[:big] + areas[big + 1:]
        # clearly larger than the others: cut anyway; otherwise only where its shape has two centres
        parts = _split_in_two(found[big], peaks_only=not others or
                              areas[big] < SPLIT_AREA_EVIDENCE * float(np.median(others)))
        if len(parts) < 2 or min(p.sum() for p in parts) < min_area:
            break
        found = found[:big] + parts + found[big + 1:]
    return [m for m in found if min_area <= m.sum() <= max_area], count


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


ENCODE_CHUNK_BYTES = 64 << 20  # pycocotools encodes at most this many mask bytes at once


def encode_instances(masks: list[np.ndarray]) -> list[dict]:
    """:func:`rle_fields` (COCO RLE, bbox, area) of each bool mask."""
    if not masks:
        return []
    # each mask written once, transposed, into a zeroed (N, W, H) buffer: pycocotools' Fortran-order (H, W, N)
    # without the copies of a stack along the last axis
    height, width = masks[0].shape
    step = max(1, ENCODE_CHUNK_BYTES // max(1, height * width))
    out = []
    for start in range(0, len(masks), step):
        part = masks[start:start + step]
        buf = np.zeros((len(part), width, height), np.uint8)
        for j, mask in enumerate(part):
            buf[j] = mask.T
        out += [rle_fields(rle) for rle in mask_utils.encode(buf.transpose(2, 1, 0))]
    return out


def _box_rle_counts(box: tuple[slice, slice], mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The uncompressed COCO RLE counts (column-major runs, starting with the zeros before the first pixel,
    pycocotools' ``rleEncode``) of an HxW mask that is ``mask`` inside ``box`` and empty outside, computed
    from the box alone."""
    (y0, y1, _), (x0, _, _) = box[0].indices(height), box[1].indices(width)
    if 0 < y0 and y1 < height:  # each column of the box between a zero above and below it (real pixels)
        flat = np.zeros((mask.shape[1], mask.shape[0] + 2), np.int8)
        flat[:, 1:-1] = mask.T
        flat = flat.ravel()
        column_len = mask.shape[0] + 2
    else:  # the box's columns at full height: a contiguous stretch of the column-major order, zero-padded
        flat = np.zeros(mask.shape[1] * height + 2, np.int8)
        flat[1:-1].reshape(mask.shape[1], height)[:, y0:y1] = mask.T
        column_len = 0
    step = np.diff(flat)
    edges = np.flatnonzero(step) + 1  # index in ``flat`` of each run's first pixel: starts and ends alternate
    if column_len:
        edges = (x0 + edges // column_len) * height + (y0 - 1) + edges % column_len
    else:
        edges = x0 * height + edges - 1
    counts = np.diff(edges, prepend=0, append=height * width)
    return counts[:-1] if counts[-1] == 0 else counts


def _encode_boxed(boxed: list[tuple[tuple[slice, slice], np.ndarray]], shape: tuple[int, int]) -> list[dict]:
    """:func:`encode_instances` of masks given as (box slices, the mask inside its box) in an image of
    ``shape``: the runs are found in the box (:func:`_box_rle_counts`), pycocotools compresses them: the same
    RLE as encoding the whole mask, at the cost of the box."""
    if not boxed:
        return []
    height, width = shape
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": _box_rle_counts(box, mask, height, width)}
                                   for box, mask in boxed], height, width)
    return [rle_fields(rle) for rle in rles]


def _r(x: float) -> float:
    return round(float(x), 4)


class LabelStage(Stage):
    """Adds ``annotations`` (JSON list of COCO annotations) and ``scores`` (JSON object)."""

    name = "labels"
    kind = "task"
    # masks.use_raw; filters: the instance size bounds; references, generation: inpainting's labels
    reads = ("classes", "masks", "filters", "references", "generation")
    inputs = ("image", "class_names", "attn", "attn_raw", "semantic_mask")  # and ``cond`` when present (counts)
    outputs = ("annotations", "scores")

    def __init__(self, spec: Any):
        super().__init__(spec)
        self.ids = category_ids(self.spec)
        self.column = "attn_raw" if self.spec.masks.use_raw else "attn"
        self.outlines = inpaint_outlines(self.spec)

    def __call__(self, batch: Batch) -> Batch:
        annotations, scores = [], []
        conds = batch.get("cond")
        for row, names_json in enumerate(batch["class_names"]):
            cond = json.loads(str(conds[row])) if conds is not None and str(conds[row]) else {}
            reference = inpainted(conds, row)
            if reference is not None:
                anns, sc = self.inpaint_row(json.loads(str(names_json)), batch[self.column][row],
                                            batch["image"][row], reference)
                annotations.append(json.dumps(anns, separators=(",", ":")))
                scores.append(json.dumps(sc, separators=(",", ":")))
                continue
            anns, sc = self.label_row(json.loads(str(names_json)), batch[self.column][row],
                                      batch["semantic_mask"][row], batch["image"][row], cond.get("counts"))
            annotations.append(json.dumps(anns, separators=(",", ":")))
            scores.append(json.dumps(sc, separators=(",", ":")))
        return passthrough(batch, annotations=np.array(annotations, dtype=str),
                           scores=np.array(scores, dtype=str))

    def label_row(self, names: list[str], attn: np.ndarray, sem: np.ndarray, image: np.ndarray | None = None,
                  counts: list[int] | None = None) -> tuple[list[dict], dict]:
        """Annotations and scores of one image; ``counts``: instances the prompt asks for per class (None: 1)."""
        unknown = [n for n in names if n not in self.ids]
        if unknown:
            raise ValueError(f"class_names {unknown} are not in the job's classes")
        # the mask stage's upsampled maps when it ran on this row in this worker (it keeps them), else upsampled
        raw, norm = _class_maps_reused(attn, len(names), sem.shape)
        pixels = sem.size
        f = self.spec.filters
        ignore = sem == IGNORE
        labelled = pixels - np.count_nonzero(ignore)  # pixels that are not ignore
        not_ignore = None
        anns, per_class = [], []
        segments = None
        for i, name in enumerate(names):
            region = sem == i + 1
            area = np.count_nonzero(region)
            mean_in = norm[i][region].mean() if area else 0.0
            if labelled > (area if i + 1 != IGNORE else 0):  # outside: pixels neither this class nor ignore
                if not_ignore is None:
                    not_ignore = ~ignore
                mean_out = norm[i][not_ignore & ~region].mean()
            else:
                mean_out = 0.0
            prompted = int(counts[i]) if counts else names.count(name)
            if prompted > 1 and image is not None:
                if segments is None:
                    from skimage.segmentation import felzenszwalb

                    segments = felzenszwalb(image, scale=self.spec.masks.superpixel_scale, sigma=0.5,
                                            min_size=max(1, int(self.spec.masks.superpixel_min_area * pixels)))
                found, n_comp = split_instances(region, image, prompted, f.min_area_fraction * pixels,
                                                f.max_area_fraction * pixels, segments, background=sem == 0)
                boxed = [((slice(None), slice(None)), m) for m in found]
                encoded = encode_instances(found)
            else:  # each instance within its bounding box (the same pixels, in the same order)
                boxed, n_comp = _components_boxed(region, f.min_area_fraction * pixels, f.max_area_fraction * pixels)
                encoded = _encode_boxed(boxed, sem.shape)
            for (box, inst), enc in zip(boxed, encoded):
                inst_mean = _r(norm[i][box][inst].mean())
                anns.append({"category_id": self.ids[name], **enc, "iscrowd": 0, "score": inst_mean,
                             "attn_peak": _r(raw[i][box][inst].max()), "attn_mean_in": inst_mean,
                             "attn_mean_out": _r(mean_out)})
            per_class.append({"name": name, "category_id": self.ids[name], "peak": _r(raw[i].max()),
                              "contrast": _r(mean_in - mean_out), "area_fraction": _r(area / pixels),
                              "n_components": n_comp, "n_instances": len(boxed),
                              "n_prompted": prompted})
        scores = {
            "per_class": per_class,
            "ignore_fraction": _r((pixels - labelled) / pixels),
            "min_contrast": min((c["contrast"] for c in per_class), default=0.0),
            "n_instances": len(anns),
            "n_prompted": sum(c["n_prompted"] for c in per_class),
        }
        return anns, scores

    def inpaint_row(self, names: list[str], attn: np.ndarray, image: np.ndarray,
                    reference: dict) -> tuple[list[dict], dict]:
        """An inpainting sample's labels: the reference's annotations (``instance_id``; the repainted one
        ``inpainted: true``, first), and its scores with the attention check of the repainted class
        (``outline``: stages/inpaint.py; null when the prompt names no class token)."""
        from .inpaint import outline_check, repaint_mask

        labels = self.outlines.labels(reference["key"])
        labels = sorted(labels, key=lambda lab: (lab.id != reference["instance"], lab.id))
        outline = labels[0].mask
        present = [lab for lab in labels if lab.mask.any()]
        anns = [{"category_id": self.ids[lab.class_name], **enc, "iscrowd": 0, "score": 1.0,
                 "instance_id": lab.id, "inpainted": lab.id == reference["instance"]}
                for lab, enc in zip(present, encode_instances([lab.mask for lab in present]))]
        pixels = outline.size
        check = None
        if reference.get("prompt") != "empty":
            raw, _ = class_maps(attn, 1, outline.shape)
            norm = refined_maps(attn, image, 1, self.spec.masks)
            t_fg, _ = thresholds(self.spec.masks, names[:1], norm)
            check = {"class": names[0], "area_fraction": _r(outline.sum() / pixels),
                     **outline_check(raw[0], norm[0] >= t_fg[0], outline,
                                     repaint_mask(outline, int(reference["dilation"])))}
        per_class = []
        for name in names:
            n = sum(lab.class_name == name for lab in present)
            per_class.append({"name": name, "category_id": self.ids[name], "n_components": n, "n_instances": n,
                              "n_prompted": n, "area_fraction": _r(sum(lab.mask.sum() for lab in present
                                                                        if lab.class_name == name) / pixels)})
        scores = {"per_class": per_class, "outline": check, "outline_empty": not outline.any(),
                  "ignore_fraction": 0.0, "n_instances": len(anns), "n_prompted": len(anns)}
        return anns, scores
