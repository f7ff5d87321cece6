"""``generation.batch_size: auto``: the most images per pipeline call that fit the synthesis device's free memory.

Measured once per job, at the start of its first run (:func:`settle`), where the synthesis runs: in a Ray task
holding one synthesis worker's resources (``resources.synthesis``: its GPU share), or in this process for
``--no-ray`` and ``synthgen eval``. The synthesis stage is built there as a worker builds it (model, capture,
judge) and draws the job's own first samples, one, then one, then two per call; the peak memory of the last two
calls above what the loaded stage holds gives a part per image and a fixed part (:func:`measure`):

    batch = the largest divisor of output.shard_size <= min(MAX_AUTO, (HEADROOM x free - fixed) / per_image)

``free``: on CUDA the device's free memory once the model is loaded (``torch.cuda.mem_get_info``) times the
worker's GPU share, the peaks from ``torch.cuda.max_memory_allocated``; on CPU the machine's available memory
(``/proc/meminfo``, within the cgroup's limit) shared by the synthesis workers, the peaks from the process's peak
resident size (``VmHWM``, reset through ``/proc/self/clear_refs`` once glibc's ``malloc_trim`` has given the freed
heap back). A batch must divide the shard size: shards hold whole batches, so a resumed run batches samples as an
uninterrupted one.

The number is written into the job's spec, so it is recorded in the manifest like any batch size and is part
of the fingerprint (the batch size changes the bytes). A later run of the same job over that output dir takes
it from the manifest instead of measuring again (:func:`recorded`): where a resumed run lands never changes the
batches or the bytes.
"""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any

from .spec import JobSpec, SpecError

#: at most this many images per call: beyond it a GPU gains little and a failed call loses more
MAX_AUTO = 64
#: the share of the free memory a batch may take (the allocator's fragmentation, other processes)
HEADROOM = 0.85
#: a measured per-image memory below this is read as this (allocator reuse can hide a small model's growth)
MIN_PER_IMAGE = 1 << 20


def with_batch_size(spec: JobSpec, batch_size: int) -> JobSpec:
    """A copy of ``spec`` with ``generation.batch_size`` set (``model_copy`` keeps its private load-time state)."""
    return spec.model_copy(update={"generation": spec.generation.model_copy(update={"batch_size": batch_size})})


def fits(free: float, fixed: float, per_image: float) -> int:
    """How many images one call can hold in ``HEADROOM`` of ``free`` bytes (0 when not even one)."""
    return max(0, math.floor((HEADROOM * free - fixed) / max(per_image, MIN_PER_IMAGE)))


def fit(free: float, fixed: float, per_image: float, shard_size: int) -> int:
    """The largest divisor of ``shard_size`` that is at most MAX_AUTO and whose calls fit ``free`` bytes
    (``HEADROOM`` of them), or 0 when not even one image fits."""
    most = min(MAX_AUTO, fits(free, fixed, per_image))
    return max((d for d in range(1, most + 1) if shard_size % d == 0), default=0)


def available_memory() -> int:
    """Bytes this machine can still give (``MemAvailable``), within its cgroup's memory limit where it has one."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    free = int(fields["MemAvailable"].split()[0]) * 1024
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


class _Peak:
    """Peak memory of a call above the memory held before it: CUDA allocations, or this process's resident size."""

    def __init__(self, device: Any):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.device = device

    def __call__(self, call) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            held = torch.cuda.memory_allocated(self.device)
            call()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - held
        _trim()  # freed heap back to the system: a call's growth shows in the resident size, not reused holes
        held = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from the current one
        call()
        return _status("VmHWM") - held

    def free(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            return torch.cuda.mem_get_info(self.device)[0]
        return available_memory()


def _trim() -> None:
    """glibc's ``malloc_trim(0)``: return the heap's free memory to the system (nothing where libc lacks it)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(spec: JobSpec, workers_per_machine: int | None = None) -> dict[str, Any]:
    """Build the synthesis stage as a worker does (its torch threads too) and measure it (module docstring); the
    measurement and the batch size it gives (``batch_size``; 0: not even one image fits). On CPU the machine's
    memory is shared by ``workers_per_machine`` synthesis workers (default: the job's synthesis actors)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.synthesis.num_cpus)))  # as pipeline/graph.py's TimedStage
    try:
        return _measure(spec, workers_per_machine)
    finally:
        torch.set_num_threads(threads)


def _measure(spec: JobSpec, workers_per_machine: int | None) -> dict[str, Any]:
    import numpy as np

    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    started = time.perf_counter()
    probe = with_batch_size(spec, 1)
    sampling, stage = SamplingStage(probe), SynthesisStage(probe)
    peak = _Peak(stage.pipe.device)
    rows = sampling({"index": np.arange(2, dtype=np.int64)})
    one = {k: np.asarray(v)[:1] for k, v in rows.items()}
    stage.draw(one)  # warm-up: lazy allocations, kernels chosen, caches filled
    p1, p2 = peak(lambda: stage.draw(one)), peak(lambda: stage.draw(rows))
    per_image = max(p2 - p1, 0)
    fixed = max(p1 - per_image, 0)
    synth = spec.resources.synthesis
    if peak.cuda:  # the worker's share of its GPU (num_gpus 0.5: two workers per GPU)
        share, device = min(synth.num_gpus, 1.0) if synth.num_gpus > 0 else 1.0, "cuda"
    else:  # the synthesis workers of one machine share its memory
        workers = workers_per_machine or (synth.actors if isinstance(synth.actors, int) else 1)
        share, device = 1.0 / workers, "cpu"
    free = peak.free() * share
    del stage, sampling  # the synthesis that follows loads its own: give this one's memory back
    gc.collect()
    if peak.cuda:
        import torch

        torch.cuda.empty_cache()
    return {"batch_size": fit(free, fixed, per_image, spec.output.shard_size), "device": device,
            "free_bytes": int(free), "share": round(share, 4), "fixed_bytes": int(fixed),
            "per_image_bytes": int(per_image), "fits": fits(free, fixed, per_image),
            "measure_s": round(time.perf_counter() - started, 2)}


def recorded(spec: JobSpec) -> int | None:
    """The batch size an earlier run of this job (``batch_size: auto``) measured and recorded in the output dir's
    manifest, when that manifest is this job's (same fingerprint with that number); None otherwise."""
    from .dataset import load_manifest
    from .jobplan import JobPlan
    from .storage import location

    try:
        manifest = load_manifest(location(spec.output.dir))
    except Exception:  # noqa: BLE001 -- an unreadable dir is the writer's to report, with its own message
        return None
    size = (((manifest or {}).get("job") or {}).get("generation") or {}).get("batch_size")
    if not isinstance(size, int) or size < 1 or spec.output.shard_size % size:
        return None
    return size if JobPlan(with_batch_size(spec, size)).fingerprint == manifest.get("fingerprint") else None


def settle(spec: JobSpec, use_ray: bool, start_ray=None, before=None) -> tuple[JobSpec, dict[str, Any] | None]:
    """``spec`` with a number for ``batch_size: auto`` (and what decided it), or as it is. ``before()`` runs before
    a measurement (the runner's output-dir check: bad input fails before the model loads); ``start_ray(spec)``
    brings Ray up for the measuring task."""
    if spec.generation.batch_size != "auto":
        return spec, None
    size = recorded(spec)
    if size is not None:
        return with_batch_size(spec, size), {"batch_size": size, "from": "manifest"}
    if before is not None:
        before()
    if use_ray:
        import ray

        if start_ray is not None:
            start_ray(with_batch_size(spec, 1))
        synth = spec.resources.synthesis
        # max_calls=1: the worker process exits after it, so no idle process keeps the model or a CUDA context
        task = ray.remote(num_cpus=synth.num_cpus, num_gpus=synth.num_gpus, max_retries=0, max_calls=1)(measure)
        found = ray.get(task.remote(spec))
    else:  # one synthesis in this process
        found = measure(spec, workers_per_machine=1)
    found["from"] = "measured"
    if found["batch_size"] < 1:
        gib = 1 << 30
        raise SpecError(f"generation.batch_size: auto, but one image needs {found['per_image_bytes'] / gib:.2f} GiB "
                        f"beyond the model ({found['fixed_bytes'] / gib:.2f} GiB fixed) and the {found['device']} "
                        f"has {found['free_bytes'] / gib:.2f} GiB free; lower generation.height / width, set a "
                        "batch_size, or use a device with more memory")
    return with_batch_size(spec, found["batch_size"]), found


def describe(note: dict[str, Any] | None) -> str:
    """One line for the terminal about a settled ``batch_size: auto``."""
    if note is None:
        return ""
    if note["from"] == "manifest":
        return f"generation.batch_size auto: {note['batch_size']}, as this output dir's first run measured"
    mib = 1 << 20
    share = "" if note["share"] == 1 else f" (this worker's {note['share']:g} of the {note['device']}'s)"
    most = min(note["fits"], MAX_AUTO)
    line = (f"generation.batch_size auto: {note['batch_size']}, the largest divisor of output.shard_size up to "
            f"{most} (memory fits {note['fits']} at {note['per_image_bytes'] / mib:.0f} MiB per "
            f"image + {note['fixed_bytes'] / mib:.0f} MiB, of {note['free_bytes'] / mib:.0f} MiB free{share} on "
            f"{note['device']}; at most {MAX_AUTO}); measured in {note['measure_s']} s")
    if note["batch_size"] * 2 <= most:
        line += (f"; a shard size with a larger divisor (e.g. a multiple of {most}) would "
                 "batch more per call")
    return line
