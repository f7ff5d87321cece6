"""``generation.excite``: Attend-and-Excite on the UNet families (issue 34).

On a constructed case (the bundled model, 3-object prompts) the nudge lowers each row's loss (1 - the weakest
prompted class's attention peak) below what the same draws reach without it, from the same starting loss; the
losses are in ``gen``; SDXL runs it with its added conditioning; the MM-DiT families, image-guided jobs and
feature reuse refuse it at validate; left null, the fingerprint is as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_job
from family_models import build_sdxl
from mmdit_models import build_sd3
from pipeline.cli import main
from pipeline.spec import load_spec
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage

pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)

STEPS = 20


def job(folder: Path, model: Path | str, excite: dict | None, masks: dict | None = None, **generation) -> Path:
    gen = {"steps": STEPS, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 2, "scheduler": "default",
           **({} if excite is None else {"excite": excite}), **generation}
    prompts = {"templates": ["{objects} on noise"], "min_classes_per_image": 3, "max_classes_per_image": 3}
    return write_job(folder, str(model), samples=4, generation=gen, prompts=prompts,
                     output={"dir": str(folder / "out")}, **({} if masks is None else {"masks": masks}))


def synthesize(job_path: Path) -> dict:
    spec = load_spec(job_path)
    rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
    return SynthesisStage(spec)(rows)


def losses(out: dict) -> np.ndarray:
    """(rows, excited steps): each row's loss at the end of every excited step."""
    return np.array([json.loads(str(g))["excite"]["loss"] for g in out["gen"]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("excite")
    return {name: synthesize(job(root / name, tiny_model, excite))
            for name, excite in (("off", None), ("measured", {"steps": 0.5, "scale": 0}),
                                 ("excited", {"steps": 0.5, "scale": 5}))}


def test_the_nudge_raises_the_weakest_subjects_attention_peak(runs):
    """Left alone, one row's weakest class fades to a loss of 0.94 at step 3 (a neglected subject); nudged (the
    bundled model's scale: 5), no row's loss after the first nudge exceeds 0.34, and all end at 0."""
    measured, excited = losses(runs["measured"]), losses(runs["excited"])
    assert measured.shape == excited.shape == (4, STEPS // 2)  # 4 rows, the first half of the steps
    assert np.allclose(measured[:, 0], excited[:, 0])  # the same draws before the first nudge
    assert (measured >= 0).all() and (measured <= 1).all()
    assert excited[:, 1:].max() < 0.5 < measured[:, 1:].max()
    assert excited[:, 1:].sum() < measured[:, 1:].sum() / 2
    assert (excited[:, -1] <= measured[:, -1] + 1e-3).all()
    assert not np.array_equal(runs["excited"]["image"], runs["measured"]["image"])


def test_measuring_alone_changes_nothing_and_the_option_is_recorded(runs, tmp_path, tiny_model):
    # scale 0 computes the loss on its own UNet call, without the capture: the draw is the plain one
    for col in ("image", "attn", "attn_raw"):
        assert np.array_equal(runs["off"][col], runs["measured"][col]), col
    gen = json.loads(str(runs["excited"]["gen"][0]))
    assert gen["excite"]["steps"] == 0.5 and gen["excite"]["scale"] == 5 and len(gen["excite"]["loss"]) == STEPS // 2
    assert "excite" not in json.loads(str(runs["off"]["gen"][0]))
    identity = {"source": "local", "id": "0" * 64}
    plain = load_spec(job(tmp_path / "a", tiny_model, None)).fingerprint(identity)
    assert load_spec(job(tmp_path / "b", tiny_model, {"scale": 20})).fingerprint(identity) != plain


def test_sdxl_runs_it_with_its_added_conditioning(tmp_path):
    model = build_sdxl(tmp_path / "tiny-sdxl")
    masks = {"capture_resolutions": ["1/2"], "self_attention_resolution": None, "refine_power": 0}
    out = synthesize(job(tmp_path / "x", model, {"steps": 0.5, "scale": 20}, masks))
    loss = losses(out)
    assert loss.shape == (4, STEPS // 2) and np.isfinite(loss).all()
    assert np.isfinite(out["attn"].astype(np.float32)).all()


@pytest.mark.parametrize("case", ["sd3", "references", "reuse"])
def test_what_cannot_take_it_is_one_line_at_validate(case, tmp_path, tiny_model, capsys):
    model = build_sd3(tmp_path / "tiny-sd3") if case == "sd3" else tiny_model
    path = job(tmp_path, model, {"scale": 20})
    extra = {"reuse": ["--set", "generation.cache_interval=2"],
             "references": ["--set", f"references={{path: {tmp_path / 'refs'}}}"]}.get(case, [])
    capsys.readouterr()
    assert main(["validate", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generation.excite" in err, err


def test_true_turns_it_on_with_the_defaults_and_validate_names_it(tmp_path, tiny_model, capsys):
    path = job(tmp_path, tiny_model, None)
    spec = load_spec(path, ["generation.excite=true"])
    assert spec.generation.excite.steps == 0.25 and spec.generation.excite.scale == 20
    assert load_spec(path, ["generation.excite=false"]).generation.excite is None
    capsys.readouterr()
    assert main(["validate", str(path), "--set", "generation.excite=true", "--set", "generation.guidance_cutoff=0.5"]) == 0
    out = capsys.readouterr().out
    assert "excite (steps 0.25, scale 20)" in out and "guidance_cutoff 0.5" in out, out
