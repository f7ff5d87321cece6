"""``generation.batch_size: auto`` (pipeline/batch_size.py): the number fits the measured memory and divides the
shard size; a run measures it once, records it in the manifest and makes the bytes an explicit batch size of
that number makes; later runs take it from the manifest; a device too small is one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_same_dataset, write_job
from pipeline import batch_size
from pipeline.cli import main
from pipeline.runner import run_job
from pipeline.spec import load_spec

GIB = 1 << 30


def test_fit_takes_the_largest_divisor_of_the_shard_that_fits():
    # 10 GiB free: 0.85 x 10 - 1 = 7.5 GiB for images at 1 GiB each -> 7; the largest divisor of 12 up to 7 is 6
    assert batch_size.fit(10 * GIB, 1 * GIB, 1 * GIB, 12) == 6
    assert batch_size.fit(10 * GIB, 1 * GIB, 1 * GIB, 7) == 7
    assert batch_size.fit(10 * GIB, 1 * GIB, 1 * GIB, 11) == 1  # prime: only single images divide it
    assert batch_size.fit(1000 * GIB, 0, 1 << 20, 1000) == 50  # at most MAX_AUTO (64): 50 divides 1000
    assert batch_size.fit(1 * GIB, 1 * GIB, 1 * GIB, 8) == 0  # not even one image fits


def test_a_run_measures_once_records_the_number_and_writes_the_bytes_of_that_number(tmp_path, tiny_model, capsys):
    job = write_job(tmp_path / "auto", tiny_model, generation={"batch_size": "auto"})
    spec = load_spec(job)
    summary = run_job(spec, use_ray=False, progress=True)
    note = summary["batch_size_auto"]
    size = note["batch_size"]
    assert note["from"] == "measured" and note["device"] == "cpu" and note["per_image_bytes"] > 0
    assert note["free_bytes"] > 0 and 4 % size == 0  # a divisor of the tiny job's shard size
    assert f"generation.batch_size auto: {size}, the largest divisor of output.shard_size up to" in \
        capsys.readouterr().err
    manifest = json.loads((Path(spec.output.dir) / "manifest.json").read_text())
    assert manifest["job"]["generation"]["batch_size"] == size
    # an explicit batch size of that number: the same fingerprint and the same bytes
    fixed = load_spec(write_job(tmp_path / "fixed", tiny_model, generation={"batch_size": size}))
    run_job(fixed, use_ray=False, progress=False)
    assert_same_dataset(Path(spec.output.dir), Path(fixed.output.dir))
    # a later run over the same dir (more samples) takes the number from the manifest, measuring nothing
    measured = []
    original = batch_size.measure
    try:
        batch_size.measure = lambda s: measured.append(s) or original(s)
        more = run_job(load_spec(job, ["samples=20"]), use_ray=False, progress=False)
    finally:
        batch_size.measure = original
    assert not measured and more["batch_size_auto"] == {"batch_size": size, "from": "manifest"}
    assert main(["validate", str(job), "--set", "samples=20"]) == 0
    assert f"batch_size auto: {size}, as the first run measured" in capsys.readouterr().out
    # with the manifest lost, repair cannot know the number: it asks for it (and repairs with it)
    (Path(spec.output.dir) / "manifest.json").unlink()
    assert main(["repair", str(job)]) == 2
    assert "give it: --set generation.batch_size=N" in capsys.readouterr().err
    assert main(["repair", str(job), "--set", "samples=20", "--set", f"generation.batch_size={size}"]) == 0


def test_a_device_too_small_is_one_line_and_exit_2_with_nothing_written(tmp_path, tiny_model, capsys, monkeypatch):
    job = write_job(tmp_path, tiny_model, generation={"batch_size": "auto"})
    monkeypatch.setattr(batch_size, "available_memory", lambda: 1 << 20)  # 1 MiB free
    assert main(["run", str(job), "--no-ray"]) == 2
    # one line of ours (before it, in this test's process only: the libraries' load bars, which the CLI's own process
    # switches off before importing them)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("synthgen")]
    assert len(err) == 1 and "generation.batch_size: auto, but one image needs" in err[0]
    assert "set a batch_size, or use a device with more memory" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_output_dir_is_checked_before_anything_is_measured(tmp_path, tiny_model, capsys, monkeypatch):
    job = write_job(tmp_path, tiny_model, generation={"batch_size": "auto"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not synthgen's")
    monkeypatch.setattr(batch_size, "measure", lambda *a, **k: pytest.fail("measured before the dir check"))
    assert main(["run", str(job), "--no-ray"]) == 2
    assert "not a synthgen output" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
