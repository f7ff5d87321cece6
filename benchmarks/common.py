"""What the benchmarks share: the repository root and "generate a job once into a cache dir named by
its fingerprint" (a rerun of the same job, overrides and model reuses the finished output)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.dataset import INDEX, OutputError, read_manifest
from pipeline.spec import JobSpec, UsageError, load_spec

REPO = Path(__file__).resolve().parents[1]


class MethodTimer:
    """Wall time spent inside some methods of a class, timed in place by wrapping them on the class: a
    component's own work inside a larger call, which (unlike two processes' wall clocks) does not move with
    the machine's load. ``seconds`` accumulates until reset."""

    def __init__(self, cls: type, names: Sequence[str]):
        self.seconds = 0.0
        for name in names:
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def run_header(module: str, argv: Sequence[str] | None) -> dict:
    """What every capture benchmark's JSON starts with: the command that reproduces it, the date, and the
    machine with its load averages at the start (times on a shared machine move with them)."""
    return {"command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpu_count": os.cpu_count(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}}


def write_result(path: str | Path, result: dict, indent: int = 2) -> None:
    """Write a benchmark's result JSON (folders made as needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")
    print(f"wrote {path}")


def checked(run: Callable, *args):
    """``run(*args)``, or None after printing a UsageError as one line (the caller exits 2)."""
    try:
        return run(*args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def finished(out: Path, samples: int | None = None) -> bool:
    """Whether ``out`` is a complete synthgen output dir (every shard committed, index written), of ``samples``
    samples if given (the fingerprint leaves the count out: a rerun with another count resizes the dir)."""
    try:
        manifest = read_manifest(out)
        return bool(manifest.get("complete")) and (out / INDEX).is_file() and \
            samples in (None, manifest["layout"]["samples"])
    except OutputError:  # no (readable) manifest yet
        return False


@dataclass
class Generated:
    out: Path  # cache_root / "<job name>-<first 12 hex digits of the job's fingerprint>"
    spec: JobSpec  # the job as run (output.dir = out)
    reused: bool  # the dir was already complete: nothing was generated
    wall_s: float  # seconds this call spent (0 when reused)


def generate_cached(job: str | Path, overrides: Sequence[str], cache_root: Path, progress: bool = True) -> Generated:
    """Run ``job`` (with ``overrides``) in-process into ``cache_root/<name>-<fingerprint[:12]>``, unless that
    dir is already complete. The fingerprint is the job's own (``JobPlan.fingerprint``): every field
    that changes the samples, and the model by content."""
    from pipeline.jobplan import JobPlan
    from pipeline.runner import run_job

    spec = load_spec(job, list(overrides), out=str(cache_root / "pending"))
    out = cache_root / f"{spec.name}-{JobPlan(spec).fingerprint[:12]}"
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(out)})})
    if finished(out, spec.samples):
        return Generated(out, spec, True, 0.0)
    print(f"generating {spec.samples} samples of {job} into {out} (in-process; a finished run is reused)", flush=True)
    t0 = time.perf_counter()
    run_job(spec, use_ray=False, progress=progress)
    return Generated(out, spec, False, time.perf_counter() - t0)


def code_digest(*paths: str | Path) -> str:
    """Short sha256 over some source files' bytes (relative to the repository root): part of a cached
    result's key, so that a change to the code that produced it invalidates it."""
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode() + b"\0" + (REPO / path).read_bytes())
    return h.hexdigest()[:12]


def cached_path(folder: Path, key: dict) -> Path:
    """Where ``cached_run`` keeps the result for ``key``."""
    return folder / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"


def cached_run(folder: Path, key: dict, run: Callable[[], dict]) -> tuple[dict, bool]:
    """``run()``'s result, stored as ``folder/<sha256 of key>.json`` (with the key beside it) when it
    finishes and reused from there by a later call with an equal key: a benchmark killed or rerun with
    one setting changed retrains only what that setting touches. Returns (result, reused). ``key``
    must hold everything the result depends on (settings, data dirs, a ``code_digest``)."""
    path = cached_path(folder, key)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored["result"], True
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "date": time.strftime("%Y-%m-%d"), "result": result}) + "\n")
    os.replace(tmp, path)
    return result, False
