"""``generation.cache_interval``: DeepCache-style reuse of the UNet's deep blocks (issue 35's speed options).

The deep blocks compute on every N-th denoiser call of a pipeline call and replay their outputs between; the
outermost blocks run every call; the capture averages each level over the steps it ran; null leaves every byte as
before; the MM-DiT families refuse the option at validate.
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
from pipeline.spec import SpecError, load_spec
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage

pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)

STEPS = 4


def job(folder: Path, model: Path | str, interval: int | None | str = "absent", masks: dict | None = None,
        **generation) -> Path:
    """4 samples, batches of 2, ``STEPS`` DDIM steps; ``interval`` "absent": no such field."""
    gen = {"steps": STEPS, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 2, "scheduler": "ddim",
           **generation}
    if interval != "absent":
        gen["cache_interval"] = interval
    return write_job(folder, str(model), samples=4, generation=gen, output={"dir": str(folder / "out")},
                     **({} if masks is None else {"masks": masks}))


def synthesize(job_path: Path) -> tuple[dict, dict[str, int]]:
    """The synthesis stage's output over the job's 4 rows, and how often a shallow and a deep resnet computed."""
    spec = load_spec(job_path)
    rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
    stage = SynthesisStage(spec)
    unet = stage.pipe.unet
    counts = {"shallow": 0, "deep": 0}
    hooks = [unet.down_blocks[0].resnets[0].register_forward_hook(lambda *a: counts.__setitem__("shallow", counts["shallow"] + 1)),
             unet.mid_block.resnets[0].register_forward_hook(lambda *a: counts.__setitem__("deep", counts["deep"] + 1))]
    try:
        out = stage(rows)
    finally:
        for h in hooks:
            h.remove()
    return out, counts


@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("reuse-sd")
    return {name: synthesize(job(root / name, tiny_model, interval))
            for name, interval in (("absent", "absent"), ("null", None), ("three", 3))}


def test_the_deep_blocks_compute_every_third_call_and_the_images_change(sd_runs):
    (plain, plain_n), (reuse, reuse_n) = sd_runs["absent"], sd_runs["three"]
    assert plain_n == {"shallow": STEPS, "deep": STEPS}  # one pipeline call on the 4 rows, one UNet call per step
    assert reuse_n == {"shallow": STEPS, "deep": 2}  # calls 0 and 3 of 4 are full
    assert not np.array_equal(plain["image"], reuse["image"])
    # the same scene: each image is nearer its own plain draw than the plain draws are to one another
    image, other = plain["image"].astype(float), reuse["image"].astype(float)
    assert np.abs(image - other).mean() < np.abs(image - np.roll(image, 1, axis=0)).mean()
    gen = json.loads(str(reuse["gen"][0]))
    assert gen["cache_interval"] == 3 and "cache_interval" not in json.loads(str(plain["gen"][0]))
    for col in ("attn", "attn_raw"):
        assert reuse[col].shape == plain[col].shape and np.isfinite(reuse[col].astype(np.float32)).all()
        assert reuse[col].astype(np.float32).max() > 0


def test_every_call_starts_full_so_a_rerun_is_byte_identical(sd_runs, tmp_path, tiny_model):
    again, counts = synthesize(job(tmp_path, tiny_model, 3))
    assert counts == {"shallow": STEPS, "deep": 2}
    for col in ("image", "attn", "attn_raw", "gen"):
        assert np.array_equal(again[col], sd_runs["three"][0][col]), col


def test_a_null_interval_is_byte_identical_to_a_job_without_the_field(sd_runs, tmp_path, tiny_model):
    (plain, plain_n), (null, null_n) = sd_runs["absent"], sd_runs["null"]
    assert plain_n == null_n
    for col in plain:
        assert np.array_equal(plain[col], null[col]), col
    identity = {"source": "local", "id": "0" * 64}
    absent = load_spec(job(tmp_path / "a", tiny_model))
    assert load_spec(job(tmp_path / "n", tiny_model, None)).fingerprint(identity) == absent.fingerprint(identity)
    assert load_spec(job(tmp_path / "c", tiny_model, 3)).fingerprint(identity) != absent.fingerprint(identity)


def test_an_interval_of_1_is_refused(tmp_path, tiny_model):
    with pytest.raises(SpecError, match="generation.cache_interval"):
        load_spec(job(tmp_path, tiny_model, 1))


def test_sdxl_capturing_a_deep_level_averages_it_over_the_full_steps(tmp_path):
    """SDXL's first level has no attention: the captured level 1/2 runs only on full calls (0 and 2 of 4)."""
    model = build_sdxl(tmp_path / "tiny-sdxl")
    masks = {"capture_resolutions": ["1/2"], "self_attention_resolution": None, "refine_power": 0}
    (plain, _), (reuse, counts) = (synthesize(job(tmp_path / name, model, interval, masks, scheduler="default"))
                                   for name, interval in (("plain", "absent"), ("reuse", 2)))
    assert counts["deep"] == 2
    assert not np.array_equal(plain["image"], reuse["image"])
    for col in ("attn", "attn_raw"):
        maps = reuse[col].astype(np.float32)
        assert maps.shape == plain[col].shape and np.isfinite(maps).all() and maps.max() > 0


def test_sd3_with_an_interval_is_one_line_at_validate(tmp_path, capsys):
    model = build_sd3(tmp_path / "tiny-sd3")
    path = job(tmp_path, model, scheduler="default")
    capsys.readouterr()  # the builder's progress bars
    assert main(["validate", str(path), "--set", "generation.cache_interval=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "generation.cache_interval" in err and "sd3" in err.lower()


def test_the_speed_option_benchmark_counts_the_denoiser_work_and_writes_its_json(tmp_path):
    """benchmarks/speed_options.py at its smallest: the counts follow the stage's own rules (20 steps, CFG: 40
    image-evaluations; a cut-off at 0.5 leaves 30; reuse every 3rd call keeps 14 deep, 12 with the cut-off, whose
    change of batch makes step 10 a full call), and each option's labels are scored."""
    import subprocess
    import sys

    from benchmarks.speed_options import denoiser_work

    assert denoiser_work(20, 5.0, None, None) == {"unet_evaluations_per_image": 40, "deep_evaluations_per_image": 40}
    assert denoiser_work(20, 5.0, 0.5, None)["unet_evaluations_per_image"] == 30
    assert denoiser_work(20, 5.0, None, 3)["deep_evaluations_per_image"] == 14
    assert denoiser_work(20, 5.0, 0.5, 3) == {"unet_evaluations_per_image": 30, "deep_evaluations_per_image": 12}
    out = tmp_path / "speed.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed_options", "--n", "2", "--options", "none,reuse_3",
                           "--json", str(out)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["none", "reuse_3"] and len(results["none"]["runs"]) == 2
    assert results["reuse_3"]["deep_evaluations_per_image"] == 14
    for r in results.values():
        assert 0 <= r["miou"] <= 1 and 0 <= r["kept_fraction"] <= 1 and r["synthesis_s_per_image"] > 0
