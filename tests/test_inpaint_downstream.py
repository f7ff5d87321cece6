"""benchmarks.inpaint_downstream at tiny settings (4 real scenes, one seed per instance, 5 training steps, 10 test
scenes, width 4): it runs end to end, writes the JSON's keys with finite numbers, and a rerun reuses the
generated inpaint output and the training runs. The figures themselves are not checked (the full run is not
made here)."""
from __future__ import annotations

import json
import math

from benchmarks import inpaint_downstream as ipd

TINY = ["--k", "4", "--steps", "5", "--test", "10", "--width", "4", "--seeds", "2", "--threads", "1",
        "--set", "references.seeds_per_level=1"]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_run_writes_finite_figures_and_a_rerun_reuses_everything(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [*TINY, "--controls", "--synthetic-root", str(tmp_path / "cache"), "--json", str(out)]
    assert ipd.main(args) == 0
    report = json.loads(out.read_text())
    for key in ("machine", "date", "command", "real_scenes", "test_scenes", "seeds", "model", "training",
                "inpainted", "wall_s", "real", "real_inpainted", "gain"):
        assert key in report, key
    assert report["real_scenes"] == 4 and report["test_scenes"] == 10
    assert report["training"]["steps"] == 5 and report["model"]["width"] == 4
    inp = report["inpainted"]
    assert inp["generated_now"] and 0 < inp["kept"] <= inp["samples"]
    assert "references.seeds_per_level=1" in inp["overrides"]
    assert inp["label_quality"]["agreement_with_reference"] == 1.0  # the reference's masks, carried exactly
    for name in ("found", "iou", "right"):
        assert finite(inp["label_quality"][name])
    for arm, n in (("real", 4), ("real_inpainted", 4 + inp["kept"]), ("real_recoloured", 4 + inp["kept"]),
                   ("real_more", 4 + inp["kept"])):
        r = report[arm]
        assert r["n"] == n and len(r["miou_runs"]) == 2 and len(r["runs"]) == 2
        assert all(finite(v) for v in r["miou_runs"])
        for key in ("miou_mean", "miou_std", "miou_min", "miou_max"):
            assert finite(r[key]), (arm, key)
        assert r["miou_min"] <= r["miou_mean"] <= r["miou_max"]
        assert all(finite(v) for v in r["final_loss_runs"])
    gain = report["gain"]
    assert finite(gain["miou_points"]) and gain["target_points"] == 5.0 and isinstance(gain["met"], bool)
    assert gain["miou_points"] == round(100 * (report["real_inpainted"]["miou_mean"] - report["real"]["miou_mean"]), 2)
    assert all(finite(v) for v in gain["per_seed_points"])
    for arm in ("real_recoloured", "real_more"):
        assert report[arm]["gain_points"] == round(100 * (report[arm]["miou_mean"] - report["real"]["miou_mean"]), 2)
    assert "real+inpainted" in capsys.readouterr().out

    assert ipd.main(args) == 0  # rerun: nothing generated, nothing trained
    again = json.loads(out.read_text())
    assert not again["inpainted"]["generated_now"]
    assert all(r["reused"] for arm in ("real", "real_inpainted", "real_recoloured", "real_more")
               for r in again[arm]["runs"])
    assert again["gain"] == gain

    # an existing inpaint output whose references are not the --k real scenes is refused in one line
    other = ["--synthetic", inp["dir"], "--k", "1", "--steps", "5", "--test", "10", "--width", "4",
             "--synthetic-root", str(tmp_path / "cache"), "--json", str(tmp_path / "other.json")]
    assert ipd.main(other) == 2
    assert "is not an inpainting of one of the 1 real training scenes" in capsys.readouterr().err
    assert not (tmp_path / "other.json").exists()


def test_the_script_sets_the_references_and_the_sample_count_itself(tmp_path, capsys):
    args = [*TINY, "--synthetic-root", str(tmp_path), "--json", str(tmp_path / "r.json"), "--set", "samples=3"]
    assert ipd.main(args) == 2
    assert "sets references.path" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_real_share_repeats_the_real_scenes_to_about_that_share_of_the_mixed_arm():
    assert ipd.real_repeats(None, 50, 450) == 1
    assert ipd.real_repeats(0.5, 50, 450) == 9  # 450 real images beside 450 inpainted ones
    assert ipd.real_repeats(0.25, 50, 450) == 3
    assert ipd.real_repeats(0.01, 50, 450) == 1  # never fewer than once


def test_recoloured_control_is_the_reference_scene_with_one_object_in_the_prompted_colour(tmp_path):
    """Control arm (c): annotation id -> (scene, object) in render_coco's order; the label is the scene's own
    mask; the pixels change only where the object covers them, to the prompted colour."""
    import numpy as np

    from pipeline.shapes.coco import render_coco
    from pipeline.shapes.world import COLORS, render_scene

    folder = tmp_path / "refs"
    render_coco(folder, 3, size=32, first_seed=7)
    coco = json.loads((folder / "annotations.json").read_text())
    last = coco["annotations"][-1]  # the last object of the last scene
    seed = next(im["seed"] for im in coco["images"] if im["id"] == last["image_id"])
    scene = render_scene(seed, size=32)
    k = len(scene.objects) - 1
    colour = next(c for c in COLORS if c != scene.objects[k].color)
    recs = [{"cond": {"reference": {"instance": last["id"]}}, "prompt": f"a {colour} {scene.objects[k].cls}"}]
    images, masks = ipd.recoloured(folder, recs, 32)
    assert np.array_equal(masks[0], scene.semantic_mask())
    changed = (images[0] != scene.image).any(-1)
    assert changed[scene.objects[k].mask].all() and changed.sum() >= scene.objects[k].mask.sum()
    assert (images[0][scene.objects[k].mask] == np.array(COLORS[colour], np.uint8)).all(-1).mean() > 0.5
