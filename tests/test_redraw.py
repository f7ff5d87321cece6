"""Judges and redraws (issue 34): a judged sample that fails is drawn again from the noise seed of its next
attempt, the delivered draw is exactly that attempt's, and every attempt is recorded in gen, scores and the
index. Ray = in-process = resumed with redraws on: tests/test_determinism.py (its demo job redraws)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_job
from pipeline.runner import run_job
from pipeline.shapes.world import CLASSES, render_scene
from pipeline.spec import load_spec
from stages.judges import ClassifierJudge, Judge, ShapesOracleJudge, prompted_colour
from stages.redraw import SampleChecks, noise_seed, take
from stages.sampling import SamplingStage, stable_seed
from stages.synthesis import SynthesisStage

BUNDLED_JUDGE = "pipeline/models/shapes-judge"


def test_attempt_0_is_the_samples_own_seed_and_later_attempts_differ():
    assert noise_seed(3, 17, 0) == stable_seed(3, 17)
    seeds = {noise_seed(3, 17, k) for k in range(5)} | {noise_seed(3, 18, 1), noise_seed(4, 17, 1)}
    assert len(seeds) == 7 and all(0 <= s < 2 ** 63 for s in seeds)
    assert noise_seed(3, 17, 2) == noise_seed(3, 17, 2)


class Never(Judge):
    """Scores every object 0: every draw is rejected."""

    def scores(self, images, prompts, classes, maps=None, region=None):
        return [[0.0] * len(c) for c in classes]


@pytest.fixture(scope="module")
def redraw_job(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("redraw")
    return write_job(folder, tiny_model, samples=8, generation={"steps": 4, "guidance_scale": 4.0, "height": 64,
                     "width": 64, "batch_size": 4, "scheduler": "ddim", "redraws": 2},
                     prompts={"templates": ["{objects} on noise"], "min_classes_per_image": 2,
                              "max_classes_per_image": 2}, judge={"kind": "shapes-oracle"},
                     output={"dir": "out", "shard_size": 8})


def sampled(spec, n: int) -> dict:
    return SamplingStage(spec)({"index": np.arange(n, dtype=np.int64)})


def test_a_redrawn_row_is_exactly_its_last_attempts_draw_and_records_each_rejected_one(redraw_job):
    spec = load_spec(redraw_job)
    stage = SynthesisStage(spec)
    batch = sampled(spec, 8)
    out = stage(batch)
    gens = [json.loads(g) for g in out["gen"]]
    first = stage.draw(batch)  # every row's attempt 0, as a run without redraws draws it
    reasons0 = stage.redraws(batch, first)
    assert [g["attempt"] for g in gens] != [0] * 8, "the oracle passed every first draw: nothing was redrawn"
    attempts = [g["attempt"] for g in gens]
    for k in range(1, max(attempts) + 1):
        pending = [i for i, a in enumerate(attempts) if a >= k]  # the rows attempt k drew, in one call
        rows = take(batch, pending)
        rows["seed"] = np.array([noise_seed(spec.seed, i, k) for i in pending], np.int64)
        again = stage.draw(rows)
        for j, i in enumerate(pending):
            if attempts[i] == k:  # the delivered draw is attempt k's
                assert gens[i]["noise_seed"] == int(rows["seed"][j])
                assert np.array_equal(out["image"][i], again["image"][j])
                assert np.array_equal(out["attn"][i], again["attn"][j])
        passed = stage.redraws(rows, again)
        assert all(passed[j] == "" or k == spec.generation.redraws for j, i in enumerate(pending) if attempts[i] == k)
        assert all(gens[i]["rejected"][k]["reason"] == passed[j] != "" for j, i in enumerate(pending) if attempts[i] > k)
    for i, g in enumerate(gens):
        k = g["attempt"]
        assert [r["attempt"] for r in g["rejected"]] == list(range(k))
        if k == 0:
            assert not reasons0[i] and "noise_seed" not in g
            assert np.array_equal(out["image"][i], first["image"][i])
        else:
            assert g["rejected"][0] == {"attempt": 0, "noise_seed": int(batch["seed"][i]), "reason": reasons0[i]}


def test_a_judge_that_rejects_everything_spends_every_attempt_and_the_filters_reject(redraw_job, tmp_path):
    spec = load_spec(redraw_job, out=str(tmp_path / "out"))
    stage = SynthesisStage(spec)
    stage.judge = Never()
    out = stage(sampled(spec, 4))
    gens = [json.loads(g) for g in out["gen"]]
    assert [g["attempt"] for g in gens] == [2] * 4
    assert all(len(g["rejected"]) == 2 and g["rejected"][0]["reason"].startswith("judge:") for g in gens)
    checks = SampleChecks(stage.spec)
    assert all(r.startswith("judge:") for r in checks(sampled(spec, 4), {k: out[k] for k in ("image", "attn",
                                                                                          "attn_raw", "gen")}))


def test_a_judged_run_records_attempts_and_scores_in_the_index_and_keeps_only_what_passes(redraw_job, tmp_path):
    spec = load_spec(redraw_job, out=str(tmp_path / "out"))
    run_job(spec, use_ray=False, progress=False)
    rows = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert len(rows) == 8
    for r in rows:
        other = json.loads(r["scores"]["other"])
        assert set(other) >= {"attempt", "rejected", "judge"} and len(other["judge"]) == len(r["classes"])
        if r["keep"]:
            assert min(other["judge"]) >= spec.judge.min_score
        if other["attempt"] < spec.generation.redraws:
            assert r["keep"] or r["reject_reason"] == "duplicate"  # it passed every redraw check


def test_the_oracle_judge_reads_each_prompted_object_by_its_colour():
    scene = render_scene(1_000_000, 64, classes=["circle", "star"], colors=["red", "blue"])
    judge = ShapesOracleJudge()
    assert prompted_colour("a red circle and a blue star on noise", "star") == "blue"
    assert judge.scores(scene.image[None], ["a red circle and a blue star on noise"], [["circle", "star"]]) == [[1.0, 1.0]]
    # the same image, asked for a green star: the green object is not there
    assert judge.scores(scene.image[None], ["a red circle and a green star on noise"], [["circle", "star"]]) == [[1.0, 0.0]]


def test_the_bundled_judge_names_the_objects_of_rendered_scenes():
    from pipeline.shapes.judge import scene_crops

    judge = ClassifierJudge(BUNDLED_JUDGE, region="attention")
    crops, labels = scene_crops(5_000_000, 40)  # seeds its training never saw, not through the VAE
    probs = judge.probabilities(crops)
    assert probs.shape == (len(labels), len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() >= 0.9


def assert_every_attempt_is_drawn_on(job: Path, classes: list[str], tmp: Path) -> None:
    """On a family's job: a random-weight judge (pipeline/shapes/judge.py's architecture, its labels mapped to the
    job's classes) on each class's attention crop, at a score no random judge reaches, rejects every draw; each
    row is drawn ``1 + redraws`` times and records it. Runs the synthesis stage on one batch (tests/test_families.py,
    tests/test_mmdit_families.py call it for every family)."""
    from pipeline.shapes.judge import save_judge

    folder = save_judge(tmp / "judge")
    labels = {c: CLASSES[i % len(CLASSES)] for i, c in enumerate(classes)}
    spec = load_spec(job, ["generation.redraws=1", f"judge={{path: {folder}, region: attention, min_score: 0.99, "
                           f"labels: {json.dumps(labels)}}}"])
    stage = SynthesisStage(spec)
    out = stage(sampled(spec, spec.generation.batch_size))
    gens = [json.loads(g) for g in out["gen"]]
    assert all(g["attempt"] == 1 and [r["attempt"] for r in g["rejected"]] == [0] for g in gens), gens
    assert all(g["rejected"][0]["reason"].startswith("judge:") and len(g["judge"]) >= 1 for g in gens)
    assert np.isfinite(out["image"]).all() and out["image"].shape[0] == spec.generation.batch_size


def tiny_clip(folder: Path) -> Path:
    """A random-weight transformers CLIP at tiny widths, with the bundled model's CLIP tokenizer."""
    import shutil

    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel
    from transformers.utils import logging

    tokenizer = Path("pipeline/models/shapes-tiny-sd/tokenizer")
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    config = CLIPConfig(text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "bos_token_id": vocab - 2, "eos_token_id": vocab - 1},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    logging.disable_progress_bar()
    try:
        CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    finally:
        logging.enable_progress_bar()
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_a_clip_judge_scores_each_prompted_class_against_the_jobs_classes(redraw_job, tmp_path):
    from stages.judges import judge_problem, load_judge

    folder = tiny_clip(tmp_path / "clip")
    spec = load_spec(redraw_job, [f"judge={{kind: clip, path: {folder}, region: attention}}"])
    assert judge_problem(spec) is None
    judge = load_judge(spec)
    batch = sampled(spec, 4)
    out = SynthesisStage(spec).draw(batch)
    names = [json.loads(c) for c in batch["class_names"]]
    scores = judge.scores(out["image"], list(batch["prompt"]), names, out["attn"])
    assert [len(s) for s in scores] == [len(n) for n in names]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)
    probs = judge.probabilities(list(out["image"]))  # a softmax over the job's 4 classes
    assert probs.shape == (4, len(spec.classes)) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    gens = [json.loads(g) for g in SynthesisStage(spec).draw(batch)["gen"]]
    assert all(len(g["judge"]) == len(n) for g, n in zip(gens, names))


def test_a_judge_folder_that_passed_is_not_loaded_again_until_its_files_change(tmp_path, monkeypatch, tiny_model):
    """Pre-flight remembers a judge folder whose weights fit its config, by content: the next check skips building
    the model (~3 s of torch and transformers imports in a fresh driver); changed weights are checked again."""
    import shutil

    import transformers

    from stages.judges import judge_problem

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "judge"
    shutil.copytree(BUNDLED_JUDGE, folder)
    spec = load_spec(write_job(tmp_path / "job", str(tiny_model), judge={"path": str(folder)}))
    assert judge_problem(spec) is None  # checked and remembered

    def refuse(*args, **kwargs):
        raise RuntimeError("built again")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_config", refuse)
    assert judge_problem(spec) is None  # the same files: remembered, not built
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")  # other content (a digest the cache has not seen)
    problem = judge_problem(spec)
    assert problem is not None and "does not load (built again)" in problem
