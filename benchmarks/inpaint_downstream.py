"""Downstream check for outline-guided inpainting: do inpainted variations of a small real set help a segmenter?

Trains the downstream segmenter of :mod:`benchmarks.downstream_seg` (its TinyUNet, training loop, settings
and test metric, imported) with identical settings — same initialisation per seed, optimizer, one-cycle
schedule, number of gradient steps, batch size and augmentation (flips, 90° turns) — on

(a) ``real``: K real shapes-world scenes (default 50), and
(b) ``real+inpainted``: the same K scenes plus the kept samples (``keep=True``) of ``jobs/shapes-inpaint.yaml``
    run on those K scenes as its references: every annotated object repainted inside its outline as its
    own class in a new colour, the reference's masks kept as labels,

then scores both on real test scenes (default 300). ``--controls`` adds two arms that bound what such
variations can give, trained the same way:

(c) ``real_recoloured``: the K scenes plus, for every kept sample, the world's own render of its variation:
    the same scene with the same object drawn in the prompted colour (``render_scene(recolor=...)``), a
    perfect repaint of the outline; the same images a flawless inpainting model would make;
(d) ``real_more``: the K scenes plus as many *new* real scenes as there are kept samples (seeds after the K),
    what the same number of images with new shapes and layouts gives.

Each arm is trained with ``--seeds`` seeds (default 3); the table gives every run's test mIoU, the mean, std,
min and max per arm, and the gain of (b) over (a) in mIoU points (target: +5 or more). The inpainted samples'
labels are also checked: the shapes-world oracle reads the repainted region of each kept sample (is the
prompted colour there, as the labelled class, and how well does it fill the outline?) and each kept sample's
mask is compared with its reference scene's.

    python -m benchmarks.inpaint_downstream --threads 1                     # the defaults below
    python -m benchmarks.inpaint_downstream --k 4 --steps 5 --test 10 --width 4 --seeds 1 \\
        --set references.seeds_per_level=1 --synthetic-root /tmp/ipd --json /tmp/ipd.json   # smoke run

The options are :mod:`benchmarks.downstream_seg`'s, with other defaults here: ``--k`` 50 real training scenes,
``--steps`` 800 of ``--batch-size`` 16 (300 steps of 32 left two of three seeds with a dead class in both arms),
``--job jobs/shapes-inpaint.yaml``, ``--synthetic-root out/inpaint-downstream``, ``--json
benchmarks/results/inpaint_downstream.json``. ``--set`` overrides the inpaint job (this script sets
``references.path`` and ``samples``); before them it sets ``references.strengths=[0.55]`` and
``references.seeds_per_level=6``: the 50 scenes hold 98 objects (~2 per scene), so 588 variations, ~12 per
scene before the job's outline check (it kept 400 at dilation 0, 468 at dilation 2 in the measured runs).
``--synthetic DIR`` takes an inpaint output made on the same real scenes instead (its references must be they).

Seeds: the real training scenes are ``downstream_seg``'s, HELD_OUT_SEED + 3_000_000 + i, rendered as a COCO
folder (``pipeline.shapes.coco.render_coco``) into ``<synthetic-root>/real-<first seed>-<K>-<size>/`` for the job to
read; the test scenes are HELD_OUT_SEED + 4_000_000 + i. The job's output is cached in
``<synthetic-root>/<job name>-<fingerprint>`` (:func:`benchmarks.common.generate_cached`; a rerun does not
regenerate) and each training run's scores in ``<synthetic-root>/runs/`` (:func:`benchmarks.common.cached_run`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import downstream_seg as seg
from benchmarks.common import REPO, cached_run, code_digest, generate_cached
from pipeline.dataset import read_manifest
from pipeline.shapes.coco import render_coco
from pipeline.shapes.world import CLASSES, COLORS, render_scene
from pipeline.spec import UsageError, load_spec

REAL_TRAIN_SEED, TEST_SEED = seg.REAL_TRAIN_SEED, seg.TEST_SEED
TARGET_POINTS = 5.0
JOB = REPO / "jobs" / "shapes-inpaint.yaml"
DEFAULT_SETS = ["references.strengths=[0.55]", "references.seeds_per_level=6"]
DEFAULTS = {"--k": "50", "--steps": "800", "--batch-size": "16",
            "--synthetic-root": str(REPO / "out" / "inpaint-downstream")}
ARMS = ("real", "real_inpainted")
CONTROL_ARMS = ("real_recoloured", "real_more")
RIGHT_IOU = 0.5  # oracle IoU with the outline from which a repainted object counts as drawn right


# --- data --------------------------------------------------------------------------------------
def real_references(root: Path, n: int, size: int) -> Path:
    """The K real training scenes as a COCO folder (rendered once; annotations.json is written last)."""
    folder = root / f"real-{REAL_TRAIN_SEED}-{n}-{size}"
    if not (folder / "annotations.json").is_file():
        render_coco(folder, n, size=size, first_seed=REAL_TRAIN_SEED,
                    description="inpaint_downstream real training scenes")
    return folder


def job_overrides(args: argparse.Namespace, references: Path) -> list[str]:
    """DEFAULT_SETS, the user's --set, then references.path and samples (instances x strengths x seeds)."""
    for item in args.set:
        if item.split("=", 1)[0].strip() in ("references.path", "samples", "references.mode"):
            raise UsageError(f"--set {item}: this benchmark sets references.path, references.mode and samples itself")
    overrides = [*DEFAULT_SETS, *args.set, f"references.path={references}"]
    from stages.references import inpaint_references

    probe = load_spec(args.job, [*overrides, "samples=1"], out=tempfile.mkdtemp(prefix="inpaint-downstream-"),
                      check_files=False)
    if probe.references is None or probe.references.mode != "inpaint":
        raise UsageError(f"{args.job}: not an inpaint job (references.mode: inpaint)")
    seg.check_size(probe.generation.height, probe.generation.width, str(args.job))
    instances = len(inpaint_references(probe).instances)
    refs = probe.references
    return [*overrides, f"samples={instances * len(refs.strengths) * refs.seeds_per_level}"]


def records(out: Path, keys: Sequence[str]) -> tuple[list[dict], dict[int, str]]:
    """The JSON records of the samples ``keys`` of an output dir, in that order, and its category id -> class
    name (the job's classes)."""
    import webdataset as wds

    from pipeline.dataset import category_names

    paths, manifest = seg.shard_paths(out)
    wanted, found = set(keys), {}
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        if sample["__key__"] in wanted:
            found[sample["__key__"]] = json.loads(sample["json"])
    return [found[k] for k in keys], category_names(manifest["job"])


def prompt_colour(prompt: str) -> str | None:
    return next((w for w in prompt.split() if w in COLORS), None)


def label_quality(images: np.ndarray, masks: np.ndarray, recs: list[dict], names: dict[int, str],
                  real_masks: dict[str, np.ndarray]) -> dict:
    """How right the kept samples' labels are. ``agreement``: share of pixels where a sample's mask equals its
    reference scene's (the labels are carried over, so ~1). The oracle reads the repaint region (outline
    dilated by the record's ``dilation``; outside greyed out): ``found`` = it finds the labelled class in the
    prompted colour, ``iou`` = its mask of that colour against the outline; ``right`` = found with IoU >=
    RIGHT_IOU."""
    from pycocotools import mask as mask_utils

    from pipeline.shapes.oracle import find_objects
    from stages.inpaint import repaint_mask

    rows = []
    for image, mask, rec in zip(images, masks, recs):
        ref = rec["cond"]["reference"]
        ann = next(a for a in rec["annotations"] if a.get("inpainted"))
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode("ascii"))
        outline = mask_utils.decode(rle).astype(bool)
        cls = names[ann["category_id"]]
        region = repaint_mask(outline, int(ref["dilation"]))
        colour = prompt_colour(rec["prompt"])
        seen = find_objects(np.where(region[..., None], image, 128).astype(np.uint8), [colour])[0] if colour else None
        iou = 0.0 if seen is None or not seen.mask.any() else \
            float((seen.mask & outline).sum() / max((seen.mask | outline).sum(), 1))
        found = seen is not None and seen.cls == cls
        rows.append({"class": cls, "found": found, "iou": iou, "right": found and iou >= RIGHT_IOU,
                     "agreement": float((mask == real_masks[ref["key"]]).mean())})
    mean = lambda rs, k: round(float(np.mean([r[k] for r in rs])), 4) if rs else None  # noqa: E731
    return {"samples": len(rows), "right_iou": RIGHT_IOU,
            "agreement_with_reference": mean(rows, "agreement"),
            "found": mean(rows, "found"), "iou": mean(rows, "iou"), "right": mean(rows, "right"),
            "per_class": {c: {"n": len(rs), "found": mean(rs, "found"), "iou": mean(rs, "iou"),
                              "right": mean(rs, "right")}
                          for c in CLASSES for rs in [[r for r in rows if r["class"] == c]]}}


def recoloured(references: Path, recs: list[dict], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Control arm (c): for each kept sample, its reference scene rendered by the world with the repainted
    object in the prompted colour (images, semantic masks); the reference's annotation ids name the objects
    in scene order (``render_coco``)."""
    coco = json.loads((references / "annotations.json").read_text())
    seeds = {im["id"]: im["seed"] for im in coco["images"]}
    where, seen = {}, {}
    for ann in coco["annotations"]:  # the k-th annotation of an image is its scene's object k
        k = seen[ann["image_id"]] = seen.get(ann["image_id"], -1) + 1
        where[ann["id"]] = (seeds[ann["image_id"]], k)
    scenes = []
    for rec in recs:
        seed, k = where[int(rec["cond"]["reference"]["instance"])]
        scenes.append(render_scene(seed, size=size, recolor={k: prompt_colour(rec["prompt"])}))
    return np.stack([s.image for s in scenes]), np.stack([s.semantic_mask() for s in scenes])


def colour_pairs(real_scenes: list, recs: list[dict], names: dict[int, str]) -> dict:
    """Class x colour pairs (of the world's 36) shown by the real scenes, and by the real scenes with the kept
    samples' repainted objects (prompted colour) added."""
    real = {(o.cls, o.color) for s in real_scenes for o in s.objects}
    painted = {(names[a["category_id"]], prompt_colour(r["prompt"])) for r in recs
               for a in r["annotations"] if a.get("inpainted")}
    return {"possible": len(CLASSES) * len(COLORS), "real": len(real), "real_inpainted": len(real | painted)}


# --- runs ----------------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict:
    v = np.array([x if x is not None else np.nan for x in values], np.float64)
    return {"miou_mean": round(float(np.nanmean(v)), 4), "miou_std": round(float(np.nanstd(v)), 4),
            "miou_min": round(float(np.nanmin(v)), 4), "miou_max": round(float(np.nanmax(v)), 4)}


def per_class_mean(runs: list[dict]) -> dict:
    out = {}
    for name in CLASSES:
        vals = [r["test"]["per_class"][name] for r in runs if r["test"]["per_class"][name] is not None]
        out[name] = round(float(np.mean(vals)), 4) if vals else None
    return out


def gain_over(base: dict, arm: dict) -> tuple[float, list[float | None]]:
    """An arm's gain over ``base`` in mIoU points: of the means, and seed by seed (None where a run has no score)."""
    per_seed = [None if x is None or y is None else round(100 * (y - x), 2)
                for x, y in zip(base["miou_runs"], arm["miou_runs"])]
    return round(100 * (arm["miou_mean"] - base["miou_mean"]), 2), per_seed


def real_repeats(share: float | None, n_real: int, n_inpainted: int) -> int:
    """How many copies of the real scenes the mixed arm trains on so that they are about ``share`` of its images
    (shuffled epochs over the copies sample them with that weight); 1 (each once) without a share."""
    if share is None:
        return 1
    return max(1, round(share / (1 - share) * n_inpainted / n_real))


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    root = args.synthetic_root
    probe = load_spec(args.job if args.synthetic is None else str(JOB), [*DEFAULT_SETS, *args.set, "samples=1"],
                      out=tempfile.mkdtemp(prefix="inpaint-downstream-"), check_files=False)
    size = probe.generation.height
    seg.check_size(size, probe.generation.width, str(args.job))
    references = real_references(root, args.k, size)
    real_x, real_y = seg.render_real(REAL_TRAIN_SEED, args.k, size)
    scenes = [render_scene(REAL_TRAIN_SEED + i, size=size) for i in range(args.k)]
    for i in range(args.k):  # the arrays are the COCO folder's scenes
        stored = np.asarray(Image.open(references / "images" / f"{REAL_TRAIN_SEED + i:08d}.png").convert("RGB"))
        if not np.array_equal(stored, real_x[i]):
            raise UsageError(f"{references}: image {i} differs from scene {REAL_TRAIN_SEED + i}; delete the folder")
    ref_keys = {f"{REAL_TRAIN_SEED + i:08d}": i for i in range(args.k)}

    if args.synthetic is None:
        overrides = job_overrides(args, references)
        made = generate_cached(args.job, overrides, root)
        out, gen_s, reused = made.out, made.wall_s, made.reused
    else:
        seg.shard_paths(args.synthetic)
        overrides, out, gen_s, reused = None, args.synthetic, None, True
    syn = seg.load_synthetic(out)
    seg.check_size(*syn.images.shape[1:3], str(out))
    if syn.images.shape[1:3] != real_x.shape[1:3]:
        raise UsageError(f"{out}: images are {syn.images.shape[1:3]}, the real scenes {real_x.shape[1:3]}")
    recs, names = records(out, syn.keys)
    refs = [(r.get("cond") or {}).get("reference") or {} for r in recs]
    bad = [ref.get("key") for ref in refs if ref.get("mode") != "inpaint" or ref.get("key") not in ref_keys]
    if bad:
        raise UsageError(f"{out}: kept sample reference {bad[0]!r} is not an inpainting of one of the {args.k} real "
                         f"training scenes (keys {REAL_TRAIN_SEED:08d}..); give an inpaint output of those scenes")
    per_scene = np.bincount([ref_keys[ref["key"]] for ref in refs], minlength=args.k)

    t0 = time.perf_counter()
    quality, _ = cached_run(root / "labels", {"dir": str(Path(out).resolve()), "keys": syn.keys,
                                              "code": code_digest("benchmarks/inpaint_downstream.py",
                                                                  "pipeline/shapes/oracle.py")},
                            lambda: label_quality(syn.images, syn.masks, recs, names,
                                                  {k: real_y[i] for k, i in ref_keys.items()}))
    quality_s = time.perf_counter() - t0
    pairs = colour_pairs(scenes, recs, names)

    import torch

    torch.set_num_threads(args.threads)
    test_x, test_y = seg.render_real(TEST_SEED, args.test, size)
    cfg = seg.TrainSettings(args.steps, args.batch_size, args.lr, width=args.width, seed=args.seed)
    code = code_digest("benchmarks/downstream_seg.py", "benchmarks/inpaint_downstream.py", "pipeline/shapes/world.py")
    data = {"real": {"first_seed": REAL_TRAIN_SEED, "n": args.k, "size": size},
            "real_inpainted": {"first_seed": REAL_TRAIN_SEED, "n": args.k, "size": size,
                               "inpainted": str(Path(out).resolve()), "keys": [syn.keys[0], syn.keys[-1]],
                               "n_inpainted": len(syn.keys)}}
    repeats = real_repeats(args.real_share, args.k, len(syn.keys))
    if repeats != 1:  # the training data's key (each once: as before the option)
        data["real_inpainted"]["real_repeats"] = repeats
    extra = {"real_inpainted": lambda: (syn.images, syn.masks),
             "real_recoloured": lambda: recoloured(references, recs, size),
             "real_more": lambda: seg.render_real(REAL_TRAIN_SEED + args.k, len(syn.keys), size)}
    data["real_recoloured"] = {**data["real_inpainted"], "recoloured": "render_scene(recolor)"}
    data["real_more"] = {"first_seed": REAL_TRAIN_SEED, "n": args.k + len(syn.keys), "size": size}
    arms = ARMS + (CONTROL_ARMS if args.controls else ())
    sets = {"real": lambda: (real_x, real_y),
            **{name: lambda make=make: tuple(np.concatenate([*[real] * repeats, more])
                                              for real, more in zip((real_x, real_y), make()))
               for name, make in extra.items()}}
    results = {}
    for name in arms:
        x, y = sets[name]()
        runs, median = seg.seed_runs(
            name, len(x), range(args.seed, args.seed + args.seeds), root / "runs",
            key=lambda s, name=name: {"arm": name, "data": data[name],
                                      "test": {"first_seed": TEST_SEED, "n": args.test, "size": size},
                                      "training": replace(cfg, seed=s).__dict__, "threads": args.threads,
                                      "code": code},
            one=lambda s, x=x, y=y: seg.trained(x, y, replace(cfg, seed=s), test_x, test_y),
            score="miou", describe=lambda test: f"test mIoU {test['miou']}")
        miou_runs = [r["test"]["miou"] for r in runs]
        results[name] = {"n": len(x), "labels": seg.label_stats(y), "miou_runs": miou_runs, **spread(miou_runs),
                         "per_class_mean": per_class_mean(runs), "median_seed": median["seed"],
                         "test": median["test"], "train": median["train"],
                         "final_loss_runs": [r["train"]["final_loss"] for r in runs],
                         "train_wall_s_runs": [r["train"]["wall_s"] for r in runs], "runs": runs}
    a, b = results["real"], results["real_inpainted"]
    gain, per_seed = gain_over(a, b)
    controls = {}
    for name in (n for n in CONTROL_ARMS if n in results):
        points, seeds = gain_over(a, results[name])
        controls[name] = {**results[name], "gain_points": points, "per_seed_points": seeds}
    counts = syn.counts
    return {
        "machine": seg.machine(args.threads),
        "date": time.strftime("%Y-%m-%d"),
        "command": args.command,
        "real_scenes": args.k, "test_scenes": args.test,
        "seeds": {"real_train": [REAL_TRAIN_SEED, REAL_TRAIN_SEED + args.k - 1],
                  "test": [TEST_SEED, TEST_SEED + args.test - 1],
                  "training": list(range(args.seed, args.seed + args.seeds))},
        "model": {"name": "TinyUNet", "width": args.width,
                  "parameters": sum(p.numel() for p in seg.TinyUNet(width=args.width).parameters())},
        "training": {**cfg.__dict__, "optimizer": "AdamW", "schedule": "one-cycle", "augmentation": "flip, rot90",
                     "loss": f"cross-entropy, ignore {seg.IGNORE}",
                     "sampling": "uniform shuffled epochs over the arm's images",
                     "real_share": args.real_share, "real_repeats": repeats},
        "inpainted": {"dir": str(out), "job": None if args.synthetic is not None else str(args.job),
                      "overrides": overrides, "generated_now": not reused, "references": str(references),
                      "samples": counts.get("indices"), "kept": len(syn.keys), "not_kept_skipped": syn.not_kept,
                      "rejected_by_reason": counts.get("rejected_by_reason", {}),
                      "kept_per_scene_mean": round(float(per_scene.mean()), 2),
                      "kept_per_scene_min": int(per_scene.min()), "kept_per_scene_max": int(per_scene.max()),
                      "label_quality": quality, "class_colour_pairs": pairs},
        "wall_s": {"generation": None if gen_s is None else round(gen_s, 1),
                   "generation_recorded": (read_manifest(out).get("summary") or {}).get("wall_s"),
                   "label_check": round(quality_s, 1),
                   "train_real": sum(a["train_wall_s_runs"]), "train_real_inpainted": sum(b["train_wall_s_runs"]),
                   "total": round(time.perf_counter() - t_start, 1)},
        "real": a, "real_inpainted": b,
        **controls,
        "gain": {"miou_points": gain, "per_seed_points": per_seed,
                 "median_runs_points": None if a["test"]["miou"] is None or b["test"]["miou"] is None
                 else round(100 * (b["test"]["miou"] - a["test"]["miou"]), 2),
                 "target_points": TARGET_POINTS, "met": bool(gain >= TARGET_POINTS)},
    }


# --- CLI -----------------------------------------------------------------------------------------
def print_table(r: dict) -> None:
    fmt = lambda v: f"{v:.3f}" if v is not None else "  -  "  # noqa: E731
    a, b = r["real"], r["real_inpainted"]
    print(f"\n{'arm':<17}{'images':>7}  {'mIoU per seed':<24}{'mean':>7}{'std':>7}{'min':>7}{'max':>7}")
    shown = [("real", a), ("real+inpainted", b),
             *[(label, r[name]) for label, name in (("real+recoloured", "real_recoloured"),
                                                    ("real+more real", "real_more")) if name in r]]
    for label, arm in shown:
        runs = " ".join(fmt(v) for v in arm["miou_runs"])
        print(f"{label:<17}{arm['n']:>7}  {runs:<24}{fmt(arm['miou_mean']):>7}{fmt(arm['miou_std']):>7}"
              f"{fmt(arm['miou_min']):>7}{fmt(arm['miou_max']):>7}")
    print(f"\n{'mean test IoU':<17}" + "".join(f"{c:>9}" for c in CLASSES))
    for label, arm in shown:
        print(f"{label:<17}" + "".join(f"{fmt(arm['per_class_mean'][c]):>9}" for c in CLASSES))
    q = r["inpainted"]["label_quality"]
    print(f"\ninpainted: {r['inpainted']['kept']} kept of {r['inpainted']['samples']} "
          f"({r['inpainted']['kept_per_scene_mean']} per scene); oracle on kept: found {q['found']}, "
          f"IoU {q['iou']}, right {q['right']}; mask = reference's on {q['agreement_with_reference']} of pixels")
    g = r["gain"]
    print(f"gain (mean mIoU) = {g['miou_points']:+.2f} points (per seed {g['per_seed_points']}); "
          f"target >= +{g['target_points']:.0f}: {'✔' if g['met'] else '✘'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """downstream_seg's options (:func:`benchmarks.downstream_seg.parse_args`) with this benchmark's defaults
    given first, so that the command line overrides them."""
    given = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--real-share", type=float, help="the mixed arm's real scenes repeated to about this share of "
                                                      "its images (e.g. 0.5); default: each once")
    own.add_argument("--controls", action="store_true",
                     help="also train the control arms: the kept variations rendered perfectly by the world "
                          "(real_recoloured) and as many new real scenes (real_more)")
    mine, rest = own.parse_known_args(given)
    if mine.real_share is not None and not 0 < mine.real_share < 1:
        own.error("--real-share must be between 0 and 1")
    defaults = [x for opt, v in DEFAULTS.items() for x in (opt, v)]
    if "--synthetic" not in given and not any(g.startswith("--synthetic=") for g in given):
        defaults += ["--job", str(JOB)]
    args = seg.parse_args([*defaults, *rest], prog="benchmarks.inpaint_downstream", description=__doc__,
                          json_default=REPO / "benchmarks" / "results" / "inpaint_downstream.json")
    args.real_share, args.controls = mine.real_share, mine.controls
    args.command = " ".join(["python -m benchmarks.inpaint_downstream", *given])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return seg.cli(parse_args(argv), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
