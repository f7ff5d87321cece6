"""The driver's side of a 10^8-sample job, simulated: 10^5 shard commits through the real writer and journal.

    python -m benchmarks.commit_scale --json benchmarks/results/commit_scale.json

No stage runs: each shard's tar and index part are written under their staging names as a worker would
(a few bytes of tar; a one-row part, the same for every shard), then committed by the driver exactly as in
a run (``DatasetWriter.commit_staged``: two renames and one fsync'd journal line). Reported: time per commit
over the first and the last 10 % of commits (median), the driver's RSS at the start and the end of the
commits, the finish (the manifest folding the journal; ``output.index: false``, as a job this size runs), the
time ``output.index: true`` adds (index.parquet streamed from the parts), and ``synthgen status`` on the
finished dir (a fresh process, as a user runs it), on a local disk.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, run_header, write_result


def rss_mb() -> float:
    """Resident set size of this process now (MB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def simulate(out: Path, shards: int, shard_size: int) -> dict:
    from pipeline.dataset import INDEX, INDEX_SCHEMA, commit_record, index_row, index_table, index_tables
    from pipeline.plan import ShardPlan
    from pipeline.storage import parquet_bytes, staging, write_file, write_parquet
    from pipeline.writer import DatasetWriter, Origin

    plan = ShardPlan("train", shard_size, shards * shard_size, 8)
    job = {"name": "sim", "classes": [{"name": "thing"}], "output": {"index": False}}  # parts/ is the index
    writer = DatasetWriter(out, plan, Origin("sim" * 16, {"source": "simulated"}, job))
    writer.open()
    row = {"key": "sim-000000000", "index": 0, "seed": 0, "prompt": "a thing", "class_names": '["thing"]',
           "keep": True, "reject_reason": "", "scores": "", "curriculum": "", "json": b""}
    part = parquet_bytes(index_table([index_row(row, "train-000000.tar", {1: "thing"})]))
    tar = b"simulated shard\n"
    keep = [True] * shard_size
    reasons = [""] * shard_size
    times, rss = [], {"start": rss_mb()}
    for k in range(shards):
        write_file(staging(out / plan.tar(k)), tar)  # the worker's side
        write_file(staging(out / plan.part(k)), part)
        record = commit_record(out, plan, k, keep, reasons, {"tar": {"bytes": len(tar), "sha256": "0" * 64},
                                                               "part": {"bytes": len(part), "sha256": "1" * 64}})
        t0 = time.perf_counter()
        writer.commit_staged(k, record)  # the driver's side: publish, journal line (fsync), bookkeeping
        times.append(time.perf_counter() - t0)
        if k == shards // 10:
            rss["after_10pct"] = rss_mb()
    rss["end"] = rss_mb()
    tenth = max(1, shards // 10)
    first, last = statistics.median(times[:tenth]), statistics.median(times[-tenth:])
    t0 = time.perf_counter()
    writer.finish({"processed": shards * shard_size, "simulated": True})
    finish_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # what output.index: true adds to the finish: index.parquet streamed from the parts
    write_parquet(index_tables(out, [plan.part(k) for k in range(shards)]), out / INDEX, INDEX_SCHEMA)
    index_s = time.perf_counter() - t0
    return {"shards": shards, "shard_size": shard_size, "samples": shards * shard_size,
            "commit_ms": {"first_10pct_median": round(first * 1e3, 3), "last_10pct_median": round(last * 1e3, 3),
                          "ratio_last_to_first": round(last / first, 2), "mean": round(statistics.mean(times) * 1e3, 3)},
            "driver_rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "rss_growth_mb": round(rss["end"] - rss["after_10pct"], 1),
            "commits_s": round(sum(times), 1), "finish_s": round(finish_s, 2), "index_parquet_s": round(index_s, 2),
            "manifest_mb": round((out / "manifest.json").stat().st_size / 2**20, 1),
            "index_mb": round((out / "index.parquet").stat().st_size / 2**20, 1)}


def status_seconds(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out)], check=True, capture_output=True,
                   cwd=REPO)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=REPO / "out", help="where the simulated output dir goes (a "
                        "folder on the disk to measure; removed afterwards)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="commit-scale-", dir=args.dir))
    try:
        result = run_header("benchmarks.commit_scale", argv)
        result.update(simulate(work / "out", args.shards, args.shard_size))
        result["status_s"] = round(status_seconds(work / "out"), 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(result)
    if args.json:
        write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
