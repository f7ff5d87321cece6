"""Outline-guided inpainting (``references.mode: inpaint``, stages/inpaint.py): the reference's masks and
annotations are carried exactly, every pixel outside the repaint mask is the reference's own, each sample records
what it repainted, the attention check scores what it claims, every family inpaints, and bad input is one line."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import write_job
from pipeline.cli import main
from pipeline.dataset import read_manifest
from pipeline.runner import run_job
from pipeline.shapes.coco import render_coco
from pipeline.shapes.world import CLASSES, COLORS, HELD_OUT_SEED, render_scene
from pipeline.spec import load_spec
from stages.filters import outline_verdict
from stages.inpaint import outline_check, repaint_mask

PALETTE = {name: list(rgb) for name, rgb in COLORS.items()}
FIRST = HELD_OUT_SEED + 7_000_000


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inpaint") / "real"
    render_coco(folder, 3, first_seed=FIRST)
    return folder


def inpaint_job(folder: Path, model: str, real: Path, samples: int, **extra) -> Path:
    references = {"path": str(real), "mode": "inpaint", "strengths": [0.5], "seeds_per_level": 1,
                  "inpaint": {"dilation": 2, "fill": "palette", "palette": PALETTE}}
    references.update(extra.pop("references", {}))
    sections = dict(classes=[{"name": c, "attributes": list(COLORS)} for c in CLASSES], samples=samples,
                    prompts={"templates": ["{objects}"], "max_classes_per_image": 1},
                    generation={"steps": 4, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 2,
                                "scheduler": "default"},
                    masks={"capture_resolutions": [16, 8], "threshold": "otsu"},
                    filters={"dedup_threshold": None}, output={"dir": str(folder / "out"), "shard_size": 4},
                    references=references)
    sections.update(extra)
    return write_job(folder, model, **sections)


def instances(real: Path) -> list[tuple[str, int]]:
    coco = json.loads((real / "annotations.json").read_text())
    files = {im["id"]: Path(im["file_name"]).stem for im in coco["images"]}
    return sorted((files[a["image_id"]], a["id"]) for a in coco["annotations"])


def committed(out: Path) -> list[dict]:
    rows = []
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[:-5]
            rows.append({"record": json.loads(members[name]),
                         "seg": np.asarray(Image.open(io.BytesIO(members[key + ".seg.png"])))})
    return rows


def test_a_run_carries_the_reference_labels_exactly_and_records_what_it_repainted(tmp_path, tiny_model, real):
    units = instances(real)
    job = inpaint_job(tmp_path, tiny_model, real, len(units),
                      references={"inpaint": {"dilation": 2, "fill": "palette", "palette": PALETTE,
                                              "min_mass_inside": 0.0}})
    spec = load_spec(job)
    run_job(spec, use_ray=False, progress=False)
    rows = committed(tmp_path / "out")
    assert len(rows) == len(units)  # the check is off: every sample kept
    scenes = {f"{FIRST + i:08d}": render_scene(FIRST + i, 64) for i in range(3)}
    for row, (key, ann_id) in zip(rows, units):
        rec, seg = row["record"], row["seg"]
        ref = rec["cond"]["reference"]
        assert (ref["key"], ref["instance"], ref["mode"], ref["dilation"], ref["prompt"], ref["fill"]) == \
            (key, ann_id, "inpaint", 2, "template", "palette")
        assert ref["strength"] == 0.5 and rec["curriculum"]["group_id"] == key and rec["gen"]["pipeline"] == "inpaint"
        scene = scenes[key]
        # annotations: every object of the scene, its exact mask, the repainted one first and marked
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in rec["annotations"]]
        assert len(masks) == len(scene.objects) and sum(a["inpainted"] for a in rec["annotations"]) == 1
        assert rec["annotations"][0]["inpainted"] and rec["annotations"][0]["instance_id"] == ann_id
        truth = sorted((o.mask for o in scene.objects), key=lambda m: m.tobytes())
        assert all(np.array_equal(a, b) for a, b in zip(sorted(masks, key=lambda m: m.tobytes()), truth))
        # the prompt names the repainted class in a colour it did not have
        obj = next(o for o, m in zip(scene.objects, [o.mask for o in scene.objects])
                   if np.array_equal(m, masks[0]))
        assert rec["class_names"][0] == obj.cls and obj.color not in rec["prompt"] and obj.cls in rec["prompt"]
        # seg.png: the scene's semantic mask in the record's class order (largest painted first)
        names = rec["class_names"]
        expected = np.zeros((64, 64), np.uint8)
        for m, a in sorted(zip(masks, rec["annotations"]), key=lambda p: -int(p[0].sum())):
            expected[m] = names.index(CLASSES[a["category_id"] - 1]) + 1
        assert np.array_equal(seg, expected)
        check = rec["scores"]["outline"]
        assert check["class"] == obj.cls and 0.0 <= check["mass_inside"] <= 1.0 and 0.0 <= check["iou"] <= 1.0


def test_outside_the_repaint_mask_every_pixel_is_the_reference_s_own(tmp_path, tiny_model, real):
    from stages.inpaint import ReferenceOutlines
    from stages.references import ReferenceImages, list_references
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    units = instances(real)
    spec = load_spec(inpaint_job(tmp_path, tiny_model, real, len(units)))
    batch = SamplingStage(spec)({"index": np.arange(4)})
    out = SynthesisStage(spec)(batch)
    refs = ReferenceImages(list_references(spec), 64, 64)
    outlines = ReferenceOutlines(spec)
    changed = 0
    for i in range(4):
        ref = json.loads(batch["cond"][i])["reference"]
        outline = outlines.outline(ref)
        repaint = repaint_mask(outline, 2)
        original = refs(ref["key"])
        assert np.array_equal(out["image"][i][~repaint], original[~repaint])  # exact: pasted back
        changed += int((out["image"][i][repaint] != original[repaint]).any())
    assert changed == 4  # and inside it the model drew
    assert out["attn"].shape[:2] == (4, 1) and np.isfinite(out["attn"]).all()


def test_the_outline_check_scores_what_it_claims():
    outline = np.zeros((32, 32), bool)
    outline[8:16, 8:16] = True
    repaint = repaint_mask(outline, 2)
    assert repaint.sum() == 12 * 12 and repaint[6, 6] and not repaint[5, 5]
    inside = np.where(outline, 1.0, 0.0).astype(np.float32)
    outside = np.where(repaint, 0.0, 1.0).astype(np.float32)
    assert outline_check(inside, outline, outline, repaint) == {"mass_inside": 1.0, "iou": 1.0}
    assert outline_check(outside, outside > 0.5, outline, repaint) == {"mass_inside": 0.0, "iou": 0.0}
    assert outline_check(np.zeros_like(inside), np.zeros_like(outline), outline, repaint)["mass_inside"] == 0.0
    opts = type("O", (), {"min_mass_inside": 0.5, "min_iou": 0.3})
    scores = {"outline": {"class": "star", "mass_inside": 0.4, "iou": 0.9}, "outline_empty": False}
    assert outline_verdict(scores, opts) == "outline:star"
    assert outline_verdict({**scores, "outline": {"class": "star", "mass_inside": 0.6, "iou": 0.2}}, opts) == \
        "outline:star"
    assert outline_verdict({**scores, "outline": {"class": "star", "mass_inside": 0.6, "iou": 0.4}}, opts) == ""
    assert outline_verdict({"outline": None, "outline_empty": False}, opts) == ""  # empty prompt: no check
    assert outline_verdict({"outline": None, "outline_empty": True}, opts) == "outline-empty"


def coco_with(real: Path, folder: Path, edit) -> Path:
    """A copy of the COCO folder ``real`` whose annotations ``edit(data)`` changed."""
    import shutil

    shutil.copytree(real, folder)
    data = json.loads((folder / "annotations.json").read_text())
    edit(data)
    (folder / "annotations.json").write_text(json.dumps(data))
    return folder


def _empty_first(data):
    rle = mask_utils.encode(np.asfortranarray(np.zeros((64, 64), np.uint8)))
    data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": rle["counts"].decode()}


def _whole_first(data):
    rle = mask_utils.encode(np.asfortranarray(np.ones((64, 64), np.uint8)))
    data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": rle["counts"].decode()}


def _no_annotations(data):
    data["annotations"] = []


@pytest.mark.parametrize("case, expected", [
    ("empty", "has an empty mask"),
    ("whole", "covers the whole image"),
    ("unannotated", "has no annotated images"),
    ("unknown id", "has no annotation 999"),
    ("options without mode", "inpaint options are set but mode is img2img"),
    ("palette missing", "fill: palette needs palette"),
    ("wrong count", "instances x 1 strengths x 1 seeds_per_level"),
])
def test_bad_inpaint_input_is_one_line_and_exit_2_before_anything_is_written(case, expected, tmp_path, tiny_model,
                                                                             real, capsys):
    n = len(instances(real))
    refs: dict = {}
    folder = real
    if case == "empty":
        folder = coco_with(real, tmp_path / "coco", _empty_first)
    elif case == "whole":
        folder = coco_with(real, tmp_path / "coco", _whole_first)
    elif case == "unannotated":
        folder = coco_with(real, tmp_path / "coco", _no_annotations)
    elif case == "unknown id":
        key = instances(real)[0][0]
        (tmp_path / "pick.csv").write_text(f"key,ann\n{key},999\n")
        refs = {"select": {"path": str(tmp_path / "pick.csv"), "instance_column": "ann"}}
        n = 1
    elif case == "options without mode":
        refs = {"mode": "img2img"}
    elif case == "palette missing":
        refs = {"inpaint": {"fill": "palette"}}
    elif case == "wrong count":
        n += 1
    job = inpaint_job(tmp_path, tiny_model, folder, n, references={"path": str(folder), **refs})
    for command in (["validate", str(job)], ["run", str(job), "--no-ray"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_select_instance_column_picks_single_instances(tmp_path, tiny_model, real):
    from stages.references import inpaint_references

    units = instances(real)
    (tmp_path / "pick.csv").write_text("key,ann\n" + "".join(f"{k},{a}\n" for k, a in units[::2]))
    spec = load_spec(inpaint_job(tmp_path, tiny_model, real, len(units[::2]),
                                 references={"select": {"path": str(tmp_path / "pick.csv"), "instance_column": "ann"}}))
    picked = inpaint_references(spec).instances
    assert [(i.key, i.outline.id) for i in picked] == units[::2]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    from family_models import BUILDERS
    from mmdit_models import build_flux, build_sd3

    root = tmp_path_factory.mktemp("inpaint-families")  # SD 2.x inpaints through SD 1.x's pipeline class
    return {**{name: BUILDERS[name](root / name) for name in ("sd15", "sdxl")},
            "sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux")}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_every_family_inpaints_with_random_weights(family, family_models, tmp_path, real):
    """Each family's inpainting pipeline (diffusers' on the same components) runs one batch: outside the repaint
    mask the reference's pixels, exactly; a map of the recorded grid; the reference's annotations as labels."""
    from stages.labels import LabelStage
    from stages.masks import MaskStage
    from stages.references import ReferenceImages, list_references
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    units = instances(real)
    job = inpaint_job(tmp_path, str(family_models[family]), real, len(units),
                      generation={"steps": 3, "guidance_scale": 4.0, "height": 64, "width": 64, "batch_size": 2,
                                  "scheduler": "default"},
                      masks={"capture_resolutions": [16] if family in ("sd3", "flux") else ["1/2"],
                             "threshold": "otsu"},
                      references={"strengths": [0.7]})
    spec = load_spec(job)
    batch = SamplingStage(spec)({"index": np.arange(2)})
    out = SynthesisStage(spec)(batch)
    out = LabelStage(spec)(MaskStage(spec)(out))
    refs = ReferenceImages(list_references(spec), 64, 64)
    for i in range(2):
        ref = json.loads(batch["cond"][i])["reference"]
        repaint = repaint_mask(_outline(spec, ref), 2)
        original = refs(ref["key"])
        assert np.array_equal(out["image"][i][~repaint], original[~repaint])
        anns = json.loads(out["annotations"][i])
        assert anns[0]["instance_id"] == ref["instance"] and anns[0]["inpainted"]
    grid = json.loads(out["gen"][0])["capture"]["map_grid"]
    assert out["attn"].shape[2:] == tuple(grid) and np.isfinite(out["attn"]).all()


def _outline(spec, ref: dict) -> np.ndarray:
    from stages.inpaint import ReferenceOutlines

    return ReferenceOutlines(spec).outline(ref)


def test_a_9_channel_inpainting_checkpoint_runs_inpaint_jobs_and_refuses_the_others(tmp_path, real, capsys,
                                                                                      family_models):
    """An SD inpainting checkpoint (UNet in_channels 9: latent + mask + masked-image latent) repaints through
    StableDiffusionInpaintPipeline's own conditioning; a text-to-image job on it is one line, exit 2."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    folder = family_models["sd15"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    nine = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, unet=nine, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd15-inpainting", safe_serialization=True)
    model = tmp_path / "sd15-inpainting"
    units = instances(real)
    job = inpaint_job(tmp_path, str(model), real, len(units), masks={"capture_resolutions": ["1/2"]},
                      references={"strengths": [1.0]})
    assert main(["validate", str(job)]) == 0
    spec = load_spec(job)
    batch = SamplingStage(spec)({"index": np.arange(2)})
    out = SynthesisStage(spec)(batch)
    for i in range(2):
        ref = json.loads(batch["cond"][i])["reference"]
        repaint = repaint_mask(_outline(spec, ref), 2)
        from stages.references import ReferenceImages, list_references

        original = ReferenceImages(list_references(spec), 64, 64)(ref["key"])
        assert np.array_equal(out["image"][i][~repaint], original[~repaint])
    text = write_job(tmp_path / "t2i", str(model), classes=list(CLASSES), samples=2,
                     output={"dir": str(tmp_path / "t2i-out"), "shard_size": 2},
                     generation={"steps": 2, "height": 64, "width": 64, "batch_size": 2},
                     masks={"capture_resolutions": ["1/2"]})
    capsys.readouterr()
    assert main(["validate", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inpainting checkpoint (unet in_channels 9)" in err[0]


def test_the_quality_benchmark_reads_every_sample_with_the_oracle(tmp_path):
    """benchmarks.inpaint_quality at a tiny size, with the bundled judge: every sample read, numbers in range, the
    sweeps applied to the recorded scores, and the job's own verdict (outline check and judge) among them."""
    from benchmarks.inpaint_quality import main as quality

    out = tmp_path / "q.json"
    judge = Path(__file__).resolve().parents[1] / "pipeline" / "models" / "shapes-judge"
    assert quality(["--n", "2", "--set", "generation.steps=4", "--set", f"judge={{path: {judge}}}",
                    "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == result["instances"] * 2 > 0  # 1 strength x 2 seeds per instance
    for key in ("found_all", "iou_all", "kept_fraction", "right_and_kept_of_all"):
        assert 0.0 <= result[key] <= 1.0
    assert set(result["ceiling"]) == {"silhouette", "vae"} and result["ceiling"]["silhouette"]["iou"] > 0.5
    assert result["psnr_outside_codec_mean_db"] > 20
    job = next(r for r in result["sweep"] if (r["min_mass_inside"], r["min_iou"]) == (0.5, 0.0))
    assert 0.0 <= job["kept_fraction"] <= 1.0
    sweep = {(r["outline_check"], r["min_score"]): r["kept_fraction"] for r in result["judge_sweep"]}
    assert result["judge"]["min_score"] == 0.5 and sweep[("job", 0.5)] == result["kept_fraction"]
    assert sweep[("off", 0.0)] >= sweep[("job", 0.0)] >= sweep[("job", 0.5)] >= sweep[("job", 0.9)]


def test_eval_with_coco_truth_runs_an_inpainting_job_one_case_per_instance(tmp_path, tiny_model, real):
    """``synthgen eval --truth coco:DIR`` on an inpainting job: each case repaints one instance with the job's
    options, and its outline is the truth; the labels are that outline, so their mask IoU is 1."""
    from pipeline.evaluate import CocoTruth, evaluate

    units = instances(real)
    spec = load_spec(inpaint_job(tmp_path, tiny_model, real, len(units)))
    result = evaluate(spec, 3, progress=False, truth=CocoTruth(real, strength=0.5))
    refined = result["refined"]
    assert refined["samples"] == 3 and refined["gt_objects"] == 3
    assert refined["semantic"]["miou"] == 1.0 and refined["instance_mask_iou_mean"] == 1.0
    assert refined["missing_object_rate"] == 0.0


def test_a_redraw_repaints_at_the_next_strength_of_the_ladder_and_the_row_says_so(tmp_path, tiny_model, real):
    """``references.inpaint.redraw_strengths``: with a check nothing passes (attention IoU ≥ 1), each sample is
    drawn 3 times, at 0.5 (its own), then 0.4, then 0.3 (the last, again); the delivered row's gen, cond and
    curriculum all say 0.3, its rejected attempts are recorded, and without redraws the field is refused."""
    from pipeline.spec import SpecError
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    references = {"inpaint": {"dilation": 2, "fill": "palette", "palette": PALETTE, "min_iou": 1.0,
                              "redraw_strengths": [0.4, 0.3]}}
    spec = load_spec(inpaint_job(tmp_path / "a", str(tiny_model), real, 8, references=references,
                                 generation={"steps": 10, "guidance_scale": 5.0, "height": 64, "width": 64,
                                             "batch_size": 2, "scheduler": "default", "redraws": 3}))
    rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
    out = SynthesisStage(spec)(rows)
    for i in range(4):
        gen, cond, cur = (json.loads(str(out[c][i])) for c in ("gen", "cond", "curriculum"))
        assert gen["attempt"] == 3 and [r["attempt"] for r in gen["rejected"]] == [0, 1, 2]
        assert all(r["reason"].startswith("outline:") for r in gen["rejected"])
        assert gen["strength"] == cond["reference"]["strength"] == cur["strength"] == 0.3
        assert cur["image_guidance"] == cur["difficulty"] == 0.7 and cur["level"] == 0
        assert json.loads(str(rows["cond"][i]))["reference"]["strength"] == 0.5  # the sample's own, as sampled
    with pytest.raises(SpecError, match="references.inpaint.redraw_strengths"):
        load_spec(inpaint_job(tmp_path / "b", str(tiny_model), real, 8, references=references))


def test_a_judge_reads_the_repainted_instance_on_its_outline_crop(tmp_path, tiny_model, real):
    """With a judge, an inpainting sample's ``gen["judge"]`` holds one score, the repainted class's, read on the crop
    around its outline (the label): the other classes are the reference's own objects, not judged."""
    from stages.judges import CROP_MARGIN, ClassifierJudge, crop, square_box
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    judge_path = Path(__file__).resolve().parents[1] / "pipeline" / "models" / "shapes-judge"
    spec = load_spec(inpaint_job(tmp_path, str(tiny_model), real, 8, judge={"path": str(judge_path)}))
    rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
    out = SynthesisStage(spec).draw(rows)
    judge = ClassifierJudge(judge_path)
    assert any(len(json.loads(str(c))) > 1 for c in rows["class_names"])  # scenes with other objects
    for i in range(4):
        name = json.loads(str(rows["class_names"][i]))[0]
        outline = _outline(spec, json.loads(str(rows["cond"][i]))["reference"])
        expected = judge.probabilities([crop(out["image"][i], square_box(outline, CROP_MARGIN))])[0]
        assert json.loads(str(out["gen"][i]))["judge"] == [round(float(expected[judge.index[name]]), 4)]


def test_a_crop_repaints_a_small_outline_at_full_size_and_its_maps_land_in_the_box(tmp_path, tiny_model, real):
    """``references.inpaint.crop_padding``: the call sees the outline's box (diffusers' crop region) resized to
    the generation size; outside the repaint mask the pixels stay the reference's, the record says the padding,
    and the maps come back on the whole image's grid, zero outside the box."""
    from stages.inpaint import ReferenceOutlines, crop_box, maps_from_crop, to_crop
    from stages.references import ReferenceImages, list_references
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    units = instances(real)
    opts = {"dilation": 0, "fill": "palette", "palette": PALETTE, "crop_padding": 4}
    spec = load_spec(inpaint_job(tmp_path, tiny_model, real, len(units), references={"inpaint": opts}))
    batch = SamplingStage(spec)({"index": np.arange(4)})
    out = SynthesisStage(spec)(batch)
    refs, outlines = ReferenceImages(list_references(spec), 64, 64), ReferenceOutlines(spec)
    plain = load_spec(inpaint_job(tmp_path / "plain", tiny_model, real, len(units), references={
        "inpaint": {**opts, "crop_padding": None}}))
    plain = SynthesisStage(plain)(SamplingStage(plain)({"index": np.arange(4)}))
    for i in range(4):
        ref = json.loads(batch["cond"][i])["reference"]
        assert ref["crop_padding"] == 4
        outline, original = outlines.outline(ref), refs(ref["key"])
        x1, y1, x2, y2 = box = crop_box(outline, 4)
        ys, xs = np.nonzero(outline)
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2 and x2 - x1 == y2 - y1 < 64
        image, mask = to_crop(original, outline, box)  # the outline, enlarged: more pixels for the model
        assert image.shape == original.shape and mask.sum() > 1.5 * outline.sum()
        assert np.array_equal(out["image"][i][~outline], original[~outline])
        assert not np.array_equal(out["image"][i][outline], plain["image"][i][outline])  # another call drew it
        attn = out["attn"][i, 0].astype(np.float32)  # the maps' grid: 64 / its side pixels per cell
        cell = 64 // attn.shape[0]
        inside = np.zeros(attn.shape, bool)
        inside[y1 // cell:-(-y2 // cell), x1 // cell:-(-x2 // cell)] = True
        assert attn.max() == pytest.approx(1.0, abs=1e-3) and attn[~inside].max() == 0.0
    # a map that fills its crop fills exactly the box on the whole image's grid
    import torch

    warped = maps_from_crop(torch.ones(1, 1, 16, 16), [(16, 32, 48, 64)], 64, 64)[0, 0]
    assert warped[8:16, 4:12].min() == 1.0 and warped.sum() == pytest.approx(64, abs=1e-4)
