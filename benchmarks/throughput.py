"""Throughput: the full synthgen pipeline vs the bare diffusers StableDiffusionPipeline.

Same model, steps, guidance, scheduler, size, batch size and device, and the same compute: on CPU
the bare pipeline runs with as many torch threads as the job's synthesis pool reserves cores
(num_cpus x actors, at most the machine's), on GPU on one device against the pipeline's images/s
per synthesis actor. Prints images/second of each and their ratio (target >= 0.85 at the demo's
settings) and writes a JSON. The in-process runner is one process running the stages one batch at
a time with the spec's per-stage threads, so with a multi-actor pool it uses less of the machine.

    python -m benchmarks.throughput                        # demo job (300 samples), local Ray
    python -m benchmarks.throughput --samples 100 --no-ray # also time the in-process runner
    python -m benchmarks.throughput --set generation.steps=10 --json out.json

The bare baseline is timed after model load and one warm-up batch (its best case), once before
and once after the pipeline runs; the ratios use the mean of the two (machine speed drifts). The pipeline
figure is end to end: run_job's wall time into a fresh output dir, Ray start-up, actor/model
load, masks, labels, filters, encoding and shard writing included. Also reported: the start-up
(output-dir checks and Ray start), the first batch's arrival after it, the summary's own wall_s
(from after start-up), the synthesis stage's rows per busy second, and the 1-minute load average
before each run (the machine may be shared: compare runs taken at a low load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import REPO, write_result
from pipeline.runner import run_job
from pipeline.spec import load_spec
from stages.model import load_pipeline
from stages.sampling import SamplingStage, stable_seed


def bare(spec, n: int, threads: int) -> dict:
    """images/s of the bare diffusers pipeline over the job's first n prompts (after load + warm-up)."""
    torch.set_num_threads(threads)
    gen, bs = spec.generation, spec.generation.batch_size
    t0 = time.perf_counter()
    pipe = load_pipeline(spec.model.path, spec.model.dtype, spec.model.device, gen.scheduler)
    load_s = time.perf_counter() - t0
    prompts = [str(p) for p in SamplingStage(spec)({"index": np.arange(n, dtype=np.int64)})["prompt"]]
    seeds = [stable_seed(spec.seed, i) for i in range(n)]

    def call(lo: int, hi: int):
        return pipe(prompts[lo:hi], num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
                    height=gen.height, width=gen.width, output_type="np",
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[lo:hi]]).images

    call(0, min(bs, n))  # warm-up
    load_avg = os.getloadavg()[0]
    if spec.model.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for lo in range(0, n, bs):
        images = call(lo, min(lo + bs, n))
    if spec.model.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert images.shape[0] == min(bs, n - (n - 1) // bs * bs)
    return {"images": n, "wall_s": round(wall, 3), "images_per_s": round(n / wall, 3), "load_s": round(load_s, 2),
            "load_avg_1min_before": round(load_avg, 2)}


def full(spec_args: tuple, use_ray: bool) -> dict:
    """images/s of run_job end to end into a fresh output dir."""
    with tempfile.TemporaryDirectory(prefix="synthgen-bench-") as tmp:
        spec = load_spec(*spec_args, out=tmp)
        load_avg = os.getloadavg()[0]
        t0 = time.perf_counter()
        summary = run_job(spec, use_ray=use_ray, progress=False)
        wall = time.perf_counter() - t0
    n = summary["processed"]
    synth = next((s for s in summary["stages"] if s["name"] == "synthesis"), {})
    return {
        "runner": summary["runner"], "images": n, "wall_s": round(wall, 3), "images_per_s": round(n / wall, 3),
        "startup_s": round(wall - summary["wall_s"], 2), "first_batch_s": summary["first_batch_s"],
        "summary_wall_s": summary["wall_s"], "summary_images_per_s": summary["images_per_s"],
        "load_avg_1min_before": round(load_avg, 2),
        "synthesis_rows_per_busy_s": synth.get("rows_per_busy_s"), "kept": summary["kept"],
        "stages": {s["name"]: {"busy_s": s["busy_s"], "rows_per_busy_s": s["rows_per_busy_s"]}
                   for s in summary["stages"]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(REPO / "jobs" / "shapes-demo.yaml"))
    ap.add_argument("--samples", type=int, help="default: the job's (300 for the demo)")
    ap.add_argument("--shard-size", type=int, help="default: the job's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra job overrides")
    ap.add_argument("--no-ray", action="store_true", help="also time the in-process runner")
    ap.add_argument("--json", default="throughput.json")
    args = ap.parse_args(argv)

    overrides = [*([f"samples={args.samples}"] if args.samples else []),
                 *([f"output.shard_size={args.shard_size}"] if args.shard_size else []), *args.set]
    spec_args = (args.job, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(*spec_args, out=tmp)
    gen = spec.generation
    synth = spec.resources.for_stage("synthesis")
    # the bare pipeline gets the compute the job's synthesis pool gets: on CPU all the cores the pool
    # reserves (num_cpus x actors, at most the machine's) as torch threads in one process; on a GPU
    # one device, and the pipeline's images/s is divided by its actors (GPUs) for the ratio
    on_gpu = spec.model.device.startswith("cuda")
    threads = max(1, int(synth.num_cpus)) if on_gpu else max(1, min(os.cpu_count() or 1, int(synth.num_cpus * synth.actors)))
    per_device = synth.actors if on_gpu else 1

    # the bare baseline runs before and after the pipeline runs, and the ratios use the mean of the
    # two: a shared or throttled machine drifts by ~10% over minutes, which one baseline would hide
    first = bare(spec, spec.samples, threads)
    results = {"ray": full(spec_args, use_ray=True)}
    if args.no_ray:
        results["in_process"] = full(spec_args, use_ray=False)
    second = bare(spec, spec.samples, threads)
    mean_wall = (first["wall_s"] + second["wall_s"]) / 2
    results["bare"] = {"images": first["images"], "wall_s": round(mean_wall, 3),
                       "images_per_s": round(first["images"] / mean_wall, 3), "runs": [first, second]}
    for key in ("ray", "in_process"):
        if key in results:
            r = results[key]
            scale = per_device if key == "ray" else 1  # the in-process runner uses one device
            r["ratio"] = round(r["images_per_s"] / scale / results["bare"]["images_per_s"], 3)
            r["summary_ratio"] = round(r["summary_images_per_s"] / scale / results["bare"]["images_per_s"], 3)

    import diffusers
    import ray

    report = {
        "job": args.job, "overrides": overrides,
        "settings": {"model": spec.model.path, "dtype": spec.model.dtype, "device": spec.model.device,
                     "height": gen.height, "width": gen.width, "steps": gen.steps,
                     "guidance_scale": gen.guidance_scale, "scheduler": gen.scheduler,
                     "batch_size": gen.batch_size, "samples": spec.samples, "shard_size": spec.output.shard_size,
                     "synthesis_pool": {"actors": synth.actors, "num_cpus": synth.num_cpus, "num_gpus": synth.num_gpus},
                     "bare_torch_threads": threads, "ratio_per_device": per_device},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "nice": os.nice(0), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "ray": ray.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "target_ratio": 0.85, "results": results,
    }

    print(f"\n{spec.samples} images, {gen.height}x{gen.width}, {gen.steps} steps {gen.scheduler}, "
          f"guidance {gen.guidance_scale}, batch {gen.batch_size}, {spec.model.device}; synthesis pool {synth.actors} x "
          f"{synth.num_cpus:g} CPU / {synth.num_gpus:g} GPU; bare: {threads} torch threads"
          + (f", Ray img/s divided by {per_device} GPUs" if per_device > 1 else ""))
    print(f"{'run':<12}{'wall s':>10}{'img/s':>10}{'ratio':>8}   (start-up s, first batch s after start-up; "
          "run_job summary: wall s, img/s, ratio; synthesis rows/busy s)")
    b = results["bare"]
    print(f"{'bare':<12}{b['wall_s']:>10.2f}{b['images_per_s']:>10.3f}{1:>8.3f}   (mean of a run before and after "
          f"the others: {', '.join(str(r['images_per_s']) for r in b['runs'])} img/s; model load and 1 warm-up "
          "batch excluded)")
    for key in ("ray", "in_process"):
        if key in results:
            r = results[key]
            print(f"{key:<12}{r['wall_s']:>10.2f}{r['images_per_s']:>10.3f}{r['ratio']:>8.3f}   "
                  f"({r['startup_s']}, {r['first_batch_s']}; {r['summary_wall_s']}, {r['summary_images_per_s']}, "
                  f"{r['summary_ratio']}; {r['synthesis_rows_per_busy_s']})")
    print(json.dumps(report, indent=2))
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
