"""Several instances of one class: multi-instance shapes-world scenes, the label stage's instance split
(touching same-class objects), the count filters, count prompts and instance mask AP."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from pipeline.evaluate import Prompt, Sample, instance_scores
from pipeline.shapes.world import CLASSES, count_caption, render_multi_scene, render_scene
from stages.filters import verdict
from stages.labels import LabelStage, category_ids, encode_mask, rle_fields

SIZE = 64


def spec(**filters):
    return SimpleNamespace(
        classes=[SimpleNamespace(name=c) for c in CLASSES],
        masks=SimpleNamespace(use_raw=False, superpixel_scale=10.0, superpixel_min_area=0.005),
        filters=SimpleNamespace(min_area_fraction=0.005, max_area_fraction=0.95, min_contrast=0.1,
                                max_extra_instances=None, max_missing_instances=None, dedup_threshold=None,
                                **filters))


def union(scene, cls):
    out = np.zeros((SIZE, SIZE), bool)
    for o in scene.objects:
        if o.cls == cls:
            out |= o.mask
    return out


def touching_scenes(cls, same_color, n):
    """The first ``n`` scenes (from seed 0) with 2-3 instances of ``cls`` all in one connected blob."""
    out = []
    for seed in range(400):
        k = 2 + seed % 2
        scene = render_multi_scene(seed, SIZE, groups=[(cls, k)], same_color=same_color, touch=1.0)
        if ndimage.label(union(scene, cls))[1] == 1:
            out.append(scene)
            if len(out) == n:
                return out
    raise AssertionError(f"fewer than {n} touching scenes of {cls}")


def test_multi_instance_scenes_and_captions():
    scene = render_multi_scene(5, SIZE, groups=[("circle", 2), ("star", 1)], same_color=True)
    assert [o.cls for o in scene.objects] == ["circle", "circle", "star"]
    a, b, star = scene.objects
    assert a.color == b.color != star.color
    assert count_caption(scene.objects) == f"two {a.color} circles and a {star.color} star"
    mixed = render_multi_scene(5, SIZE, groups=[("cross", 3)], same_color=False)
    colors = [o.color for o in mixed.objects]
    assert len(set(colors)) == 3
    assert count_caption(mixed.objects) == f"three crosses, {colors[0]}, {colors[1]} and {colors[2]}"
    for o in scene.objects + mixed.objects:  # exact, disjoint visible masks, each mostly visible
        assert o.mask.sum() > 0
    assert not (a.mask & b.mask).any()
    # the existing world is untouched by the new stream
    assert render_scene(5).caption == render_scene(5).caption and render_scene(5, SIZE).objects[0].cls in CLASSES


def _label(scene, cls, stage, counts):
    sem = np.where(union(scene, cls), 1, 0).astype(np.uint8)
    attn = np.zeros((1, 16, 16), np.float32)
    return stage.label_row([cls], attn, sem, scene.image, counts)


@pytest.mark.parametrize("cls, same_color", [("circle", True), ("square", False), ("triangle", False),
                                             ("star", False)])
def test_touching_objects_of_one_class_are_split(cls, same_color):
    stage = LabelStage(spec())
    for scene in touching_scenes(cls, same_color, 3):
        truth = [o.mask for o in scene.objects]
        anns, scores = _label(scene, cls, stage, [len(truth)])
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        assert scores["per_class"][0]["n_components"] == 1  # connected components alone: one object
        assert scores["per_class"][0]["n_prompted"] == len(truth)
        assert scores["per_class"][0]["n_instances"] == len(masks) == len(truth), scene.seed
        for t in truth:  # each true object has its own instance
            best = max((m & t).sum() / (m | t).sum() for m in masks)
            assert best >= 0.75, (scene.seed, best)


def test_one_blob_is_cut_only_where_its_shape_has_two_centres():
    """Fewer pieces than prompted: one blob is cut at the neck between two distance-transform centres
    (two overlapping discs), never a single convex object (one disc asked for twice stays one)."""
    from stages.labels import split_instances

    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = lambda cy, cx, r: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # noqa: E731
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    pair = disc(32, 22, 9) | disc(32, 36, 9)  # overlapping by 4 px: one component, one colour
    image[pair] = (200, 30, 30)
    found, n_comp = split_instances(pair, image, 2, 10, SIZE * SIZE, background=~pair)
    assert n_comp == 1 and len(found) == 2
    for t in (disc(32, 22, 9), disc(32, 36, 9)):
        assert max((m & t).sum() / (m | t).sum() for m in found) >= 0.75
    single = disc(32, 32, 12)
    image[:] = 128
    image[single] = (200, 30, 30)
    found, _ = split_instances(single, image, 2, 10, SIZE * SIZE, background=~single)
    assert len(found) == 1 and np.array_equal(found[0], single)


def test_a_class_prompted_once_keeps_its_components():
    """Single-instance labels are the plain components, exactly as before (no split without a count)."""
    scene = touching_scenes("circle", True, 1)[0]
    stage = LabelStage(spec())
    anns, scores = _label(scene, "circle", stage, None)
    assert len(anns) == 1 and scores["per_class"][0]["n_prompted"] == 1
    assert np.array_equal(mask_utils.decode(anns[0]["segmentation"]).astype(bool), union(scene, "circle"))


def test_stage_reads_counts_from_cond():
    scene = touching_scenes("circle", True, 1)[0]
    k = len(scene.objects)
    stage = LabelStage(spec())
    batch = {"class_names": np.array([json.dumps(["circle"])] * 2), "image": np.stack([scene.image] * 2),
             "attn": np.zeros((2, 1, 16, 16), np.float16), "attn_raw": np.zeros((2, 1, 16, 16), np.float16),
             "semantic_mask": np.stack([union(scene, "circle").astype(np.uint8)] * 2),
             "cond": np.array([json.dumps({"counts": [k]}), ""])}
    out = stage(batch)
    split, plain = (json.loads(s) for s in out["scores"])
    assert split["per_class"][0]["n_instances"] == split["n_prompted"] == k
    assert plain["per_class"][0]["n_instances"] == plain["n_prompted"] == 1


def _scores(n_instances, n_prompted, name="circle"):
    return {"name": name, "n_components": max(n_instances, 1), "n_instances": n_instances,
            "n_prompted": n_prompted, "contrast": 0.5}


def test_count_filters_both_sides():
    three = {"per_class": [_scores(2, 3)]}
    assert verdict(three, 0.1) == ""  # off by default
    assert verdict(three, 0.1, max_missing_instances=0) == "fewer:circle"
    assert verdict(three, 0.1, max_missing_instances=1) == ""
    assert verdict({"per_class": [_scores(4, 3)]}, 0.1, max_extra_instances=0, max_missing_instances=0) == \
        "count:circle"
    assert verdict({"per_class": [_scores(3, 3)]}, 0.1, max_extra_instances=0, max_missing_instances=0) == ""


def _sample(truths, preds, cls="circle"):
    ids = category_ids(spec())
    anns = [{"category_id": ids[cls], **rle_fields(encode_mask(m)), "score": s} for m, s in preds]
    return Sample(Prompt(0, "t", [(str(i), cls) for i in range(len(truths))]), truths,
                  np.zeros((SIZE, SIZE), np.uint8), anns)


def test_instance_ap_and_count_accuracy_on_hand_made_cases():
    ids = category_ids(spec())
    scene = render_multi_scene(1, SIZE, groups=[("circle", 2)], same_color=True, touch=0.0)
    a, b = (o.mask for o in scene.objects)
    perfect = instance_scores([_sample([a, b], [(a, 0.9), (b, 0.8)])], ids)
    assert perfect["AP"] == perfect["AP50"] == 1.0 and perfect["count_accuracy"] == 1.0
    assert perfect["per_class"]["circle"]["count_cases"] == 1
    # one of two objects missed: recall 0.5 at precision 1 -> 51 of COCO's 101 recall points
    missed = instance_scores([_sample([a, b], [(a, 0.9)])], ids)
    assert missed["AP50"] == missed["AP"] == round(51 / 101, 4)
    assert missed["count_accuracy"] == 0.0
    # a merged pair (one mask over both) matches neither object at IoU >= 0.5 when they are alike in size
    merged = instance_scores([_sample([a, b], [(a | b, 0.9)])], ids)
    assert merged["AP50"] < 0.51 and merged["count_accuracy"] == 0.0


def test_count_prompts_text_and_references(tmp_path):
    """Counts in words ('two red circles'), with a tokenizer that knows them: a random-weight SD 1.5 folder
    with the real CLIP vocabulary (the bundled tokenizer has no number words: the next test)."""
    from conftest import write_job
    from family_models import build_sd15

    from pipeline.shapes.coco import render_multi_coco
    from pipeline.shapes.world import COLORS
    from pipeline.spec import load_spec
    from stages.sampling import SamplingStage

    model = str(build_sd15(tmp_path / "sd15"))
    levels = {"capture_resolutions": [8, 4]}  # its 8×8 latent at 64²
    world = [{"name": c, "attributes": list(COLORS)} for c in CLASSES]
    prompts = {"templates": ["{objects}"], "max_classes_per_image": 2}
    plain = SamplingStage(load_spec(write_job(tmp_path / "a", model, classes=world, masks=levels, prompts=prompts)))
    counted = SamplingStage(load_spec(write_job(tmp_path / "b", model, classes=world, masks=levels,
                                                prompts={**prompts, "max_instances_per_class": 2})))
    index = {"index": np.arange(12)}
    a, b = plain(index), counted(index)
    assert all(c == "" for c in a["cond"])
    multi = 0
    for i in range(12):
        cond = json.loads(b["cond"][i]) if b["cond"][i] else {}
        counts = cond.get("counts", [1] * len(json.loads(b["class_names"][i])))
        assert counts == counted.counts(int(b["seed"][i]), len(counts))
        if max(counts) == 1:  # same draws as the plain job: the counts have their own random stream
            assert b["prompt"][i] == a["prompt"][i] and not cond
            continue
        multi += 1
        words = b["prompt"][i].split()
        for name, k in zip(json.loads(b["class_names"][i]), counts):
            if k > 1:
                assert ("two", "three")[k - 2] in words and any(w.startswith(name) and w != name for w in words)
    assert multi >= 3
    # image-guided variations of multi-instance references name each reference's count
    refs = tmp_path / "refs"
    render_multi_coco(refs, 3, first_seed=7)
    data = json.loads((refs / "annotations.json").read_text())
    job = write_job(tmp_path / "c", model, classes=world, masks=levels, samples=3,
                    prompts={"templates": ["{objects}"], "max_instances_per_class": 4},
                    references={"path": str(refs), "strengths": [0.3], "seeds_per_level": 1})
    rows = SamplingStage(load_spec(job))({"index": np.arange(3)})
    by_key = {f"{im['seed']:08d}": im for im in data["images"]}
    for prompt, cond in zip(rows["prompt"], rows["cond"]):
        key = json.loads(cond)["reference"]["key"]
        want = by_key[key]["count"]
        assert json.loads(cond)["counts"] == [want]
        assert prompt.split()[0] == ("two", "three", "four")[want - 2]


def test_count_style_repeat_names_the_class_word_k_times(tiny_model, tmp_path):
    """The bundled tokenizer has no plurals or number words ('rings' is four pieces the model never saw
    grounded, 'three' five): counts in words are refused before any work, and with ``prompts.count_style:
    repeat`` a count is the singular phrase k times, every copy's token is the class's, and the pre-flight
    length check measures the prompt as the sampler writes it."""
    from conftest import write_job

    from pipeline.shapes.world import COLORS
    from pipeline.spec import SpecError, load_spec
    from stages.sampling import SamplingStage

    world = [{"name": c, "attributes": list(COLORS)} for c in CLASSES]
    prompts = {"templates": ["{objects} on noise"], "max_classes_per_image": 1, "max_instances_per_class": 3,
               "count_style": "repeat"}
    words = write_job(tmp_path / "n", tiny_model, classes=world, prompts={**prompts, "count_style": "number"})
    with pytest.raises(SpecError, match=r"prompts\.count_style: 'number' .* splits 'two' into 3 pieces .* set "
                                        r"prompts\.count_style: repeat \(the class phrase k times: 'a circle and a "
                                        r"circle'\)$"):
        load_spec(words)
    stage = SamplingStage(load_spec(write_job(tmp_path / "a", tiny_model, classes=world, prompts=prompts)))
    rows = stage({"index": np.arange(12)})
    seen = set()
    for i in range(12):
        (name,), (positions,) = json.loads(rows["class_names"][i]), json.loads(rows["token_index"][i])
        k = (json.loads(rows["cond"][i]) if rows["cond"][i] else {}).get("counts", [1])[0]
        seen.add(k)
        colour = rows["prompt"][i].split()[1]
        assert rows["prompt"][i] == " and ".join([f"a {colour} {name}"] * k) + " on noise"
        ids = stage.tokenizer(str(rows["prompt"][i])).input_ids
        assert [stage.tokenizer.convert_ids_to_tokens(ids[j]) for j in positions] == [f"{name}</w>"] * k
    assert seen == {1, 2, 3}
    # three classes of three repeats overflow the bundled tokenizer's 24 tokens: one line naming the fields
    job = write_job(tmp_path / "b", tiny_model, classes=world, prompts={**prompts, "max_classes_per_image": 3})
    with pytest.raises(SpecError, match=r"max_classes_per_image: 3 classes .* lower max_classes_per_image or "
                                        r"max_instances_per_class"):
        load_spec(job)


def test_oracle_finds_the_instances_of_a_rendered_scene():
    from pipeline.shapes.oracle import find_instances

    scene = touching_scenes("circle", True, 1)[0]
    found = find_instances(scene.image, [o.color for o in scene.objects], len(scene.objects))
    assert len(found) == len(scene.objects)
    for o in scene.objects:
        assert max((m & o.mask).sum() / (m | o.mask).sum() for m in found) >= 0.75


def test_benchmark_ceiling_counts_references_that_pass_the_drawn_check(tmp_path):
    """benchmarks.multi_instance's ceiling: every rendered reference shows its instances as the check wants
    (it is the truth); the bundled model's VAE round trip is counted beside it, and a scene with one instance
    recoloured fails the check."""
    from benchmarks.multi_instance import ceiling, drawn
    from pipeline.shapes.coco import render_multi_coco
    from pipeline.shapes.tiny_sd import BUNDLED_MODEL

    folder = tmp_path / "multi"
    render_multi_coco(folder, 4, first_seed=4_100_000, max_count=3)
    bound = ceiling(folder, BUNDLED_MODEL, kept=0.6)
    assert bound["references"] == 4 and bound["of"] == 4 and 0 <= bound["vae"] <= 4
    assert all(type(v) is int for v in bound.values())  # JSON-ready
    coco = json.loads((folder / "annotations.json").read_text())
    anns = [a for a in coco["annotations"] if a["image_id"] == 1]
    truth = [mask_utils.decode(dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())).astype(bool)
             for a in anns]
    colors = [a["attributes"]["color"] for a in anns]
    from PIL import Image

    image = np.asarray(Image.open(folder / coco["images"][0]["file_name"]).convert("RGB")).copy()
    assert drawn(SimpleNamespace(truth=truth), image, colors, 0.6)
    image[truth[0]] = 128  # the first instance painted over in grey: not drawn
    assert not drawn(SimpleNamespace(truth=truth), image, colors, 0.6)
