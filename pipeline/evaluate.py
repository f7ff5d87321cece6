"""``synthgen eval``: how good the labels are, measured on the shapes world against the oracle.

N held-out shapes-world captions (seeds never used to train the bundled model) go through the
job's own synthesis, mask, label and filter stages, in process. The oracle
(:mod:`pipeline.shapes.oracle`) recovers each prompted object's true pixels from the generated
image by its colour; the prompted class is its category. Against that ground truth:

* **semantic mIoU** per class and mean over the object classes (background reported apart), for
  the *raw* cross-attention (min-max normalised, threshold 0.5, no refinement, no ignore band)
  and for the job's *refined* masks. Pixels a mask marks ignore (255) are left out of the
  refined score (training ignores them too); ``miou_ignore_as_background`` counts them as wrong;
* **instance mask IoU**: per prompted object, the best IoU of a predicted instance of its class;
* **boxes**: COCO AP and AP50 with ``pycocotools.cocoeval.COCOeval`` (bbox, and segm);
* **missing objects**: prompted objects with no predicted box of their class at IoU >= 0.5
  (including objects the model did not draw at all);
* **filters**: the same numbers on the kept samples only, the share of kept samples whose every
  object is found (precision) and the share of such good samples that were kept (recall).

``--calibrate F`` instead searches, per class, the foreground threshold on the refined maps that
maximises that class's IoU on a separate calibration seed range, and writes it to ``F`` for
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
from .shapes.world import HELD_OUT_SEED, render_scene
from .spec import JobSpec, SpecError

#: evaluation captions come from scenes HELD_OUT_SEED + i; calibration uses a disjoint range
CALIBRATION_SEED = HELD_OUT_SEED + 2_000_000
CALIBRATION_GRID = np.round(np.arange(0.05, 0.91, 0.05), 2)
WEAK_CLASS_IOU = 0.3  # calibration warns about classes whose best IoU stays below this


@dataclass
class Prompt:
    seed: int
    text: str
    objects: list[tuple[str, str]]  # (colour, class) in prompt order


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
                        "(e.g. jobs/shapes-demo.yaml)")
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


class Generator:
    """The job's stages in process: synthesis once, then masks/labels/filters for refined and raw."""

    def __init__(self, spec: JobSpec):
        from stages.filters import FilterStage
        from stages.labels import LabelStage
        from stages.masks import MaskStage
        from stages.synthesis import SynthesisStage

        self.spec = spec
        self.synthesis = SynthesisStage(spec)
        self.refined = [MaskStage(spec), LabelStage(spec), FilterStage(spec)]
        raw = raw_spec(spec)
        self.raw = [MaskStage(raw), LabelStage(raw)]

    def __call__(self, prompts: list[Prompt], start: int) -> tuple[Batch, Batch]:
        batch = prompt_batch(self.synthesis.pipe.tokenizer, prompts, start)
        batch = self.synthesis(batch)
        refined = batch
        for stage in self.refined:
            refined = stage(refined)
        raw = batch
        for stage in self.raw:
            raw = stage(raw)
        return refined, raw


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
    for kind in ("bbox", "segm"):
        if not gts or not dets:
            out[kind] = {"AP": 0.0, "AP50": 0.0}
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its own tables
            gt = COCO()
            gt.dataset = {"images": images, "annotations": gts,
                          "categories": [{"id": i, "name": n} for n, i in ids.items()]}
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dets), kind)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        out[kind] = {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1])}
    return out


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
            **coco_scores(samples, ids)}, complete


def _samples(prompts: list[Prompt], out: Batch, truths: list[list[np.ndarray]]) -> list[Sample]:
    keep = out.get("keep", np.ones(len(prompts), bool))
    reasons = out.get("reject_reason", np.array([""] * len(prompts)))
    return [Sample(p, t, out["semantic_mask"][i], json.loads(str(out["annotations"][i])), bool(keep[i]),
                   str(reasons[i])) for i, (p, t) in enumerate(zip(prompts, truths))]


def generate(spec: JobSpec, prompts: list[Prompt], progress: bool = True):
    """Run the stages over ``prompts``: (refined samples, raw samples, refined batches, seconds)."""
    from tqdm import tqdm

    gen = Generator(spec)
    refined, raw, batches = [], [], []
    size = spec.generation.batch_size
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(prompts), size), desc="eval", unit="batch", disable=not progress):
        chunk = prompts[start:start + size]
        out, out_raw = gen(chunk, start)
        truths = [[f.mask for f in find_objects(image, [c for c, _ in p.objects])]
                  for p, image in zip(chunk, out["image"])]
        refined += _samples(chunk, out, truths)
        raw += _samples(chunk, out_raw, truths)
        batches.append(out)
    return refined, raw, batches, time.perf_counter() - t0


def evaluate(spec: JobSpec, n: int, progress: bool = True) -> dict[str, Any]:
    """All label-quality numbers for ``n`` held-out prompts (see the module docstring)."""
    prompts = shapes_prompts(n)
    check_spec(spec, prompts)
    ids = category_ids(spec)
    refined, raw, _, seconds = generate(spec, prompts, progress)
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
        "prompts": {"n": n, "first_seed": HELD_OUT_SEED, "objects": sum(len(p.objects) for p in prompts)},
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


def calibrate(spec: JobSpec, n: int, progress: bool = True) -> dict[str, Any]:
    """Per-class foreground thresholds on the refined maps that maximise each class's IoU."""
    prompts = shapes_prompts(n, CALIBRATION_SEED)
    check_spec(spec, prompts)
    from stages.synthesis import SynthesisStage

    synthesis = SynthesisStage(spec)
    column = "attn_raw" if spec.masks.use_raw else "attn"
    names = [c.name for c in spec.classes]
    inter = {c: np.zeros(len(CALIBRATION_GRID)) for c in names}
    union = {c: np.zeros(len(CALIBRATION_GRID)) for c in names}
    from tqdm import tqdm

    size = spec.generation.batch_size
    for start in tqdm(range(0, len(prompts), size), desc="calibrate", unit="batch", disable=not progress):
        chunk = prompts[start:start + size]
        out = synthesis(prompt_batch(synthesis.pipe.tokenizer, chunk, start))
        for p, image, maps in zip(chunk, out["image"], out[column]):
            truths = find_objects(image, [c for c, _ in p.objects])
            norm = refined_maps(maps, image, len(p.objects), spec.masks)
            for (_, cls), t, cmap in zip(p.objects, truths, norm):
                if not t.mask.any():
                    continue
                pred = cmap[None] >= CALIBRATION_GRID[:, None, None]
                inter[cls] += (pred & t.mask[None]).sum(axis=(1, 2))
                union[cls] += (pred | t.mask[None]).sum(axis=(1, 2))
    thresholds, ious = {}, {}
    for cls in names:
        if not union[cls].any():
            raise SpecError(f"calibrate: class {cls!r} never appeared in {n} calibration prompts; use a larger -n")
        iou = inter[cls] / np.maximum(union[cls], 1)
        best = int(np.argmax(iou))
        thresholds[cls], ious[cls] = float(CALIBRATION_GRID[best]), round(float(iou[best]), 4)
    return {"class_thresholds": thresholds, "calibration_iou": ious, "model": spec.model.path,
            "prompts": {"n": n, "first_seed": CALIBRATION_SEED}, "map": column,
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
    lines.append(f"{result['prompts']['n']} held-out prompts in {result['seconds']:.0f} s")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
