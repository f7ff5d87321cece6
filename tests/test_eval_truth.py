"""`synthgen eval --truth coco:DIR` and `--calibrate` through a COCO folder of annotated images (built
from the shapes world, so every true mask is known exactly): the truth masks, the per-class IoU
against an explicit computation, calibration, and the one-line errors when no truth fits the job."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import cli
from pipeline import evaluate as ev
from pipeline.shapes.coco import categories, scene_annotations
from pipeline.shapes.world import CLASSES, render_scene
from pipeline.spec import SpecError, load_spec
from stages.masks import IGNORE

from conftest import write_job

PAD = 16  # columns added on each side: the truth must be cropped back exactly as the reference image is
#: (classes, colours) per image; images 0-3 are evaluated (-n 4), images 4-7 calibrate (the last 4)
SCENES = [(["circle", "circle"], ["red", "blue"]), (["square", "star"], ["green", "yellow"]),
          (["triangle"], ["purple"]), (["star", "circle"], ["orange", "red"]),
          (["circle"], ["blue"]), (["square"], ["red"]), (["triangle"], ["green"]), (["star"], ["yellow"])]
FAST = {"generation": {"steps": 4, "batch_size": 2, "scheduler": "ddim", "height": 64, "width": 64,
                       "guidance_scale": 4.0}}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO folder of 8 padded shapes-world scenes (96x64) and the unpadded scenes themselves."""
    folder = tmp_path_factory.mktemp("coco")
    (folder / "images").mkdir()
    images, anns, scenes = [], [], []
    for i, (classes, colours) in enumerate(SCENES):
        scene = render_scene(5_000_000 + i, 64, classes=classes, colors=colours)
        padded = np.pad(scene.image, ((0, 0), (PAD, PAD), (0, 0)), constant_values=128)
        for obj in scene.objects:
            obj.mask = np.pad(obj.mask, ((0, 0), (PAD, PAD)))
        name = f"images/img{i:02d}.png"
        Image.fromarray(padded).save(folder / name)
        images.append({"id": i + 1, "file_name": name, "width": 64 + 2 * PAD, "height": 64})
        anns += scene_annotations(scene, i + 1, len(anns) + 1)
        for obj in scene.objects:  # back to the 64x64 truth the test compares with
            obj.mask = obj.mask[:, PAD:-PAD]
        scenes.append(scene)
    (folder / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                         "categories": categories()}))
    return folder, scenes


def prompted(scene):
    """The class the variation prompts: the largest object's (ties: the first annotated)."""
    return max(scene.objects, key=lambda o: (int(o.mask.sum()), -scene.objects.index(o))).cls


def test_coco_truth_masks_are_the_annotations_cropped_back(coco, tmp_path, tiny_model):
    folder, scenes = coco
    spec = load_spec(write_job(tmp_path, tiny_model, **FAST))
    truth = ev.CocoTruth(folder, strength=0.5)
    run, prompts = truth.job(spec, 4, calibration=False)
    assert run.references.strengths == [0.5] and run.samples == 8
    assert [p.text for p in prompts] == ["img00", "img01", "img02", "img03"]
    blank = np.zeros((64, 64, 3), np.uint8)
    for p, scene in zip(prompts, scenes):
        cls = prompted(scene)
        want = sorted((o.mask for o in scene.objects if o.cls == cls), key=lambda m: -int(m.sum()))  # largest first
        got = truth.masks(p, blank)
        assert [c for _, c in p.objects] == [cls] * len(want)
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert len(prompts[0].objects) == 2  # both circles of image 0 are truth
    _, last = truth.job(spec, 4, calibration=True)
    assert [p.text for p in last] == ["img04", "img05", "img06", "img07"]


def explicit_per_class(samples, scenes) -> dict[str, float]:
    """Per-class IoU summed over the samples, by hand: prediction = the semantic mask's 1 (the prompted
    class), truth = the scene's objects of that class; ignore pixels left out; classes in either."""
    inter, union, seen = {}, {}, set()
    for s, scene in zip(samples, scenes):
        cls = prompted(scene)
        truth = np.zeros((64, 64), bool)
        for o in scene.objects:
            if o.cls == cls:
                truth |= o.mask
        pred = s.semantic == 1
        valid = s.semantic != IGNORE
        if (pred | truth).any():
            seen.add(cls)
        inter[cls] = inter.get(cls, 0) + int((pred & truth & valid).sum())
        union[cls] = union.get(cls, 0) + int(((pred | truth) & valid).sum())
    return {c: round(inter[c] / union[c], 4) if union[c] else None for c in sorted(seen)}


def test_eval_through_a_coco_folder_scores_per_class_iou_as_computed_by_hand(coco, tmp_path, tiny_model):
    folder, scenes = coco
    job = write_job(tmp_path, tiny_model, **FAST)
    spec = load_spec(job)
    truth = ev.CocoTruth(folder, strength=0.5)
    run, prompts = truth.job(spec, 4, calibration=False)
    refined, raw, batches, _ = ev.generate(run, prompts, truth, progress=False)
    gens = [json.loads(g) for b in batches for g in b["gen"]]
    assert [g["strength"] for g in gens] == [0.5] * 4  # img2img variations, not text-to-image
    ids = {c.name: i + 1 for i, c in enumerate(spec.classes)}
    expected = explicit_per_class(refined, scenes)
    assert set(expected) == {prompted(s) for s in scenes[:4]} and len(expected) >= 3
    sem = ev.semantic_scores(refined, ids)
    assert sem["per_class"] == expected
    assert sum(v > 0 for v in expected.values()) >= 2, expected  # the tiny model's masks do overlap the truth
    assert ev.semantic_scores(raw, ids)["per_class"] == explicit_per_class(raw, scenes)

    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(job), "--truth", f"coco:{folder}", "--strength", "0.5", "-n", "4",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"]["truth"] == f"coco:{folder}" and result["prompts"]["strength"] == 0.5
    assert result["prompts"]["n"] == 4 and result["prompts"]["objects"] == 5  # two circles in image 0
    assert result["refined"]["semantic"]["per_class"] == expected  # the CLI runs the same, deterministically


def test_calibrate_through_a_coco_folder(coco, tmp_path, tiny_model):
    folder, _ = coco
    job = write_job(tmp_path, tiny_model, **FAST)
    cal = tmp_path / "cal.json"
    assert cli.main(["eval", str(job), "--truth", f"coco:{folder}", "--strength", "0.5", "-n", "4",
                     "--calibrate", str(cal)]) == 0
    result = json.loads(cal.read_text())
    assert set(result["class_thresholds"]) == {"circle", "square", "triangle", "star"}
    assert all(t in ev.CALIBRATION_GRID for t in result["class_thresholds"].values())
    assert result["prompts"]["truth"] == f"coco:{folder}" and result["prompts"]["n"] == 4
    assert all(0.0 <= v <= 1.0 for v in result["calibration_iou"].values())
    spec = load_spec(write_job(tmp_path, tiny_model, name="cal-job.yaml",
                               masks={"threshold": "calibrated", "calibration": str(cal)}, **FAST))
    assert spec.masks.class_thresholds == result["class_thresholds"]


@pytest.mark.parametrize("case, message", [
    ("dog-job", "not a shapes-world job"),
    ("no-folder", "no annotations.json"),
    ("bad-source", "expected 'oracle' or 'coco:DIR'"),
    ("too-many", "has 8 annotated images"),
    ("foreign-classes", "are not in the job's classes"),
])
def test_no_fitting_truth_is_one_line_and_exit_2(case, message, coco, tmp_path, tiny_model, capsys):
    folder, _ = coco
    classes = [{"name": "dog"}, {"name": "cat"}] if case in ("dog-job", "foreign-classes") else None
    job = write_job(tmp_path, tiny_model, **({"classes": classes} if classes else {}))
    truth = {"dog-job": [], "no-folder": ["--truth", f"coco:{tmp_path / 'nothing'}"],
             "bad-source": ["--truth", "imagenet"], "too-many": ["--truth", f"coco:{folder}", "-n", "9"],
             "foreign-classes": ["--truth", f"coco:{folder}"]}[case]
    n = [] if "-n" in truth else ["-n", "2"]
    assert cli.main(["eval", str(job), *truth, *n, "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.json").exists()


def test_the_oracle_is_the_default_truth_for_shapes_jobs(tmp_path, tiny_model):
    spec = load_spec(write_job(tmp_path, tiny_model))
    assert isinstance(ev.truth_source(None, spec), ev.OracleTruth)
    assert isinstance(ev.truth_source("coco:/x", spec), ev.CocoTruth)
    with pytest.raises(SpecError, match="not a shapes-world job"):
        ev.truth_source(None, load_spec(write_job(tmp_path, tiny_model, name="d.yaml", classes=[{"name": "dog"}, {"name": "cat"}])))
    assert set(CLASSES) >= {c.name for c in spec.classes}
