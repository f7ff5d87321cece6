"""SD3 and Flux end to end: tiny random-weight folders (tests/mmdit_models.py, built offline) through the whole
pipeline on a local Ray (own temp dir, stopped by its session's PIDs), killed after its first committed shard and
resumed to the same bytes as an uninterrupted in-process run; every record's map grid is the image-token grid
the synthesis stage really produced, masks are image-sized, multi-token class words map to all their tokens."""
from __future__ import annotations

import io
import json
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_same_dataset, write_job
from mmdit_models import build_flux, build_sd3
from pipeline.cli import main
from pipeline.dataset import read_manifest
from pipeline.runner import run_job
from pipeline.spec import SpecError, load_spec
from test_determinism import CliRun

HEIGHT, WIDTH = 64, 96  # non-square: a 4×6 image-token grid (VAE scale 8 × patch 2)
CLASSES = ["traffic light", "fire hydrant", "hot dog", "dog", "cat"]
GUIDANCE = {"sd3": 4.0, "flux": 3.5}


pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmdit")
    return {"sd3": build_sd3(root / "tiny-sd3"), "flux": build_flux(root / "tiny-flux")}


def mm_job(folder: Path, model: Path, family: str) -> Path:
    """6 samples in 3 shards of 2, batches of 2, 3 flow-matching steps at 64×96, every sample kept."""
    return write_job(folder, str(model), name=f"{family}.yaml", samples=6,
                     classes=[{"name": c} for c in CLASSES],
                     prompts={"templates": ["a photo of {objects}", "{objects} in the street"],
                              "max_classes_per_image": 2},
                     generation={"steps": 3, "guidance_scale": GUIDANCE[family], "height": HEIGHT, "width": WIDTH,
                                 "batch_size": 2, "scheduler": "default"},
                     masks={"capture_resolutions": [16]},
                     filters={"min_area_fraction": 0.0, "max_area_fraction": 1.0, "min_contrast": 0.0,
                              "dedup_threshold": None},
                     output={"dir": "out", "shard_size": 2},
                     resources={"sampling": {"num_cpus": 0.25}, "synthesis": {"num_cpus": 1, "actors": 1},
                                **{n: {"num_cpus": 0.25} for n in ("masks", "labels", "filters", "encode")}})


def samples(out: Path) -> list[dict]:
    """Every committed sample: its JSON record, decoded image and semantic mask."""
    rows = []
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[:-len(".json")]
            rows.append({"record": json.loads(members[name]),
                         "image": np.asarray(Image.open(io.BytesIO(members[f"{key}.jpg"]))),
                         "mask": np.asarray(Image.open(io.BytesIO(members[f"{key}.seg.png"])))})
    return rows


@pytest.mark.parametrize("family, runner", [("sd3", "in-process"), ("flux", "ray")])  # Ray once: CI time
def test_a_killed_run_resumes_to_the_uninterrupted_bytes(family, runner, models, tmp_path, monkeypatch):
    job = mm_job(tmp_path, models[family], family)
    reference = tmp_path / "in-process"
    run_job(load_spec(job, out=str(reference)), use_ray=False, progress=False)

    rows = samples(reference)
    assert len(rows) == 6
    grid = [HEIGHT // 16, WIDTH // 16]
    for row in rows:
        gen, classes = row["record"]["gen"], row["record"]["class_names"]
        assert gen["family"] == family and gen["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
        capture = gen["capture"]
        assert capture["map_grid"] == grid and set(map(tuple, capture["grids"]["joint"].values())) == {tuple(grid)}
        assert capture["blocks"] and all(0 <= b < (4 if family == "sd3" else 5) for b in capture["blocks"])
        assert row["image"].shape == (HEIGHT, WIDTH, 3) and row["mask"].shape == (HEIGHT, WIDTH)
        assert set(np.unique(row["mask"])) <= {0, 255, *range(1, len(classes) + 1)}
    assert any(np.isin(row["mask"], range(1, 3)).any() for row in rows)  # some class pixels

    # the driver (under its own local Ray: own temp dir, the run's session killed by PID; or in-process)
    # SIGKILLs itself right after committing its first shard; the rerun resumes in-process
    out = tmp_path / "killed"
    monkeypatch.setenv("SYNTHGEN_FAILPOINT", "after-commit:1")
    run = CliRun(job, tmp_path, "--out", str(out), *(["--no-ray"] if runner == "in-process" else []))
    assert run.wait() == -signal.SIGKILL, run.output()
    monkeypatch.delenv("SYNTHGEN_FAILPOINT")
    killed = read_manifest(out)
    assert [s["name"] for s in killed["shards"]] == ["train-000000"] and not killed["complete"]
    assert main(["run", str(job), "--no-ray", "--out", str(out)]) == 0
    resumed = read_manifest(out)
    assert resumed["complete"] and resumed["runs"][-1]["shards_written"] == 2  # the committed shard was kept
    assert_same_dataset(out, reference)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_judge_and_redraws_run_on_every_mm_dit_family(family, models, tmp_path):
    from test_redraw import assert_every_attempt_is_drawn_on

    assert_every_attempt_is_drawn_on(mm_job(tmp_path, models[family], family), CLASSES, tmp_path)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_synthesis_maps_have_the_recorded_grid_and_multi_token_words_map_to_all_tokens(family, models, tmp_path):
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    spec = load_spec(mm_job(tmp_path, models[family], family), out=str(tmp_path / "out"))
    batch = SamplingStage(spec)({"index": np.arange(2)})
    stage = SynthesisStage(spec)
    out = stage(batch)
    gen = json.loads(out["gen"][0])
    assert out["attn"].shape == (2, 2, *gen["capture"]["map_grid"]) and np.isfinite(out["attn"]).all()
    assert out["attn"][:, 0].max(axis=(-2, -1)).min() == pytest.approx(1.0, abs=1e-3)  # max-normalised class maps

    fam = stage.family
    prompt = "a traffic light, a fire hydrant and a hot dog"
    spans = [(prompt.index(w), prompt.index(w) + len(w)) for w in ("traffic light", "fire hydrant", "hot dog")]
    positions = fam.token_positions(prompt, spans)
    assert set(positions) == set(fam.tokenizers)
    for name, groups in positions.items():
        tok = getattr(fam.pipe, name)
        ids = tok(prompt).input_ids
        for (start, end), group in zip(spans, groups):
            text = tok.decode([ids[p] for p in group]).replace(" ", "")
            assert text == prompt[start:end].replace(" ", ""), (name, text)  # every token of both words, nothing else
    captured = fam.capture_token_index(prompt, positions["tokenizer"])
    t5 = positions[fam.t5_tokenizer]
    expected = ([list(c) + [77 + p for p in t] for c, t in zip(positions["tokenizer"], t5)] if family == "sd3"
                else t5)
    assert captured == expected
    # a class named twice (count_style 'repeat'): the T5 tokens of both words, none of the words between
    twice = "a hot dog and a hot dog"
    spans = [(2, 9), (16, 23)]
    both = fam.token_positions(twice, spans)
    clip = [both["tokenizer"][0] + both["tokenizer"][1]]
    t5 = sorted(set(both[fam.t5_tokenizer][0] + both[fam.t5_tokenizer][1]))
    assert fam.capture_token_index(twice, clip) == ([clip[0] + [77 + p for p in t5]] if family == "sd3" else [t5])


def test_sd3_without_t5_captures_the_clip_tokens(tmp_path):
    """SD3 with ``text_encoder_3`` / ``tokenizer_3`` saved as None: the pipeline feeds zeros for T5, the capture keeps
    the CLIP positions only (the joint text still has 77 + 256 tokens), the maps have the token grid."""
    import torch

    from stages.families import resolve_family

    folder = build_sd3(tmp_path / "sd3-no-t5", t5=False)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    family = resolve_family(folder)(str(folder))
    assert family.name == "sd3" and family.pipe.text_encoder_3 is None
    prompt = "a photo of a fire hydrant"
    span = (prompt.index("fire"), len(prompt))
    positions = family.token_positions(prompt, [span])
    assert set(positions) == {"tokenizer", "tokenizer_2"}
    assert family.capture_token_index(prompt, positions["tokenizer"]) == positions["tokenizer"]
    job = mm_job(tmp_path, folder, "sd3")
    masks = load_spec(job).masks  # the pre-flight checks pass on a folder without T5
    capture = family.attach_capture(masks, HEIGHT, WIDTH)
    assert capture.info["text_tokens"] == 77 + 256 and capture.info["map_grid"] == [HEIGHT // 16, WIDTH // 16]
    # the family's schedulers are checked before any weights load; capture blocks by index, in range
    with pytest.raises(SpecError, match=r"generation.scheduler: 'ddim' does not fit a .* model; use 'default' or 'euler'"):
        load_spec(job, ["generation.scheduler=ddim"])
    assert load_spec(job, ["masks.capture_blocks=[0, 1]"]).masks.capture_blocks == [0, 1]
    with pytest.raises(SpecError, match=r"masks.capture_blocks: \[99\] out of range"):
        load_spec(job, ["masks.capture_blocks=[99]"])
    capture.begin([positions["tokenizer"]], 2, family.loop_steps(2))
    images = family.run(family.conditioning([prompt], [{}]), [torch.Generator().manual_seed(0)], 2, 4.0, HEIGHT,
                        WIDTH, capture.on_step_end)
    maps = capture.finish()["attn"]
    assert images.shape == (1, HEIGHT, WIDTH, 3) and maps.shape == (1, 2, HEIGHT // 16, WIDTH // 16)
    assert float(maps[0, 0].max()) == pytest.approx(1.0) and float(maps[0, 1].abs().max()) == 0.0


def test_refinement_on_mm_dit_needs_no_unet_self_attention_level(models, tmp_path):
    """``refine_power`` on an MM-DiT model refines with the captured blocks' own image→image attention: the
    UNet-only ``self_attention_resolution`` is not asked for (on a UNet model it is: tests/test_bad_input.py)."""
    spec = load_spec(mm_job(tmp_path, models["sd3"], "sd3"), ["masks.refine_power=1"])
    assert spec.masks.refine_power == 1 and spec.masks.self_attention_resolution is None
