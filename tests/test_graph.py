"""How the stage chain becomes Ray operators: which stages share a worker, and what the job reserves."""
from __future__ import annotations

from conftest import REPO
from pipeline.jobplan import JobPlan
from pipeline.spec import load_spec


def ops_of(job: str, *overrides: str, tmp_path, cluster: dict | None = None) -> list[tuple[str, str, int]]:
    spec = load_spec(REPO / "jobs" / job, list(overrides), out=str(tmp_path / "out"))
    return [(op.name, op.kind, op.actors) for op in JobPlan(spec, cluster=cluster).operators]


def test_demo_cpu_stages_share_one_worker_and_the_model_stage_stands_alone(tmp_path):
    assert ops_of("shapes-demo.yaml", tmp_path=tmp_path) == [
        ("sampling", "task", 1),
        ("synthesis", "actor", 2),
        ("masks+labels+filters+encode", "actor", 1),  # filters keeps state -> the fused group is an actor
    ]


def test_stages_with_different_resources_or_the_model_stage_are_never_fused(tmp_path):
    ops = ops_of("shapes-demo.yaml", "resources.labels.actors=3", "resources.sampling.num_cpus=2",
                 "resources.synthesis.num_cpus=2", "resources.synthesis.actors=1", tmp_path=tmp_path)
    # sampling now has synthesis's resources but synthesis is not fusable; labels breaks the run
    assert ops == [("sampling", "task", 1), ("synthesis", "actor", 1), ("masks", "task", 1),
                   ("labels", "task", 3), ("filters+encode", "actor", 1)]


def test_gpu_job_keeps_its_parallel_cpu_stages_apart_from_the_stateful_filter(tmp_path):
    assert ops_of("coco80-sd15.yaml", tmp_path=tmp_path, cluster={"CPU": 64.0, "GPU": 8.0}) == [  # actors: auto
        ("sampling", "task", 2), ("synthesis", "actor", 8), ("masks+labels", "task", 16),
        ("filters", "actor", 1), ("encode", "task", 16)]


def test_reservations_count_each_actor_pool_once(tmp_path):
    spec = load_spec(REPO / "jobs" / "shapes-demo.yaml", [], out=str(tmp_path / "out"))
    # synthesis 2 x 1 CPU + the fused CPU actor 0.25 + room for one task (Ray's read tasks take 1 CPU)
    assert JobPlan(spec).required == {"CPU": 3.25, "GPU": 0.0}
