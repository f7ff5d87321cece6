"""`synthgen eval` scoring (on known masks), calibration files in job specs, and one tiny real eval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from pipeline import evaluate as ev
from pipeline.shapes.world import CLASSES, render_scene
from pipeline.spec import SpecError, load_spec
from stages.labels import encode_instances
from stages.masks import IGNORE

from conftest import REPO, write_job

IDS = {c: i + 1 for i, c in enumerate(CLASSES)}


def rendered(seed: int, n_objects: int = 2):
    """A rendered scene as an eval sample: its true masks, and a perfect labelling of it."""
    scene = render_scene(seed, n_objects=n_objects)
    prompt = ev.Prompt(seed, scene.caption, [(o.color, o.cls) for o in scene.objects])
    semantic = np.zeros((64, 64), np.uint8)
    for i, o in enumerate(scene.objects):
        semantic[o.mask] = i + 1
    anns = [{"category_id": IDS[o.cls], "score": 0.9, **enc}
            for o, enc in zip(scene.objects, encode_instances([o.mask for o in scene.objects]))]
    return ev.Sample(prompt, [o.mask for o in scene.objects], semantic, anns)


def test_perfect_labels_score_one():
    samples = [rendered(s) for s in range(6)]
    result, complete = ev.score(samples, IDS)
    assert result["semantic"]["miou"] == pytest.approx(1.0)
    assert result["semantic"]["background_iou"] == pytest.approx(1.0)
    assert result["instance_mask_iou_mean"] == pytest.approx(1.0)
    assert result["bbox"]["AP50"] == pytest.approx(1.0) and result["segm"]["AP"] == pytest.approx(1.0)
    assert result["missing_object_rate"] == 0.0 and all(complete)


def test_missing_and_wrong_class_objects_are_counted():
    good, wrong, lost = rendered(10), rendered(11), rendered(12)
    wrong.annotations[0]["category_id"] = IDS["cross"] if wrong.annotations[0]["category_id"] != IDS["cross"] \
        else IDS["circle"]
    lost.annotations = lost.annotations[1:]
    result, complete = ev.score([good, wrong, lost], IDS)
    assert complete == [True, False, False]
    assert result["missing_object_rate"] == pytest.approx(2 / 6)
    assert result["bbox"]["AP50"] < 1.0


def test_ignore_pixels_are_left_out_or_counted_as_wrong():
    sample = rendered(20, n_objects=1)
    truth = sample.truth[0]
    sample.semantic = np.where(truth, IGNORE, 0).astype(np.uint8)  # the whole object marked "unsure"
    sem = ev.semantic_scores([sample], IDS)
    cls = sample.prompt.objects[0][1]
    assert sem["ignore_fraction"] == pytest.approx(truth.mean())
    assert sem["miou_ignore_as_background"] == 0.0
    assert sem["per_class"][cls] is None and sem["miou"] == 0.0  # nothing of it left to score


def test_half_a_mask_has_iou_one_half():
    sample = rendered(30, n_objects=1)
    truth = sample.truth[0]
    ys = np.nonzero(truth)[0]
    half = truth & (np.arange(64)[:, None] <= np.median(ys))
    sample.semantic = half.astype(np.uint8)
    sem = ev.semantic_scores([sample], IDS)
    assert sem["miou"] == pytest.approx(half.sum() / truth.sum())


def test_calibration_file_fills_the_class_thresholds(tmp_path, tiny_model):
    calib = tmp_path / "cal.json"
    thresholds = {"circle": 0.3, "square": 0.6, "triangle": 0.45, "star": 0.5}  # the tiny job's classes
    calib.write_text(json.dumps({"class_thresholds": thresholds}))
    job = write_job(tmp_path, tiny_model, masks={"threshold": "calibrated", "calibration": "cal.json"})
    spec = load_spec(job)
    assert spec.masks.class_thresholds == thresholds
    assert spec.masks.calibration == str(calib.resolve())
    assert spec.model_dump()["masks"]["class_thresholds"]["square"] == 0.6  # what the manifest stores


@pytest.mark.parametrize("content, message", [
    (None, r"cal.json does not exist \(a relative path in a job file resolves against the job file.s folder\)"),
    ("not json", "cannot read class_thresholds"),
    (json.dumps({"class_thresholds": {"circle": 0.3}}), "masks.class_thresholds"),
])
def test_bad_calibration_file_is_a_clear_error(tmp_path, tiny_model, content, message):
    if content is not None:
        (tmp_path / "cal.json").write_text(content)
    job = write_job(tmp_path, tiny_model, masks={"threshold": "calibrated", "calibration": "cal.json"})
    with pytest.raises(SpecError, match=message):
        load_spec(job)


def test_calibration_and_inline_thresholds_conflict(tmp_path, tiny_model):
    (tmp_path / "cal.json").write_text(json.dumps({"class_thresholds": {"circle": 0.3}}))
    job = write_job(tmp_path, tiny_model, masks={"calibration": "cal.json", "class_thresholds": {"circle": 0.4}})
    with pytest.raises(SpecError, match="not both"):
        load_spec(job)


def test_eval_and_calibrate_run_the_job_stages(tmp_path, tiny_model, capsys, monkeypatch):
    """A real (tiny) `synthgen eval` and `--calibrate` on the bundled model: the job's refined masks
    score at least the raw attention's mIoU, calibrated thresholds come from the searched grid."""
    job = REPO / "jobs" / "shapes-demo.yaml"
    fast = ["--set", f"model.path={tiny_model}", "--set", "generation.steps=4", "--set", "generation.batch_size=4"]
    out = tmp_path / "eval.json"
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(job), *fast, "-n", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"]["n"] == 4 and result["refined"]["samples"] == 4
    for key in ("raw", "refined"):
        assert 0.0 <= result[key]["semantic"]["miou"] <= 1.0
        assert 0.0 <= result[key]["bbox"]["AP50"] <= 1.0
    raw, refined = result["raw"]["semantic"]["miou"], result["refined"]["semantic"]["miou"]
    assert refined >= raw > 0.0, (raw, refined)  # refinement is what the job adds over raw attention
    assert result["filters"]["kept"] + result["filters"]["rejected"] == 4
    assert "mIoU" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "empty")
    assert cli.main(["eval", str(job), *fast, "-n", "2"]) == 0  # without --json: the table, and no file anywhere
    captured = capsys.readouterr()
    assert "mIoU" in captured.out and "wrote" not in captured.out and list(Path.cwd().iterdir()) == []
    assert "2/2" in captured.err  # its progress bar (images)

    calib = tmp_path / "cal.json"
    assert cli.main(["eval", str(job), *fast, "-n", "8", "--calibrate", str(calib)]) == 0
    calibration = json.loads(calib.read_text())
    thresholds, ious = calibration["class_thresholds"], calibration["calibration_iou"]
    assert set(thresholds) == set(ious) == set(CLASSES)
    assert all(t in ev.CALIBRATION_GRID for t in thresholds.values()), thresholds  # the searched thresholds
    assert all(0.0 <= v <= 1.0 for v in ious.values()) and max(ious.values()) > 0.0, ious
    objects = sum(len(p.objects) for p in ev.shapes_prompts(8, ev.CALIBRATION_SEED))
    assert calibration["prompts"] == {"truth": "oracle", "n": 8, "objects": objects, "first_seed": ev.CALIBRATION_SEED}
    spec = load_spec(job, [f"model.path={tiny_model}", "masks.threshold=calibrated", f"masks.calibration={calib}"])
    assert spec.masks.class_thresholds == thresholds


def test_eval_refuses_a_job_without_the_shapes_classes(tmp_path, tiny_model, capsys):
    job = write_job(tmp_path, tiny_model)  # circle, square, triangle, star: no ring, no cross
    assert cli.main(["eval", str(job), "-n", "20", "--json", str(tmp_path / "e.json")]) == 2
    assert "classes lack" in capsys.readouterr().err and not (tmp_path / "e.json").exists()
