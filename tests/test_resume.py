"""Writer commit protocol and resume: a killed run, rerun, equals an uninterrupted run byte for byte."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, TINY_JOB, assert_same_dataset
from pipeline.cli import main
from pipeline.jobplan import JobPlan
from pipeline.runner import prepare, run_job
from pipeline.spec import load_spec, validate_spec
from pipeline.dataset import MANIFEST, OutputError, read_manifest, sha256_file
from pipeline.writer import DatasetWriter

IDENTITY = {"source": "hub", "model": "org/m"}


def make_writer(out: Path, samples: int = 10, overwrite: bool = False, **changes) -> DatasetWriter:
    data = dict(TINY_JOB, model={"path": "org/m"}, samples=samples, output={"dir": str(out), "shard_size": 4})
    data.update(changes)
    spec = validate_spec(data)
    return prepare(JobPlan(spec, identity=IDENTITY), overwrite=overwrite)


def records(indices, rejected=()) -> dict[str, np.ndarray]:
    """A batch as the encode stage hands it over (bytes members, JSON strings)."""
    n = len(indices)
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "key": np.array([f"tiny-{i:09d}" for i in indices]), "index": np.array(indices, dtype=np.int64),
        "seed": np.array(indices, dtype=np.int64) * 7, "prompt": np.array([f"prompt {i}" for i in indices]),
        "class_names": np.array(['["circle"]'] * n), "scores": np.array(["{}"] * n),
        "curriculum": np.array(["{}"] * n), "keep": np.array([i not in rejected for i in indices]),
        "reject_reason": np.array(["low_contrast" if i in rejected else "" for i in indices]),
        "jpg": obj([f"jpg{i}".encode() for i in indices]), "seg_png": obj([f"png{i}".encode() for i in indices]),
        "json": obj([json.dumps({"index": i}).encode() for i in indices]), "cls": obj([b"1"] * n),
    }


def test_shards_commit_when_all_their_indices_arrived_in_any_order(tmp_path):
    writer = make_writer(tmp_path / "out")
    assert list(writer.open()) == [0, 1, 2]  # [0,4) [4,8) [8,10)
    arrivals = [([4, 5], []), ([0, 1], []), ([8, 9], ["train-000002"]), ([2, 3], ["train-000000"]),
                ([6, 7], ["train-000001"])]
    for indices, committed in arrivals:
        assert writer.add(records(indices, rejected={3})) == committed
    writer.finish({"runner": "test"})
    with tarfile.open(tmp_path / "out" / "shards" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"tiny-{i:09d}.{ext}" for i in (0, 1, 2) for ext in
                                         ("cls", "jpg", "json", "seg.png")]
    assert {m.mtime for m in members} == {946684800}
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] and [s["name"] for s in manifest["shards"]] == ["train-000000", "train-000001",
                                                                               "train-000002"]
    assert manifest["counts"] == {"shards": 3, "indices": 10, "samples": 9, "rejected": 1,
                                  "rejected_by_reason": {"low_contrast": 1}}
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert [r["index"] for r in index] == list(range(10))
    assert [r["shard"] for r in index] == ["train-000000.tar"] * 4 + ["train-000001.tar"] * 4 + ["train-000002.tar"] * 2
    assert index[3]["keep"] is False and index[3]["reject_reason"] == "low_contrast"
    assert index[0]["classes"] == ["circle"]


def test_reopening_deletes_strays_and_keeps_committed_shards(tmp_path):
    out = tmp_path / "out"
    writer = make_writer(out)
    writer.open()
    writer.add(records([0, 1, 2, 3, 4, 5]))  # commits shard 0; 4, 5 only buffered
    committed = sha256_file(out / "shards" / "train-000000.tar")
    # what a kill can leave behind: temp files, and a shard renamed but not yet in the manifest
    (out / "shards" / "train-000001.tar.tmp").write_bytes(b"partial")
    (out / "shards" / "train-000001.tar").write_bytes(b"uncommitted")
    (out / "parts" / "train-000001.parquet.tmp").write_bytes(b"partial")
    (out / "manifest.json.tmp").write_bytes(b"{")

    again = make_writer(out)
    assert list(again.open()) == [1, 2]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train-000000.tar"]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["train-000000.parquet"]
    assert not list(out.glob("*.tmp"))
    assert sha256_file(out / "shards" / "train-000000.tar") == committed
    with pytest.raises(RuntimeError, match="outside the pending shards"):
        again.add(records([0, 1]))
    again.add(records([4, 5]))
    with pytest.raises(RuntimeError, match="arrived twice"):
        again.add(records([5]))


def test_a_different_spec_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    writer = make_writer(out)
    writer.open()
    writer.add(records([0, 1, 2, 3]))
    manifest = (out / MANIFEST).read_bytes()
    with pytest.raises(OutputError, match="different job or spec.*--overwrite"):
        make_writer(out, seed=99)
    assert (out / MANIFEST).read_bytes() == manifest
    fresh = make_writer(out, seed=99, overwrite=True)
    assert list(fresh.open()) == [0, 1, 2]
    assert list((out / "shards").iterdir()) == []


def test_a_resume_with_other_cpu_thread_counts_is_refused_but_other_resources_may_change(tmp_path):
    out = tmp_path / "out"
    cpu = {"path": "org/m", "device": "cpu"}
    writer = make_writer(out, model=cpu)
    writer.open()
    writer.add(records([0, 1, 2, 3]))
    manifest = (out / MANIFEST).read_bytes()
    threads = dict(TINY_JOB["resources"], synthesis={"num_cpus": 2})
    with pytest.raises(OutputError, match=r"resources\.synthesis\.num_cpus: .* 1 torch thread.*would use 2.*--overwrite"):
        make_writer(out, model=cpu, resources=threads)
    assert (out / MANIFEST).read_bytes() == manifest
    more_actors = dict(TINY_JOB["resources"], synthesis={"num_cpus": 0.9, "actors": 3})  # still 1 thread
    assert list(make_writer(out, model=cpu, resources=more_actors).open()) == [1, 2]


def test_the_thread_check_covers_device_auto_on_a_machine_without_gpu(tmp_path):
    out = tmp_path / "out"
    auto = {"path": "org/m", "device": "auto"}
    writer = make_writer(out, model=auto)
    writer.open()
    writer.add(records([0, 1, 2, 3]))
    threads = dict(TINY_JOB["resources"], masks={"num_cpus": 2})
    with pytest.raises(OutputError, match=r"resources\.masks\.num_cpus: .* 1 torch thread"):
        make_writer(out, model=auto, resources=threads)


def test_a_foreign_non_empty_directory_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a synthgen output"):
            make_writer(tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_a_killed_run_resumes_to_the_same_bytes_as_an_uninterrupted_run(dataset, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--no-ray", "--out", str(out)]
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if read_manifest(out)["shards"]:
                    break
            except OutputError:
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    killed = read_manifest(out)
    assert 1 <= len(killed["shards"]) < 4 and not killed["complete"], "the kill must land mid-run"

    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out)]) == 0
    resumed = json.loads((out / MANIFEST).read_text())
    assert resumed["complete"]
    assert resumed["summary"]["processed"] == 16 - 4 * len(killed["shards"])  # only what was missing
    assert_same_dataset(out, dataset.out)


def test_rerunning_a_complete_job_does_no_work(dataset, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(dataset.out, out)
    shards = {p.name: sha256_file(p) for p in (out / "shards").iterdir()}
    summary = run_job(load_spec(dataset.job, out=str(out)), use_ray=False, progress=False)
    assert summary["processed"] == 0 and summary["shards_written"] == 0
    assert summary["stages"] == []
    manifest = read_manifest(out)
    assert manifest["runs"][-1] == summary and manifest["summary"] == manifest["runs"][-2]  # the run that generated
    assert {p.name: sha256_file(p) for p in (out / "shards").iterdir()} == shards
    assert_same_dataset(out, dataset.out)


def test_a_no_op_rerun_imports_no_torch_and_starts_no_ray(dataset, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(dataset.out, out)
    code = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, "run", str(dataset.job), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr[-2000:]
    assert "0 written this run" in proc.stdout and "nothing to do" in proc.stdout
    assert "img/s" not in proc.stdout + proc.stderr  # no progress bar, no rate, for a run that does nothing
    assert_same_dataset(out, dataset.out)


def test_a_changed_spec_on_a_used_output_dir_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(dataset.out, out)
    manifest = (out / MANIFEST).read_bytes()
    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out), "--set", "seed=99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different job or spec" in err and "--overwrite" in err
    assert (out / MANIFEST).read_bytes() == manifest


# --- another sample count: the dataset grows or shrinks, committed shards stay --------------------------
def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((out / "shards").iterdir())}


def test_raising_samples_keeps_the_committed_shards_and_adds_the_new_ones(dataset, tmp_path, capsys):
    out = tmp_path / "grow"
    run = ["run", str(dataset.job), "--no-ray", "--out", str(out)]
    assert main([*run, "--set", "samples=12"]) == 0
    before = shard_hashes(out)
    assert len(before) == 3
    capsys.readouterr()
    assert main(["validate", str(dataset.job), "--out", str(out)]) == 0
    assert "resumes: 3 of 4 shards committed; grows from 12 to 16 samples" in capsys.readouterr().out
    assert main(run) == 0
    assert "grows from 12 to 16 samples; committed shards kept" in capsys.readouterr().err
    after = shard_hashes(out)
    assert {k: after[k] for k in before} == before and len(after) == 4  # the first 3 untouched, 1 new
    assert read_manifest(out)["runs"][-1]["shards_written"] == 1
    assert main(["verify", str(out)]) == 0
    assert_same_dataset(out, dataset.out)  # as if it had been asked for 16 from the start


def test_lowering_samples_leaves_shards_past_the_end_on_disk_and_out_of_the_dataset(dataset, tmp_path, capsys):
    out = tmp_path / "shrink"
    shutil.copytree(dataset.out, out)
    run = ["run", str(dataset.job), "--no-ray", "--out", str(out)]
    capsys.readouterr()
    assert main([*run, "--set", "samples=12"]) == 0
    err = capsys.readouterr().err
    assert "shrinks from 16 to 12 samples" in err
    assert "past the new end, left on disk and out of the dataset: shards/train-000003.tar, " \
           "parts/train-000003.parquet" in err
    assert "left alone" not in err  # they are ours, not files synthgen did not write
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["layout"]["samples"] == 12 and manifest["job"]["samples"] == 12
    assert [s["name"] for s in manifest["shards"]] == ["train-000000", "train-000001", "train-000002"]
    assert manifest["runs"][-1]["shards_written"] == 0
    assert pq.read_table(out / "index.parquet").num_rows == 12
    assert (out / "shards" / "train-000003.tar").is_file()  # not deleted without --overwrite
    assert main(["verify", str(out)]) == 0
    # a count that cuts a shard generates that shard again; back at 16 it is the same bytes as ever
    assert main([*run, "--set", "samples=14"]) == 0
    assert "generated again at the new count: " not in capsys.readouterr().err  # shard 3 was not committed
    assert read_manifest(out)["shards"][-1]["indices"] == [12, 14]
    assert main([*run, "--set", "samples=13"]) == 0
    assert "generated again at the new count: train-000003" in capsys.readouterr().err
    assert main(run) == 0
    assert_same_dataset(out, dataset.out)


def test_a_changed_spec_names_the_fields_that_differ(dataset, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(dataset.out, out)
    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out), "--set", "generation.steps=5",
                 "--set", "prompts.templates=[\"{objects}\"]"]) == 2
    err = capsys.readouterr().err
    assert 'generation.steps: 4 → 5' in err and 'prompts.templates: ["{objects} on noise", ' in err, err
    # an option the stored job leaves out at its default is named too, not just "fingerprint differs"
    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out), "--set", "model.compile=true"]) == 2
    err = capsys.readouterr().err
    assert "model.compile: unset → true" in err and "fingerprint differs" not in err, err


def test_a_dataset_with_the_fingerprint_of_an_earlier_synthgen_resumes(dataset, tmp_path):
    out = tmp_path / "earlier"
    shutil.copytree(dataset.out, out)
    spec = load_spec(dataset.job, out=str(out))
    manifest = json.loads((out / MANIFEST).read_text())
    identity = spec.model_identity()
    assert manifest["fingerprint"] == spec.fingerprint(identity) != spec.fingerprint(identity, samples=16)
    manifest["fingerprint"] = spec.fingerprint(identity, samples=16)  # as synthgen wrote it before: with the count
    (out / MANIFEST).write_text(json.dumps(manifest))
    summary = run_job(spec, use_ray=False, progress=False)
    assert summary["shards_written"] == 0
    assert read_manifest(out)["fingerprint"] == spec.fingerprint(identity)
