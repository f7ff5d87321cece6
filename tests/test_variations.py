"""Image-guided variations (img2img strength ladder from reference images), embedding sampling,
hard-sample selection and `synthgen import-coco`, read back from the written output."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import REPO, assert_same_dataset, write_job
from pipeline.cli import main
from pipeline.import_coco import import_coco
from pipeline.runner import run_job
from pipeline.shapes.coco import render_coco
from pipeline.shapes.world import CLASSES, COLORS
from pipeline.spec import SpecError, load_spec, validate_spec
from stages.model import load_pipeline
from stages.references import ReferenceImages, list_references
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage, img2img_loop_steps, slerp

WORLD = [{"name": c, "attributes": list(COLORS)} for c in CLASSES]
LADDER = [0.25, 0.5, 1.0]  # x 4 steps: 1, 2 and 4 denoising steps


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Three rendered shapes-world scenes as a COCO folder."""
    folder = tmp_path_factory.mktemp("real") / "coco"
    render_coco(folder, 3, first_seed=1_000_000)
    return folder


def largest_classes(folder: Path) -> dict[str, tuple[str, str]]:
    """{key: (category of the largest annotation, its colour)} straight from annotations.json."""
    data = json.loads((folder / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    out = {}
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        top = max(anns, key=lambda a: a["area"])
        out[Path(image["file_name"]).stem] = (names[top["category_id"]], top["attributes"]["color"])
    return out


def variation_job(directory: Path, model: str, refs: Path, **sections) -> Path:
    sections.setdefault("samples", 3 * len(LADDER) * 2)
    return write_job(directory, model, classes=WORLD, prompts={"templates": ["{objects}"], "max_classes_per_image": 1},
                     references={"path": str(refs), "strengths": LADDER, "seeds_per_level": 2},
                     output={"dir": "out", "shard_size": 6}, **sections)


def shard_records(out: Path) -> dict[str, dict]:
    records = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    records[rec["key"]] = rec
    return records


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, tiny_model, coco):
    spec = load_spec(variation_job(tmp_path_factory.mktemp("ladder"), tiny_model, coco))
    run_job(spec, use_ray=False, progress=False)
    return Path(spec.output.dir)


def test_strength_ladder_records_levels_strengths_and_groups(ladder, coco):
    rows = pq.read_table(ladder / "index.parquet").to_pylist()
    truth = largest_classes(coco)
    keys = sorted(truth)
    assert len(rows) == 18
    for row in rows:
        cur = row["curriculum"]  # a typed struct: every field of the record's curriculum, nothing left over
        level, rest = divmod(row["index"], 6)  # consecutive indices share a level; 3 refs x 2 seeds each
        strength = sorted(LADDER, reverse=True)[level]  # level 0 = least image guidance
        assert cur == {"level": level, "strength": strength, "image_guidance": round(1 - strength, 6),
                       "group_id": keys[rest // 2], "source": "synthetic", "difficulty": round(1 - strength, 6),
                       "other": None}
        cls, colour = truth[cur["group_id"]]
        assert row["classes"] == [cls] and row["prompt"] == f"a {colour} {cls}"  # inherited from the reference
    records = shard_records(ladder)
    assert records, "every sample was filtered out"
    for rec in records.values():
        cur = rec["curriculum"]
        assert rec["cond"] == {"reference": {"key": cur["group_id"], "strength": cur["strength"]}}
        assert rec["gen"]["strength"] == cur["strength"]
        assert rec["class_names"] == [truth[cur["group_id"]][0]]


def test_img2img_runs_through_the_capture(tiny_model, coco, tmp_path):
    spec = load_spec(variation_job(tmp_path, tiny_model, coco))
    batch = SamplingStage(spec)({"index": np.array([0, 1, 16, 17])})  # strengths 1.0, 1.0, 0.25, 0.25
    synth = SynthesisStage(spec)
    out = synth(batch)
    assert out["image"].shape == (4, 64, 64, 3) and out["attn"].shape == (4, 1, 16, 16)
    attn = out["attn"].astype(np.float32)
    assert np.isfinite(attn).all() and (attn.reshape(4, -1).max(axis=1) > 0).all()
    # each strength group alone gives the same rows: grouping does not mix rows across calls
    alone = synth({k: v[2:] for k, v in batch.items()})
    assert np.array_equal(alone["image"], out["image"][2:])
    # a stronger img2img moves further from the reference
    ref = synth.reference_images(json.loads(batch["cond"][0])["reference"]["key"]).astype(float)
    ref16 = synth.reference_images(json.loads(batch["cond"][2])["reference"]["key"]).astype(float)
    assert np.abs(out["image"][2] - ref16).mean() < np.abs(out["image"][0] - ref).mean()


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++"])  # PNDM runs steps + 1; DPM++ sets a begin index
def test_img2img_loop_steps_match_diffusers(tiny_model, scheduler):
    pipe = load_pipeline(tiny_model, scheduler=scheduler)
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    calls = []
    img2img(prompt="a red circle", image=np.zeros((1, 64, 64, 3), np.float32), strength=0.5, num_inference_steps=6,
            guidance_scale=1.0, output_type="np", callback_on_step_end=lambda p, i, t, kw: calls.append(i) or kw)
    assert img2img_loop_steps(pipe.scheduler, 6, 0.5) == len(calls) > 0


def test_embedding_sampling_is_recorded_and_reproducible(tmp_path, tiny_model):
    interpolate = {"templates": ["{objects}"], "max_classes_per_image": 1,
                   "embedding": {"mode": "interpolate", "method": "slerp", "weight": [0.2, 0.4]}}
    outs = []
    for run in ("a", "b"):
        job = write_job(tmp_path / run, tiny_model, samples=2, prompts=interpolate)
        spec = load_spec(job)
        run_job(spec, use_ray=False, progress=False)
        outs.append(Path(spec.output.dir))
    assert_same_dataset(*outs)
    records = shard_records(outs[0])
    assert records, "the run wrote no samples, so nothing below would be checked"
    for rec in records.values():
        emb = rec["cond"]["embedding"]
        assert emb["mode"] == "interpolate" and emb["method"] == "slerp" and 0.2 <= emb["weight"] <= 0.4
        first, second = emb["prompts"]
        assert first == rec["prompt"] and emb["classes"][0] == rec["class_names"][0] != emb["classes"][1]
        assert second == first.replace(rec["class_names"][0], emb["classes"][1])


def test_embedding_conditioning_changes_images_deterministically(tiny_model, tmp_path):
    spec = load_spec(write_job(tmp_path / "plain", tiny_model, samples=4))
    jitter = load_spec(write_job(tmp_path / "jitter", tiny_model, samples=4,
                                 prompts={"embedding": {"mode": "jitter", "sigma": 0.5}}))
    plain_rows = SamplingStage(spec)({"index": np.arange(2)})
    rows = SamplingStage(jitter)({"index": np.arange(2)})
    assert list(rows["prompt"]) == list(plain_rows["prompt"])  # prompts are drawn as without embeddings
    cond = json.loads(rows["cond"][0])["embedding"]
    assert cond["mode"] == "jitter" and cond["sigma"] == 0.5 and cond["prompt"] == rows["prompt"][0]
    synth = SynthesisStage(jitter)
    a, b = synth(rows), synth(rows)
    assert np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], synth(plain_rows)["image"])
    base = synth.embed(None, cond["prompt"])
    assert torch.equal(synth.embed(cond, ""), synth.embed(cond, ""))
    assert not torch.equal(synth.embed(cond, ""), synth.embed({**cond, "seed": cond["seed"] + 1}, ""))
    noise_rms = (synth.embed(cond, "") - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt()
    assert 0.4 < float(noise_rms) < 0.6


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    unit_a, unit_b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    assert torch.allclose(slerp(unit_a, unit_b, 0.3).norm(dim=-1), torch.ones(2, 7), atol=1e-5)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel vectors: lerp


def test_select_restricts_the_references(tmp_path, tiny_model, coco):
    keys = sorted(largest_classes(coco))
    csv = tmp_path / "hard.csv"
    csv.write_text(f"key,label\n{keys[2]},x\n{keys[0]},y\n")
    job = variation_job(tmp_path, tiny_model, coco, samples=2 * len(LADDER) * 2)
    spec = load_spec(job, [f"references.select.path={csv}"])
    assert [r.key for r in list_references(spec)] == [keys[0], keys[2]]
    rows = SamplingStage(spec)({"index": np.arange(12)})
    assert {json.loads(c)["group_id"] for c in rows["curriculum"]} == {keys[0], keys[2]}

    losses = tmp_path / "losses.parquet"
    pq.write_table(pa.table({"key": keys, "loss": [0.5, 2.0, 1.0]}), losses)
    top = load_spec(job, [f"references.select.path={losses}", "references.select.top_k=2"])
    assert [r.key for r in list_references(top)] == [keys[1], keys[2]]
    frac = load_spec(job, [f"references.select.path={losses}", "references.select.top_fraction=0.3", "samples=6"])
    assert [r.key for r in list_references(frac)] == [keys[1]]
    with pytest.raises(SpecError, match=r"samples: 12, but 3 references x 3 strengths x 2 seeds_per_level = 18"):
        load_spec(job)
    csv.write_text("key\nnot-a-reference\n")
    with pytest.raises(SpecError, match=r"references\.select\.path: 1 keys of .* are not references"):
        load_spec(job, [f"references.select.path={csv}"])


def test_bad_references_fail_before_any_work(tmp_path, tiny_model, coco, capsys):
    out = tmp_path / "never"

    def error(*overrides: str) -> str:
        code = main(["run", str(variation_job(tmp_path, tiny_model, coco)), "--no-ray", "--out", str(out),
                     *[a for o in overrides for a in ("--set", o)]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and not out.exists()
        return err

    assert f"references.path: {tmp_path / 'missing'} is not a directory" in error(
        f"references.path={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    assert "has neither annotations.json" in error(f"references.path={tmp_path / 'empty'}")
    assert "references.strengths: strength 0.1 x generation.steps 4" in error("references.strengths=[0.1, 0.5]")
    few = [{"name": n} for n in ("circle", "square")]
    assert "not in the job's classes" in error(f"classes={json.dumps(few)}")
    assert "references.select: give top_k or top_fraction, not both" in error(
        "references.select={path: x.csv, top_k: 1, top_fraction: 0.5}")


def test_embedding_spec_errors():
    base = json.loads(json.dumps({"name": "j", "model": {"path": "org/m"}, "classes": ["a", "b"], "samples": 2,
                                  "output": {"dir": "/tmp/x"}}))
    with pytest.raises(SpecError, match=r"prompts\.embedding: sigma does not apply to mode 'interpolate'"):
        validate_spec({**base, "prompts": {"embedding": {"mode": "interpolate", "sigma": 0.1}}})
    with pytest.raises(SpecError, match=r"weight \[0\.2, 0\.7\] must be .* <= 0\.5"):
        validate_spec({**base, "prompts": {"embedding": {"mode": "interpolate", "weight": [0.2, 0.7]}}})
    with pytest.raises(SpecError, match=r"prompts\.embedding\.mode: interpolate swaps a class"):
        validate_spec({**base, "prompts": {"max_classes_per_image": 2, "embedding": {"mode": "interpolate"}}})


def test_import_coco_writes_real_records_usable_as_references(tmp_path, tiny_model, coco, capsys):
    out = tmp_path / "real-wds"
    assert main(["import-coco", str(tmp_path), str(out)]) == 2 and not out.exists()
    assert "no annotations.json; expected a COCO folder" in capsys.readouterr().err
    summary = import_coco(coco, out, shard_size=2)
    assert summary["processed"] == 3 and summary["shards_written"] == 2
    assert import_coco(coco, out, shard_size=2)["shards_written"] == 0  # rerun: resumes, nothing redone
    truth = largest_classes(coco)
    records = shard_records(out)
    assert sorted(records) == sorted(truth)
    for key, rec in records.items():
        assert rec["class_names"][0] == truth[key][0] and rec["curriculum"]["source"] == "real"
        assert rec["curriculum"]["group_id"] == key and rec["annotations"][0]["attributes"]["color"] == truth[key][1]
        areas = [a["area"] for a in rec["annotations"]]
        assert areas == sorted(areas, reverse=True) and all(a["score"] == 1.0 for a in rec["annotations"])
    with tarfile.open(out / "shards" / "train-000000.tar") as tar:
        key = sorted(truth)[0]
        assert tar.extractfile(f"{key}.cls").read() == str(CLASSES.index(truth[key][0]) + 1).encode()
    # the imported dir works as a references source, with the same keys and classes
    spec = load_spec(variation_job(tmp_path, tiny_model, out))
    refs = list_references(spec)
    assert [(r.key, r.class_name) for r in refs] == [(k, truth[k][0]) for k in sorted(truth)]
    key = refs[0].key
    from_shard = ReferenceImages(refs, 64, 64)(key).astype(float)
    original = np.asarray(Image.open(coco / "images" / f"{key}.png").convert("RGB")).astype(float)
    assert np.abs(from_shard - original).mean() < 8  # the JPEG of the same pixels (another image: ~40)


def test_example_job_validates(tmp_path):
    refs = tmp_path / "shapes-real"
    render_coco(refs, 40)
    spec = load_spec(REPO / "jobs" / "shapes-curriculum.yaml", [f"references.path={refs}"], out=str(tmp_path / "o"))
    assert spec.samples == 40 * len(spec.references.strengths) * spec.references.seeds_per_level == 200
    assert spec.output.shard_size % spec.generation.batch_size == 0
    with pytest.raises(SpecError, match="references.path: .* is not a directory"):
        load_spec(REPO / "jobs" / "shapes-curriculum.yaml", [f"references.path={tmp_path / 'none'}"])
    # the inpainting job on the references its comment renders: every instance x strength x seed, as it says
    inpaint = tmp_path / "shapes-real-inpaint"
    render_coco(inpaint, 40, first_seed=1_000_000)
    spec = load_spec(REPO / "jobs" / "shapes-inpaint.yaml", [f"references.path={inpaint}"], out=str(tmp_path / "i"))
    assert spec.references.mode == "inpaint" and spec.judge is not None and spec.samples == 168
