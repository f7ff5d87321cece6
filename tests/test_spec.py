"""Job spec: the shipped jobs load, overrides and paths resolve, bad input is one clear line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_JOB, write_job
from pipeline.cli import main
from pipeline.spec import JobSpec, SpecError, load_spec, validate_spec


def test_demo_job_loads_with_the_bundled_model_path():
    spec = load_spec(REPO / "jobs" / "shapes-demo.yaml")
    assert Path(spec.model.path) == REPO / "pipeline" / "models" / "shapes-tiny-sd"
    assert Path(spec.output.dir) == REPO / "out" / "shapes-demo"
    assert [c.name for c in spec.classes] == ["circle", "square", "triangle", "star", "ring", "cross"]
    assert all(len(c.attributes) == 6 for c in spec.classes)
    assert (spec.generation.height, spec.generation.width) == (64, 64)
    assert spec.samples == 300 and spec.output.shard_size == 100 and spec.num_shards == 3
    assert spec.model.device == "cpu" and spec.resources.synthesis.num_gpus == 0


def test_coco80_job_is_a_consistent_gpu_job():
    spec = load_spec(REPO / "jobs" / "coco80-sd15.yaml", check_files=False)
    assert spec.model.path.endswith("stable-diffusion-v1-5") and not Path(spec.model.path).is_absolute()
    assert len(spec.classes) == 80 and len({c.name for c in spec.classes}) == 80
    assert {"person", "traffic light", "toothbrush"} <= {c.name for c in spec.classes}
    assert (spec.generation.height, spec.generation.width) == (512, 512)
    assert spec.samples == 1_000_000 and spec.num_shards == 1000
    assert (spec.model.device, spec.model.dtype) == ("cuda", "float16")
    synth = spec.resources.synthesis
    assert synth.num_gpus == 1 and synth.actors >= 1
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


@pytest.mark.parametrize("change, field", [
    ({"generation": {"height": 60}}, "generation.height"),
    ({"output": {"dir": "out", "shard_size": 5}}, "output.shard_size"),  # not a multiple of batch_size 2
    ({"model": {"path": "org/m", "device": "cuda"}}, "resources.synthesis.num_gpus"),
    ({"prompts": {"templates": ["a photo"]}}, "prompts.templates"),
    ({"prompts": {"templates": ["{objects}"], "min_classes_per_image": 3, "max_classes_per_image": 2}}, "prompts"),
    ({"masks": {"refine_power": 2}}, "masks"),
    ({"classes": ["circle", "circle"]}, "classes"),
    ({"name": "has space"}, "name"),
    ({"samples": {"per_clas": 3}}, "samples.per_class"),
])
def test_cross_field_errors_name_the_field(change, field):
    data = dict(TINY_JOB, model={"path": "org/m"})
    data.update(change)
    with pytest.raises(SpecError) as err:
        validate_spec(data)
    message = str(err.value)
    assert "\n" not in message and f": {field}" in message, message


BAD_INPUTS = [
    ("malformed YAML", "name: [unclosed\nseed: 1\n", None, "malformed YAML"),
    ("unknown key", None, {"generation": {"stepz": 3}}, "generation.stepz: unknown key"),
    ("wrong type", None, {"generation": {"steps": "ten"}}, "generation.steps: Input should be a valid integer"),
    ("missing model path", None, {"model": {"path": "./no/such/model", "device": "cpu"}}, "model.path:"),
    ("empty class list", None, {"classes": []}, "classes: List should have at least 1 item"),
    ("shard size 0", None, {"output": {"dir": "out", "shard_size": 0}}, "output.shard_size:"),
    ("output dir is a file", None, {"output": {"dir": "taken", "shard_size": 4}}, "output.dir:"),
]


@pytest.mark.parametrize("case, text, change, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_model, capsys, case, text, change,
                                                         expected, command):
    job_dir = tmp_path / "job"
    if text is not None:
        job_dir.mkdir()
        job = job_dir / "job.yaml"
        job.write_text(text)
    else:
        job = write_job(job_dir, tiny_model, **change)
    (job_dir / "taken").write_text("a file where the output dir should go\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [command, str(job)] + (["--no-ray"] if command == "run" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("synthgen: error: "), err
    assert str(job) in err and expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_override_is_reported_against_the_override(job_file, capsys):
    assert main(["validate", str(job_file), "--set", "generation.steps=[1"]) == 2
    assert "--set generation.steps=[1" in capsys.readouterr().err


def test_validate_prints_a_summary(job_file, capsys):
    assert main(["validate", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert "16 samples of 4 classes in 4 shards of 4" in out


def test_the_spec_is_frozen():
    spec = validate_spec(dict(TINY_JOB, model={"path": "org/m"}))
    with pytest.raises(Exception):
        spec.seed = 5
    assert isinstance(spec, JobSpec)
    assert yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))["samples"] == 16


def test_dedup_needs_a_single_filters_actor():
    data = dict(TINY_JOB, model={"path": "org/m"}, filters={"dedup_threshold": 2},
                resources={"filters": {"actors": 2}})
    with pytest.raises(SpecError, match="resources.filters.actors"):
        validate_spec(data)
    assert validate_spec(dict(data, resources={"filters": {"actors": 1}})).filters.dedup_threshold == 2
