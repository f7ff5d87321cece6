"""Fault injection: kills at each commit point, damaged and lost files, foreign and read-only dirs, a full disk.

Each case either completes with output byte-identical to the uninterrupted run (the session's
``dataset`` fixture) or stops with one line and exit 2 — and no file synthgen did not write is
touched. Kills are real SIGKILLs of a ``synthgen run`` subprocess at a failpoint
(``SYNTHGEN_FAILPOINT``, pipeline/writer.py).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_same_dataset
from pipeline.cli import main
from pipeline.dataset import JOURNAL, MANIFEST, read_manifest
from pipeline.writer import DatasetWriter


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(dataset, out: Path, *extra: str) -> int:
    return main(["run", str(dataset.job), "--no-ray", "--out", str(out), *extra])


def one_error_line(capsys) -> str:
    """The one error line ending stderr (a failure after generation started follows our progress bar)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def done(dataset, tmp_path) -> Path:
    """A copy of the finished tiny dataset."""
    out = tmp_path / "out"
    shutil.copytree(dataset.out, out)
    return out


# --- driver killed (SIGKILL) at each point of the commit protocol --------------------------------
@pytest.mark.parametrize("point", ["before-rename:1", "between-renames:2", "after-rename:2", "after-commit:3"])
def test_a_driver_killed_at_any_commit_point_resumes_to_the_same_bytes(dataset, tmp_path, point):
    out = tmp_path / "killed"
    env = dict(os.environ, SYNTHGEN_FAILPOINT=point,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--no-ray", "--out",
                           str(out)], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    before = read_manifest(out)
    committed = int(point.split(":")[1]) - (0 if point.startswith("after-commit") else 1)
    assert len(before["shards"]) == committed and not before["complete"]
    assert run(dataset, out) == 0
    after = read_manifest(out)
    assert after["runs"][-1]["shards_written"] == 4 - committed  # nothing committed was generated again
    assert not (out / JOURNAL).exists() and not list(out.rglob("*.tmp"))
    assert_same_dataset(out, dataset.out)


# --- damaged or lost files -----------------------------------------------------------------------
def test_a_truncated_shard_is_redone_on_a_plain_rerun(dataset, done, capsys):
    tar = done / "shards" / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    assert run(dataset, done) == 0
    out = capsys.readouterr().out
    assert "redone: train-000002 (shards/train-000002.tar has 1000 bytes" in out
    assert read_manifest(done)["runs"][-1]["shards_written"] == 1
    assert_same_dataset(done, dataset.out)


def test_a_deleted_shard_or_part_is_redone(dataset, done):
    (done / "shards" / "train-000001.tar").unlink()
    (done / "parts" / "train-000003.parquet").unlink()
    assert run(dataset, done) == 0
    summary = read_manifest(done)["runs"][-1]
    assert summary["redone"] == {"train-000001": "shards/train-000001.tar is missing",
                                 "train-000003": "parts/train-000003.parquet is missing"}
    assert summary["shards_written"] == 2
    assert_same_dataset(done, dataset.out)


def test_a_changed_byte_is_found_by_verify_and_redone_by_run_verify(dataset, done, capsys):
    tar = done / "shards" / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size: only the hash tells
    tar.write_bytes(bytes(data))
    assert main(["verify", str(done)]) == 1
    assert "train-000000: shards/train-000000.tar sha256 differs" in capsys.readouterr().out
    assert run(dataset, done) == 0  # sizes only: the change goes unnoticed ...
    assert read_manifest(done)["runs"][-1]["shards_written"] == 0
    assert run(dataset, done, "--verify") == 0  # ... until hashes are compared
    assert read_manifest(done)["runs"][-1]["redone"] == {"train-000000": "shards/train-000000.tar sha256 differs "
                                                                        "from the committed one"}
    capsys.readouterr()
    assert main(["verify", str(done)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {done}: 4 shards")
    assert_same_dataset(done, dataset.out)


def test_verify_finds_a_shard_whose_members_disagree_with_its_part(dataset, done, capsys):
    import tarfile

    tar_path = done / "shards" / "train-000003.tar"
    record = next(s for s in read_manifest(done)["shards"] if s["name"] == "train-000003")
    with tarfile.open(tar_path) as tar:  # a tar of fewer samples, recorded as if it were committed so
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][4:]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            tar.addfile(m, __import__("io").BytesIO(data))
    manifest = json.loads((done / MANIFEST).read_text())
    for s in manifest["shards"]:
        if s["name"] == "train-000003":
            s["bytes"] = tar_path.stat().st_size
            s["sha256"] = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    (done / MANIFEST).write_text(json.dumps(manifest))
    assert record["samples"] >= 1
    assert main(["verify", str(done)]) == 1
    assert f"shards/train-000003.tar: holds {record['samples'] - 1} samples" in capsys.readouterr().out


def test_a_lost_manifest_is_refused_then_repaired_without_regenerating(dataset, done, capsys):
    (done / MANIFEST).unlink()
    (done / "index.parquet").unlink()
    listing = tree(done)
    assert run(dataset, done) == 2
    assert "no manifest.json" in one_error_line(capsys) and tree(done) == listing
    assert main(["repair", str(dataset.job), "--out", str(done)]) == 0
    assert "adopted 4 shard(s)" in capsys.readouterr().out
    assert run(dataset, done) == 0
    assert read_manifest(done)["runs"][-1]["shards_written"] == 0
    assert_same_dataset(done, dataset.out)


def test_repair_refuses_shards_of_another_job(dataset, done, capsys):
    (done / MANIFEST).unlink()
    listing = tree(done)
    assert main(["repair", str(dataset.job), "--out", str(done), "--set", "seed=4"]) == 2
    assert "do not agree with this job" in one_error_line(capsys)
    assert tree(done) == listing


def test_a_killed_run_without_its_manifest_rewrite_is_repaired_from_the_journal(dataset, tmp_path):
    """A kill can leave commits only in the journal; losing the manifest then loses nothing committed."""
    out = tmp_path / "killed"
    env = dict(os.environ, SYNTHGEN_FAILPOINT="after-commit:2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--no-ray", "--out",
                           str(out)], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 0  # the commits are in the journal
    (out / MANIFEST).unlink()
    assert main(["repair", str(dataset.job), "--out", str(out)]) == 0
    assert len(read_manifest(out)["shards"]) == 2
    assert run(dataset, out) == 0
    assert read_manifest(out)["runs"][-1]["shards_written"] == 2
    assert_same_dataset(out, dataset.out)


# --- files that are not ours ---------------------------------------------------------------------
def test_overwrite_refuses_a_folder_whose_manifest_is_not_ours(dataset, tmp_path, capsys):
    web = tmp_path / "webapp"
    for rel, text in {MANIFEST: '{"name": "my web app"}', "annotations.json": "{}", "shards/precious.tar": "x",
                      "parts/keep.parquet": "y", "draft.tmp": "z"}.items():
        (web / rel).parent.mkdir(parents=True, exist_ok=True)
        (web / rel).write_text(text)
    listing = tree(web)
    for extra in ((), ("--overwrite",)):
        assert run(dataset, web, *extra) == 2
        err = one_error_line(capsys)
        assert "not a synthgen manifest" in err and "annotations.json" in err and "--overwrite" not in err
    assert main(["repair", str(dataset.job), "--out", str(web)]) == 2
    one_error_line(capsys)
    assert tree(web) == listing


def test_unrelated_files_survive_reruns_and_overwrite_and_are_reported(dataset, done, capsys):
    mine = {"shards/extra-from-elsewhere.tar": b"user data", "plan.tmp": b"draft", "notes/readme.txt": b"hi",
            "parts/train-000001.parquet.bak": b"backup"}
    for rel, data in mine.items():
        (done / rel).parent.mkdir(parents=True, exist_ok=True)
        (done / rel).write_bytes(data)
    assert run(dataset, done) == 0
    printed = capsys.readouterr().out
    assert "left alone: 4 file(s)" in printed and "shards/extra-from-elsewhere.tar" in printed
    assert sorted(read_manifest(done)["runs"][-1]["left_alone"]) == sorted(["notes", "plan.tmp",
                                                                           "shards/extra-from-elsewhere.tar",
                                                                           "parts/train-000001.parquet.bak"])
    assert_same_dataset(done, dataset.out)
    assert run(dataset, done, "--overwrite", "--set", "seed=5") == 0  # replaces our dataset, not their files
    assert all((done / rel).read_bytes() == data for rel, data in mine.items())
    assert read_manifest(done)["job"]["seed"] == 5


def test_a_non_empty_folder_without_manifest_is_refused_even_with_overwrite(dataset, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    listing = tree(out)
    for extra in ((), ("--overwrite",)):
        assert run(dataset, out, *extra) == 2
        assert "notes.txt" in one_error_line(capsys)
    assert tree(out) == listing


# --- the filesystem says no ------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs mount (root only), unmounted afterwards."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_output_dir_stops_with_one_line_and_changes_nothing(dataset, tmpfs, capsys):
    out = tmpfs / "out"
    shutil.copytree(dataset.out, out)
    (out / "shards" / "train-000002.tar").unlink()  # so the run has work to do
    listing = tree(out)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert run(dataset, out) == 2
    err = one_error_line(capsys)
    assert "output.dir: read-only file system" in err and "committed shards are kept" in err
    assert tree(out) == listing
    fresh = tmpfs / "new"
    assert run(dataset, fresh) == 2
    assert "read-only file system" in one_error_line(capsys) and not fresh.exists()


def test_a_full_disk_stops_with_one_line_and_a_rerun_completes_the_same_bytes(dataset, tmp_path, monkeypatch,
                                                                                capsys):
    out = tmp_path / "full"
    real_write = DatasetWriter._write_tar
    calls = []

    def write_tar(path, kept):
        calls.append(path.name)
        if len(calls) == 3:
            path.write_bytes(b"half a shard")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, kept)

    monkeypatch.setattr(DatasetWriter, "_write_tar", staticmethod(write_tar))
    assert run(dataset, out) == 2
    assert "no space left on device while writing shards/train-000002.tar" in one_error_line(capsys)
    assert len(read_manifest(out)["shards"]) == 2 and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert run(dataset, out) == 0
    assert read_manifest(out)["runs"][-1]["shards_written"] == 2
    assert_same_dataset(out, dataset.out)


# --- a tampered manifest, journal or index: names the plan does not give -------------------------------
def _shard(m: dict, i: int, **changes) -> None:
    m["shards"][i].update(changes)


def _journal_line(out: Path, **changes) -> None:
    record = dict(json.loads((out / MANIFEST).read_text())["shards"][3], **changes)
    with open(out / JOURNAL, "a") as f:
        f.write(json.dumps(record) + "\n")


def _link_shards_elsewhere(out: Path) -> None:
    """shards/ replaced by a link to a folder outside OUT that holds files of the same names."""
    outside = out.parent / "victim" / "linked"
    shutil.copytree(out / "shards", outside)
    shutil.rmtree(out / "shards")
    (out / "shards").symlink_to(outside, target_is_directory=True)


def _link_a_tar_elsewhere(out: Path) -> None:
    (out / "shards" / "train-000000.tar").unlink()
    (out / "shards" / "train-000000.tar").symlink_to(out.parent / "victim" / "v1.txt")


#: (id, change to the manifest dict or None, change to the output dir or None, words of the one line)
TAMPERED = [
    ("traversal in a tar", lambda m, out: _shard(m, 0, tar="../../victim/v1.txt"), None, "shards[0] has tar"),
    ("absolute part", lambda m, out: _shard(m, 1, part=str(out.parent / "victim" / "v2.txt")), None,
     "shards[1] has part"),
    ("traversal in the journal", None, lambda out: _journal_line(out, tar="../../victim/v3.txt"),
     "commits.jsonl[0] has tar"),
    ("shards/ linked outside", None, _link_shards_elsewhere, "shards/ is a link to"),
    ("a tar linked outside", None, _link_a_tar_elsewhere, "leading out of the output dir"),
    ("a duplicate shard", lambda m, out: m["shards"].__setitem__(1, dict(m["shards"][0])), None, "repeats shard"),
    ("a name of another split", lambda m, out: _shard(m, 0, name="val-000000", tar="shards/val-000000.tar",
                                                      part="parts/val-000000.parquet"), None, "'val-000000'"),
    ("a shard past the plan", lambda m, out: _shard(m, 0, name="train-000099", tar="shards/train-000099.tar",
                                                    part="parts/train-000099.parquet"), None, "'train-000099'"),
    ("a name padded otherwise", lambda m, out: _shard(m, 0, name="train-0000000"), None, "'train-0000000'"),
    ("a shard count against the plan", lambda m, out: m["layout"].update(num_shards=99), None,
     "is not a shard plan synthgen writes"),
    ("samples past the limit", lambda m, out: m["layout"].update(samples=10 ** 15, num_shards=25 * 10 ** 13), None,
     "is not a shard plan synthgen writes"),
    ("a size that overflows", lambda m, out: _shard(m, 2, bytes=2 ** 70), None, "not a file size"),
    ("indices not the shard's", lambda m, out: _shard(m, 2, indices=[0, 10 ** 12]), None, "has indices"),
    ("counts that do not add up", lambda m, out: _shard(m, 2, samples=10 ** 9), None, "do not add up"),
    ("a digest that is a path", lambda m, out: _shard(m, 3, sha256="../../victim/v1.txt"), None, "not a sha256"),
    ("more shards than the layout", lambda m, out: m["shards"].extend([dict(m["shards"][0], name=f"x{i}")
                                                                       for i in range(1)]), None, "shards[4]"),
]


@pytest.mark.parametrize("edit_manifest, edit_dir, words", [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_a_tampered_manifest_or_journal_deletes_and_reads_nothing(dataset, done, capsys, edit_manifest, edit_dir,
                                                                   words):
    victim = done.parent / "victim"
    victim.mkdir()
    for name in ("v1.txt", "v2.txt", "v3.txt"):
        (victim / name).write_text(f"the user's {name}\n")
    if edit_manifest is not None:
        manifest = json.loads((done / MANIFEST).read_text())
        edit_manifest(manifest, done)
        (done / MANIFEST).write_text(json.dumps(manifest))
    if edit_dir is not None:
        edit_dir(done)
    outside, inside = tree(victim), tree(done)
    for extra in ((), ("--overwrite",), ("--verify",)):
        assert run(dataset, done, *extra) == 2
        line = one_error_line(capsys)
        assert words in line and "edited or damaged; nothing was deleted or read" in line, line
    assert main(["validate", str(dataset.job), "--out", str(done)]) == 2  # validate and run agree
    assert words in one_error_line(capsys)
    assert main(["verify", str(done)]) == 1  # a mismatch, reported like any other
    assert words in capsys.readouterr().out
    assert main(["export-coco", str(done), "-o", str(done.parent / "coco.json")]) == 2
    assert words in one_error_line(capsys)
    assert tree(victim) == outside and tree(done) == inside


def test_an_index_naming_a_shard_the_manifest_does_not_commit_is_refused_by_readers(dataset, done, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dataset import TamperedError
    from pipeline.loader import CurriculumDataset

    index = pq.read_table(done / "index.parquet")
    shards = index.column("shard").to_pylist()
    shards[0] = "../../../victim.tar"
    pq.write_table(index.set_column(index.schema.get_field_index("shard"), "shard", pa.array(shards)),
                   done / "index.parquet")
    with pytest.raises(TamperedError, match="names shard '../../../victim.tar', which manifest.json does not commit"):
        CurriculumDataset(done)


def test_an_orphan_whose_shards_link_outside_is_not_repaired(dataset, done, capsys):
    _link_shards_elsewhere(done)
    (done / MANIFEST).unlink()
    outside = tree(done.parent / "victim")
    assert main(["repair", str(dataset.job), "--out", str(done)]) == 2
    assert "shards/ is a link to" in one_error_line(capsys)
    assert tree(done.parent / "victim") == outside and not (done / MANIFEST).exists()


def test_repair_with_nothing_to_adopt_writes_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "mine"
    for sub in ("shards", "parts"):
        (out / sub).mkdir(parents=True)
    before = tree(out)
    assert main(["repair", str(dataset.job), "--out", str(out)]) == 2
    assert "holds no shard of this job's plan" in one_error_line(capsys)
    assert tree(out) == before and not (out / MANIFEST).exists()


# --- errors found late leave the dir as it was ---------------------------------------------------------
def test_a_run_that_fails_before_its_first_commit_leaves_no_manifest_and_a_fixed_job_takes_the_dir(
        dataset, tmp_path, monkeypatch, capsys):
    from stages.synthesis import SynthesisStage

    def broken(self, batch):
        raise RuntimeError("the model failed on its first batch")

    out = tmp_path / "late"
    monkeypatch.setattr(SynthesisStage, "__call__", broken)
    assert run(dataset, out) == 1
    assert "the model failed on its first batch" in one_error_line(capsys)
    assert not out.exists()  # open() made it: nothing was committed, so nothing is left
    monkeypatch.undo()
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a dir of the user's that was there before stays theirs
    with monkeypatch.context() as mp:
        mp.setattr(SynthesisStage, "__call__", broken)
        (out / "notes.txt").unlink()
        assert run(dataset, out) == 1
        capsys.readouterr()
    assert out.is_dir() and list(out.iterdir()) == []
    # a manifest with no committed shard (a run killed before its first commit) is not a dataset yet: another
    # job's run takes the dir over without --overwrite
    assert run(dataset, out, "--set", "seed=5", "--set", "samples=4") == 0
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(shards=[], counts={}, complete=False)
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert run(dataset, out) == 0
    assert_same_dataset(out, dataset.out)


def test_validate_refuses_a_read_only_output_dir_as_run_does(dataset, tmpfs, capsys):
    fresh = tmpfs / "new"
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for command in ("validate", "run"):  # the same line, before Ray starts
        assert main([command, str(dataset.job), "--out", str(fresh)]) == 2
        assert f"output.dir: read-only file system in {fresh} (to be made in {tmpfs})" in one_error_line(capsys)
    assert not fresh.exists()


def test_an_interrupt_right_after_a_journal_line_keeps_the_commit(dataset, tmp_path, monkeypatch, capsys):
    """SIGTERM between a shard's journal line and the writer's own bookkeeping: the shard is committed (the line
    is the commit point), so the dir keeps its manifest and the rerun resumes to the same bytes."""
    import pipeline.writer as writer_module
    from pipeline.errors import Terminated

    real = writer_module.append_commit

    def append_then_terminated(out, record):
        real(out, record)
        raise Terminated("signal 15")

    out = tmp_path / "out"
    monkeypatch.setattr(writer_module, "append_commit", append_then_terminated)
    assert run(dataset, out) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / MANIFEST).is_file() and len(read_manifest(out)["shards"]) == 1
    assert run(dataset, out) == 0
    assert_same_dataset(out, dataset.out)
