"""Throughput: the full synthgen pipeline vs the bare diffusers StableDiffusionPipeline.

Same model, steps, guidance, scheduler, size, batch size and device, and the same compute: on CPU
the bare pipeline runs with as many torch threads as the job's synthesis pool reserves cores
(num_cpus x actors, at most the machine's), on GPU on one device against the pipeline's images/s
per synthesis actor. Prints images/second of each and their ratios (targets at the demo's settings:
steady >= 0.95, end to end >= 0.90, start-up to the first batch <= 10 s) and writes a JSON. The
in-process runner is one process running the stages one batch at a time with the spec's per-stage
threads, so with a multi-actor pool it uses less of the machine.

    python -m benchmarks.throughput                        # demo job (300 samples), local Ray
    python -m benchmarks.throughput --samples 100 --no-ray # also time the in-process runner
    python -m benchmarks.throughput --set generation.steps=10 --json out.json

Three figures (top-level keys of the JSON), all from one run:

- ``steady_ratio``: the pipeline's steady images/s over bare's. Steady = after the first unit out: the
  pipeline's rows after its first arrival at the driver over the time from that arrival to the last; bare's
  images after its first batch (which also warms it up) over the time of the later batches.
- ``e2e_ratio``: end to end, pipeline over bare. The pipeline: run_job's wall time into a fresh output dir
  (Ray start-up, actor and model load, masks, labels, filters, encoding and shard writing included); bare:
  model load plus every batch, the first included. Neither counts the interpreter's imports.
- ``startup_s``: the pipeline's start-up to its first committed shard, as a ``synthgen run`` sees it: the
  command's own imports (``import pipeline.cli, pipeline.runner`` timed in a fresh interpreter) plus run_job's
  call to the first shard the workers commit (the demo's writer: with workers writing, the driver sees
  nothing before a whole shard). ``startup_first_batch_s``: the same to the first record batch out of
  synthesis, from a second Ray run with the driver writing (``--writer driver``: every batch reaches the
  driver, after the CPU stages' few ms per batch); ``--no-first-batch`` skips that run.

The bare baseline runs once before and once after the pipeline runs; its figures are the mean of the
two (machine speed drifts). Also reported: Ray start-up (until the runner is ready), the summary's own
wall_s, the synthesis stage's rows per busy second, and the 1-minute load average before each run (the
machine may be shared: compare runs taken at a low load). A job whose ``resources.synthesis.actors`` is
``auto`` gets the pool a local Ray would size (:func:`pipeline.jobplan.pool_size` over this machine's GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import REPO, write_result
from pipeline.jobplan import pool_size
from pipeline.runner import run_job
from pipeline.spec import load_spec
from stages.model import load_pipeline
from stages.sampling import SamplingStage, stable_seed


def bare(spec, n: int, threads: int) -> dict:
    """The bare diffusers pipeline over the job's first n prompts: end to end (model load and every batch)
    and steady (the batches after the first, which warms it up)."""
    torch.set_num_threads(threads)
    gen, bs = spec.generation, spec.generation.batch_size
    cuda = spec.model.device.startswith("cuda")
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    pipe = load_pipeline(spec.model.path, spec.model.dtype, spec.model.device, gen.scheduler)
    load_s = time.perf_counter() - t0
    prompts = [str(p) for p in SamplingStage(spec)({"index": np.arange(n, dtype=np.int64)})["prompt"]]
    seeds = [stable_seed(spec.seed, i) for i in range(n)]

    def call(lo: int, hi: int):
        images = pipe(prompts[lo:hi], num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
                      height=gen.height, width=gen.width, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[lo:hi]]).images
        if cuda:
            torch.cuda.synchronize()
        return images

    t1 = time.perf_counter()
    call(0, min(bs, n))
    first_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    for lo in range(bs, n, bs):
        images = call(lo, min(lo + bs, n))
    steady_wall = time.perf_counter() - t1
    assert n <= bs or images.shape[0] == min(bs, n - (n - 1) // bs * bs)
    steady_n = max(n - bs, 0)
    e2e = load_s + first_s + steady_wall
    return {"images": n, "load_s": round(load_s, 2), "first_batch_s": round(first_s, 3),
            "steady_images": steady_n, "steady_wall_s": round(steady_wall, 3),
            "steady_images_per_s": round(steady_n / steady_wall, 3) if steady_wall > 0 else None,
            "e2e_wall_s": round(e2e, 3), "e2e_images_per_s": round(n / e2e, 3),
            "load_avg_1min_before": round(load_avg, 2), "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def command_import_s() -> float:
    """Seconds a fresh interpreter takes to import what ``synthgen run`` imports before run_job."""
    code = "import pipeline.cli, pipeline.runner"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return time.perf_counter() - t0


def full(spec_args: tuple, use_ray: bool, writer_mode: str = "auto") -> dict:
    """run_job end to end into a fresh output dir, with the arrival time of each unit (a committed shard,
    or a record batch) at the driver: end-to-end and steady images/s, and the time to the first unit."""
    arrivals: list[tuple[float, str, int]] = []
    with tempfile.TemporaryDirectory(prefix="synthgen-bench-") as tmp:
        spec = load_spec(*spec_args, out=tmp)
        load_avg = os.getloadavg()[0]
        t0 = time.perf_counter()
        summary = run_job(spec, use_ray=use_ray, progress=False, writer_mode=writer_mode,
                          on_progress=lambda kind, rows: arrivals.append((time.perf_counter() - t0, kind, rows)))
        wall = time.perf_counter() - t0
    n = summary["processed"]
    ready_s = next(t for t, kind, _ in arrivals if kind == "ready")
    units = [(t, kind, rows) for t, kind, rows in arrivals if kind != "ready"]
    (first_t, unit, first_rows), last_t = units[0], units[-1][0]
    steady_n = n - first_rows
    synth = next((s for s in summary["stages"] if s["name"] == "synthesis"), {})
    return {
        "runner": summary["runner"], "writer": summary["writer"], "unit": unit, "images": n,
        "wall_s": round(wall, 3), "images_per_s": round(n / wall, 3),
        "startup_s": round(wall - summary["wall_s"], 2), "first_batch_s": summary["first_batch_s"],
        "ready_s": round(ready_s, 2), "first_unit_s": round(first_t, 2), "first_unit_rows": first_rows,
        "steady_images": steady_n, "steady_wall_s": round(last_t - first_t, 3),
        "steady_images_per_s": round(steady_n / (last_t - first_t), 3) if last_t > first_t else None,
        "arrivals_s": [round(t, 2) for t, _, _ in units],
        "summary_wall_s": summary["wall_s"], "summary_images_per_s": summary["images_per_s"],
        "load_avg_1min_before": round(load_avg, 2), "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "synthesis_workers": synth.get("workers"),
        # what the synthesis pool makes per second while busy (workers x rows per busy second): the steady rate's
        # ceiling, and a check on it where units arrive bunched (with few shards, or batches held back)
        "synthesis_capacity_images_per_s": round(synth["workers"] * synth["rows_per_busy_s"], 3)
        if synth.get("rows_per_busy_s") else None,
        "synthesis_rows_per_busy_s": synth.get("rows_per_busy_s"), "kept": summary["kept"],
        # diffusion draws: every row once plus the redraws (generation.redraws), the work bare diffusers
        # never does; draws per second at steady state is the figure comparable with bare's images/s
        "redraws": summary["redraws"], "draws": n + summary["redraws"],
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
    ap.add_argument("--no-first-batch", action="store_true", help="skip the second Ray run (driver writing) that "
                    "times the first batch out of synthesis")
    ap.add_argument("--json", default="throughput.json")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    overrides = [*([f"samples={args.samples}"] if args.samples else []),
                 *([f"output.shard_size={args.shard_size}"] if args.shard_size else []), *args.set]
    spec_args = (args.job, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(*spec_args, out=tmp)
    gen = spec.generation
    synth = spec.resources.for_stage("synthesis")
    # the bare pipeline gets the compute the job's synthesis pool gets: on CPU all the cores the pool
    # reserves (num_cpus x actors, at most the machine's) as torch threads in one process; on a GPU
    # one device, and the pipeline's images/s is divided by its actors (GPUs) for the ratio. `actors: auto`
    # is sized as a local Ray would size it: one per GPU of this machine
    on_gpu = spec.model.device.startswith("cuda")
    local = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}
    actors = pool_size(synth.actors, synth.num_gpus, local)
    threads = max(1, int(synth.num_cpus)) if on_gpu else max(1, min(os.cpu_count() or 1, int(synth.num_cpus * actors)))
    per_device = actors if on_gpu else 1
    import_s = command_import_s()

    # the bare baseline runs before and after the pipeline runs, and the figures use the mean of the
    # two: a shared or throttled machine drifts by ~10% over minutes, which one baseline would hide
    first = bare(spec, spec.samples, threads)
    results = {"ray": full(spec_args, use_ray=True)}
    if not args.no_first_batch:
        results["ray_driver"] = full(spec_args, use_ray=True, writer_mode="driver")
    if args.no_ray:
        results["in_process"] = full(spec_args, use_ray=False)
    second = bare(spec, spec.samples, threads)
    runs = [first, second]

    def mean(key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    b = {"images": first["images"], "load_s": round(mean("load_s"), 2), "e2e_wall_s": round(mean("e2e_wall_s"), 3),
         "steady_images": first["steady_images"], "steady_wall_s": round(mean("steady_wall_s"), 3)}
    b["e2e_images_per_s"] = round(b["images"] / b["e2e_wall_s"], 3)
    b["steady_images_per_s"] = round(b["steady_images"] / b["steady_wall_s"], 3)
    # the keys the README's table has cited since the first version: bare's images/s is its steady rate
    b["wall_s"], b["images_per_s"] = b["steady_wall_s"], b["steady_images_per_s"]
    b["runs"] = runs
    results["bare"] = b
    for key in ("ray", "ray_driver", "in_process"):
        if key in results:
            r = results[key]
            scale = per_device if key != "in_process" else 1  # the in-process runner uses one device
            r["steady_ratio"] = round(r["steady_images_per_s"] / scale / b["steady_images_per_s"], 3)
            r["e2e_ratio"] = round(r["images_per_s"] / scale / b["e2e_images_per_s"], 3)
            r["draws_e2e_ratio"] = round(r["draws"] / r["wall_s"] / scale / b["e2e_images_per_s"], 3)
            r["ratio"] = round(r["images_per_s"] / scale / b["steady_images_per_s"], 3)  # e2e over bare's steady
            r["summary_ratio"] = round(r["summary_images_per_s"] / scale / b["steady_images_per_s"], 3)
            r["startup_first_unit_s"] = round(import_s + r["first_unit_s"], 2)
            if r["synthesis_capacity_images_per_s"]:
                r["capacity_ratio"] = round(r["synthesis_capacity_images_per_s"] / scale / b["steady_images_per_s"], 3)

    import diffusers
    import ray

    ray_r = results["ray"]
    drv = results.get("ray_driver")
    report = {
        "job": args.job, "overrides": overrides,
        "steady_ratio": ray_r["steady_ratio"], "e2e_ratio": ray_r["e2e_ratio"],
        "startup_s": ray_r["startup_first_unit_s"], "startup_to": f"first committed {ray_r['unit']} "
        f"({ray_r['writer']} writing), command imports included",
        "startup_first_shard_s": ray_r["startup_first_unit_s"] if ray_r["unit"] == "shard" else None,
        "startup_first_batch_s": drv["startup_first_unit_s"] if drv else
        (ray_r["startup_first_unit_s"] if ray_r["unit"] == "batch" else None),
        "draws_e2e_ratio": ray_r["draws_e2e_ratio"], "redraws": ray_r["redraws"],
        "command_import_s": round(import_s, 2),
        "targets": {"steady_ratio": 0.95, "e2e_ratio": 0.90, "startup_first_batch_s": 10.0},
        "settings": {"model": spec.model.path, "dtype": spec.model.dtype, "device": spec.model.device,
                     "height": gen.height, "width": gen.width, "steps": gen.steps,
                     "guidance_scale": gen.guidance_scale, "scheduler": gen.scheduler,
                     "batch_size": gen.batch_size, "samples": spec.samples, "shard_size": spec.output.shard_size,
                     "synthesis_pool": {"actors": synth.actors, "resolved_actors": actors, "num_cpus": synth.num_cpus,
                                        "num_gpus": synth.num_gpus},
                     "bare_torch_threads": threads, "ratio_per_device": per_device},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "nice": os.nice(0), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "ray": ray.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "target_ratio": 0.85, "wall_s": round(time.perf_counter() - t_start, 1), "results": results,
    }

    print(f"\n{spec.samples} images, {gen.height}x{gen.width}, {gen.steps} steps {gen.scheduler}, "
          f"guidance {gen.guidance_scale}, batch {gen.batch_size}, {spec.model.device}; synthesis pool {actors} x "
          f"{synth.num_cpus:g} CPU / {synth.num_gpus:g} GPU; bare: {threads} torch threads"
          + (f", Ray img/s divided by {per_device} GPUs" if per_device > 1 else ""))
    print(f"{'run':<12}{'e2e s':>9}{'e2e img/s':>11}{'e2e ratio':>11}{'steady img/s':>14}{'steady ratio':>14}"
          f"{'first out s':>13}   (unit; ready s; load avg before)")
    print(f"{'bare':<12}{b['e2e_wall_s']:>9.2f}{b['e2e_images_per_s']:>11.3f}{1:>11.3f}{b['steady_images_per_s']:>14.3f}"
          f"{1:>14.3f}{mean('first_batch_s') + mean('load_s'):>13.2f}   (batch; runs: "
          f"{', '.join(str(r['steady_images_per_s']) for r in runs)} steady img/s; load avg "
          f"{', '.join(str(r['load_avg_1min_before']) for r in runs)})")
    for key in ("ray", "ray_driver", "in_process"):
        if key in results:
            r = results[key]
            print(f"{key:<12}{r['wall_s']:>9.2f}{r['images_per_s']:>11.3f}{r['e2e_ratio']:>11.3f}"
                  f"{r['steady_images_per_s']:>14.3f}{r['steady_ratio']:>14.3f}{r['startup_first_unit_s']:>13.2f}   "
                  f"({r['unit']}; {r['ready_s']}; {r['load_avg_1min_before']})")
    print(f"steady_ratio {report['steady_ratio']}, e2e_ratio {report['e2e_ratio']} ({ray_r['redraws']} redraws; "
          f"{report['draws_e2e_ratio']} counting every draw), startup_s {report['startup_s']} "
          f"({report['startup_to']}), to the first batch {report['startup_first_batch_s']}")
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
