"""``generation.guidance_cutoff``: classifier-free guidance stops after a fraction of the steps (issue 35).

The cut-off chains diffusers' documented step-end pattern (``pipe._guidance_scale = 0.0``, the conditional
half of each CFG-batched callback tensor) after the attention capture's own callback; null leaves every
byte as before; Flux (no CFG batch) is refused at validate.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_job
from family_models import build_sdxl
from mmdit_models import build_flux, build_sd3
from pipeline.cli import main
from pipeline.spec import SpecError, load_spec
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage

pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)

STEPS = 4


def job(folder: Path, model: Path | str, cutoff: float | None | str = "absent", masks: dict | None = None,
        **generation) -> Path:
    """4 samples, batches of 2, ``STEPS`` DDIM / flow-matching steps; ``cutoff`` "absent": no such field."""
    gen = {"steps": STEPS, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 2, **generation}
    if cutoff != "absent":
        gen["guidance_cutoff"] = cutoff
    return write_job(folder, str(model), samples=4, generation=gen, output={"dir": str(folder / "out")},
                     **({} if masks is None else {"masks": masks}))


def synthesize(job_path: Path) -> tuple[dict, list[int]]:
    """The synthesis stage's output over the job's 4 sampled rows, and the batch of every denoiser call."""
    spec = load_spec(job_path)
    rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
    stage = SynthesisStage(spec)
    denoiser = getattr(stage.pipe, "unet", None) or stage.pipe.transformer
    batches: list[int] = []
    hook = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(int((args[0] if args else kwargs["hidden_states"]).shape[0])),
        with_kwargs=True)
    try:
        out = stage(rows)
    finally:
        hook.remove()
    return out, batches


@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("cutoff-sd")
    return {name: synthesize(job(root / name, tiny_model, cutoff, scheduler="ddim"))
            for name, cutoff in (("absent", "absent"), ("null", None), ("half", 0.5))}


def test_the_cutoff_drops_the_unconditional_half_after_its_step_and_changes_the_images(sd_runs):
    (plain, plain_calls), (cut, cut_calls) = sd_runs["absent"], sd_runs["half"]
    assert plain_calls == [8] * STEPS  # one call on the 4 rows: every step a [uncond, cond] batch of 2B
    # diffusers' pattern: CFG through step int(4 × 0.5) = 2, then the conditional half alone (B)
    assert cut_calls == [8, 8, 8, 4]
    assert not np.array_equal(plain["image"], cut["image"])
    gen = json.loads(str(cut["gen"][0]))
    assert gen["guidance_cutoff"] == 0.5 and gen["guidance_scale"] == 5.0
    assert "guidance_cutoff" not in json.loads(str(plain["gen"][0]))


def test_the_capture_still_gives_finite_maps_of_the_same_shape(sd_runs):
    plain, cut = sd_runs["absent"][0], sd_runs["half"][0]
    for col in ("attn", "attn_raw"):
        assert cut[col].shape == plain[col].shape
        assert np.isfinite(cut[col].astype(np.float32)).all()
        assert cut[col].astype(np.float32).max() > 0
    assert "non_finite" not in str(cut["gen"][0])


def test_a_null_cutoff_is_byte_identical_to_a_job_without_the_field(sd_runs, tmp_path, tiny_model):
    (plain, plain_calls), (null, null_calls) = sd_runs["absent"], sd_runs["null"]
    assert plain_calls == null_calls
    for col in plain:
        assert np.array_equal(plain[col], null[col]), col
    identity = {"source": "local", "id": "0" * 64}
    absent = load_spec(job(tmp_path / "a", tiny_model))
    assert load_spec(job(tmp_path / "n", tiny_model, None)).fingerprint(identity) == absent.fingerprint(identity)
    assert "guidance_cutoff" not in json.dumps(absent.model_dump(mode="json", exclude={"generation": {"guidance_cutoff"}}))
    assert load_spec(job(tmp_path / "c", tiny_model, 0.5)).fingerprint(identity) != absent.fingerprint(identity)
    # cut-off 1 never stops guidance: the same images as no cut-off
    one, one_calls = synthesize(job(tmp_path / "one", tiny_model, 1.0, scheduler="ddim"))
    assert one_calls == plain_calls and np.array_equal(one["image"], plain["image"])


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_a_cutoff_outside_0_1_is_refused(tmp_path, tiny_model, value):
    with pytest.raises(SpecError, match="generation.guidance_cutoff"):
        load_spec(job(tmp_path, tiny_model, value))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_cutoff_works_on_sdxl_and_sd3_and_their_capture(family, tmp_path):
    model = build_sdxl(tmp_path / "tiny-sdxl") if family == "sdxl" else build_sd3(tmp_path / "tiny-sd3")
    masks = {"capture_resolutions": ["1/2"] if family == "sdxl" else [16], "self_attention_resolution": None,
             "refine_power": 0}
    runs = {name: synthesize(job(tmp_path / name, model, cutoff, masks, scheduler="default"))
            for name, cutoff in (("plain", "absent"), ("cut", 0.5))}
    (plain, plain_calls), (cut, cut_calls) = runs["plain"], runs["cut"]
    assert plain_calls == [8] * STEPS and cut_calls == [8, 8, 8, 4]
    assert not np.array_equal(plain["image"], cut["image"])
    for col in ("attn", "attn_raw"):
        assert cut[col].shape == plain[col].shape and np.isfinite(cut[col].astype(np.float32)).all()


def test_flux_with_a_cutoff_is_one_line_at_validate(tmp_path, capsys):
    model = build_flux(tmp_path / "tiny-flux")
    path = job(tmp_path, model, scheduler="default", guidance_scale=3.5)
    capsys.readouterr()  # the builder's progress bars
    assert main(["validate", str(path), "--set", "generation.guidance_cutoff=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "generation.guidance_cutoff" in err and "flux" in err.lower()
