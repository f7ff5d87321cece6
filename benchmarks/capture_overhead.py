"""What cross-attention capture costs: the synthesis stage with and without capture, same settings.

    python -m benchmarks.capture_overhead [--job jobs/shapes-demo.yaml] [--batches 6] [--repeats 3]

Each configuration runs in its own subprocess (so its peak resident memory is its own), the
configurations take turns ``--repeats`` times, and the best time of each is kept (other load on
the machine only ever slows a run down). Configurations:

  * ``off``         ``SynthesisStage(spec, capture=False)``: plain diffusers generation
  * ``cross``       the job's capture (cross-attention at ``masks.capture_resolutions``)
  * ``cross+self``  plus self-attention at the finest captured resolution, ``refine_power`` 2

Prints a table and writes JSON (default benchmarks/results/capture_overhead.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

from benchmarks.common import REPO, write_result

CONFIGS = ("off", "cross", "cross+self")


def child(job: str, config: str, batches: int, overrides: list[str]) -> dict:
    """Run in the subprocess: time ``batches`` batches after one warm-up batch."""
    import numpy as np
    import torch

    from pipeline.evaluate import prompt_batch, shapes_prompts
    from pipeline.spec import load_spec
    from stages.synthesis import SynthesisStage

    spec = load_spec(job, overrides)
    if config == "cross+self":
        res = max(spec.masks.capture_resolutions)
        spec = load_spec(job, [*overrides, f"masks.self_attention_resolution={res}", "masks.refine_power=2"])
    torch.set_num_threads(max(1, int(spec.resources.synthesis.num_cpus)))
    stage = SynthesisStage(spec, capture=config != "off")
    size = spec.generation.batch_size
    prompts = shapes_prompts(size * (batches + 1))
    rows = [prompt_batch(stage.pipe.tokenizer, prompts[i:i + size], i) for i in range(0, len(prompts), size)]
    stage(rows[0])  # warm-up
    t0 = time.perf_counter()
    for batch in rows[1:]:
        out = stage(batch)
        assert np.isfinite(out["image"]).all()
    seconds = time.perf_counter() - t0
    return {"seconds_per_image": seconds / (size * batches),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=str(REPO / "jobs" / "shapes-demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "capture_overhead.json"))
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.job, args.child, args.batches, args.overrides)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:
            cmd = [sys.executable, "-m", "benchmarks.capture_overhead", "--child", config, "--job", args.job, "--batches", str(args.batches)]
            for item in args.overrides:
                cmd += ["--set", item]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            runs[config].append(json.loads(out.strip().splitlines()[-1]))
    best = {c: min(r["seconds_per_image"] for r in runs[c]) for c in CONFIGS}
    peak = {c: max(r["peak_rss_mb"] for r in runs[c]) for c in CONFIGS}
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "job": args.job, "overrides": args.overrides, "batches": args.batches, "repeats": args.repeats,
        "seconds_per_image": best, "peak_rss_mb": peak,
        "overhead": {c: best[c] / best["off"] - 1 for c in CONFIGS if c != "off"},
        "runs": runs,
    }
    print(f"{'capture':<12}{'s/img':>8}{'overhead':>10}{'peak RSS MB':>13}")
    for c in CONFIGS:
        over = "" if c == "off" else f"{100 * result['overhead'][c]:+.1f}%"
        print(f"{c:<12}{best[c]:>8.3f}{over:>10}{peak[c]:>13.0f}")
    write_result(args.json, result)


if __name__ == "__main__":
    main()
