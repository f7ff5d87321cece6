"""``synthgen eval``: how good the labels are, measured against a source of ground truth.

A :class:`Truth` says what to generate and what the right labels are. Two are built in
(``--truth``):

* ``oracle`` (the default for shapes-world jobs): N held-out shapes-world captions (seeds never
  used to train the bundled model) drawn text-to-image; the oracle (:mod:`pipeline.shapes.oracle`)
  recovers each prompted object's true pixels from the generated image by its colour, and the
  prompted class is its category.
* ``coco:DIR`` (any job, e.g. a real model's): a COCO folder of real images with annotations
  (``import-coco``'s and ``references.path``'s layout). Each of N annotated images is the start of
  one image-guided variation at strength ``s`` (img2img, as ``references`` jobs make them); the
  prompt names the image's largest annotation's class, and that class's annotations, fitted to the
  generated size as the reference image is, are the ground truth (a low strength keeps the layout).
  Objects of classes the prompt does not name are not scored. For an inpainting job (``references.mode:
  inpaint``) each case repaints one instance (the first N in key and id order) with the job's inpaint
  options, and that instance's outline is the truth of the new object.

The job's own synthesis, mask, label and filter stages run in process. Against the truth:

* **semantic mIoU** per class and mean over the object classes (background reported apart), for
  the *raw* cross-attention (min-max normalised, threshold 0.5, no refinement, no ignore band)
  and for the job's *refined* masks. Pixels a mask marks ignore (255) are left out of the
  refined score (training ignores them too); ``miou_ignore_as_background`` counts them as wrong;
* **instance mask IoU**: per true object, the best IoU of a predicted instance of its class;
* **boxes**: COCO AP and AP50 with ``pycocotools.cocoeval.COCOeval`` (bbox, and segm);
* **instances** (several of one class): instance mask AP / AP50 (COCOeval segm, one ground truth per true
  object) over all classes and per class, and count accuracy: per (image, class) with two or more true
  objects, whether the labels found exactly that many (``instance_scores``; a job with
  ``prompts.max_instances_per_class > 1`` prompts the count and the label stage splits the class);
* **missing objects**: true objects with no predicted box of their class at IoU >= 0.5
  (including objects the model did not draw at all);
* **filters**: the same numbers on the kept samples only, the share of kept samples whose every
  object is found (precision) and the share of such good samples that were kept (recall).

``--calibrate F`` instead searches, per class, the foreground threshold on the refined maps that
maximises that class's IoU on separate calibration cases (the oracle: another seed range; a COCO
folder: its last N images, where evaluation takes its first N), and writes it to ``F`` for
``masks.calibration`` (thresholds then travel in the job spec and the output manifest).
"""
from __future__ import annotations

import contextlib
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from stages.base import Batch
from stages.labels import category_ids, encode_mask, rle_fields
from stages.masks import IGNORE, refined_maps

from .shapes.oracle import find_objects
from .shapes.world import CLASSES as SHAPES_CLASSES
from .shapes.world import HELD_OUT_SEED, render_scene
from .spec import JobSpec, ReferencesSpec, SpecError

#: evaluation captions come from scenes HELD_OUT_SEED + i; calibration uses a disjoint range
CALIBRATION_SEED = HELD_OUT_SEED + 2_000_000
CALIBRATION_GRID = np.round(np.arange(0.05, 0.91, 0.05), 2)
WEAK_CLASS_IOU = 0.3  # calibration warns about classes whose best IoU stays below this


@dataclass
class Prompt:
    """One evaluation case: the oracle's caption (seed, text, (colour, class) per object in prompt
    order), or a COCO image (seed: its variation's index, text: its key, (annotation id, class) per
    true object)."""

    seed: int
    text: str
    objects: list[tuple[str, str]]


def shapes_prompts(n: int, first_seed: int = HELD_OUT_SEED) -> list[Prompt]:
    """Captions of the shapes-world scenes ``first_seed .. first_seed + n - 1`` with their objects."""
    out = []
    for seed in range(first_seed, first_seed + n):
        scene = render_scene(seed)
        out.append(Prompt(seed, scene.caption, [(o.color, o.cls) for o in scene.objects]))
    return out


def check_spec(spec: JobSpec, prompts: list[Prompt]) -> None:
    """The job must know every class and allow as many classes per image as the prompts use."""
    known = {c.name for c in spec.classes}
    used = {cls for p in prompts for _, cls in p.objects}
    if used - known:
        raise SpecError(f"eval: the job's classes lack {sorted(used - known)}; evaluate a shapes-world job "
                        "(e.g. jobs/shapes-demo.yaml) or give --truth coco:DIR (annotated images of its classes)")
    most = max(len(p.objects) for p in prompts)
    if spec.prompts.max_classes_per_image < most:
        raise SpecError(f"eval: prompts.max_classes_per_image is {spec.prompts.max_classes_per_image} but the "
                        f"evaluation captions name up to {most} objects; --set prompts.max_classes_per_image={most}")


def raw_spec(spec: JobSpec) -> JobSpec:
    """The spec of the raw baseline: unrefined maps, fixed threshold 0.5, no ignore band."""
    masks = spec.masks.model_copy(update={"use_raw": True, "threshold": "fixed", "fg_threshold": 0.5,
                                          "ignore_threshold": 0.5, "ambiguity_margin": 0.0,
                                          "image_refine": "none"})
    return spec.model_copy(update={"masks": masks})


def prompt_batch(tokenizer, prompts: list[Prompt], start: int) -> Batch:
    """The sampling stage's columns (index, prompt, seed, token_index, class_names) for given prompts,
    rows ``start ..``: what the synthesis stage takes to draw exactly these captions from these seeds
    (``synthgen eval``; the benchmarks use it to feed the synthesis stage held-out prompts)."""
    from stages.sampling import class_token_positions

    token_index = []
    for p in prompts:
        spans, pos = [], 0
        for _, cls in p.objects:  # class words appear in prompt order
            at = p.text.index(cls, pos)
            spans.append((at, at + len(cls)))
            pos = at + len(cls)
        token_index.append(json.dumps(class_token_positions(tokenizer, p.text, spans)))
    return {"index": np.arange(start, start + len(prompts), dtype=np.int64),
            "prompt": np.array([p.text for p in prompts]),
            "seed": np.array([p.seed for p in prompts], dtype=np.int64),
            "token_index": np.array(token_index),
            "class_names": np.array([json.dumps([cls for _, cls in p.objects]) for p in prompts])}


class Truth:
    """A source of ground truth for ``synthgen eval`` / ``--calibrate``: which cases to generate, the
    synthesis stage's input rows for them, and the true mask of each case's objects."""

    name = "truth"

    def job(self, spec: JobSpec, n: int, calibration: bool) -> tuple[JobSpec, list[Prompt]]:
        """(the spec to run, ``n`` cases); SpecError (exit 2) when this truth does not fit the job."""
        raise NotImplementedError

    def inputs(self, synthesis: Any, prompts: list[Prompt], start: int) -> Batch:
        """The synthesis stage's input rows for ``prompts`` (rows ``start ..``)."""
        raise NotImplementedError

    def masks(self, prompt: Prompt, image: np.ndarray) -> list[np.ndarray]:
        """Per object of ``prompt``, its true bool mask at the image's size (empty: not drawn)."""
        raise NotImplementedError

    def describe(self, prompts: list[Prompt]) -> dict[str, Any]:
        """What the result JSON records about the cases."""
        return {"truth": self.name, "n": len(prompts), "objects": sum(len(p.objects) for p in prompts)}


class OracleTruth(Truth):
    """Held-out shapes-world captions, text-to-image; the oracle finds each object by its colour."""

    name = "oracle"

    def job(self, spec: JobSpec, n: int, calibration: bool) -> tuple[JobSpec, list[Prompt]]:
        self.first_seed = CALIBRATION_SEED if calibration else HELD_OUT_SEED
        prompts = shapes_prompts(n, self.first_seed)
        check_spec(spec, prompts)
        return spec, prompts

    def inputs(self, synthesis: Any, prompts: list[Prompt], start: int) -> Batch:
        return prompt_batch(synthesis.pipe.tokenizer, prompts, start)

    def masks(self, prompt: Prompt, image: np.ndarray) -> list[np.ndarray]:
        return [f.mask for f in find_objects(image, [c for c, _ in prompt.objects])]

    def describe(self, prompts: list[Prompt]) -> dict[str, Any]:
        return {**super().describe(prompts), "first_seed": self.first_seed}


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask centre-cropped to the aspect ratio and resized (nearest) to height x width: the
    geometry ``stages.references.ReferenceImages`` gives a reference image."""
    from PIL import Image, ImageOps

    fitted = ImageOps.fit(Image.fromarray(mask.astype(np.uint8) * 255), (width, height),
                          method=Image.Resampling.NEAREST)
    return np.asarray(fitted) > 127


class CocoTruth(Truth):
    """A COCO folder of annotated real images: each is one img2img variation at ``strength``; its
    largest annotation's class is prompted and that class's annotations are the truth."""

    def __init__(self, folder: str | Path, strength: float = 0.3):
        self.folder = Path(folder).resolve()
        self.strength = float(strength)
        self.name = f"coco:{folder}"
        self.sampling = None

    def job(self, spec: JobSpec, n: int, calibration: bool) -> tuple[JobSpec, list[Prompt]]:
        from stages.references import ANNOTATIONS, ReferenceDataError, load_coco

        if not (self.folder / ANNOTATIONS).is_file():
            raise SpecError(f"--truth coco:{self.folder}: no {ANNOTATIONS}; give a COCO folder (images + "
                            f"{ANNOTATIONS}), e.g. from `python -m pipeline.shapes render --n 40 --out DIR`")
        if not 0.0 < self.strength <= 1.0:
            raise SpecError(f"--strength {self.strength}: the img2img strength must be in (0, 1]")
        try:
            coco, images = load_coco(self.folder, field=f"--truth coco:{self.folder}")
        except ReferenceDataError as e:
            raise SpecError(str(e)) from None
        name = {c["id"]: c["name"] for c in coco.cats.values()}
        known = {c.name for c in spec.classes}
        outside = sorted({name[im.annotations[0]["category_id"]] for im in images} - known)
        if outside:
            raise SpecError(f"--truth coco:{self.folder}: its images' main classes {outside} are not in the job's "
                            "classes; add them to classes or use a folder of the job's classes")
        if len(images) < n:
            raise SpecError(f"-n {n}: --truth coco:{self.folder} has {len(images)} annotated images; use -n "
                            f"{len(images)} or fewer")
        if int(spec.generation.steps * self.strength) < 1:
            raise SpecError(f"--strength {self.strength}: int(generation.steps x strength) must be >= 1 "
                            f"(steps {spec.generation.steps})")
        if spec.references is not None and spec.references.mode == "inpaint":
            return self._inpaint_job(spec, n, calibration, coco, images)
        refs = ReferencesSpec(path=str(self.folder), strengths=[self.strength], seeds_per_level=1)
        run = spec.model_copy(update={"references": refs, "samples": len(images)})
        first = len(images) - n if calibration else 0  # calibration: the last n images; evaluation: the first n
        prompts = []
        for index in range(first, first + n):
            im = images[index]
            top = name[im.annotations[0]["category_id"]]
            prompts.append(Prompt(index, im.key, [(str(a["id"]), top) for a in im.annotations
                                                  if name[a["category_id"]] == top]))
        self.coco, self.images = coco, images
        self.cases = {p.seed: p for p in prompts}
        self.run = run
        return run, prompts

    def _inpaint_job(self, spec: JobSpec, n: int, calibration: bool, coco, images) -> tuple[JobSpec, list[Prompt]]:
        """An inpainting job: each case repaints one instance of the folder (the job's ``references.inpaint``
        options, at ``strength``); the instance's outline is the truth of the new object."""
        from stages.references import ReferenceDataError, inpaint_references

        refs = ReferencesSpec(path=str(self.folder), mode="inpaint", inpaint=spec.references.inpaint,
                              strengths=[self.strength], seeds_per_level=1)
        run = spec.model_copy(update={"references": refs, "samples": 1})
        try:
            units = inpaint_references(run).instances
        except ReferenceDataError as e:
            raise SpecError(f"--truth coco:{self.folder}: {e}") from None
        if len(units) < n:
            raise SpecError(f"-n {n}: --truth coco:{self.folder} has {len(units)} instances; use -n {len(units)} "
                            "or fewer")
        run = run.model_copy(update={"samples": len(units)})
        first = len(units) - n if calibration else 0
        prompts = [Prompt(i, units[i].key, [(str(units[i].outline.id), units[i].outline.class_name)])
                   for i in range(first, first + n)]
        self.coco, self.images, self.run = coco, images, run
        self.by_key = {im.key: im for im in images}
        self.cases = {p.seed: p for p in prompts}
        return run, prompts

    def inputs(self, synthesis: Any, prompts: list[Prompt], start: int) -> Batch:
        from stages.sampling import SamplingStage

        if self.sampling is None:
            self.sampling = SamplingStage(self.run)
        batch = self.sampling({"index": np.array([p.seed for p in prompts], dtype=np.int64)})
        for p, names in zip(prompts, batch["class_names"]):
            if json.loads(str(names))[:1] != [p.objects[0][1]]:  # the sampling stage prompts the largest annotation's class
                raise RuntimeError(f"{p.text}: prompted {names}, expected [{p.objects[0][1]!r}]")
        return batch

    def masks(self, prompt: Prompt, image: np.ndarray) -> list[np.ndarray]:
        image_of = getattr(self, "by_key", None)
        im = image_of[prompt.text] if image_of is not None else self.images[prompt.seed]
        anns = {str(a["id"]): a for a in im.annotations}
        h, w = image.shape[:2]
        return [fit_mask(self.coco.annToMask(anns[tag]) > 0, h, w) for tag, _ in prompt.objects]

    def describe(self, prompts: list[Prompt]) -> dict[str, Any]:
        return {**super().describe(prompts), "strength": self.strength,
                "images": [p.text for p in prompts[:3]] + (["..."] if len(prompts) > 3 else [])}


def truth_source(text: str | None, spec: JobSpec, strength: float = 0.3) -> Truth:
    """The truth ``--truth`` names (None: the oracle for a shapes-world job); SpecError when none fits."""
    if text is None:
        if not {c.name for c in spec.classes} <= set(SHAPES_CLASSES):
            raise SpecError(f"eval: job {spec.name!r} is not a shapes-world job, so the oracle cannot be its truth; "
                            "give --truth coco:DIR (a COCO folder of annotated images of its classes)")
        return OracleTruth()
    if text == "oracle":
        return OracleTruth()
    kind, _, folder = text.partition(":")
    if kind == "coco" and folder:
        return CocoTruth(folder, strength)
    raise SpecError(f"--truth {text!r}: expected 'oracle' or 'coco:DIR' (a COCO folder of annotated images)")


def one_draw(spec: JobSpec) -> JobSpec:
    """``spec`` without redraws: eval and calibration measure the labels of one draw per case, as drawn, not
    the draws a job's redraws would pick (stages/redraw.py)."""
    if not spec.generation.redraws:
        return spec
    return spec.model_copy(update={"generation": spec.generation.model_copy(update={"redraws": 0})})


class Generator:
    """The job's stages in process: synthesis once (one draw per case: :func:`one_draw`), then masks/labels/filters
    for refined and raw (chained by :class:`pipeline.graph.Chain`, as the in-process runner chains them)."""

    def __init__(self, spec: JobSpec, truth: Truth, redraws: bool = False):
        from stages.filters import FilterStage
        from stages.labels import LabelStage
        from stages.masks import MaskStage
        from stages.synthesis import SynthesisStage

        from .graph import Chain
        from .jobplan import JobPlan

        spec = spec if redraws else one_draw(spec)
        self.spec, self.truth = spec, truth
        self.synthesis = SynthesisStage(spec)
        plan = JobPlan(spec)
        self.refined = Chain([MaskStage, LabelStage, FilterStage], plan)
        self.raw = Chain([MaskStage, LabelStage], JobPlan(raw_spec(spec), identity=plan.identity))

    def __call__(self, prompts: list[Prompt], start: int) -> tuple[Batch, Batch]:
        batch = self.synthesis(self.truth.inputs(self.synthesis, prompts, start))
        return self.refined(batch), self.raw(batch)


@dataclass
class Sample:
    """One evaluated image: oracle truth and one labelling of it."""

    prompt: Prompt
    truth: list[np.ndarray]  # oracle mask per prompted object (empty when not drawn)
    semantic: np.ndarray  # uint8 HxW, 0 bg, 1+i = prompted object i's class, 255 ignore
    annotations: list[dict]
    keep: bool = True
    reason: str = ""


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _box_iou(a: list[float], b: list[float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def semantic_scores(samples: list[Sample], ids: dict[str, int]) -> dict[str, Any]:
    """Per-class IoU over all pixels of all samples (ignore left out, and counted as background)."""
    n_classes = max(ids.values()) + 1
    inter = np.zeros((2, n_classes))
    union = np.zeros((2, n_classes))
    ignored = total = 0
    for s in samples:
        names = [cls for _, cls in s.prompt.objects]
        lut = np.zeros(256, np.int64)
        lut[1:1 + len(names)] = [ids[c] for c in names]
        truth = np.zeros(s.semantic.shape, np.int64)
        for cls, m in zip(names, s.truth):
            truth[m] = ids[cls]
        ign = s.semantic == IGNORE
        pred = lut[s.semantic]
        ignored += int(ign.sum())
        total += ign.size
        for mode, valid in enumerate((~ign, np.ones_like(ign))):
            p, t = pred[valid], truth[valid]
            for c in range(n_classes):
                pc, tc = p == c, t == c
                inter[mode, c] += np.logical_and(pc, tc).sum()
                union[mode, c] += np.logical_or(pc, tc).sum()
    names_by_id = {v: k for k, v in ids.items()}
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    objects = [c for c in range(1, n_classes) if union[1, c] > 0]  # in the truth or the prediction

    def mean(row: np.ndarray) -> float:
        values = row[objects]
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else 0.0

    return {
        "miou": mean(iou[0]),
        "miou_ignore_as_background": mean(iou[1]),
        "per_class": {names_by_id[c]: None if np.isnan(iou[0, c]) else round(float(iou[0, c]), 4) for c in objects},
        "background_iou": float(iou[0, 0]),
        "ignore_fraction": ignored / max(total, 1),
    }


def coco_scores(samples: list[Sample], ids: dict[str, int]) -> dict[str, Any]:
    """Box and mask AP / AP50 (pycocotools COCOeval) with the oracle objects as ground truth."""
    images, gts, dets = [], [], []
    for img_id, s in enumerate(samples, start=1):
        h, w = s.semantic.shape
        images.append({"id": img_id, "height": h, "width": w})
        for (_, cls), m in zip(s.prompt.objects, s.truth):
            if m.any():
                gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": ids[cls], "iscrowd": 0,
                            **rle_fields(encode_mask(m))})
        for a in s.annotations:
            dets.append({"image_id": img_id, "category_id": a["category_id"], "bbox": a["bbox"],
                         "segmentation": a["segmentation"], "score": a["score"]})
    out: dict[str, Any] = {"gt_objects": len(gts), "detections": len(dets)}
    cats = [{"id": i, "name": n} for n, i in ids.items()]
    for kind in ("bbox", "segm"):
        out[kind] = coco_ap(images, gts, dets, cats, kind) if gts else {"AP": 0.0, "AP50": 0.0}
    return out


def coco_ap(images: list[dict], gts: list[dict], dets: list[dict], cats: list[dict], kind: str = "segm",
            ) -> dict[str, float | None]:
    """AP@[.5:.95], AP50 and AP75 of ``dets`` against ``gts`` (pycocotools COCOeval; ``kind`` "bbox" or "segm"),
    rounded to 4 places; None without ground truth, 0.0 without detections."""
    if not gts:
        return {"AP": None, "AP50": None, "AP75": None}
    if not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its own tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gts, "categories": cats}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), kind)
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {"AP": round(float(ev.stats[0]), 4), "AP50": round(float(ev.stats[1]), 4),
            "AP75": round(float(ev.stats[2]), 4)}


def instance_scores(samples: list[Sample], ids: dict[str, int]) -> dict[str, Any]:
    """Instances of one class, each on its own: instance mask AP / AP50 (COCOeval segm, one ground truth per
    true object) over all classes and per class, and count accuracy: per (image, class) with two or more
    true objects (the model drew the prompted count: the truth holds that many), whether the labels found
    exactly that many instances of the class."""
    images, gts, dets = [], [], []
    counts: dict[str, list[bool]] = {}
    for img_id, s in enumerate(samples, start=1):
        h, w = s.semantic.shape
        images.append({"id": img_id, "height": h, "width": w})
        truth: dict[str, int] = {}
        for (_, cls), m in zip(s.prompt.objects, s.truth):
            if m.any():
                truth[cls] = truth.get(cls, 0) + 1
                gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": ids[cls], "iscrowd": 0,
                            **rle_fields(encode_mask(m))})
        for a in s.annotations:
            dets.append({"image_id": img_id, "category_id": a["category_id"], "bbox": a["bbox"],
                         "segmentation": a["segmentation"], "score": a["score"]})
        for cls, k in truth.items():
            if k >= 2:
                found = sum(a["category_id"] == ids[cls] for a in s.annotations)
                counts.setdefault(cls, []).append(found == k)
    cats = [{"id": i, "name": n} for n, i in ids.items()]
    per_class = {}
    for name, cid in ids.items():
        g = [a for a in gts if a["category_id"] == cid]
        if not g:
            continue
        per_class[name] = {"objects": len(g), **coco_ap(images, g, [d for d in dets if d["category_id"] == cid],
                                                          cats)}
        if name in counts:
            per_class[name].update(count_cases=len(counts[name]),
                                   count_accuracy=round(float(np.mean(counts[name])), 4))
    every = [c for v in counts.values() for c in v]
    return {"objects": len(gts), "detections": len(dets), **coco_ap(images, gts, dets, cats),
            "count_cases": len(every), "count_accuracy": round(float(np.mean(every)), 4) if every else None,
            "per_class": per_class}


def object_scores(samples: list[Sample], ids: dict[str, int]) -> tuple[dict[str, Any], list[bool]]:
    """Instance mask IoU and missing-object rate; also whether each sample has all objects found."""
    ious, missing, not_drawn, complete = [], 0, 0, []
    n_objects = 0
    for s in samples:
        ok = True
        for (_, cls), m in zip(s.prompt.objects, s.truth):
            n_objects += 1
            preds = [a for a in s.annotations if a["category_id"] == ids[cls]]
            if not m.any():
                not_drawn += 1
                missing += 1
                ok = False
                continue
            masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in preds]
            ious.append(max((_iou(p, m) for p in masks), default=0.0))
            box = rle_fields(encode_mask(m))["bbox"]
            if not any(_box_iou(a["bbox"], box) >= 0.5 for a in preds):
                missing += 1
                ok = False
        complete.append(ok)
    return {
        "objects": n_objects,
        "instance_mask_iou_mean": float(np.mean(ious)) if ious else 0.0,
        "instance_mask_iou_median": float(np.median(ious)) if ious else 0.0,
        "missing_object_rate": missing / max(n_objects, 1),
        "not_drawn_rate": not_drawn / max(n_objects, 1),
    }, complete


def score(samples: list[Sample], ids: dict[str, int]) -> tuple[dict[str, Any], list[bool]]:
    objects, complete = object_scores(samples, ids)
    return {"samples": len(samples), "semantic": semantic_scores(samples, ids), **objects,
            **coco_scores(samples, ids), "instances": instance_scores(samples, ids)}, complete


def _samples(prompts: list[Prompt], out: Batch, truths: list[list[np.ndarray]]) -> list[Sample]:
    keep = out.get("keep", np.ones(len(prompts), bool))
    reasons = out.get("reject_reason", np.array([""] * len(prompts)))
    return [Sample(p, t, out["semantic_mask"][i], json.loads(str(out["annotations"][i])), bool(keep[i]),
                   str(reasons[i])) for i, (p, t) in enumerate(zip(prompts, truths))]


def settled_batch_size(spec: JobSpec) -> JobSpec:
    """``batch_size: auto`` as the job's output dir recorded it, else measured here (pipeline/batch_size.py)."""
    from .batch_size import settle

    return settle(spec, use_ray=False)[0]


def _batches(prompts: list[Prompt], size: int, desc: str, progress: bool):
    """(start, chunk) over ``prompts`` in batches of ``size``, with a progress bar on stderr that counts
    the prompts (images) done."""
    from tqdm import tqdm

    with tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            yield start, chunk
            bar.update(len(chunk))


def generate(spec: JobSpec, prompts: list[Prompt], truth: Truth, progress: bool = True, redraws: bool = False):
    """Run the stages over ``prompts`` (``spec`` and ``prompts`` from ``truth.job``): (refined samples,
    raw samples, refined batches, seconds). ``redraws``: with the job's ``generation.redraws`` (each case's
    delivered draw is measured; the default measures one draw per case)."""
    gen = Generator(spec, truth, redraws)
    refined, raw, batches = [], [], []
    t0 = time.perf_counter()
    for start, chunk in _batches(prompts, spec.generation.batch_size, "eval", progress):
        out, out_raw = gen(chunk, start)
        truths = [truth.masks(p, image) for p, image in zip(chunk, out["image"])]
        refined += _samples(chunk, out, truths)
        raw += _samples(chunk, out_raw, truths)
        batches.append(out)
    return refined, raw, batches, time.perf_counter() - t0


def evaluate(spec: JobSpec, n: int, progress: bool = True, truth: Truth | None = None) -> dict[str, Any]:
    """All label-quality numbers for ``n`` cases of ``truth`` (default: the oracle; see the module docstring)."""
    truth = truth or OracleTruth()
    spec, prompts = truth.job(spec, n, calibration=False)
    spec = settled_batch_size(spec)
    ids = category_ids(spec)
    refined, raw, _, seconds = generate(spec, prompts, truth, progress)
    raw_scores, _ = score(raw, ids)
    refined_scores, complete = score(refined, ids)
    kept = [s for s in refined if s.keep]
    kept_scores, _ = score(kept, ids) if kept else ({"samples": 0}, [])
    good = sum(complete)
    good_kept = sum(c for c, s in zip(complete, refined) if s.keep)
    reasons: dict[str, int] = {}
    for s in refined:
        if not s.keep:
            key = s.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    m = spec.masks
    return {
        "model": spec.model.path,
        "prompts": truth.describe(prompts),
        "settings": {"generation": spec.generation.model_dump(mode="json"), "masks": m.model_dump(mode="json"),
                     "filters": spec.filters.model_dump(mode="json")},
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "seconds": round(seconds, 1),
        "raw": raw_scores,
        "refined": refined_scores,
        "filters": {
            "kept": len(kept), "rejected": len(refined) - len(kept), "rejected_by_reason": reasons,
            "precision": good_kept / max(len(kept), 1), "recall": good_kept / max(good, 1),
            "complete_samples": good, "kept_scores": kept_scores,
        },
    }


def calibrate(spec: JobSpec, n: int, progress: bool = True, truth: Truth | None = None) -> dict[str, Any]:
    """Per-class foreground thresholds on the refined maps that maximise each class's IoU over ``n``
    calibration cases of ``truth`` (default: the oracle)."""
    truth = truth or OracleTruth()
    spec, prompts = truth.job(spec, n, calibration=True)
    spec = settled_batch_size(spec)
    from stages.synthesis import SynthesisStage

    synthesis = SynthesisStage(one_draw(spec))
    column = "attn_raw" if spec.masks.use_raw else "attn"
    names = [c.name for c in spec.classes]
    inter = {c: np.zeros(len(CALIBRATION_GRID)) for c in names}
    union = {c: np.zeros(len(CALIBRATION_GRID)) for c in names}
    for start, chunk in _batches(prompts, spec.generation.batch_size, "calibrate", progress):
        out = synthesis(truth.inputs(synthesis, chunk, start))
        for p, image, maps, prompted in zip(chunk, out["image"], out[column], out["class_names"]):
            classes = json.loads(str(prompted))  # one map per prompted class
            truths = truth.masks(p, image)
            norm = refined_maps(maps, image, len(classes), spec.masks)
            for cls, cmap in zip(classes, norm):
                t = np.zeros(image.shape[:2], bool)
                for (_, c), m in zip(p.objects, truths):
                    if c == cls:
                        t |= m
                if not t.any():
                    continue
                pred = cmap[None] >= CALIBRATION_GRID[:, None, None]
                inter[cls] += (pred & t[None]).sum(axis=(1, 2))
                union[cls] += (pred | t[None]).sum(axis=(1, 2))
    thresholds, ious = {}, {}
    for cls in names:
        if not union[cls].any():
            raise SpecError(f"calibrate: class {cls!r} never appeared in {n} calibration cases of {truth.name}; "
                            "use a larger -n (a COCO folder: one with images of every class)")
        iou = inter[cls] / np.maximum(union[cls], 1)
        best = int(np.argmax(iou))
        thresholds[cls], ious[cls] = float(CALIBRATION_GRID[best]), round(float(iou[best]), 4)
    return {"class_thresholds": thresholds, "calibration_iou": ious, "model": spec.model.path,
            "prompts": truth.describe(prompts), "map": column,
            "masks": spec.masks.model_dump(mode="json", exclude={"class_thresholds", "calibration"})}


def format_report(result: dict[str, Any]) -> str:
    """The table ``synthgen eval`` prints."""
    rows = [("raw attention", result["raw"]), ("refined (job)", result["refined"]),
            ("refined, kept only", result["filters"]["kept_scores"])]
    lines = [f"{'labels':<20}{'n':>5}{'mIoU':>7}{'mIoU*':>7}{'ign%':>6}{'instIoU':>8}{'AP50':>6}{'AP':>6}"
             f"{'mAP50':>7}{'miss%':>7}"]
    for name, r in rows:
        if not r.get("samples"):
            lines.append(f"{name:<20}{0:>5}")
            continue
        sem = r["semantic"]
        lines.append(f"{name:<20}{r['samples']:>5}{sem['miou']:>7.3f}{sem['miou_ignore_as_background']:>7.3f}"
                     f"{100 * sem['ignore_fraction']:>6.1f}{r['instance_mask_iou_mean']:>8.3f}"
                     f"{r['bbox']['AP50']:>6.3f}{r['bbox']['AP']:>6.3f}{r['segm']['AP50']:>7.3f}"
                     f"{100 * r['missing_object_rate']:>7.1f}")
    f = result["filters"]
    lines.append("mIoU* counts ignore pixels as background; AP = box AP@[.5:.95], mAP50 = mask AP50; "
                 "miss% = prompted objects without a box of their class at IoU >= 0.5")
    lines.append(f"filters: kept {f['kept']}/{f['kept'] + f['rejected']} {f['rejected_by_reason']}; precision "
                 f"(kept samples with every object found) {f['precision']:.3f}, recall {f['recall']:.3f}")
    lines.append("per-class refined IoU: " + ", ".join(f"{k} {v if v is None else round(v, 3)}" for k, v in
                                                        result["refined"]["semantic"]["per_class"].items()))
    inst = result["refined"].get("instances") or {}
    if inst.get("count_cases"):
        lines.append(f"instances (refined): mask AP50 {inst['AP50']:.3f}, AP {inst['AP']:.3f}; count accuracy "
                     f"{inst['count_accuracy']:.3f} on {inst['count_cases']} (image, class) pairs with 2+ objects; "
                     + ", ".join(f"{k} AP50 {v['AP50']:.2f} count {v.get('count_accuracy', float('nan')):.2f}"
                                 for k, v in inst["per_class"].items() if v.get("AP50") is not None))
    lines.append(f"{result['prompts']['n']} cases of {result['prompts']['truth']} in {result['seconds']:.0f} s")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
