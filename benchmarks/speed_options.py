"""Speed options against label quality: each option's time per image and its labels on ``synthgen eval``'s oracle.

One process runs ``pipeline.evaluate.evaluate`` over the same held-out prompts for each option set (the demo job's
settings plus ``--set`` overrides), timing the synthesis stage's own calls (``MethodTimer``) and the whole eval. The
option-free baseline runs first and last; times are given as a ratio to the mean of its two runs (the machine
drifts over minutes). Denoiser work is counted, not timed: image-evaluations of the UNet per image (a CFG call
counts 2) and how many of them run the deep blocks (``generation.cache_interval``), by replaying the run's calls
through the same schedule classes the stage uses.

    python -m benchmarks.speed_options --n 60 --json benchmarks/results/speed_options.json
    python -m benchmarks.speed_options --n 4 --options none,reuse_3        # a quick check
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from benchmarks.common import REPO, MethodTimer, write_result
from pipeline.evaluate import evaluate
from pipeline.spec import load_spec
from stages.families.feature_reuse import ReuseSchedule
from stages.synthesis import SynthesisStage

#: option sets: JSON key -> (label, job overrides)
OPTIONS: dict[str, tuple[str, list[str]]] = {
    "none": ("none (default)", []),
    "cutoff_05": ("guidance_cutoff 0.5", ["generation.guidance_cutoff=0.5"]),
    "reuse_2": ("cache_interval 2", ["generation.cache_interval=2"]),
    "reuse_3": ("cache_interval 3", ["generation.cache_interval=3"]),
    "reuse_5": ("cache_interval 5", ["generation.cache_interval=5"]),
    "cutoff_05_reuse_3": ("guidance_cutoff 0.5 + cache_interval 3",
                          ["generation.guidance_cutoff=0.5", "generation.cache_interval=3"]),
}


def denoiser_work(steps: int, guidance_scale: float, cutoff: float | None, interval: int | None) -> dict:
    """UNet image-evaluations per image (CFG doubles a call) and those that run the deep blocks: the loop's calls
    replayed through the stage's own rules (CFG through step int(steps x cutoff); ``ReuseSchedule``)."""
    cfg = guidance_scale > 1
    cfg_steps = steps if cutoff is None or not cfg else int(steps * cutoff)
    schedule = ReuseSchedule(interval) if interval else None
    evals = deep = 0
    for step in range(steps):
        width = 2 if cfg and step < cfg_steps else 1
        evals += width
        if schedule is not None:
            schedule.next_call((width,))
            deep += width if schedule.full else 0
        else:
            deep += width
    return {"unet_evaluations_per_image": evals, "deep_evaluations_per_image": deep}


def kept_time_ratios(results: dict[str, dict]) -> None:
    """Each option's time per *kept* image against the baseline's (``kept_time_ratio``): with redraws, a sample
    the filters drop is drawn again, so a faster option that keeps fewer samples saves less."""
    base_kept = results["none"]["kept_fraction"]
    for r in results.values():
        r["kept_time_ratio"] = round(r["time_ratio"] * base_kept / r["kept_fraction"], 3) if r["kept_fraction"] else None


def run_option(job: str, overrides: list[str], n: int, timer: MethodTimer) -> dict:
    spec = load_spec(job, overrides)
    timer.seconds = 0.0
    t0 = time.perf_counter()
    result = evaluate(spec, n, progress=False)
    wall = time.perf_counter() - t0
    gen = spec.generation
    kept = result["filters"]["kept"]
    return {
        "overrides": overrides, "load_avg_1min_before": round(os.getloadavg()[0], 2),
        "wall_s": round(wall, 2), "synthesis_s": round(timer.seconds, 2),
        "synthesis_s_per_image": round(timer.seconds / n, 3), "eval_s_per_image": round(result["seconds"] / n, 3),
        **denoiser_work(gen.steps, gen.guidance_scale, gen.guidance_cutoff, gen.cache_interval),
        "miou": round(result["refined"]["semantic"]["miou"], 4),
        "box_ap50": round(result["refined"]["bbox"]["AP50"], 4),
        "kept_fraction": round(kept / n, 4),
        "kept_miou": round(result["filters"]["kept_scores"].get("semantic", {}).get("miou", math.nan), 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(REPO / "jobs" / "shapes-demo.yaml"))
    ap.add_argument("--n", type=int, default=60, help="held-out oracle prompts per option")
    ap.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {', '.join(OPTIONS)}")
    ap.add_argument("--json", default="speed_options.json")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.options.split(",") if k.strip()]
    unknown = [k for k in keys if k not in OPTIONS]
    if unknown or "none" not in keys:
        ap.error(f"--options: unknown {unknown}" if unknown else "--options must include none (the baseline)")
    timer = MethodTimer(SynthesisStage, ["draw"])
    order = ["none", *[k for k in keys if k != "none"], "none"]
    runs: dict[str, list[dict]] = {}
    for key in order:
        label, overrides = OPTIONS[key]
        r = run_option(args.job, overrides, args.n, timer)
        runs.setdefault(key, []).append(r)
        print(f"{label:<42} synthesis {r['synthesis_s_per_image']:.3f} s/img  mIoU {r['miou']:.3f}  "
              f"AP50 {r['box_ap50']:.3f}  kept {r['kept_fraction']:.2f}  (load {r['load_avg_1min_before']})",
              flush=True)
    base = runs["none"]
    base_s = sum(r["synthesis_s_per_image"] for r in base) / len(base)
    results = {}
    for key in keys:
        r = dict(runs[key][0])
        if key == "none":
            r["synthesis_s_per_image"] = round(base_s, 3)
            r["runs"] = base
        r["label"] = OPTIONS[key][0]
        r["time_ratio"] = round(r["synthesis_s_per_image"] / base_s, 3)
        r["miou_change"] = round(r["miou"] - runs["none"][0]["miou"], 4)
        results[key] = r
    kept_time_ratios(results)
    import platform

    import torch
    report = {"job": args.job, "n": args.n, "baseline_runs_s_per_image": [r["synthesis_s_per_image"] for r in base],
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "results": results}
    print("\noption                                     time ratio  per kept  UNet evals  deep evals  mIoU    AP50   kept")
    for key, r in results.items():
        print(f"{r['label']:<42} {r['time_ratio']:>9.3f}  {r['kept_time_ratio']:>8.3f}  {r['unet_evaluations_per_image']:>10}  "
              f"{r['deep_evaluations_per_image']:>10}  {r['miou']:.3f}  {r['box_ap50']:.3f}  {r['kept_fraction']:.2f}")
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
