"""Determinism and identity by content (issue 18, items 7 and 10): a job's bytes do not depend on where
its model or checkout lies, on Ray vs in-process, or on a kill and resume; models and references
are identified by what their files hold, never by their paths."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, TINY_JOB, assert_same_dataset, write_job
from pipeline.dataset import MANIFEST, OutputError, read_manifest
from pipeline.plan import ShardPlan
from pipeline.runner import prepare, run_job
from pipeline.shapes.coco import render_coco
from pipeline.shapes.world import CLASSES, COLORS
from pipeline.spec import load_spec
from stages import identity
from stages.identity import model_identity

#: jobs/shapes-demo.yaml's parallel settings on the tiny job: two single-threaded synthesis actors,
#: near-duplicate removal (which needs its one filters actor), the CPU stages fused at 0.25 CPU
DEMO_RESOURCES = {"sampling": {"num_cpus": 0.25}, "synthesis": {"num_cpus": 1, "actors": 2},
                  **{name: {"num_cpus": 0.25, "actors": 1} for name in ("masks", "labels", "filters", "encode")}}


pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)


def checkout(root: Path, model: str) -> Path:
    """A fake checkout at ``root``: a copy of the model under models/, the tiny job under jobs/ naming it
    by a relative path (as jobs/shapes-demo.yaml does) and writing to ../out."""
    shutil.copytree(model, root / "models" / "tiny-sd")
    return write_job(root / "jobs", "../models/tiny-sd", output={"dir": "../out", "shard_size": 4}, samples=12)


def text_of(out: Path) -> dict[str, bytes]:
    """Every byte an output dir publishes, decoded where it is compressed: each tar member, each Parquet
    table's rows (and its schema metadata), the manifest."""
    found = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                found[f"{tar_path.name}/{m.name}"] = m.name.encode() + tar.extractfile(m).read()
    for part in [*sorted((out / "parts").glob("*.parquet")), out / "index.parquet"]:
        table = pq.read_table(part)
        found[part.name] = json.dumps([table.to_pylist(), str(table.schema.metadata)], default=str).encode()
    found[MANIFEST] = (out / MANIFEST).read_bytes()
    return found


def first_record(out: Path) -> dict:
    with tarfile.open(sorted((out / "shards").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        return json.loads(tar.extractfile(member).read())


def leaks(out: Path, locations: list[Path]) -> list[str]:
    return sorted(f"{name}: {loc}" for name, data in text_of(out).items() for loc in locations
                  if str(loc).encode() in data)


# --- (1) two checkouts at different absolute paths ------------------------------------------------

@pytest.fixture(scope="module")
def two_checkouts(tmp_path_factory, tiny_model):
    """The same 12-sample job run in-process from two checkouts (model copied into each)."""
    roots = [tmp_path_factory.mktemp("first-checkout"), tmp_path_factory.mktemp("elsewhere") / "deeper" / "repo"]
    outs = []
    for root in roots:
        job = checkout(root, tiny_model)
        spec = load_spec(job)
        run_job(spec, use_ray=False, progress=False)
        outs.append(Path(spec.output.dir))
    return roots, outs


def test_two_checkouts_of_a_job_write_identical_shards(two_checkouts):
    (first, second), (a, b) = two_checkouts
    assert a == first / "out" and b == second / "out"
    assert_same_dataset(a, b)
    sha = [[s["sha256"] for s in json.loads((out / MANIFEST).read_text())["shards"]] for out in (a, b)]
    assert sha[0] == sha[1] and len(sha[0]) == 3
    rec = first_record(a)
    ident = model_identity(str(first / "models" / "tiny-sd"))
    assert rec["gen"]["model"] == "../models/tiny-sd" and rec["gen"]["model_id"] == ident["id"][:16]


def test_no_local_path_in_shard_members_or_parts(two_checkouts):
    roots, outs = two_checkouts
    for out in outs:
        found = {k: v for k, v in text_of(out).items() if k != MANIFEST}
        assert any(k.endswith(".json") for k in found) and "index.parquet" in found
        assert not [k for k, v in found.items() for loc in (*roots, REPO) if str(loc).encode() in v]


def test_no_local_path_in_the_manifest(two_checkouts):
    roots, outs = two_checkouts
    for out in outs:
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["model"]["model"] == manifest["job"]["model"]["path"] == "../models/tiny-sd"
        assert manifest["job"]["output"]["dir"] == "../out"
        assert not leaks(out, [*roots, REPO])


# --- (2) Ray = in-process = killed and resumed under Ray ------------------------------------------

def session_processes(sid: int) -> list[int]:
    """PIDs of the processes in session ``sid`` (a subprocess started with start_new_session, and the
    Ray processes it started: GCS, raylet, workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm)": state ppid pgrp session ...
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


class CliRun:
    """``python -m pipeline.cli run JOB`` in its own session with its own Ray (own temp dir, no
    RAY_ADDRESS): a kill takes it and every Ray process it started, and nothing else."""

    def __init__(self, job: Path, tmp: Path, *args: str):
        self.ray_tmp = tempfile.mkdtemp(prefix="sgdet-", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   RAY_TMPDIR=self.ray_tmp, XDG_CACHE_HOME=os.environ["XDG_CACHE_HOME"])
        self.log = tmp / f"cli-{time.monotonic_ns()}.log"
        self.err = self.log.with_suffix(".err")
        with open(self.log, "wb") as log, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), *args], env=env,
                                         stdout=log, stderr=err, start_new_session=True)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the run's session (its process group, then any stray by PID) and wait until it is empty."""
        sid = self.proc.pid
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while (left := session_processes(sid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        assert not left, f"processes of the killed run survived: {left}"

    def output(self) -> str:
        """stdout, then stderr."""
        return self.log.read_text(errors="replace") + self.err.read_text(errors="replace")

    def noise(self) -> list[str]:
        """stderr lines other than the job's own progress and notes ("tiny: …"): library warnings, banners."""
        return [line for line in re.split(r"[\r\n]", self.err.read_text(errors="replace"))
                if line.strip() and not line.startswith("tiny:")]


def committed(out: Path) -> list[str]:
    """The shards committed so far (the manifest with the commit journal of a running run)."""
    try:
        return [s["name"] for s in read_manifest(out)["shards"]]
    except OutputError:  # no manifest yet
        return []


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory, tiny_model) -> Path:
    """The tiny job at 12 samples in 3 shards with jobs/shapes-demo.yaml's parallel settings, its scheduler and
    guidance, and 8 steps (a synthesis batch takes long enough for shards to commit one at a time); samples the
    shapes-world oracle judges wrong are drawn again, twice at most (stages/redraw.py), and a draw it judges wrong
    on its predicted clean image after 7 of the 8 steps stops there (generation.early_check)."""
    folder = tmp_path_factory.mktemp("demo-settings")
    return write_job(folder, tiny_model, samples=12, resources=DEMO_RESOURCES,
                     generation={"steps": 8, "scheduler": "default", "guidance_scale": 5.0, "redraws": 2,
                                 "early_check": {"step": 0.875, "min_score": 0.5}},
                     filters=dict(TINY_JOB["filters"], dedup_threshold=2), judge={"kind": "shapes-oracle"})


def killed_mid_run(job: Path, out: Path, tmp: Path, tries: int = 3) -> list[str]:
    """Run the job under Ray and SIGKILL it (with its Ray) as soon as a shard is committed; the shards
    committed by then. On a loaded machine Ray may hand over every block at once, so that the kill
    lands after the last commit: such a try proves nothing and is repeated into a fresh dir."""
    for attempt in range(tries):
        shutil.rmtree(out, ignore_errors=True)
        run = CliRun(job, tmp, "--out", str(out))
        deadline = time.monotonic() + 600
        while not committed(out) and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        run.kill()  # the CLI, its Ray head and its workers, at once
        assert run.proc.returncode == -signal.SIGKILL, run.output()
        done = committed(out)
        assert done, run.output()
        print(f"kill {attempt + 1}: committed {done}", file=sys.stderr)
        if len(done) < 3:
            return done
    pytest.fail(f"{tries} kills all landed after the last commit")


def test_ray_in_process_and_killed_ray_runs_write_the_same_bytes(demo_job, tmp_path):
    spec = load_spec(demo_job, out=str(tmp_path / "in-process"))
    assert spec.filters.dedup_threshold == 2 and spec.resources.synthesis.actors == 2 and ShardPlan.from_spec(spec).num_shards == 3
    run_job(spec, use_ray=False, progress=False)
    others = [json.loads(r["other"]) for r in
              pq.read_table(tmp_path / "in-process" / "index.parquet").column("scores").to_pylist()]
    attempts = [o["attempt"] for o in others]
    assert len(attempts) == 12 and max(attempts) >= 1, attempts  # redraws happened: the comparison covers them
    assert any(r["reason"].startswith("early:") for o in others for r in o["rejected"]), others  # and early stops

    # under Ray, killed after its first commit and resumed: the shards of both Ray runs are the in-process bytes
    killed_out = tmp_path / "killed"
    done = killed_mid_run(demo_job, killed_out, tmp_path)
    assert not read_manifest(killed_out)["complete"]
    run = CliRun(demo_job, tmp_path, "--out", str(killed_out))
    assert run.wait() == 0, run.output()
    assert run.noise() == [], run.output()  # a run under its own local Ray prints only its progress and notes
    resumed = json.loads((killed_out / MANIFEST).read_text())
    assert resumed["complete"] and resumed["summary"]["runner"] == "ray"
    assert [s["workers"] for s in resumed["summary"]["stages"] if s["name"] == "synthesis"] == [2]
    assert resumed["summary"]["processed"] == 12 - 4 * len(done)  # only what the kill left undone
    assert_same_dataset(killed_out, tmp_path / "in-process")


# --- model identity by content --------------------------------------------------------------------

def test_model_identity_is_content_and_the_given_name(tmp_path, tiny_model):
    a, b = tmp_path / "a" / "sd", tmp_path / "b" / "sd"
    for folder in (a, b):
        shutil.copytree(tiny_model, folder)
    ia, ib = model_identity(str(a)), model_identity(str(b), "models/sd")
    assert ia["model"] == "sd" and ib["model"] == "models/sd"  # absolute: the folder's name; else as given
    assert {k: v for k, v in ia.items() if k != "model"} == {k: v for k, v in ib.items() if k != "model"}
    assert ia["tokenizer"] and all(name.startswith("tokenizer/") for name in ia["tokenizer"])
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= set(ia["configs"])
    (b / "notes.json").write_text("{}")  # files outside model_index.json's components are not identity
    (b / "unet" / "README.md").write_text("card")
    assert model_identity(str(b))["id"] == ia["id"]
    config = json.loads((b / "scheduler" / "scheduler_config.json").read_text())
    (b / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 0.02}))
    changed = model_identity(str(b))
    assert changed["configs"]["scheduler/scheduler_config.json"] != ia["configs"]["scheduler/scheduler_config.json"]
    assert changed["id"] != ia["id"] and changed["weights"] == ia["weights"]


def test_fingerprint_ignores_where_the_model_lies_but_not_what_it_holds(tmp_path, tiny_model):
    jobs = [checkout(tmp_path / name, tiny_model) for name in ("one", "two")]
    specs = [load_spec(job) for job in jobs]
    assert specs[0].model.path != specs[1].model.path and specs[0].model_name == "../models/tiny-sd"
    prints = [s.fingerprint(s.model_identity()) for s in specs]
    assert prints[0] == prints[1]
    tok = tmp_path / "two" / "models" / "tiny-sd" / "tokenizer" / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("}", ', "note": 1}', 1))
    assert specs[1].fingerprint(specs[1].model_identity()) != prints[0]


def test_public_dump_records_paths_as_given(tmp_path, tiny_model, monkeypatch):
    job = checkout(tmp_path / "co", tiny_model)
    calibration = REPO / "jobs" / "calibration" / "shapes-tiny-sd.json"
    spec = load_spec(job, [f"masks.calibration={calibration}"], out=str(tmp_path / "elsewhere" / "data"))
    dump = spec.public_dump()
    assert Path(spec.output.dir).is_absolute() and Path(spec.model.path).is_absolute()
    assert dump["model"]["path"] == "../models/tiny-sd"
    assert dump["output"]["dir"] == "data" and dump["masks"]["calibration"] == "shapes-tiny-sd.json"
    assert str(tmp_path) not in json.dumps(dump) and str(REPO) not in json.dumps(dump)
    assert spec.model_identity()["model"] == "../models/tiny-sd"
    monkeypatch.chdir(tmp_path)
    typed = load_spec(job, ["model.path=./co/models/tiny-sd"], out="elsewhere/data")
    assert typed.model.path == str(tmp_path / "co" / "models" / "tiny-sd")  # --set: resolved against the cwd
    assert typed.model_name == "co/models/tiny-sd" and typed.public_dump()["output"]["dir"] == "elsewhere/data"


def test_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    calls = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: calls.append(p) or real(p))
    old, young = tmp_path / "old.bin", tmp_path / "young.bin"
    old.write_bytes(b"x" * 1000)
    young.write_bytes(b"y" * 1000)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(old, ns=(an_hour_ago, an_hour_ago))
    first = identity.cached_sha256_many([old, young])
    assert len(calls) == 2 and identity.cache_file().is_file()
    monkeypatch.setattr(identity, "_memory", {})  # a new process: only the cache file remembers
    assert identity.cached_sha256_many([old, young]) == first
    # the young file (its mtime could repeat after an edit in the same clock tick) is hashed again
    assert calls == [os.path.realpath(p) for p in (old, young, young)]
    old.write_bytes(b"z" * 1000)  # same size, new mtime
    os.utime(old, ns=(an_hour_ago + 1, an_hour_ago + 1))
    assert identity.cached_sha256(old) == real(old) != first[old]


# --- (3) references by content --------------------------------------------------------------------

def test_a_reference_pixel_edit_changes_the_fingerprint_and_blocks_resume(tmp_path, tiny_model):
    coco = tmp_path / "refs"
    render_coco(coco, 2, first_seed=2_000_000)
    job = write_job(tmp_path, tiny_model, classes=[{"name": c, "attributes": list(COLORS)} for c in CLASSES],
                    prompts={"templates": ["{objects}"], "max_classes_per_image": 1}, samples=2 * 2,
                    references={"path": "refs", "strengths": [0.5, 1.0]})
    spec = load_spec(job)
    fingerprint = spec.fingerprint(spec.model_identity())
    run_job(spec, use_ray=False, progress=False)  # a dataset of this job (a dir with nothing committed is none)
    assert prepare(load_spec(job)).fingerprint == fingerprint

    moved = tmp_path / "moved" / "copy"
    shutil.copytree(coco, moved / "refs")
    elsewhere = load_spec(shutil.copy(job, moved / "job.yaml"))
    assert elsewhere.fingerprint(elsewhere.model_identity()) == fingerprint  # content, not location

    image = sorted((coco / "images").iterdir())[0]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    edited = load_spec(job)
    assert edited.fingerprint(edited.model_identity()) != fingerprint
    with pytest.raises(OutputError, match="different job or spec.*--overwrite"):
        prepare(edited)
    assert prepare(edited, overwrite=True).fingerprint != fingerprint
