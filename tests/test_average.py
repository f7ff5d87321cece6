"""Weight averaging of two runs (benchmarks/training/average.py): the arithmetic, what is kept, what is refused."""
from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from benchmarks.training import average
from pipeline.shapes.tiny_sd import build_random
from pipeline.dataset import sha256_file


def _digest(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A random model A, and B: A with every UNet weight + 1 and every text-encoder weight x 3."""
    root = tmp_path_factory.mktemp("runs")
    a = build_random(root / "a", seed=0)
    b = root / "b"
    shutil.copytree(a, b)
    unet = UNet2DConditionModel.from_pretrained(a, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    unet.save_pretrained(b / "unet", safe_serialization=True)
    te = CLIPTextModel.from_pretrained(a, subfolder="text_encoder")
    with torch.no_grad():
        for p in te.parameters():
            p.mul_(3.0)
    te.save_pretrained(b / "text_encoder", safe_serialization=True)
    return a, b


def test_average_mixes_unet_and_text_encoder_and_keeps_the_rest(two_runs, tmp_path):
    a, b = two_runs
    out = average.average(a, b, 0.25, tmp_path / "mix")
    ua, uo = (UNet2DConditionModel.from_pretrained(f, subfolder="unet").state_dict() for f in (a, out))
    assert all(torch.allclose(uo[k], ua[k] + 0.25, atol=1e-6) for k in ua)
    ta, to = (CLIPTextModel.from_pretrained(f, subfolder="text_encoder") for f in (a, out))
    pa, po = dict(ta.named_parameters()), dict(to.named_parameters())
    assert all(torch.allclose(po[k], pa[k] * 1.5, atol=1e-6) for k in pa)  # 0.75 * x + 0.25 * 3x
    da, do = _digest(a), _digest(out)
    kept = [k for k in da if k.startswith(("vae/", "tokenizer/", "scheduler/")) or k == "model_index.json"]
    assert kept and all(da[k] == do[k] for k in kept)
    assert '"_name_or_path"' not in (out / "unet" / "config.json").read_text()
    assert not list(tmp_path.glob("mix.*"))  # no temporary folder left behind


def test_average_can_replace_its_first_input(two_runs, tmp_path):
    a, b = two_runs
    target = tmp_path / "a"
    shutil.copytree(a, target)
    average.average(target, b, 1.0, target)  # weight 1: B's weights, written over A
    ub, ut = (UNet2DConditionModel.from_pretrained(f, subfolder="unet").state_dict() for f in (b, target))
    assert all(torch.equal(ub[k], ut[k]) for k in ub)


def test_runs_of_different_vaes_are_refused_before_anything_is_written(two_runs, tmp_path, capsys):
    a, _ = two_runs
    other = build_random(tmp_path / "other", seed=1)  # another random VAE: another latent space
    with pytest.raises(SystemExit) as e:
        average.main([str(a), str(other), "--out", str(tmp_path / "mix")])
    assert "VAEs" in str(e.value) and "latent space" in str(e.value)
    assert not (tmp_path / "mix").exists()
    with pytest.raises(SystemExit):
        average.main([str(a), str(a), "--weight", "1.5", "--out", str(tmp_path / "mix")])
    assert not (tmp_path / "mix").exists()
