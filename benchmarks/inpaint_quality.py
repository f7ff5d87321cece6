"""Outline-guided inpainting on the shapes world: does the repainted object fill its outline?

Real scenes are rendered from a held-out seed range (``FIRST_SEED``: never seen by the bundled model,
disjoint from every other benchmark's scenes) as a COCO folder; ``jobs/shapes-inpaint.yaml`` (``--set``
overrides allowed) repaints every annotated object inside its outline, as its own class in a colour it
did not have. The oracle reads each generated image, with everything outside the repaint mask greyed out
(what lies there is the reference's own):

* **found**: the oracle finds the instance's class in the prompted colour (share of all samples);
* **IoU**: the oracle's mask of that colour against the sample's label for the repainted instance (the
  outline), on kept samples and on all;
* **outside**: pixels outside the repaint mask. Before encoding they equal the reference's exactly (the
  synthesis stage pastes them back; ``tests/test_inpaint.py`` checks the bytes); here the PSNR of the
  decoded JPEG against the reference over those pixels, beside the PSNR of the reference's own JPEG at the
  job's quality (the codec's loss alone);
* **ceiling**: the same reading of each sample's starting silhouette, as is and after the model's VAE round
  trip: what the oracle finds when the model draws nothing new;
* **filter**: precision (kept samples that are right) and recall (right samples that are kept) of the job's
  checks (the outline check; with a ``judge``, also its score of the repainted class on its outline crop), where
  right = found with IoU >= ``--right-iou``. Every sample is generated and stored (the run's outline check
  is off), then the job's check (``stages.filters.outline_verdict``, its ``references.inpaint``
  thresholds) is applied to the recorded scores: the verdict is the one a run makes, and a sweep of
  ``min_mass_inside`` x ``min_iou`` needs no new images.

With ``--redraws N`` the run keeps the job's check and draws a rejected sample again up to N times
(``generation.redraws``, stages/redraw.py): only kept samples are stored, and a sample still rejected after
its last attempt counts as not found in ``delivered.found_of_all`` (found over every index of the job).

    python -m benchmarks.inpaint_quality [--n 30] [--set references.strengths=[0.7]] [--redraws 3]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from benchmarks.common import REPO, generate_cached, run_header, write_result
from pipeline.shapes.coco import render_coco
from pipeline.shapes.oracle import find_objects
from pipeline.shapes.world import COLORS, HELD_OUT_SEED
from stages.encode import encode_image
from stages.filters import outline_verdict
from stages.inpaint import ReferenceOutlines, repaint_mask
from stages.references import ReferenceImages, list_references

FIRST_SEED = HELD_OUT_SEED + 5_000_000  # the reported scenes: held out from training and from other benchmarks


def prompt_colour(prompt: str) -> str | None:
    return next((w for w in prompt.split() if w in COLORS), None)


def read_samples(out: Path):
    """(record, decoded image) of every sample of a finished output dir, in index order."""
    import webdataset as wds

    from benchmarks.downstream_seg import shard_paths

    paths, _ = shard_paths(out)
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        yield json.loads(sample["json"]), np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) if a.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ceilings(spec, out: Path, outlines, refs) -> dict:
    """What the oracle reads when nothing is drawn: each sample's starting image (its outline filled with the
    prompt's colour, the silhouette the model starts from) as it is, and after the model's VAE round trip
    (the most a latent-space model can keep of it)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(spec.model.path, subfolder="vae").eval()
    found = {"silhouette": [], "vae": []}
    iou = {"silhouette": [], "vae": []}
    for rec, _ in read_samples(out):
        ref = rec["cond"]["reference"]
        if not ref.get("fill_rgb"):
            continue
        outline = outlines.outline(ref)
        repaint = repaint_mask(outline, int(ref["dilation"]))
        start = refs(ref["key"]).copy()
        start[outline] = ref["fill_rgb"]
        with torch.no_grad():
            x = torch.from_numpy(start).float().permute(2, 0, 1)[None] / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
        decoded = ((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for name, image in (("silhouette", start), ("vae", decoded)):
            inside = np.where(repaint[..., None], image, 128).astype(np.uint8)
            obj = find_objects(inside, [prompt_colour(rec["prompt"])])[0]
            found[name].append(obj.cls == rec["class_names"][0])
            iou[name].append(float((obj.mask & outline).sum() / max((obj.mask | outline).sum(), 1)))
    return {name: {"found": round(float(np.mean(found[name])), 3), "iou": round(float(np.mean(iou[name])), 3)}
            for name in found if found[name]}


def kept(scores: dict, opts, min_score: float | None) -> bool:
    """The run's verdict from a sample's recorded scores: the outline check at ``opts``' thresholds and, with a
    judge (``min_score`` not None), its score of the repainted class at least ``min_score``."""
    judged = (scores or {}).get("judge")
    return not outline_verdict(scores, opts) and (min_score is None or judged is None or judged[0] >= min_score)


def measure(spec, out: Path, right_iou: float, opts, min_score: float | None = None) -> dict:
    quality = spec.output.jpeg_quality
    outlines = ReferenceOutlines(spec)
    refs = ReferenceImages(list_references(spec), spec.generation.height, spec.generation.width)
    rows = []
    for rec, image in read_samples(out):
        ref = rec["cond"]["reference"]
        outline = outlines.outline(ref)
        repaint = repaint_mask(outline, int(ref["dilation"]))
        colour = prompt_colour(rec["prompt"])
        inside = np.where(repaint[..., None], image, 128).astype(np.uint8)
        found = find_objects(inside, [colour])[0] if colour else None
        cls = rec["class_names"][0]
        iou = 0.0
        if found is not None and found.mask.any():
            iou = float((found.mask & outline).sum() / max((found.mask | outline).sum(), 1))
        ok = found is not None and found.cls == cls
        original = refs(ref["key"])
        codec = np.asarray(Image.open(io.BytesIO(encode_image(original, "JPEG", quality=quality))).convert("RGB"))
        rows.append({"key": rec["key"], "class": cls, "found": ok, "iou": iou, "right": ok and iou >= right_iou,
                     "keep": kept(rec["scores"], opts, min_score), "scores": rec["scores"],
                     "psnr_outside": psnr(image[~repaint], original[~repaint]),
                     "psnr_outside_codec": psnr(codec[~repaint], original[~repaint]),
                     })
    checked = [r for r in rows if (r["scores"] or {}).get("outline")]
    oracle = np.array([r["iou"] for r in checked])
    agreement = {name: round(float(np.corrcoef([r["scores"]["outline"][name] for r in checked], oracle)[0, 1]), 3)
                 for name in ("iou", "mass_inside")} if len(checked) > 2 and oracle.std() > 0 else {}
    summary = {**summarise(rows), "ceiling": ceilings(spec, out, outlines, refs),
               "check_vs_oracle_iou_correlation": agreement}
    sweep = []
    for mass in (0.0, 0.5, 0.6, 0.7):
        for iou in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7):
            t = SimpleNamespace(min_mass_inside=mass, min_iou=iou)
            moved = [dict(r, keep=kept(r["scores"], t, min_score)) for r in rows]
            sweep.append({"min_mass_inside": mass, "min_iou": iou, **{k: summarise(moved)[k] for k in SWEPT}})
    if min_score is None:
        return {**summary, "sweep": sweep}
    judge_sweep = []  # the judge's own threshold, beside the job's outline check and without it
    for outline in ("job", "off"):
        t = opts if outline == "job" else SimpleNamespace(min_mass_inside=0.0, min_iou=0.0)
        for score in (0.0, 0.3, 0.5, 0.7, 0.9):
            moved = [dict(r, keep=kept(r["scores"], t, score)) for r in rows]
            judge_sweep.append({"outline_check": outline, "min_score": score,
                                **{k: summarise(moved)[k] for k in SWEPT}})
    return {**summary, "sweep": sweep, "judge_sweep": judge_sweep}


def delivered(out: Path, stored: dict) -> dict:
    """With redraws (only kept samples stored): found / right / IoU over every index of the job, a sample
    rejected after its last attempt counting as not found (IoU 0), and the draws the run made (each
    index's ``attempt`` + 1 from the index)."""
    import pyarrow.parquet as pq

    from pipeline.dataset import INDEX

    rows = pq.read_table(out / INDEX, columns=["keep", "scores"]).to_pylist()
    total, n = len(rows), stored["samples"]
    draws = sum(json.loads((r["scores"] or {}).get("other") or "{}").get("attempt", 0) + 1 for r in rows)
    return {"samples": total, "kept": n, "kept_fraction": round(n / total, 3),
            "found_of_all": round(stored["found_all"] * n / total, 3),
            "iou_of_all": round(stored["iou_all"] * n / total, 3),
            "right_of_all": round(stored["right_and_kept_of_all"] * n / total, 3),
            "draws": int(draws), "draws_per_sample": round(draws / total, 3)}


SWEPT = ("kept_fraction", "found_kept", "iou_kept", "right_and_kept_of_all", "filter_precision", "filter_recall")


def summarise(rows: list[dict]) -> dict:
    kept = [r for r in rows if r["keep"]]
    right = [r for r in rows if r["right"]]
    per_class = {}
    for cls in sorted({r["class"] for r in rows}):
        mine = [r for r in rows if r["class"] == cls]
        per_class[cls] = {"n": len(mine), "found": round(np.mean([r["found"] for r in mine]), 3),
                          "iou": round(float(np.mean([r["iou"] for r in mine])), 3)}
    finite = [r["psnr_outside"] for r in rows if np.isfinite(r["psnr_outside"])]
    codec = [r["psnr_outside_codec"] for r in rows if np.isfinite(r["psnr_outside_codec"])]
    return {
        "samples": len(rows), "kept": len(kept), "kept_fraction": round(len(kept) / max(len(rows), 1), 3),
        "found_all": round(float(np.mean([r["found"] for r in rows])), 3),
        "found_kept": round(float(np.mean([r["found"] for r in kept])), 3) if kept else None,
        "iou_all": round(float(np.mean([r["iou"] for r in rows])), 3),
        "iou_kept": round(float(np.mean([r["iou"] for r in kept])), 3) if kept else None,
        "right_and_kept_of_all": round(sum(r["right"] and r["keep"] for r in rows) / max(len(rows), 1), 3),
        "filter_precision": round(sum(r["right"] for r in kept) / len(kept), 3) if kept else None,
        "filter_recall": round(sum(r["keep"] for r in right) / len(right), 3) if right else None,
        "psnr_outside_min_db": round(min(finite), 2) if finite else None,
        "psnr_outside_mean_db": round(float(np.mean(finite)), 2) if finite else None,
        "psnr_outside_codec_mean_db": round(float(np.mean(codec)), 2) if codec else None,
        "per_class": per_class,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inpaint_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="real scenes (each gives one sample per object per "
                    "strength and seed)")
    ap.add_argument("--job", default=str(REPO / "jobs" / "shapes-inpaint.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job overrides")
    ap.add_argument("--redraws", type=int, default=0, help="keep the job's check and redraw rejected samples up to "
                    "this many times (generation.redraws); 0: every sample stored once, the check applied after")
    ap.add_argument("--right-iou", type=float, default=0.5, help="oracle IoU from which a found object is right")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "inpaint-quality")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "inpaint_quality.json")
    args = ap.parse_args(argv)
    header = run_header("benchmarks.inpaint_quality", argv)
    real = args.cache / f"real-{FIRST_SEED}-{args.n}"
    if not (real / "annotations.json").is_file():
        render_coco(real, args.n, first_seed=FIRST_SEED)
    from pipeline.spec import load_spec
    from stages.references import inpaint_references

    overrides = [f"references.path={real}", *args.set]
    probe = load_spec(args.job, overrides + ["samples=1"], out=tempfile.mkdtemp(), check_files=False)
    refs = probe.references
    units = len(inpaint_references(probe).instances)
    overrides.append(f"samples={units * len(refs.strengths) * refs.seeds_per_level}")
    asked = load_spec(args.job, overrides, out=tempfile.mkdtemp(), check_files=False)
    opts, judge = asked.references.inpaint, asked.judge
    if args.redraws:  # the job's check decides in the run; rejected samples are drawn again
        made = generate_cached(args.job, overrides + [f"generation.redraws={args.redraws}"], args.cache)
    else:  # every sample stored: the checks are applied below, from the recorded scores
        made = generate_cached(args.job, overrides + ["references.inpaint.min_mass_inside=0",
                                                      "references.inpaint.min_iou=0",
                                                      *(["judge.min_score=0"] if judge is not None else [])],
                               args.cache)
    result = {**header, "job": Path(args.job).name, "overrides": args.set, "scenes": args.n,
              "first_seed": FIRST_SEED, "instances": units, "generate_s": round(made.wall_s, 1),
              "min_mass_inside": opts.min_mass_inside, "min_iou": opts.min_iou, "redraws": args.redraws,
              "judge": None if judge is None else {"kind": judge.kind, "min_score": judge.min_score},
              **measure(made.spec, made.out, args.right_iou, opts, None if judge is None else judge.min_score)}
    if args.redraws:
        result["delivered"] = delivered(made.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_class", "sweep")}, indent=1))
    for cls, v in result["per_class"].items():
        print(f"  {cls:9s} n={v['n']:3d}  found {v['found']:.2f}  IoU {v['iou']:.2f}")
    print("min_mass_inside min_iou  " + "  ".join(SWEPT))
    for row in result["sweep"]:
        print(f"{row['min_mass_inside']:15.1f} {row['min_iou']:7.1f}  " + "  ".join(f"{row[k]}" for k in SWEPT))
    for row in result.get("judge_sweep", []):
        print(f"outline {row['outline_check']:3s} judge {row['min_score']:.1f}  " + "  ".join(f"{row[k]}" for k in SWEPT))
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
