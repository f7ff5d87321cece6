"""Long-tail benchmark: does a diffusion curriculum of the tail classes help a classifier?

1. Real data from the shapes world, single-object scenes: a long-tailed training set (default 4 head
   classes x 500 images, 2 tail classes x 10) and a balanced test set (100 per class), each rendered
   as a COCO folder and imported with ``synthgen import-coco``'s code into an output dir.
2. Image-guided variations of the tail references only (``references.select`` with a CSV of the
   tail keys), a ladder of img2img strengths x seeds per level, run in-process through the project's
   runner from ``jobs/shapes-curriculum.yaml`` (``--set`` overrides allowed).
3. The same classifier (``benchmarks.train_classifier``: 4-block CNN) trained three ways — real only;
   real + all variations each epoch, no order; real + the fixed curriculum (one level per stage,
   ascending image guidance, then real only) — and DisCL's adaptive curriculum as a fourth row; each
   over ``--seeds`` (``--rows`` picks some; real only, the baseline, always runs). The curricula take DisCL's proportions: 3 epochs
   per level, so 15 of the 20 epochs have synthetic data and the last 5 are real only (DisCL: 15 of 20
   on iWildCam, 60 of 65 on ImageNet-LT). Every mode uses the same loss: class weights
   from each epoch's own label counts (``--balance``, default sqrt: count^-0.5, mean 1) x the
   loader's score weights. sqrt is the default because it gave real only its best baseline (seed 0,
   20 epochs, tail / overall accuracy: none 0.34 / 0.78, sqrt 0.68 / 0.87, inverse 0.54 / 0.49 —
   inverse weights of ~34 on 10 images destabilise the head classes).

Prints overall and tail-class accuracy on the balanced test set (mean ± std over seeds) and the
paired differences vs real only, and writes JSON (machine, settings, wall times, per-seed numbers).

    python -m benchmarks.longtail_curriculum                        # the default (~2.5 h on 2 cores)
    python -m benchmarks.longtail_curriculum --head-count 60 --tail-count 4 --test-per-class 20 \\
        --seeds-per-level 1 --seeds 0 --epochs 6 --epochs-per-level 1 --rows curriculum-fixed --json /tmp/lt.json  # smoke

Data is cached under ``--cache`` (default out/longtail-curriculum): real sets in folders keyed by
their settings, variations in ``<job name>-<fingerprint>``, and each training run's result in
``runs/``, keyed by everything it depends on (mode, seed, training settings, data dirs, and a digest
of the trainer's code): a rerun, or a run killed halfway, trains only what is not there yet.
Seeds: the bundled model trained on scenes < HELD_OUT_SEED; training scenes are HELD_OUT_SEED +
5_000_000 + i, test scenes HELD_OUT_SEED + 6_000_000 + i (disjoint from other benchmarks' too).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from benchmarks.common import (
    REPO,
    cached_run,
    checked,
    code_digest,
    finished,
    generate_cached,
    write_result,
)
from benchmarks.train_classifier import BALANCES, train
from pipeline.dataset import read_manifest
from pipeline.import_coco import import_coco
from pipeline.shapes.coco import render_coco
from pipeline.shapes.world import CLASSES, HELD_OUT_SEED
from pipeline.spec import load_spec
from stages.references import reference_key

TRAIN_SEED = HELD_OUT_SEED + 5_000_000
TEST_SEED = HELD_OUT_SEED + 6_000_000
MAX_SCENES = 1_000_000  # per set: keeps the training and test seed ranges disjoint
TARGET_TAIL_GAIN = 0.10
#: (row name, train_classifier mode, schedule)
ROWS = [("real-only", "real-only", "fixed"), ("mixed", "mixed", "fixed"),
        ("curriculum-fixed", "curriculum", "fixed"), ("curriculum-adaptive", "curriculum", "adaptive")]


# --- real data -------------------------------------------------------------------------------------
def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def render_single_objects(folder: Path, counts: dict[str, int], first_seed: int, size: int) -> list[dict]:
    """One-object scenes, ``counts[class]`` of each, as a COCO folder (``annotations.json`` written last).

    Scene i has seed first_seed + i and its class from a seeded shuffle of the class list, so files
    (and the shards import-coco writes in key order) are not sorted by class. Returns the image entries.
    """
    labels = [cls for cls, n in counts.items() for _ in range(n)]
    order = np.random.default_rng(first_seed).permutation(len(labels))
    path = render_coco(folder, len(labels), size, first_seed, classes=[labels[j] for j in order],
                       description="synthgen shapes world, single objects")
    return json.loads(path.read_text())["images"]


def real_set(cache: Path, name: str, counts: dict[str, int], first_seed: int, size: int) -> dict:
    """Render + import a real set into ``cache/<name>-<settings key>/{coco,wds}`` (reused when finished)."""
    settings = {"counts": counts, "first_seed": first_seed, "size": size, "n_objects": 1, "order": "shuffled"}
    root = cache / f"{name}-{settings_key(settings)}"
    coco, wds = root / "coco", root / "wds"
    t0 = time.perf_counter()
    if (coco / "annotations.json").is_file():
        images = json.loads((coco / "annotations.json").read_text())["images"]
    else:
        print(f"rendering {sum(counts.values())} {name} scenes -> {coco}", flush=True)
        images = render_single_objects(coco, counts, first_seed, size)
    render_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reused = finished(wds)
    if not reused:
        import_coco(coco, wds, name=name)
    seeds = [im["seed"] for im in images]
    return {"coco": coco, "wds": wds, "images": images, "seeds": [min(seeds), max(seeds)], "reused": reused,
            "wall_s": {"render": round(render_s, 1), "import": round(time.perf_counter() - t0, 1)}}


def write_tail_keys(path: Path, images: list[dict], tail: Sequence[str]) -> list[str]:
    """The hard-sample selection: a CSV (key, class) of the tail-class images' reference keys."""
    rows = [(reference_key(im["file_name"]), im["class"]) for im in images if im["class"] in tail]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "class"])
        writer.writerows(rows)
    return [k for k, _ in rows]


# --- variations ------------------------------------------------------------------------------------
def generate_variations(job: str, overrides: Sequence[str], coco: Path, keys_csv: Path, refs: int,
                        strengths: Sequence[float], seeds_per_level: int, threads: int, cache: Path) -> dict:
    """Run the variation job in-process into ``cache/<name>-<fingerprint>`` (a finished run is reused):
    ``refs`` tail references x ``strengths`` x ``seeds_per_level`` seeds."""
    batch = load_spec(job, overrides, check_files=False).generation.batch_size
    per_level = refs * seeds_per_level
    shard_size = batch * -(-per_level // batch)  # about one shard per level, a multiple of the batch size
    made = generate_cached(job, [*overrides, f"references.path={coco}", f"references.select.path={keys_csv}",
                                 f"references.strengths={list(strengths)}",
                                 f"references.seeds_per_level={seeds_per_level}", f"samples={per_level * len(strengths)}",
                                 f"output.shard_size={shard_size}", f"resources.synthesis.num_cpus={threads}"], cache)
    manifest = read_manifest(made.out)
    return {"dir": made.out, "reused": made.reused, "samples": made.spec.samples, "counts": manifest["counts"],
            "summary": manifest["summary"], "steps": made.spec.generation.steps,
            "guidance_scale": made.spec.generation.guidance_scale}


# --- results ---------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def paired(values: Sequence[float]) -> dict:
    """Mean ± std of paired differences and the two-sided 95 % Student-t interval of their mean."""
    entry = mean_std(values)
    if len(values) > 1:
        low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values),
                                           scale=statistics.stdev(values) / len(values) ** 0.5)
        entry["ci95"] = [round(float(low), 4), round(float(high), 4)]
    return entry


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per row: overall / tail accuracy mean ± std, and paired (same seed) differences vs real only."""
    base = {r["seed"]: r for r in runs["real-only"]}
    out = {}
    for row, results in runs.items():
        entry = {"accuracy": mean_std([r["accuracy"] for r in results]),
                 "tail_accuracy": mean_std([r["tail_accuracy"] for r in results])}
        if row != "real-only":
            for metric in ("accuracy", "tail_accuracy"):
                entry[f"delta_{metric}"] = paired([r[metric] - base[r["seed"]][metric] for r in results])
        out[row] = entry
    return out


def print_table(summary: dict, tail: Sequence[str]) -> None:
    pct = lambda d: f"{100 * d['mean']:5.1f} ± {100 * d['std']:4.1f}"  # noqa: E731
    delta = lambda d: f"{100 * d['mean']:+5.1f} ± {100 * d['std']:4.1f}" if d else "      —     "  # noqa: E731
    print(f"\n{'mode':<21}{'overall acc %':>15}{'tail acc %':>15}{'Δ overall':>15}{'Δ tail':>15}")
    for row, s in summary.items():
        print(f"{row:<21}{pct(s['accuracy']):>15}{pct(s['tail_accuracy']):>15}"
              f"{delta(s.get('delta_accuracy')):>15}{delta(s.get('delta_tail_accuracy')):>15}")
    if "curriculum-fixed" not in summary:
        return
    gain = summary["curriculum-fixed"]["delta_tail_accuracy"]
    low, high = gain.get("ci95", [float("nan")] * 2)
    print(f"\ntail classes {', '.join(tail)}; Δ = paired difference vs real only (same seed), mean ± std over seeds")
    print(f"tail gain of the fixed curriculum: {100 * gain['mean']:+.1f} points, 95 % t-interval "
          f"[{100 * low:+.1f}, {100 * high:+.1f}] (target: mean >= +{100 * TARGET_TAIL_GAIN:.0f}, lower bound > 0) "
          f"{'✔' if target_met(gain) else '✘'}")


def target_met(gain: dict) -> bool:
    return gain["mean"] >= TARGET_TAIL_GAIN and gain.get("ci95", [0.0])[0] > 0


# --- CLI -------------------------------------------------------------------------------------------
def class_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CLASSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated shapes-world classes {list(CLASSES)}")
    return names


def row_list(text: str) -> list[str]:
    names, known = [r.strip() for r in text.split(",") if r.strip()], [row for row, _, _ in ROWS]
    if not names or any(r not in known for r in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated rows of {known}")
    return names


def number_list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind.__name__}s") from None
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", type=class_list, default=["circle", "square", "triangle", "star"])
    ap.add_argument("--tail", type=class_list, default=["ring", "cross"])
    ap.add_argument("--head-count", type=int, default=500, help="real training images per head class")
    ap.add_argument("--tail-count", type=int, default=10, help="real training images per tail class")
    ap.add_argument("--test-per-class", type=int, default=100, help="balanced real test set")
    ap.add_argument("--size", type=int, default=64, help="image side (the bundled model makes 64)")
    ap.add_argument("--job", default=str(REPO / "jobs" / "shapes-curriculum.yaml"), help="variation job file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job overrides")
    ap.add_argument("--strengths", type=number_list(float), default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--seeds-per-level", type=int, default=6, help="variations per tail reference and strength")
    ap.add_argument("--seeds", type=number_list(int), default=[0, 1, 2, 3, 4, 5], help="training seeds (one run each)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--epochs-per-level", type=int, default=3,
                    help="curricula: epochs per level (then real only until --epochs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance", choices=BALANCES, default="sqrt",
                    help="class weights ~ count^-p from each epoch's label counts, the same rule in all modes")
    ap.add_argument("--rows", type=row_list, default=[row for row, _, _ in ROWS],
                    help=f"comma-separated rows to train, of {', '.join(row for row, _, _ in ROWS)} (real-only "
                         "always runs: the gains are paired with it)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training and synthesis)")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "longtail-curriculum")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "longtail_curriculum.json")
    args = ap.parse_args(argv)
    args.command = " ".join(["python -m benchmarks.longtail_curriculum", *(sys.argv[1:] if argv is None else argv)])
    if set(args.head) & set(args.tail):
        ap.error(f"--head and --tail share {sorted(set(args.head) & set(args.tail))}; a class is head or tail")
    for name in ("head_count", "tail_count", "test_per_class", "seeds_per_level", "epochs", "epochs_per_level",
                 "batch_size", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 16:
        ap.error(f"--size must be >= 16, got {args.size}")
    n_classes = len(args.head) + len(args.tail)
    if max(args.head_count * len(args.head) + args.tail_count * len(args.tail),
           args.test_per_class * n_classes) > MAX_SCENES:
        ap.error(f"at most {MAX_SCENES} scenes per set (training and test seed ranges must not overlap)")
    if not args.seeds or not args.strengths:
        ap.error("--seeds and --strengths need at least one value")
    if args.epochs < len(args.strengths) * args.epochs_per_level:
        ap.error(f"--epochs {args.epochs} < the curriculum's {len(args.strengths)} levels x "
                 f"{args.epochs_per_level} epochs per level")
    if args.lr <= 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    return args


def run_key(args: argparse.Namespace, mode: str, schedule: str, seed: int, real: Path, test: Path,
            synthetic: str | None, code: str) -> dict:
    """Everything one training run's result depends on (the key of its cached result): a curriculum's
    schedule and epochs per level count only for the curriculum modes."""
    curriculum = mode == "curriculum"
    return {"mode": mode, "schedule": schedule if curriculum else None, "seed": seed, "epochs": args.epochs,
            "epochs_per_level": args.epochs_per_level if curriculum else None, "batch_size": args.batch_size,
            "lr": args.lr, "balance": args.balance, "tail": args.tail, "threads": args.threads, "real": str(real),
            "test": str(test), "synthetic": synthetic, "code": code}


def run(args: argparse.Namespace) -> dict:
    t_start, load_start = time.perf_counter(), os.getloadavg()
    load_spec(args.job, args.set, check_files=False)  # a bad job file or override fails before any work
    torch.set_num_threads(args.threads)
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    classes = [*args.head, *args.tail]
    counts = {**{c: args.head_count for c in args.head}, **{c: args.tail_count for c in args.tail}}
    real = real_set(cache, "lt-train", counts, TRAIN_SEED, args.size)
    test = real_set(cache, "lt-test", {c: args.test_per_class for c in classes}, TEST_SEED, args.size)
    keys_csv = real["coco"].parent / "tail_keys.csv"
    tail_keys = write_tail_keys(keys_csv, real["images"], args.tail)
    t0 = time.perf_counter()
    syn = generate_variations(args.job, args.set, real["coco"], keys_csv, len(tail_keys), args.strengths,
                              args.seeds_per_level, args.threads, cache)
    gen_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)  # the synthesis stage pins its own count

    rows = [r for r in ROWS if r[0] == "real-only" or r[0] in args.rows]
    code = code_digest("benchmarks/train_classifier.py", "pipeline/loader.py")
    runs: dict[str, list[dict]] = {}
    for row, mode, schedule in rows:
        for seed in args.seeds:
            synthetic = None if mode == "real-only" else str(syn["dir"])
            key = run_key(args, mode, schedule, seed, real["wds"], test["wds"], synthetic, code)
            result, reused = cached_run(cache / "runs", key, lambda: train(
                real["wds"], test["wds"], synthetic_dir=synthetic, mode=mode, schedule=schedule, seed=seed,
                epochs=args.epochs, epochs_per_level=args.epochs_per_level, batch_size=args.batch_size,
                lr=args.lr, balance=args.balance, tail=args.tail))
            print(f"  {row} seed {seed}: accuracy {result['accuracy']:.3f}, tail {result['tail_accuracy']:.3f} "
                  f"({result['wall_s']} s{', reused' if reused else ''})", flush=True)
            runs.setdefault(row, []).append({**result, "reused": reused})
    summary = summarize(runs)
    keep = ("seed", "accuracy", "tail_accuracy", "per_class_accuracy", "wall_s", "reused", "levels_per_epoch",
            "history")
    return {
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": [round(v, 2) for v in load_start],
                    "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "command": args.command,
        "settings": {
            "classes": classes, "head": args.head, "tail": args.tail, "train_counts": counts,
            "test_per_class": args.test_per_class, "image_size": args.size, "objects_per_image": 1,
            "seeds": {"real_train": real["seeds"], "test": test["seeds"], "training_runs": args.seeds},
            "variations": {"job": args.job, "overrides": args.set, "references": len(tail_keys),
                           "selection": str(keys_csv), "strengths": args.strengths,
                           "seeds_per_level": args.seeds_per_level, "samples": syn["samples"],
                           "steps": syn["steps"], "guidance_scale": syn["guidance_scale"]},
            "classifier": {"model": "SmallCNN (4 conv-BN-ReLU-pool blocks 16-128, GAP, linear)",
                           "epochs": args.epochs, "epochs_per_level": args.epochs_per_level,
                           "batch_size": args.batch_size, "optimizer": "AdamW (wd 1e-4), cosine", "lr": args.lr,
                           "augmentation": "horizontal flip",
                           "loss": f"cross-entropy x score weight x class weight (balance={args.balance}, "
                                   "from each epoch's label counts), batch mean",
                           "real_fraction": None},
        },
        "data": {"real_train": str(real["wds"]), "test": str(test["wds"]), "variations": str(syn["dir"]),
                 "variation_counts": syn["counts"], "reused": {"real_train": real["reused"], "test": test["reused"],
                                                               "variations": syn["reused"]}},
        "wall_s": {"real_train": real["wall_s"], "test": test["wall_s"],
                   "variations_this_run": round(gen_s, 1),
                   "variations_generation": (syn["summary"] or {}).get("wall_s"),
                   "training": {row: [r["wall_s"] for r in rs] for row, rs in runs.items()},
                   "total": round(time.perf_counter() - t_start, 1)},
        "summary": summary,
        "target": {"tail_gain_curriculum_vs_real_only": TARGET_TAIL_GAIN,
                   "interval_lower_bound_above": 0.0,
                   "met": target_met(summary["curriculum-fixed"]["delta_tail_accuracy"])
                   if "curriculum-fixed" in summary else None},
        "runs": {row: [{k: r[k] for k in keep} for r in rs] for row, rs in runs.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = checked(run, args)
    if report is None:
        return 2
    print_table(report["summary"], args.tail)
    print(f"total wall time {report['wall_s']['total']} s")
    write_result(args.json, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
