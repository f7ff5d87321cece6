"""Driver cost of planning very large jobs, and the time of a no-op rerun of the demo.

    python -m benchmarks.plan_scale --json benchmarks/results/plan_scale.json

Planning: the demo job with ``samples`` set to 10^7 (shards of 100) and 10^9 (shards of 1000: an output dir
holds at most 10^6 shards, pipeline/plan.py), in a fresh process each: validate the
spec, check the (empty) output dir, write its manifest, compute the pending shards and the number of
batches the Ray source will emit. Reported: the process's peak RSS and the part of it planning
added (peak minus the RSS after imports), wall seconds, and the manifest's size.

No-op rerun: ``synthgen run jobs/shapes-demo.yaml --out DIR`` on a finished output dir (made first,
with the same command, when DIR has no manifest), timed as a user would see it: a fresh process
from start to exit, median of 3.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks.common import REPO, write_result

DEMO = REPO / "jobs" / "shapes-demo.yaml"

PLAN = """
import json, resource, sys, time
from pipeline.runner import prepare
from pipeline.spec import load_spec
import pyarrow, numpy  # noqa: F401 (imports counted in the baseline)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
spec = load_spec(sys.argv[1], [f"samples={sys.argv[2]}", f"output.shard_size={sys.argv[4]}"], out=sys.argv[3])
writer = prepare(spec)
pending = writer.open()
batches = writer.plan.batch_count(pending)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"samples": spec.samples, "shards": int(len(pending)), "batches": int(batches),
                  "peak_rss_mb": round(peak / 1024, 1), "planning_rss_mb": round((peak - base) / 1024, 1),
                  "wall_s": round(wall, 2)}))
"""


def plan(samples: int, shard_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        proc = subprocess.run([sys.executable, "-c", PLAN, str(DEMO), str(samples), str(out), str(shard_size)],
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["manifest_kb"] = round((out / "manifest.json").stat().st_size / 1024, 1)
    return result


def noop_rerun(out: Path, repeats: int = 3) -> dict:
    cmd = ["synthgen", "run", str(DEMO), "--out", str(out)]
    if not (out / "manifest.json").is_file():
        subprocess.run(cmd, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"command": " ".join(["synthgen", "run", "jobs/shapes-demo.yaml", "--out", "DIR"]),
            "median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", default=str(REPO / "out" / "shapes-demo"),
                        help="finished demo output dir for the no-op rerun (made when missing)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                         f"{__import__('os').cpu_count()} cores", "date": date.today().isoformat(),
              "planning": [plan(10**7, 100), plan(10**9, 1000)], "noop_rerun": noop_rerun(Path(args.demo_out))}
    for p in result["planning"]:
        print(f"plan {p['samples']:.0e} samples: {p['shards']} shards, {p['batches']} batches, peak RSS "
              f"{p['peak_rss_mb']} MB (+{p['planning_rss_mb']} MB planning), {p['wall_s']} s, manifest "
              f"{p['manifest_kb']} KB")
    r = result["noop_rerun"]
    print(f"no-op rerun of the demo: {r['median_s']} s (median of {r['runs_s']})")
    if args.json:
        write_result(args.json, result, indent=1)


if __name__ == "__main__":
    main()
