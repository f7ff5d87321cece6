"""What the driver receives and holds: today's driver-side writer vs the worker-side writer (issue 21).

    python -m benchmarks.driver_bytes [--samples 200] [--json benchmarks/results/driver_bytes.json]

Runs the demo job (jobs/shapes-demo.yaml, ``samples`` overridden) twice on a local Ray, each in a fresh
driver process: ``writer_mode="driver"`` (every record's image, mask and JSON bytes stream to the driver,
which writes the shards) and ``writer_mode="workers"`` (Ray tasks write the shards where the blocks are;
the driver receives commit records). Per mode: the bytes the driver received (``summary.driver_bytes``)
per 1,000 samples and per shard, the driver's peak RSS, images/s; and whether both wrote the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, write_result

JOB = REPO / "jobs" / "shapes-demo.yaml"


def child(mode: str, out: str, samples: int) -> None:
    """One run in this process (the driver); prints its measurements as one JSON line."""
    from pipeline.runner import run_job
    from pipeline.spec import load_spec

    spec = load_spec(JOB, [f"samples={samples}"], out)
    summary = run_job(spec, writer_mode=mode, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"mode": summary["writer"], "processed": summary["processed"],
                      "shards": summary["shards_written"], "driver_bytes": summary["driver_bytes"],
                      "images_per_s": summary["images_per_s"], "wall_s": summary["wall_s"],
                      "driver_peak_rss_mb": round(peak_mb, 1)}))


def shard_digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((out / "shards").glob("*.tar")) + sorted((out / "parts").glob("*.parquet")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="demo samples per run (multiple of 100)")
    parser.add_argument("--json", default="benchmarks/results/driver_bytes.json")
    parser.add_argument("--child", choices=["driver", "workers"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.samples)
        return 0
    runs, digests = {}, {}
    with tempfile.TemporaryDirectory(prefix="driver-bytes-") as tmp:
        for mode in ("driver", "workers"):
            out = Path(tmp) / mode
            proc = subprocess.run([sys.executable, "-m", "benchmarks.driver_bytes", "--child", mode, "--out", str(out),
                                   "--samples", str(args.samples)], cwd=REPO, capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["driver_bytes_per_1000_samples"] = round(run["driver_bytes"] * 1000 / run["processed"])
            run["driver_bytes_per_shard"] = round(run["driver_bytes"] / run["shards"])
            runs[mode] = run
            digests[mode] = shard_digest(out)
            print(json.dumps(run))
    result = {"job": "jobs/shapes-demo.yaml", "samples": args.samples, "before": runs["driver"],
              "after": runs["workers"], "same_bytes": digests["driver"] == digests["workers"],
              "driver_bytes_ratio": round(runs["driver"]["driver_bytes"] / max(runs["workers"]["driver_bytes"], 1), 1),
              "images_per_s_ratio": round(runs["workers"]["images_per_s"] / runs["driver"]["images_per_s"], 3)}
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
