"""GPU throughput: stock diffusers, an optimized bare pipeline and the synthgen path, in images/s and peak GPU memory.

    python -m benchmarks.gpu_throughput [--compile] [--json benchmarks/results/gpu_throughput.json]
    python -m benchmarks.gpu_throughput --tiny --device cpu --json /tmp/t.json     # what tests/ run

Models: random-weight SD 1.5 and SDXL at their real configurations (``benchmarks.family_capture.build``, built
offline once into ``--cache`` and reused; on a GPU their weights are initialised there), at the settings of
jobs/coco80-sd15.yaml (512², 25 steps, DPM-Solver++, guidance 7.5, batches of 8, capture at 16 and 32 with
refinement, Otsu masks, the filters) and jobs/coco80-sdxl.yaml (1024², 25 steps, batches of 4), in ``--dtype``
(bfloat16 on a GPU). Per model, on the job's first prompts and seeds (``SamplingStage``, one CPU generator per
image, as synthgen draws them):

  stock      the diffusers pipeline as ``from_pretrained`` gives it, in ``--stock-dtype`` (float32: diffusers'
             default), called on each batch (``output_type="np"``)
  optimized  the same pipeline object cast to ``--dtype``, UNet and VAE in channels_last, PyTorch's fused SDPA
             (``AttnProcessor2_0``); with ``--compile`` measured again with the UNet through ``torch.compile``
             (``--compile-mode``), compile time in its warm-up
  synthgen   the job's stages chained in this process (``pipeline.graph.Chain``, as ``synthgen run --no-ray``
             runs them: sampling, ``SynthesisStage`` with capture, masks, labels, filters, encode) on the same
             indices; also the synthesis stage alone (its own busy time), which is the rate a Ray run sustains
             when the CPU stages keep up on other workers; with ``--compile`` again with the job's
             ``model.compile`` (``synthgen_compiled``)

Each: one warm-up batch, then ``--batches`` timed batches; images/s = images / wall time; peak GPU memory
(``torch.cuda.max_memory_allocated``) over the timed batches. Ratios: synthgen / optimized (target on a GPU:
>= 0.95; eager against eager, and against compiled when measured) and optimized / stock (target >= 2).
``--tiny``: tiny-width folders (``benchmarks.gpu_smoke.build_tiny``), 64², 2 steps, batches of 2, capture at
"1/2" and "1/4" (what 32 and 16 are at 512²): the same code on a CPU in seconds. Writes JSON (``--json``; on
cuda by default benchmarks/results/gpu_throughput.json). Meant to fit 8 minutes on one H100, compile included.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import REPO, run_header, write_result
from pipeline import quiet

MODELS = ("sd15", "sdxl")
JOBS = {"sd15": "jobs/coco80-sd15.yaml", "sdxl": "jobs/coco80-sdxl.yaml"}
TINY = ["generation.height=64", "generation.width=64", "generation.steps=2", "generation.batch_size=2",
        'masks.capture_resolutions=["1/2", "1/4"]', 'masks.self_attention_resolution="1/2"']
TARGETS = {"synthgen_over_optimized": 0.95, "optimized_over_stock": 2.0}


def build_model(name: str, cache: Path, tiny: bool, device: str) -> Path:
    """The random-weight folder of ``name``: real configuration (family_capture.build; its weights initialised on
    ``device``, then saved), or tiny widths (gpu_smoke.build_tiny). Reused when already built."""
    import torch

    if tiny:
        from benchmarks.gpu_smoke import build_tiny

        return build_tiny(name, cache / f"{name}-tiny")
    from benchmarks.family_capture import build

    with torch.device(device):  # random init on the GPU is seconds for SDXL's 3.5 B parameters
        return build(name, cache / f"{name}-w1", 1.0)


class Timer:
    """Wall time (and peak GPU memory) of some batches, after the device finished the earlier work."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, run: Callable[[int, int], Any], batches: list[tuple[int, int]]) -> dict:
        import torch

        t0 = time.perf_counter()
        run(*batches[0])  # warm-up (compile, autotuning, lazy init)
        warmup = time.perf_counter() - t0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for lo, hi in batches[1:]:
            run(lo, hi)
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        n = sum(hi - lo for lo, hi in batches[1:])
        return {"images": n, "wall_s": round(wall, 3), "images_per_s": round(n / wall, 4),
                "warmup_s": round(warmup, 2),
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bare_runs(spec, pipeline_class, stock_dtype: str, dtype: str, compile_mode: str | None, timer: Timer,
              batches: list[tuple[int, int]], extra: dict) -> dict:
    """(a) the stock pipeline, then (b) the same object optimized (and compiled when ``compile_mode``)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from stages.model import DTYPES, load_pipeline
    from stages.sampling import SamplingStage, stable_seed

    gen = spec.generation
    n = batches[-1][1]
    prompts = [str(p) for p in SamplingStage(spec)({"index": np.arange(n, dtype=np.int64)})["prompt"]]
    seeds = [stable_seed(spec.seed, i) for i in range(n)]
    pipe = None

    def run(lo: int, hi: int):
        images = pipe(prompts[lo:hi], num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
                      height=gen.height, width=gen.width, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[lo:hi]]).images
        assert images.shape == (hi - lo, gen.height, gen.width, 3) and np.isfinite(images).all()

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    pipe = load_pipeline(spec.model.path, stock_dtype, spec.model.device, gen.scheduler, pipeline_class=pipeline_class,
                         **extra)
    load_s = time.perf_counter() - t0
    print(f"  stock ({stock_dtype}) ...", flush=True)
    out["stock"] = {**timer(run, batches), "dtype": stock_dtype, "load_s": round(load_s, 2)}

    pipe.to(dtype=DTYPES[dtype])
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    _free()
    print(f"  optimized ({dtype}, channels_last, SDPA) ...", flush=True)
    out["optimized"] = {**timer(run, batches), "dtype": dtype, "channels_last": True, "attention": "SDPA",
                        "compiled": False}
    if compile_mode:
        print(f"  optimized + torch.compile(unet, mode={compile_mode!r}) ...", flush=True)
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        try:
            out["optimized_compiled"] = {**timer(run, batches), "dtype": dtype, "channels_last": True,
                                         "attention": "SDPA", "compiled": True, "compile_mode": compile_mode}
        except Exception as e:  # noqa: BLE001 - a compile failure is a finding, not the end of the run
            out["optimized_compiled"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            print(f"  compile failed: {out['optimized_compiled']['error']}", flush=True)
    del pipe
    _free()
    return out


def synthgen_run(spec, timer: Timer, batches: list[tuple[int, int]]) -> dict:
    """(c) every registered stage chained in this process over the same indices; per-stage seconds per image."""
    from pipeline.graph import TIME_PREFIX, Chain
    from pipeline.jobplan import JobPlan

    t0 = time.perf_counter()
    plan = JobPlan(spec)
    chain = Chain(plan.stages, plan)
    load_s = time.perf_counter() - t0
    outputs = []

    def run(lo: int, hi: int):
        outputs.append(chain({"index": np.arange(lo, hi, dtype=np.int64)}))

    result = timer(run, batches)
    timed = outputs[1:]
    stages = {}
    for cls in plan.stages:
        col = TIME_PREFIX + cls.name
        stages[cls.name] = round(float(sum(o[col].sum() for o in timed)) / result["images"], 4)
    kept = int(sum(o["keep"].sum() for o in timed))
    synthesis = stages.get("synthesis")
    del chain
    _free()
    return {**result, "dtype": spec.model.dtype, "load_s": round(load_s, 2), "stages": [c.name for c in plan.stages],
            "seconds_per_image": stages, "kept": kept,
            "synthesis_images_per_busy_s": round(1 / synthesis, 4) if synthesis else None}


def ratio(a: dict | None, b: dict | None, key: str = "images_per_s") -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return round(a[key] / b[key], 4)


def main(argv=None) -> int:
    quiet.setup(verbose=False)  # no progress bars or library notices, as the CLI (before they are imported)
    import torch

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default=default_device, help=f"default: {default_device}")
    ap.add_argument("--dtype", help="optimized and synthgen dtype (default: bfloat16 on cuda, float32 on cpu, "
                                    "where the job spec refuses half precision)")
    ap.add_argument("--stock-dtype", default="float32", help="the stock pipeline's dtype (diffusers' default)")
    ap.add_argument("--compile", action="store_true", help="also time the optimized pipeline with a compiled UNet")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode (default: default; max-autotune compiles for minutes)")
    ap.add_argument("--batches", type=int, default=1, help="timed batches per configuration, after one warm-up")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra job overrides for every model (e.g. generation.batch_size=4)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, 64², 2 steps, batches of 2 (CPU tests)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default on cpu: 1; on cuda: torch's default)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "synthgen-gpu-bench"),
                    help="where the random-weight folders are built and reused")
    ap.add_argument("--json", help="result JSON (default on cuda: benchmarks/results/gpu_throughput.json)")
    args = ap.parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        ap.error(f"--models: choose from {','.join(MODELS)}")

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from pipeline.spec import load_spec

    import diffusers

    t_start = time.perf_counter()
    timer = Timer(cuda)
    result: dict[str, Any] = {
        **run_header("benchmarks.gpu_throughput", argv), "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "cuda": torch.version.cuda if cuda else None},
        "tiny": args.tiny, "dtype": dtype, "stock_dtype": args.stock_dtype, "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None, "batches": args.batches,
        "threads": torch.get_num_threads(), "targets": TARGETS, "models": {}}
    cache = Path(args.cache)
    with tempfile.TemporaryDirectory(prefix="synthgen-gpu-throughput-") as tmp:
        for name in models:
            print(f"{name}: building / reusing the random-weight folder ...", flush=True)
            t0 = time.perf_counter()
            folder = build_model(name, cache, args.tiny, device)
            build_s = time.perf_counter() - t0
            overrides = [f"model.path={folder}", f"model.device={device}", f"model.dtype={dtype}",
                         f"resources.synthesis.num_gpus={1 if cuda else 0}", *(TINY if args.tiny else [])]
            if not cuda:  # every stage with the same torch threads as the bare pipeline
                overrides += [f"resources.{s}.num_cpus={torch.get_num_threads()}"
                              for s in ("sampling", "synthesis", "masks", "labels", "filters", "encode")]
            overrides += args.set
            spec = load_spec(JOBS[name], [*overrides, "samples=1"], out=tmp)
            bs = spec.generation.batch_size
            batches = [(i * bs, (i + 1) * bs) for i in range(args.batches + 1)]
            spec = load_spec(JOBS[name], [*overrides, f"samples={batches[-1][1]}"], out=str(Path(tmp) / name))
            gen = spec.generation
            row: dict[str, Any] = {
                "folder": str(folder), "build_s": round(build_s, 1), "job": JOBS[name], "overrides": overrides,
                "settings": {"height": gen.height, "width": gen.width, "steps": gen.steps, "scheduler": gen.scheduler,
                             "guidance_scale": gen.guidance_scale, "batch_size": bs,
                             "capture_resolutions": list(spec.masks.capture_resolutions),
                             "refine_power": spec.masks.refine_power}}
            pipeline_class, extra = ((StableDiffusionXLPipeline, {"add_watermarker": False}) if name == "sdxl"
                                     else (StableDiffusionPipeline, {}))
            row.update(bare_runs(spec, pipeline_class, args.stock_dtype, dtype,
                                 args.compile_mode if args.compile else None, timer, batches, extra))
            print("  synthgen (every stage, in process) ...", flush=True)
            row["synthgen"] = synthgen_run(spec, timer, batches)
            if args.compile:  # (c) again with the job's own model.compile (the capture's bookkeeping stays eager)
                print("  synthgen with model.compile ...", flush=True)
                compiled = load_spec(JOBS[name], [*overrides, f"samples={batches[-1][1]}", "model.compile=true"],
                                     out=str(Path(tmp) / f"{name}-compiled"))
                row["synthgen_compiled"] = synthgen_run(compiled, timer, batches)
            best = max((row[k] for k in ("optimized", "optimized_compiled") if row.get(k, {}).get("images_per_s")),
                       key=lambda r: r["images_per_s"])
            synth_rate = {"images_per_s": row["synthgen"]["synthesis_images_per_busy_s"]}
            row["ratios"] = {
                "synthgen_over_optimized": ratio(row["synthgen"], row["optimized"]),
                "synthgen_synthesis_over_optimized": ratio(synth_rate, row["optimized"]),
                "synthgen_over_optimized_compiled": ratio(row["synthgen"], row.get("optimized_compiled")),
                "synthgen_compiled_over_optimized_compiled": ratio(row.get("synthgen_compiled"),
                                                                   row.get("optimized_compiled")),
                "synthgen_synthesis_over_optimized_compiled": ratio(synth_rate, row.get("optimized_compiled")),
                "optimized_over_stock": ratio(best, row["stock"]),
                "optimized_eager_over_stock": ratio(row["optimized"], row["stock"])}
            row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            result["models"][name] = row
            print_model(name, row)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    path = args.json or (str(REPO / "benchmarks" / "results" / "gpu_throughput.json") if cuda else None)
    if path:
        write_result(path, result)
    print(f"wall {result['wall_s']} s on {result['device_name']}")
    return 0


def print_model(name: str, row: dict) -> None:
    s = row["settings"]
    print(f"\n{name}: {s['height']}², {s['steps']} steps ({s['scheduler']}), batch {s['batch_size']}")
    head = f"{'configuration':<44}{'images/s':>10}{'peak GPU MB':>13}{'warm-up s':>11}"
    print(head + "\n" + "-" * len(head))
    labels = {"stock": f"(a) stock diffusers, {row['stock']['dtype']}",
              "optimized": f"(b) optimized, {row['optimized']['dtype']}, channels_last, SDPA",
              "optimized_compiled": "(b) optimized + torch.compile(unet)",
              "synthgen": f"(c) synthgen, capture + every stage, {row['synthgen']['dtype']}"}
    for key, label in labels.items():
        r = row.get(key)
        if not r:
            continue
        if "error" in r:
            print(f"{label:<44}{'failed: ' + r['error'][:60]}")
            continue
        mb = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        print(f"{label:<44}{r['images_per_s']:>10.3f}{mb:>13}{r['warmup_s']:>11.1f}")
    c = row["synthgen"]
    per = ", ".join(f"{k} {v:.3f}" for k, v in c["seconds_per_image"].items())
    print(f"synthgen seconds per image by stage: {per}")
    r = row["ratios"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"ratios: (c)/(b) {fmt(r['synthgen_over_optimized'])} (synthesis stage alone "
          f"{fmt(r['synthgen_synthesis_over_optimized'])}; vs compiled {fmt(r['synthgen_over_optimized_compiled'])}), "
          f"(b)/(a) {fmt(r['optimized_over_stock'])}  [targets on a GPU: >= {TARGETS['synthgen_over_optimized']}, "
          f">= {TARGETS['optimized_over_stock']}]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
