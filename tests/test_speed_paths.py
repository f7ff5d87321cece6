"""Issue 35's paths to a first GPU run: non-finite outputs rejected, fp16 on MM-DiT warned, ``actors: auto``,
channels_last convolutions under the capture."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import member_hashes, write_job

BATCH = 2  # TINY_JOB's generation.batch_size: the in-process runner makes one pipeline call per batch, in order


# --- 1. non-finite outputs are rejected, never labelled -----------------------------------------

def poison(monkeypatch, image_index: int, map_index: int) -> None:
    """A NaN in the float image of sample ``image_index`` and an inf in a captured map of ``map_index``."""
    from stages.attention import AttentionCapture
    from stages.families.base import ModelFamily

    run, finish = ModelFamily.run, AttentionCapture.finish
    calls = {"run": 0, "finish": 0}

    def bad_run(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        if calls["run"] == image_index // BATCH:
            out = out.copy()
            out[image_index % BATCH, 3, 5, 1] = np.nan
        calls["run"] += 1
        return out

    def bad_finish(self):
        maps = finish(self)
        if calls["finish"] == map_index // BATCH:
            maps["attn_raw"] = maps["attn_raw"].clone()
            maps["attn_raw"][map_index % BATCH, 0, 2, 2] = torch.inf
        calls["finish"] += 1
        return maps

    monkeypatch.setattr(ModelFamily, "run", bad_run)
    monkeypatch.setattr(AttentionCapture, "finish", bad_finish)


def test_a_nan_image_or_an_inf_map_rejects_its_row_and_leaves_the_others_byte_for_byte(
        dataset, tmp_path, tiny_model, monkeypatch):
    from pipeline.runner import run_job
    from pipeline.spec import load_spec

    clean = pq.read_table(dataset.out / "index.parquet").to_pylist()
    kept = [r["index"] for r in clean if r["keep"]]
    assert len(kept) >= 2, "the tiny job must keep two samples for this test to mean anything"
    image_bad, map_bad = kept[0], kept[-1]
    poison(monkeypatch, image_bad, map_bad)
    spec = load_spec(write_job(tmp_path, tiny_model))
    summary = run_job(spec, use_ray=False, progress=False)

    rows = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    for i in (image_bad, map_bad):
        assert (rows[i]["keep"], rows[i]["reject_reason"]) == (False, "non-finite")
    others = [i for i in range(len(rows)) if i not in (image_bad, map_bad)]
    assert [rows[i] for i in others] == [clean[i] for i in others]
    bad_keys = (clean[image_bad]["key"] + ".", clean[map_bad]["key"] + ".")
    assert member_hashes(tmp_path / "out") == {
        name: h for name, h in member_hashes(dataset.out).items() if not name.startswith(bad_keys)}
    assert summary["rejected_by_reason"]["non-finite"] == 2
    assert summary["rejected_by_reason"] == {**dataset.summary["rejected_by_reason"], "non-finite": 2}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rejected_by_reason"]["non-finite"] == 2


def test_non_finite_helpers_mark_only_the_bad_rows():
    from stages import finite

    gen = np.array(['{"model":"m"}'] * 3)
    x = np.ones((3, 2, 2), np.float32)
    assert finite.zeroed(x) is x and finite.mark(gen, finite.bad_rows(x)) is gen
    x[1, 0, 0] = -np.inf
    bad = finite.bad_rows(x)
    assert bad.tolist() == [False, True, False] and finite.zeroed(x)[1].tolist() == [[0, 1], [1, 1]]
    assert finite.bad_rows(torch.tensor(x)).tolist() == bad.tolist()
    marked = finite.mark(gen, bad)
    assert [finite.is_marked(g) for g in marked] == [False, True, False] and marked[0] == gen[0]


# --- 2. fp16 on the MM-DiT families: one warning line at validate and at run -------------------------

@pytest.fixture(scope="module")
def mmdit(tmp_path_factory) -> dict:
    from mmdit_models import build_flux, build_sd3

    root = tmp_path_factory.mktemp("mmdit")
    return {"sd3": build_sd3(root / "tiny-sd3"), "flux": build_flux(root / "tiny-flux")}


def fp16_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "float16" in line and line.startswith("warning:")]


@pytest.mark.usefixtures("own_cache")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fp16_on_an_mmdit_family_warns_at_validate_and_at_run(family, mmdit, tmp_path, capsys, monkeypatch):
    import pipeline.runner
    from pipeline.cli import main
    from pipeline.spec import UsageError
    from test_mmdit_families import mm_job

    job = mm_job(tmp_path, mmdit[family], family)
    fp16 = ["--set", "model.dtype=float16", "--set", "model.device=auto"]  # cpu refuses fp16 (spec)
    assert main(["validate", str(job), *fp16]) == 0
    lines = fp16_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"({family})" in lines[0] and "overflows" in lines[0]
    assert lines[0].endswith("set model.dtype: bfloat16")

    def stop(*args, **kwargs):
        raise UsageError("stopped by the test before any work")

    monkeypatch.setattr(pipeline.runner, "run_job", stop)
    assert main(["run", str(job), *fp16]) == 2
    assert fp16_lines(capsys.readouterr().err) == lines  # the same line, from the same function

    assert main(["validate", str(job), "--set", "model.dtype=bfloat16", "--set", "model.device=auto"]) == 0
    assert fp16_lines(capsys.readouterr().err) == []


@pytest.mark.usefixtures("own_cache")
def test_fp16_on_a_unet_family_or_an_unknown_hub_model_does_not_warn(tiny_model, tmp_path):
    from pipeline.preflight import dtype_warning, job_warnings
    from pipeline.spec import load_spec

    unet = load_spec(write_job(tmp_path, tiny_model), ["model.dtype=float16", "model.device=auto"])
    assert dtype_warning(unet) == "" and job_warnings(unet) == []
    hub = ["model.path=nobody/no-such-model", "model.dtype=float16", "model.device=cuda",
           "resources.synthesis.num_gpus=1"]
    assert dtype_warning(load_spec(write_job(tmp_path, tiny_model), hub, check_files=False)) == ""
    named = load_spec(write_job(tmp_path, tiny_model), [*hub, "model.family=flux"], check_files=False)
    assert "(flux)" in dtype_warning(named)


# --- 3. resources.synthesis.actors: auto ---------------------------------------------------------------

def test_auto_is_a_job_value_and_a_misspelt_auto_is_one_line_exit_2(tiny_model, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.spec import load_spec

    job = write_job(tmp_path, tiny_model)
    assert load_spec(job, ["resources.synthesis.actors=auto"]).resources.synthesis.actors == "auto"
    assert load_spec(job, ["resources.synthesis.actors=3"]).resources.synthesis.actors == 3
    assert main(["validate", str(job), "--set", "resources.synthesis.actors=atuo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resources.synthesis.actors: must be a whole number ≥ 1 or 'auto'" in err[0]
    assert "(got 'atuo')" in err[0]


def test_auto_is_one_actor_per_gpu_of_the_cluster():
    from pipeline.jobplan import pool_size

    assert pool_size("auto", 1.0, {"CPU": 64.0, "GPU": 8.0}) == 8
    assert pool_size("auto", 1.0, {"CPU": 16.0, "GPU": 1.0}) == 1
    assert pool_size("auto", 0.5, {"GPU": 3.0}) == 6 and pool_size("auto", 2.0, {"GPU": 5.0}) == 2
    assert pool_size("auto", 0.1, {"GPU": 0.3}) == 3  # float division lands on 2.9999…: still 3
    assert pool_size("auto", 1.0, {"CPU": 8.0}) == 1  # no GPU yet: one, and the resource check says what lacks
    assert pool_size("auto", 0.0, {"GPU": 8.0}) == 1 and pool_size("auto", 1.0, None) == 1  # CPU-only / in-process
    assert pool_size(3, 1.0, {"GPU": 8.0}) == 3


@pytest.mark.parametrize("gpus", [1, 8])
def test_the_shipped_gpu_jobs_fit_one_gpu_and_eight(gpus, monkeypatch):
    import ray

    from conftest import REPO
    from pipeline.graph import init_ray
    from pipeline.jobplan import JobPlan
    from pipeline.spec import load_spec

    spec = load_spec(REPO / "jobs" / "coco80-sd15.yaml", check_files=False)
    plan = JobPlan(spec)
    assert dict((op.name, op.actors) for op in plan.operators)["synthesis"] == 1  # no cluster known yet
    cluster = {"CPU": 8.0 + 2 * gpus, "GPU": float(gpus)}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray already up in this process: init_ray sizes
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    assert init_ray(plan, None) is False  # no ResourceError: the job fits
    assert dict((op.name, op.actors) for op in plan.operators)["synthesis"] == gpus
    assert plan.required["GPU"] == gpus


def test_a_no_ray_run_with_auto_makes_the_same_dataset(dataset, tmp_path, capsys):
    from conftest import assert_same_dataset
    from pipeline.cli import main

    out = tmp_path / "auto"
    auto = ["--set", "resources.synthesis.actors=auto"]
    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out), *auto]) == 0
    assert_same_dataset(dataset.out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["resources"]["synthesis"]["actors"] == "auto"
    assert {s["name"]: s["workers"] for s in manifest["summary"]["stages"]}["synthesis"] == 1


# --- channels_last: the GPU layout of the convolutions leaves images and maps as they were -------

def test_channels_last_convolutions_keep_the_images_and_the_captured_maps(tiny_model, tmp_path):
    from pipeline.spec import load_spec
    from stages.model import convolutions_channels_last
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    spec = load_spec(write_job(tmp_path, tiny_model, output={"dir": str(tmp_path / "out")}))
    rows = SamplingStage(spec)({"index": np.arange(2, dtype=np.int64)})
    plain, nhwc = SynthesisStage(spec), SynthesisStage(spec)
    convolutions_channels_last(nhwc.pipe)
    conv = next(m for m in nhwc.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = plain.draw(rows), nhwc.draw(rows)
    assert np.abs(a["image"].astype(int) - b["image"].astype(int)).max() <= 1
    for col in ("attn", "attn_raw"):
        assert np.abs(a[col].astype(np.float32) - b[col].astype(np.float32)).max() < 1e-3, col


def test_a_pickled_plan_leaves_the_stage_classes_behind(tmp_path):
    """Ray's workers get the job plan pickled: unpickling it imports no stage module (a CPU worker imports only
    its own operator's stages, not the synthesis stage's torch and diffusers), and the stages and operators
    come back the same where asked for."""
    import pickle
    import subprocess
    import sys

    from pipeline.jobplan import JobPlan
    from pipeline.spec import load_spec
    from conftest import REPO

    plan = JobPlan(load_spec(str(REPO / "jobs" / "shapes-demo.yaml"), [], out=str(tmp_path / "out"),
                             check_files=False))
    before = [(op.stages, op.actors, op.num_cpus) for op in plan.operators]  # computed and cached on the driver
    blob = tmp_path / "plan.pkl"
    blob.write_bytes(pickle.dumps(plan))
    code = ("import json, pickle, sys; plan = pickle.load(open(sys.argv[1], 'rb')); "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('stages'))))")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    imported = set(json.loads(out))
    assert "torch" not in imported and not imported & {f"stages.{name}" for name in
                                                     ("sampling", "synthesis", "masks", "labels", "filters", "encode")}
    again = pickle.loads(blob.read_bytes())
    assert [(op.stages, op.actors, op.num_cpus) for op in again.operators] == before
    assert again.fingerprint == plan.fingerprint and again.bundles == plan.bundles
