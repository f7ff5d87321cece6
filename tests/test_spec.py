"""Job spec: the shipped jobs load, overrides and paths resolve (bad input: tests/test_bad_input.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from conftest import REPO, TINY_JOB, write_job
from pipeline.cli import main
from pipeline.plan import ShardPlan
from pipeline.spec import JobSpec, SpecError, load_spec, validate_spec


def test_demo_job_loads_with_the_bundled_model_path():
    spec = load_spec(REPO / "jobs" / "shapes-demo.yaml")
    assert Path(spec.model.path) == REPO / "pipeline" / "models" / "shapes-tiny-sd"
    assert Path(spec.output.dir) == REPO / "out" / "shapes-demo"
    assert [c.name for c in spec.classes] == ["circle", "square", "triangle", "star", "ring", "cross"]
    assert all(len(c.attributes) == 6 for c in spec.classes)
    assert (spec.generation.height, spec.generation.width) == (64, 64)
    assert spec.samples == 300 and spec.output.shard_size == 100 and ShardPlan.from_spec(spec).num_shards == 3
    assert spec.model.device == "cpu" and spec.resources.synthesis.num_gpus == 0


def test_coco80_job_is_a_consistent_gpu_job():
    spec = load_spec(REPO / "jobs" / "coco80-sd15.yaml", check_files=False)
    assert spec.model.path.endswith("stable-diffusion-v1-5") and not Path(spec.model.path).is_absolute()
    assert len(spec.classes) == 80 and len({c.name for c in spec.classes}) == 80
    assert {"person", "traffic light", "toothbrush"} <= {c.name for c in spec.classes}
    assert (spec.generation.height, spec.generation.width) == (512, 512)
    assert spec.samples == 1_000_000 and ShardPlan.from_spec(spec).num_shards == 1000
    assert (spec.model.device, spec.model.dtype) == ("cuda", "float16")
    synth = spec.resources.synthesis
    assert synth.num_gpus == 1 and synth.actors == "auto"  # one actor per GPU of the cluster
    assert all(spec.resources.for_stage(s).num_gpus == 0 for s in ("sampling", "masks", "labels", "filters", "encode"))
    assert spec.output.shard_size % spec.generation.batch_size == 0


def test_samples_per_class_and_plain_string_classes(tmp_path, tiny_model):
    spec = load_spec(write_job(tmp_path, tiny_model, samples={"per_class": 3}, classes=["circle", "star"],
                               prompts={"templates": ["{objects}"], "max_classes_per_image": 1}))
    assert spec.samples == 6
    assert spec.classes[1].name == "star" and spec.classes[1].synonyms == []


def test_overrides_are_yaml_values_on_dotted_paths(job_file):
    spec = load_spec(job_file, ["generation.steps=7", "generation.guidance_scale=1.5", "masks.step_window=[0.2, 0.8]",
                                "classes.0.synonyms=[disc]", "filters.dedup_threshold=3"])
    assert spec.generation.steps == 7 and spec.generation.guidance_scale == 1.5
    assert spec.masks.step_window == (0.2, 0.8)
    assert spec.classes[0].synonyms == ["disc"] and spec.filters.dedup_threshold == 3


def test_relative_paths_follow_the_job_file_and_command_line_paths_the_cwd(tmp_path, tiny_model, monkeypatch):
    model_dir = Path(tiny_model)
    job = write_job(tmp_path / "jobs", os.path.relpath(model_dir, tmp_path / "jobs"), output={"dir": "../data/x"})
    monkeypatch.chdir(REPO)
    spec = load_spec(job)
    assert Path(spec.model.path) == model_dir.resolve()
    assert Path(spec.output.dir) == (tmp_path / "data" / "x").resolve()
    spec = load_spec(job, ["output.dir=rel/out"])
    assert Path(spec.output.dir) == REPO / "rel" / "out"
    assert Path(load_spec(job, out="other").output.dir) == REPO / "other"


def test_hub_ids_are_not_checked_on_disk(job_file):
    spec = load_spec(job_file, ["model.path=someorg/some-model"])
    assert spec.model.path == "someorg/some-model"


def test_fingerprint_ignores_location_and_resources_but_not_content():
    base = dict(TINY_JOB, model={"path": "org/m"})
    identity = {"source": "hub", "model": "org/m"}
    fp = validate_spec(base).fingerprint(identity)
    moved = dict(base, output={"dir": "/elsewhere", "shard_size": 4},
                 resources={"synthesis": {"num_cpus": 4, "actors": 3}})
    assert validate_spec(moved).fingerprint(identity) == fp
    assert validate_spec(dict(base, seed=4)).fingerprint(identity) != fp
    assert validate_spec(dict(base, generation=dict(base["generation"], batch_size=4),
                              output={"dir": "out", "shard_size": 4})).fingerprint(identity) != fp


def test_a_calibrated_job_keeps_its_fingerprint_when_the_repo_moves_but_not_when_thresholds_change(tmp_path):
    identity = {"source": "hub", "model": "org/m"}
    fps = []
    for where, thresholds in (("a", {"circle": 0.4}), ("b", {"circle": 0.4}), ("c", {"circle": 0.6})):
        folder = tmp_path / where
        (folder / "calibration").mkdir(parents=True)
        (folder / "calibration" / "t.json").write_text(json.dumps({"class_thresholds": thresholds}))
        job = dict(TINY_JOB, model={"path": "org/m"}, masks=dict(TINY_JOB["masks"], calibration="calibration/t.json"))
        (folder / "job.yaml").write_text(yaml.safe_dump(job))
        spec = load_spec(folder / "job.yaml")
        assert spec.masks.class_thresholds == thresholds
        fps.append(spec.fingerprint(identity))
    assert fps[0] == fps[1] != fps[2]


def test_validate_prints_a_summary(job_file, capsys):
    assert main(["validate", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert "16 samples of 4 classes in 4 shards of 4" in out


def test_the_spec_is_frozen():
    spec = validate_spec(dict(TINY_JOB, model={"path": "org/m"}))
    with pytest.raises(ValidationError, match="frozen"):
        spec.seed = 5
    assert spec.seed != 5
    assert isinstance(spec, JobSpec)
    assert yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))["samples"] == 16


def test_dedup_needs_a_single_filters_actor():
    data = dict(TINY_JOB, model={"path": "org/m"}, filters={"dedup_threshold": 2},
                resources={"filters": {"actors": 2}})
    with pytest.raises(SpecError, match="resources.filters.actors"):
        validate_spec(data)
    assert validate_spec(dict(data, resources={"filters": {"actors": 1}})).filters.dedup_threshold == 2
