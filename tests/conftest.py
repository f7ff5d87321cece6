"""Shared fixtures: the bundled tiny model (or, before training has exported it, a random-weight
model with the same architecture built into a temporary folder), tiny job files, and one small
dataset generated in-process and shared by the tests that read output back."""
from __future__ import annotations

import copy
import hashlib
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.shapes.tiny_sd import BUNDLED_MODEL, build_random

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]

#: 16 samples in 4 shards of 4, batches of 2, 4 DDIM steps at 64x64: a few seconds on a CPU
TINY_JOB = {
    "name": "tiny",
    "seed": 3,
    "model": {"path": None, "dtype": "float32", "device": "cpu"},
    "classes": [{"name": n, "attributes": COLOURS} for n in ("circle", "square", "triangle", "star")],
    "prompts": {"templates": ["{objects} on noise", "{objects} on stripes"], "max_classes_per_image": 2},
    "samples": 16,
    "generation": {"steps": 4, "guidance_scale": 4.0, "height": 64, "width": 64, "batch_size": 2,
                   "scheduler": "ddim"},
    "masks": {"capture_resolutions": [16, 8]},
    "filters": {"min_area_fraction": 0.002, "max_area_fraction": 0.95, "min_contrast": 0.15,
                "dedup_threshold": None},
    "output": {"dir": "out", "shard_size": 4},
    "resources": {name: {"num_cpus": 0.5} for name in
                  ("sampling", "synthesis", "masks", "labels", "filters", "encode")},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a Stable Diffusion 1.x-layout folder: the bundled model when present."""
    if (Path(BUNDLED_MODEL) / "model_index.json").is_file():
        return str(BUNDLED_MODEL)
    return str(build_random(tmp_path_factory.mktemp("models") / "random-tiny-sd"))


def write_job(directory: Path, model_path: str, name: str = "job.yaml", **sections) -> Path:
    """Write TINY_JOB (model path filled in, top-level ``sections`` merged one level deep) to a file."""
    job = copy.deepcopy(TINY_JOB)
    job["model"]["path"] = model_path
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key].update(value)
        else:
            job[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """Model digests cached in this module's folder (not the user's ~/.cache); the process memo starts empty."""
    from stages import identity

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(identity, "_memory", {})
        yield


@pytest.fixture
def job_file(tmp_path, tiny_model) -> Path:
    return write_job(tmp_path, tiny_model)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, tiny_model) -> SimpleNamespace:
    """The tiny job generated once, in-process: ``.job`` (file), ``.spec``, ``.out``, ``.summary``."""
    from pipeline.runner import run_job
    from pipeline.spec import load_spec

    job = write_job(tmp_path_factory.mktemp("dataset"), tiny_model)
    spec = load_spec(job)
    summary = run_job(spec, use_ray=False, progress=False)
    return SimpleNamespace(job=job, spec=spec, out=Path(spec.output.dir), summary=summary)


def member_hashes(out: Path) -> dict[str, str]:
    """{member name: sha256} over every committed shard of an output dir."""
    from pipeline.dataset import read_manifest

    hashes = {}
    for tar_path in (out / s["tar"] for s in read_manifest(out)["shards"]):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                hashes[member.name] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return hashes


def assert_same_dataset(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"]
    assert member_hashes(a) == member_hashes(b)
    assert [(s["name"], s["sha256"], s["samples"]) for s in ma["shards"]] == \
           [(s["name"], s["sha256"], s["samples"]) for s in mb["shards"]]
    assert pq.read_table(a / "index.parquet").equals(pq.read_table(b / "index.parquet"))
