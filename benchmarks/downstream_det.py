"""Downstream check, detection: is a box detector trained on synthgen's synthetic data as good on real images?

The detection twin of :mod:`benchmarks.downstream_seg`, with the same data, network body and budget: a
CenterNet-style detector (the same small U-Net, its head predicting per-class centre heatmaps, box sizes
and centre offsets at full resolution; pure torch) trained with identical settings (a) on the first K kept
samples of a synthgen output dir — the records' COCO boxes and category ids, as a detector training reads
them — and (b) on K real shapes-world scenes (boxes of each object's visible pixels), then scored with
COCO box AP (pycocotools) on real test scenes. Each arm is trained with ``--seeds`` seeds (default 3); its
median-AP run stands for it. Prints per-class AP of the median runs, every run's AP and AP(a) / AP(b).

    python -m benchmarks.downstream_det                            # the demo job's output, generated once
    python -m benchmarks.downstream_det --k 40 --steps 10 --test 50 --json /tmp/det.json   # smoke run

The synthetic set is the one :mod:`benchmarks.downstream_seg` generates (same job, same ``--set``, same
cache dir ``out/downstream-seg/``), so the two benchmarks read the same images. Training runs are cached in
``out/downstream-seg/runs/`` keyed by the arm, its data, the settings and a digest of this file and the
segmentation benchmark (whose network it uses).

The detector: heatmap focal loss (CenterNet's, alpha 2, beta 4) on Gaussians at box centres (sigma from
the box's size), L1 on log width / height and on the centre's sub-pixel offset at the centre pixel;
decoding keeps 3×3 local maxima of the heatmap, up to 20 per image. Augmentation: horizontal flips and
90° turns, applied to the boxes with the images. Each training takes 10-15 min on 2 CPU cores (six in all).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import downstream_seg as seg
from benchmarks.common import REPO, code_digest
from pipeline.dataset import category_names
from pipeline.evaluate import coco_ap
from pipeline.shapes.world import CLASSES, render_scene
from pipeline.spec import UsageError
from stages.labels import encode_mask, rle_fields

NUM_CLASSES = len(CLASSES)
HEADS = NUM_CLASSES + 4  # heatmap per class, log w, log h, offset x, offset y
MAX_DETECTIONS = 20
CATEGORIES = [{"id": 1 + i, "name": name} for i, name in enumerate(CLASSES)]  # the world's global ids
TARGET_RATIO = seg.TARGET_RATIO


# --- data --------------------------------------------------------------------------------------
@dataclass
class BoxSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    boxes: list[np.ndarray]  # per image float32 (n, 4): COCO [x, y, w, h] in pixels
    labels: list[np.ndarray]  # per image int64 (n,): 0-based index into CLASSES
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)


def load_synthetic_boxes(out: Path, limit: int | None = None) -> BoxSet:
    """The first ``limit`` kept samples (index order) of a synthgen output dir with their records' boxes;
    category ids are read through the job's classes (the manifest) into the world's classes."""

    def labeller(manifest: dict):
        names = category_names(manifest["job"])

        def boxes_of(sample: dict, meta: dict, image: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
            b, lab = [], []
            for ann in meta["annotations"]:
                name = names.get(ann["category_id"])
                if name not in CLASSES:
                    raise UsageError(f"{where}: category_id {ann['category_id']} ({name!r}) is not a shapes-world "
                                     "class")
                b.append(ann["bbox"])
                lab.append(CLASSES.index(name))
            return np.asarray(b, np.float32).reshape(-1, 4), np.asarray(lab, np.int64)

        return boxes_of

    images, labelled, keys, _, _ = seg.read_kept(out, limit, labeller)
    return BoxSet(images, [b for b, _ in labelled], [lab for _, lab in labelled], keys)


def render_boxes(first_seed: int, n: int, size: int) -> BoxSet:
    """n real scenes (seeds first_seed + i) with each object's box: that of its visible pixels, computed as
    synthgen computes a record's box (COCO RLE → bbox)."""
    images, boxes, labels = [], [], []
    for i in range(n):
        scene = render_scene(first_seed + i, size=size)
        objs = [o for o in scene.objects if o.mask is not None and o.mask.any()]
        images.append(scene.image)
        boxes.append(np.asarray([rle_fields(encode_mask(o.mask))["bbox"] for o in objs], np.float32).reshape(-1, 4))
        labels.append(np.asarray([CLASSES.index(o.cls) for o in objs], np.int64))
    return BoxSet(np.stack(images), boxes, labels, [str(first_seed + i) for i in range(n)])


# --- augmentation and targets ------------------------------------------------------------------------
def turn_boxes(boxes: np.ndarray, side: int, flip: bool, turns: int) -> np.ndarray:
    """The boxes of an image after ``x.flip(-1)`` (if flip) then ``torch.rot90(x, turns, (-2, -1))``."""
    b = boxes.copy()
    if flip:
        b[:, 0] = side - b[:, 0] - b[:, 2]
    for _ in range(turns % 4):  # rot90 by one: row r, column c -> row side-1-c, column r
        x, y, w, h = b[:, 0].copy(), b[:, 1].copy(), b[:, 2].copy(), b[:, 3].copy()
        b[:, 0], b[:, 1], b[:, 2], b[:, 3] = y, side - x - w, h, w
    return b


def targets(boxes: Sequence[np.ndarray], labels: Sequence[np.ndarray], side: int) -> tuple[torch.Tensor, ...]:
    """Dense training targets of a batch: heatmaps (N, C, S, S) with a Gaussian at each box centre (sigma
    from the box's size, peak 1 at the centre pixel), regression targets (N, 4, S, S) — log w, log h and the
    centre's offset in its pixel — and a (N, S, S) bool map of the centre pixels."""
    n = len(boxes)
    heat = np.zeros((n, NUM_CLASSES, side, side), np.float32)
    reg = np.zeros((n, 4, side, side), np.float32)
    centre = np.zeros((n, side, side), bool)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        for (x, y, w, h), c in zip(b, lab):
            cx, cy = x + w / 2, y + h / 2
            px, py = min(int(cx), side - 1), min(int(cy), side - 1)
            sigma = max(0.8, float(np.sqrt(w * h)) / 8)
            g = np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma ** 2))
            heat[i, c] = np.maximum(heat[i, c], g)
            reg[i, :, py, px] = (np.log(max(w, 1.0)), np.log(max(h, 1.0)), cx - px, cy - py)
            centre[i, py, px] = True
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(centre)


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), normalised by the number of centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def detection_loss(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Focal loss on the heatmaps + L1 on log size and offset at the centre pixels."""
    loss = focal_loss(out[:, :NUM_CLASSES], heat)
    if centre.any():
        pred = out[:, NUM_CLASSES:].permute(0, 2, 3, 1)[centre]
        loss = loss + F.l1_loss(pred, reg.permute(0, 2, 3, 1)[centre])
    return loss


def new_model(width: int) -> seg.TinyUNet:
    model = seg.TinyUNet(num_classes=HEADS, width=width)
    with torch.no_grad():  # CenterNet's heatmap prior: sigmoid(-2.19) = 0.1
        model.head.bias[:NUM_CLASSES].fill_(-2.19)
    return model


def train(data: BoxSet, cfg: seg.TrainSettings) -> tuple[nn.Module, dict]:
    """Train a fresh detector (seeded) on the boxes (the segmentation benchmark's loop, :func:`seg.fit`)."""
    x_all, side = seg.to_input(data.images), data.images.shape[1]

    def batch_loss(model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        idx = idx.tolist()
        flips = (torch.rand(len(idx), generator=gen) < 0.5).tolist()
        turns = torch.randint(0, 4, (len(idx),), generator=gen).tolist()
        x = torch.stack([torch.rot90(x_all[i].flip(-1) if f else x_all[i], t, (-2, -1))
                         for i, f, t in zip(idx, flips, turns)])
        boxes = [turn_boxes(data.boxes[i], side, f, t) for i, f, t in zip(idx, flips, turns)]
        return detection_loss(model(x), *targets(boxes, [data.labels[i] for i in idx], side))

    return seg.fit(lambda: new_model(cfg.width), len(data), cfg, batch_loss)


@torch.no_grad()
def detect(model: nn.Module, images: np.ndarray, batch_size: int = 100) -> list[list[dict]]:
    """Per image, up to MAX_DETECTIONS boxes: ``{"bbox": [x, y, w, h], "label": class index, "score"}``."""
    model.eval()
    found = []
    for start in range(0, len(images), batch_size):
        out = model(seg.to_input(images[start:start + batch_size]))
        heat = torch.sigmoid(out[:, :NUM_CLASSES])
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        n, c, h, w = heat.shape
        scores, flat = peaks.reshape(n, -1).topk(min(MAX_DETECTIONS, c * h * w))
        for i in range(n):
            dets = []
            for score, f in zip(scores[i].tolist(), flat[i].tolist()):
                if score <= 0.01:
                    break
                cls, py, px = f // (h * w), (f % (h * w)) // w, f % w
                lw, lh, ox, oy = out[i, NUM_CLASSES:, py, px].tolist()
                bw, bh = float(np.exp(lw)), float(np.exp(lh))
                dets.append({"bbox": [px + ox - bw / 2, py + oy - bh / 2, bw, bh], "label": cls, "score": score})
            found.append(dets)
    return found


def box_ap(found: Sequence[Sequence[dict]], truth: BoxSet) -> dict:
    """COCO box AP, AP50, AP75 (pycocotools) over all classes and per class (AP@[.5:.95])."""
    side = truth.images.shape[1]
    images = [{"id": i + 1, "height": side, "width": side} for i in range(len(truth))]
    gts = [{"id": k + 1, **g} for k, g in enumerate(
        {"image_id": i + 1, "category_id": int(c) + 1, "bbox": [float(v) for v in b], "area": float(b[2] * b[3]),
         "iscrowd": 0} for i in range(len(truth)) for b, c in zip(truth.boxes[i], truth.labels[i]))]
    dets = [{"image_id": i + 1, "category_id": d["label"] + 1, "bbox": d["bbox"], "score": d["score"]}
            for i, per_image in enumerate(found) for d in per_image]
    report = coco_ap(images, gts, dets, CATEGORIES, "bbox")
    report["per_class"] = {}
    for cat in CATEGORIES:
        g = [a for a in gts if a["category_id"] == cat["id"]]
        report["per_class"][cat["name"]] = coco_ap(images, g, [d for d in dets if d["category_id"] == cat["id"]],
                                                   CATEGORIES, "bbox")["AP"]
    report["objects"], report["detections"] = len(gts), len(dets)
    return report


def trained(data: BoxSet, cfg: seg.TrainSettings, test: BoxSet) -> dict:
    """One training run and its test scores: ``{seed, train, test}``."""
    model, stats = train(data, cfg)
    return {"seed": cfg.seed, "train": stats, "test": box_ap(detect(model, test.images), test)}


# --- CLI --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return seg.parse_args(argv, prog="benchmarks.downstream_det", description=__doc__,
                          json_default=REPO / "benchmarks" / "results" / "downstream_det.json")


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    out, gen_s = seg.synthetic_dir(args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    syn = load_synthetic_boxes(out, args.k)
    n, side = len(syn), syn.images.shape[1]
    if n < args.k:
        print(f"warning: {out} has only {n} kept samples (< K={args.k}); both trainings use {n}")
    seg.check_size(side, syn.images.shape[2], str(out))
    real = render_boxes(seg.REAL_TRAIN_SEED, n, side)
    test = render_boxes(seg.TEST_SEED, args.test, side)
    data_s = time.perf_counter() - t0

    cfg = seg.TrainSettings(args.steps, args.batch_size, args.lr, width=args.width, seed=args.seed)
    code = code_digest("benchmarks/downstream_det.py", "benchmarks/downstream_seg.py", "pipeline/shapes/world.py")
    sources = {"synthetic": {"dir": str(Path(out).resolve()), "keys": [syn.keys[0], syn.keys[-1]], "n": n},
               "real": {"first_seed": seg.REAL_TRAIN_SEED, "n": n, "size": side}}
    results = {}
    for name, data in (("synthetic", syn), ("real", real)):
        runs, median = seg.seed_runs(
            name, n, range(args.seed, args.seed + args.seeds), args.synthetic_root / "runs",
            key=lambda seed, name=name: {"task": "detection", "arm": name, "data": sources[name],
                                         "test": {"first_seed": seg.TEST_SEED, "n": args.test, "size": side},
                                         "training": replace(cfg, seed=seed).__dict__, "threads": args.threads,
                                         "code": code},
            one=lambda seed, data=data: trained(data, replace(cfg, seed=seed), test),
            score="AP", describe=lambda t: f"test box AP {t['AP']}, AP50 {t['AP50']}")
        results[name] = {"boxes": sum(len(b) for b in data.boxes), "train": median["train"], "test": median["test"],
                         "median_seed": median["seed"], "ap_runs": [r["test"]["AP"] for r in runs],
                         "ap50_runs": [r["test"]["AP50"] for r in runs], "runs": runs}
    ratio, per_seed = seg.ratios(results["synthetic"]["test"]["AP"], results["real"]["test"]["AP"],
                                 results["synthetic"]["ap_runs"], results["real"]["ap_runs"])
    return {
        "machine": seg.machine(args.threads),
        "command": args.command, "date": time.strftime("%Y-%m-%d"),
        "k": args.k, "train_images": n, "test_images": args.test,
        "model": {"name": "TinyUNet, CenterNet heads", "width": args.width,
                  "parameters": sum(p.numel() for p in new_model(args.width).parameters())},
        "training": {**cfg.__dict__, "optimizer": "AdamW", "schedule": "one-cycle", "augmentation": "flip, rot90",
                     "loss": "CenterNet focal (heatmaps) + L1 (log size, offset)"},
        "seeds": {"real_train": [seg.REAL_TRAIN_SEED, seg.REAL_TRAIN_SEED + n - 1],
                  "test": [seg.TEST_SEED, seg.TEST_SEED + args.test - 1]},
        "synthetic_source": {"dir": str(out), "generated": gen_s is not None, "first_key": syn.keys[0],
                             "last_key": syn.keys[-1]},
        "wall_s": {"generation": None if gen_s is None else round(gen_s, 1), "data": round(data_s, 2),
                   "total": round(time.perf_counter() - t_start, 1)},
        "synthetic": results["synthetic"], "real": results["real"],
        "ratio": ratio, "ratio_per_seed": per_seed,
        "target_ratio": TARGET_RATIO,
    }


def print_table(results: dict) -> None:
    a, b = results["synthetic"]["test"], results["real"]["test"]
    fmt = lambda v: f"{v:>.3f}" if v is not None else "  -  "  # noqa: E731
    print(f"\n{'box AP':<12}{'(a) synthetic':>15}{'(b) real':>10}")
    for name in CLASSES:
        print(f"{name:<12}{fmt(a['per_class'][name]):>15}{fmt(b['per_class'][name]):>10}")
    for key in ("AP", "AP50", "AP75"):
        print(f"{key:<12}{fmt(a[key]):>15}{fmt(b[key]):>10}")
    for name in ("synthetic", "real"):
        print(f"{name} box AP per seed: {results[name]['ap_runs']} (median: seed {results[name]['median_seed']})")
    r = results["ratio"]
    print(f"\nratio AP(a)/AP(b) = {r if r is not None else '-'}  (the segmentation benchmark's bar: >= {TARGET_RATIO})")


def main(argv: Sequence[str] | None = None) -> int:
    return seg.cli(parse_args(argv), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
