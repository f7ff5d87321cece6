"""cluster.yaml against Ray's own cluster-config schema, its fit to the GPU job, and `synthgen submit`."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

from conftest import REPO
from pipeline.cli import build_parser, submission
from pipeline.jobplan import JobPlan
from pipeline.spec import SpecError, load_spec

SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    jsonschema.validate(cluster, SCHEMA)
    validate_config(fillout_defaults(copy.deepcopy(cluster)))  # the launcher's own checks on top


def test_the_schema_check_is_not_vacuous(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        jsonschema.validate(broken, SCHEMA)
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_cpu_head_and_autoscaling_gpu_workers_fit_the_coco80_job(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu_group = next(t for t in workers if t["resources"].get("GPU", 0) > 0)
    assert gpu_group["min_workers"] == 0 < gpu_group["max_workers"] <= cluster["max_workers"]
    spec = load_spec(REPO / "jobs" / "coco80-sd15.yaml", check_files=False)
    full = {res: sum(t["max_workers"] * t["resources"].get(res, 0) for t in workers) for res in ("CPU", "GPU")}
    need = JobPlan(spec, cluster=full).required  # the cluster scaled out (its GPU workers start at 0: actors=8)
    assert spec.resources.synthesis.actors == "auto" and need["GPU"] == full["GPU"]  # one synthesis actor per GPU
    assert need["CPU"] <= full["CPU"]


def submit_args(*argv: str):
    return build_parser().parse_args(["submit", *argv, "--address", "http://head:8265"])


def test_submit_ships_the_job_and_the_code_and_runs_the_job_inside_them(monkeypatch):
    monkeypatch.chdir(REPO)
    args = submit_args("jobs/coco80-sd15.yaml", "--set", "samples=1000", "--out", "/mnt/shared/run1")
    kwargs = submission(args)
    files = kwargs["package"].files  # tests/test_submit.py: what a package holds, exactly
    assert {"jobs/coco80-sd15.yaml", "pyproject.toml", "pipeline/cli.py", "stages/base.py"} <= set(files)
    assert not [rel for rel in files if rel.startswith(("tests/", "pipeline/models/", ".")) or "/." in rel]
    assert shlex.split(kwargs["entrypoint"]) == [
        "python", "-m", "pipeline.cli", "run", "jobs/coco80-sd15.yaml", "--set", "samples=1000",
        "--out", "/mnt/shared/run1", "--resource-timeout", "900"]


def test_submit_refuses_an_output_dir_inside_the_shipped_working_dir(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SpecError, match="pass --out with an absolute path"):
        submission(submit_args("jobs/shapes-demo.yaml"))
    with pytest.raises(SpecError, match="generation.steps"):
        submission(submit_args("jobs/coco80-sd15.yaml", "--set", "generation.steps=ten", "--out", "/x"))
