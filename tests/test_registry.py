"""The stage registry: the resources section derives from it, stages see only what they declare, and
adding a stage is one module plus one registration line (tests/example_stage.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, TINY_JOB, write_job
from pipeline.spec import JobSpec, SpecError, validate_spec
from stages import registry
from stages.base import CONTEXT, Stage


def test_resources_and_stage_classes_derive_from_the_registry():
    names = registry.stage_names()
    resources = JobSpec.model_fields["resources"].annotation
    assert tuple(resources.model_fields) == names
    assert [cls.name for cls in registry.load_stages()] == list(names)
    job = dict(TINY_JOB, model={"path": "org/m"}, output={"dir": "out"})
    with pytest.raises(SpecError, match=r"resources\.dedup: unknown key; allowed keys here: sampling, synthesis"):
        validate_spec(dict(job, resources={"dedup": {"num_cpus": 1}}))
    gpu = [e.name for e in registry.STAGES if e.gpu]
    with pytest.raises(SpecError, match=f"resources.masks.num_gpus: only the {gpu[0]} stage uses a GPU"):
        validate_spec(dict(job, resources={"masks": {"num_gpus": 1}}))


def test_a_stage_sees_only_the_sections_it_reads():
    spec = validate_spec(dict(TINY_JOB, model={"path": "org/m"}, output={"dir": "out"}))

    class Probe(Stage):
        name = "probe"
        reads = ("filters",)

    seen = vars(Probe(spec).spec)
    assert set(seen) == {"filters", *CONTEXT}
    assert seen["filters"] is spec.filters and seen["shard_size"] == spec.output.shard_size
    assert not hasattr(Probe(spec).spec, "generation")


def test_the_example_stage_rejects_dark_images():
    from example_stage import Darkness

    images = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8, 3), np.uint8)])
    batch = {"image": images, "keep": np.array([True, True, False]), "reject_reason": np.array(["", "", "low_contrast"])}
    out = Darkness(object())(batch)
    assert out["keep"].tolist() == [False, True, False]
    assert out["reject_reason"].tolist() == ["dark", "", "low_contrast"]  # an earlier verdict is kept


def test_adding_a_stage_is_one_module_and_one_registration_line(tmp_path, tiny_model):
    """In a fresh interpreter: the registration line, then a job that gives the new stage resources
    and runs through it; its verdicts reach the index and the shards."""
    job = write_job(tmp_path, tiny_model, samples=4, output={"dir": str(tmp_path / "out"), "shard_size": 2},
                    resources={name: {"num_cpus": 0.5} for name in (*registry.stage_names(), "darkness")})
    script = textwrap.dedent(f"""
        from stages import registry
        registry.STAGES = registry.STAGES[:-1] + (registry.Entry("darkness", "example_stage:Darkness"),
                                                  registry.STAGES[-1])
        import example_stage
        example_stage.Darkness.limit = 256.0  # every image is "dark" (the tiny model's are not)
        from pipeline.runner import run_job
        from pipeline.spec import load_spec
        summary = run_job(load_spec({str(job)!r}), use_ray=False, progress=False)
        print([s["name"] for s in summary["stages"]], summary["rejected_by_reason"])
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "['sampling', 'synthesis', 'masks', 'labels', 'filters', 'darkness', 'encode'] {'dark': 4}")
    index = pq.read_table(tmp_path / "out" / "index.parquet")
    assert index.column("reject_reason").to_pylist() == ["dark"] * 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["job"]["resources"]["darkness"] == {"num_cpus": 0.5, "num_gpus": 0.0, "actors": 1}
    assert manifest["counts"]["samples"] == 0 and manifest["counts"]["indices"] == 4
