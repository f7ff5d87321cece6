"""Run a job: check the output dir and the cluster, stream records into the writer, summarise."""
from __future__ import annotations

import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tqdm import tqdm

from stages.base import Batch, Stage

from . import errors
from .errors import transient
from .graph import TIME_PREFIX, ResourceError, init_ray, run_in_process, run_ray, run_ray_shards
from .jobplan import JobPlan
from .preflight import check_hub_reachable
from .spec import JobSpec
from .storage import RemotePath
from .writer import COLUMNS, DatasetWriter, storage_error


class RunStats:
    """Per-stage rows and busy seconds, and kept/rejected counts, accumulated over record batches."""

    def __init__(self, plan: JobPlan, stages: Sequence[type[Stage]]):
        self.plan = plan
        self.stages = list(stages)
        self.rows = Counter()
        self.busy = Counter()
        self.reasons: Counter = Counter()
        self.processed = self.kept = self.redraws = 0
        self.first_batch_s: float | None = None

    def add(self, batch: Batch) -> None:
        n = len(batch["index"])
        self.processed += n
        keep = np.asarray(batch["keep"], dtype=bool)
        self.kept += int(keep.sum())
        self.reasons.update(str(r) for r in np.asarray(batch["reject_reason"])[~keep])
        if "scores" in batch:
            from stages.redraw import redraws_of

            self.redraws += sum(redraws_of(s) for s in batch["scores"])
        for cls in self.stages:
            column = TIME_PREFIX + cls.name
            if column in batch:
                self.rows[cls.name] += n
                self.busy[cls.name] += float(np.sum(batch[column]))

    def add_shard(self, stats: dict) -> None:
        """A shard a worker wrote: its counts and per-stage busy seconds (no records reach the driver)."""
        self.processed += stats["processed"]
        self.kept += stats["kept"]
        self.reasons.update(stats["reasons"])
        self.redraws += stats.get("redraws", 0)
        for name, rows in stats["rows"].items():
            self.rows[name] += rows
            self.busy[name] += stats["busy"][name]

    def summary(self, runner: str, started: datetime, wall_s: float, writer: DatasetWriter) -> dict[str, Any]:
        stages = []
        op_of = {cls: op for op in (self.plan.operators if self.stages else ()) for cls in op.stages}
        ray = runner == "ray"  # in-process: one worker, no Ray operator, no reservations
        for cls in self.stages:
            op = op_of[cls]
            busy = self.busy[cls.name]
            stages.append({
                "name": cls.name, "kind": op.kind if ray else "in-process",
                "operator": op.name if ray else None, "workers": op.actors if ray else 1,
                "num_cpus": op.num_cpus if ray else None, "num_gpus": op.num_gpus if ray else None,
                "rows": self.rows[cls.name],
                "busy_s": round(busy, 3),
                "rows_per_busy_s": round(self.rows[cls.name] / busy, 2) if busy > 0 else None,
            })
        return {
            "runner": runner, "started": started.isoformat(timespec="seconds"), "wall_s": round(wall_s, 2),
            "processed": self.processed, "kept": self.kept, "rejected": self.processed - self.kept,
            "rejected_by_reason": dict(sorted(self.reasons.items())), "redraws": self.redraws,
            "images_per_s": round(self.processed / wall_s, 3) if wall_s > 0 else None,
            "first_batch_s": None if self.first_batch_s is None else round(self.first_batch_s, 2),
            "shards_written": writer.written, "shards_complete": len(writer.committed),
            "shards_total": writer.plan.num_shards, "dataset": writer.counts(), "stages": stages,
            "redone": writer.redo, "left_alone": writer.foreign,
        }


def prepare(job: JobSpec | JobPlan, overwrite: bool = False, verify: bool = False,
            adopt: bool = False) -> DatasetWriter:
    """The writer for the job's output dir, checked against the job (raises OutputError); writes nothing.

    ``verify`` also compares every committed shard's sha256 (sizes are always compared); ``adopt``
    starts a fresh manifest in a directory without one (``synthgen repair``)."""
    plan = job if isinstance(job, JobPlan) else JobPlan(job)
    return DatasetWriter(plan.spec.output.dir, plan.shards, plan.origin, overwrite, verify, adopt)


def payload_bytes(batch: Batch) -> int:
    """Bytes of a record batch's values (sample bytes, strings, numbers): what the driver receives."""
    total = 0
    for value in batch.values():
        arr = np.asarray(value)
        total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in arr.ravel()) if arr.dtype == object \
            else arr.nbytes
    return total


def workers_write(mode: str, writer: DatasetWriter) -> bool:
    """Whether the Ray runner writes shards on the workers (``mode`` "workers"), in the driver ("driver"),
    or ("auto") on the workers when every node sees the output: an object-store / remote URI, or a
    one-node cluster (a local path on a multi-node cluster may be one node's disk: the driver writes)."""
    if mode in ("workers", "driver"):
        return mode == "workers"
    if isinstance(writer.out, RemotePath):
        return True
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


def check_local_device(spec: JobSpec) -> None:
    """Without Ray the synthesis runs in this process: a job that names a CUDA device needs one here
    (with Ray, the synthesis actors' ``num_gpus`` are checked against the cluster instead)."""
    if spec.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ResourceError("model.device: cuda, but this machine has no GPU that torch can use and --no-ray runs "
                                "the synthesis here; set model.device: auto (or cpu), or run with Ray on a cluster "
                                "with GPUs")


def recover(writer: DatasetWriter, e: BaseException, at_s: float) -> dict:
    """After a failure of the cluster's: drop what the writer holds of shards not yet committed (they are
    generated again, to the same bytes: batches are aligned to shards) and return the recovery's record."""
    writer.buffers.clear()
    writer.note_recovery()
    name, message = errors.summary(e)
    return {"at_s": round(at_s, 1), "error": f"{name}: {message}"[:300], "committed": len(writer.committed)}


def settle_batch_size(spec: JobSpec, use_ray: bool, address: str | None, wait_s: float, verbose: bool,
                      stages: Sequence[type[Stage]] | None, progress: bool, overwrite: bool,
                      verify: bool) -> tuple[JobSpec, dict, bool]:
    """``generation.batch_size: auto`` made a number (pipeline/batch_size.py): (the spec, what decided it, whether
    Ray was started for the measuring task). The output dir is checked first, as the job stands (auto)."""
    from .batch_size import describe, settle

    started = []
    if not use_ray:
        check_local_device(spec)

    def start_ray(probe: JobSpec) -> None:
        started.append(init_ray(JobPlan(probe, stages=stages), address, wait_s, verbose))

    try:
        spec, note = settle(spec, use_ray, start_ray, before=lambda: prepare(JobPlan(spec, stages=stages),
                                                                               overwrite, verify))
    except BaseException:
        if any(started):
            import ray

            ray.shutdown()
        raise
    if progress:
        print(f"{spec.name}: {describe(note)}", file=sys.stderr)
    return spec, note, any(started)


def run_job(spec: JobSpec, *, overwrite: bool = False, verify: bool = False, use_ray: bool = True,
            address: str | None = None,
            resource_wait_s: float = 0.0, verbose: bool = False, progress: bool = True,
            stages: Sequence[type[Stage]] | None = None, writer_mode: str = "auto",
            on_progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Generate every sample of the job that is not yet committed in its output dir; returns the summary.

    Raises OutputError / ResourceError (before anything is written) when the output dir or the
    cluster does not fit the job. With Ray, a failure of the cluster's (a lost node, actor, worker or
    object: :func:`pipeline.errors.transient`) is recovered from up to ``spec.retries`` times, as a rerun
    would: what is committed stays, the pipeline is rebuilt over the pending shards (actor pools then
    elastic); each recovery is one line on stderr and an entry of the summary's ``recoveries``. A job with
    nothing to generate imports no stage (no torch) and starts no Ray: its summary lists no stages.
    ``writer_mode`` (Ray runner): where shards are written,
    "workers", "driver" or "auto" (:func:`workers_write`); the summary says which (``writer``) and how many
    bytes of records or commit records the driver received (``driver_bytes``). ``on_progress`` (for timing:
    benchmarks/throughput.py) is called as each unit reaches the driver, with its kind ("shard": a shard the
    workers committed; "batch": a record batch) and its rows, and once with ("ready", 0) when the runner
    (Ray included) is up and generation starts.
    """
    owns_ray, settled = False, None
    if spec.generation.batch_size == "auto":  # measured where the synthesis runs, or taken from the manifest
        spec, settled, owns_ray = settle_batch_size(spec, use_ray, address, resource_wait_s, verbose, stages,
                                                   progress, overwrite, verify)
    plan = JobPlan(spec, stages=stages)
    writer = prepare(plan, overwrite, verify)
    if writer.resize_note() and progress:
        print(f"{spec.name}: {writer.resize_note()}", file=sys.stderr)
    work = len(writer.pending_shards()) > 0
    stages = plan.stages if work else ()  # a run with nothing to do imports no stage
    # checks come before open(), which writes
    if work and plan.identity.get("source") == "hub":
        check_hub_reachable(spec.model.path)
    if work and not use_ray:
        check_local_device(spec)
    owns_ray = bool(work and use_ray and init_ray(plan, address, resource_wait_s, verbose)) or owns_ray
    opened = False
    try:
        pending = writer.open()
        opened = True
        stats = RunStats(plan, stages)
        started, t0 = datetime.now(timezone.utc), time.perf_counter()
        on_workers = use_ray and len(pending) > 0 and workers_write(writer_mode, writer)
        received = 0
        total = writer.plan.count(pending)
        recoveries: list[dict] = []
        if on_progress is not None:
            on_progress("ready", 0)
        if progress and on_workers:
            print(f"{spec.name}: {total} samples in {len(pending)} shards; the workers load the model, then the bar "
                  f"moves as each shard commits", file=sys.stderr)

        def stream(pending: np.ndarray, bar: tqdm) -> None:
            """Generate and commit the pending shards: one attempt of the pipeline."""
            nonlocal received
            elastic = bool(recoveries)  # after a loss: pools of 1 to `actors`, growing as nodes come back
            if on_workers:  # the driver receives commit records only and journals them
                try:
                    for result in run_ray_shards(plan, pending, writer.shared_location, writer.categories, COLUMNS,
                                                 verbose=verbose, elastic=elastic):
                        errors.check_terminated()
                        if stats.first_batch_s is None:
                            stats.first_batch_s = time.perf_counter() - t0
                        received += len(pickle.dumps(result))
                        stats.add_shard(result["stats"])
                        writer.commit_staged(result["k"], result["record"])
                        if on_progress is not None:
                            on_progress("shard", result["stats"]["processed"])
                        bar.update(result["stats"]["processed"])
                        bar.set_postfix(kept=f"{100 * stats.kept / max(stats.processed, 1):.0f}%",
                                        shards=f"{len(writer.committed)}/{writer.plan.num_shards}")
                except OSError as e:
                    raise storage_error(writer.out, e, "writing shards on the workers") from None
                return
            records = run_ray(plan, pending, COLUMNS, verbose=verbose, elastic=elastic) if use_ray else \
                run_in_process(plan, pending)
            for batch in records:
                errors.check_terminated()
                if stats.first_batch_s is None:
                    stats.first_batch_s = time.perf_counter() - t0
                received += payload_bytes(batch)
                if on_progress is not None:
                    on_progress("batch", len(batch["index"]))
                stats.add(batch)
                writer.add(batch)
                bar.update(len(batch["index"]))
                bar.set_postfix(kept=f"{100 * stats.kept / max(stats.processed, 1):.0f}%",
                                shards=f"{len(writer.committed)}/{writer.plan.num_shards}")

        with tqdm(total=total, unit="img", disable=not (progress and work), desc=spec.name, dynamic_ncols=True) as bar:
            while True:
                try:
                    stream(pending, bar)
                    break
                except Exception as e:  # noqa: BLE001 - re-raised unless it is the cluster's and retries are left
                    stalled = bool(recoveries) and recoveries[-1]["committed"] == len(writer.committed)
                    if not (use_ray and transient(e)) or len(recoveries) >= spec.retries or stalled:
                        raise  # the job's own error, the retries spent, or the same loss again before any commit
                    recoveries.append(recover(writer, e, time.perf_counter() - t0))
                    pending = writer.pending_shards()
                    bar.n = total - writer.plan.count(pending)  # the bar counts committed samples again
                    bar.refresh()
                    print(f"{spec.name}: recovery {len(recoveries)} of {spec.retries} after "
                          f"{recoveries[-1]['error'][:200]}; {recoveries[-1]['committed']} shards committed, "
                          f"{len(pending)} to go", file=sys.stderr)
        errors.check_terminated()
        runner = ("ray" if use_ray else "in-process") if work else "none"  # nothing to do starts no Ray
        summary = stats.summary(runner, started, time.perf_counter() - t0, writer)
        summary["writer"] = "workers" if on_workers else "driver"
        summary["driver_bytes"] = received
        summary["recoveries"] = recoveries
        if settled is not None:
            summary["batch_size_auto"] = settled
        writer.finish(summary)
        return summary
    except BaseException:
        if opened:
            writer.abandon()  # nothing committed: no manifest of a dataset that was never made
        raise
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
