"""The training script's data and decoder phases (benchmarks.training.train; the UNet phase is covered in
test_grounding.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from benchmarks.training import train


def test_render_dataset_is_the_same_with_any_number_of_workers(tmp_path):
    one = train.render_dataset(tmp_path / "a", 20, 64, workers=1)
    two = train.render_dataset(tmp_path / "b", 20, 64, workers=2)
    for x, y in zip(one, two):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert (tmp_path / "b" / "scenes-20-64-masks.npz").exists()


def test_decoder_finetune_leaves_the_encoder_and_latents_alone(tmp_path, tiny_model):
    images, *_ = train.render_dataset(tmp_path, 8, 64, workers=1)
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    x = train.to_tensor(images)
    with torch.no_grad():
        lat_before = vae.encode(x).latent_dist.mean
    train.train_decoder(tmp_path, vae, images, steps=3, batch=4, seed=0)
    after = vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and tuned
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in tuned) > len(tuned) // 2
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mean, lat_before)
    assert torch.load(tmp_path / "decoder.pt", weights_only=False)["step"] == 3
    # a rerun with the same step count resumes at the end: no further change
    tuned_state = {k: v.clone() for k, v in vae.state_dict().items()}
    train.train_decoder(tmp_path, vae, images, steps=3, batch=4, seed=0)
    assert all(torch.equal(tuned_state[k], v) for k, v in vae.state_dict().items())


def test_a_fresh_vae_run_is_reproducible(tmp_path):
    images, *_ = train.render_dataset(tmp_path, 8, 64, workers=1)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.rand(3)  # whatever the process's RNG did before must not matter
    first = train.train_vae(tmp_path / "a", images, steps=2, batch=4, seed=0).state_dict()
    torch.rand(5)
    second = train.train_vae(tmp_path / "b", images, steps=2, batch=4, seed=0).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_an_export_of_loaded_weights_records_no_source_path(tmp_path, tiny_model):
    """--init-from loads with from_pretrained, which remembers the folder; the exported configs must not."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.shapes.tiny_sd import save_pipeline

    parts = dict(vae=AutoencoderKL.from_pretrained(tiny_model, subfolder="vae"),
                 unet=UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"),
                 text_encoder=CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder"),
                 tokenizer=CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"))
    out = save_pipeline(tmp_path / "export", **parts)
    configs = sorted(out.glob("*/config.json"))
    assert [c.parent.name for c in configs] == ["text_encoder", "unet", "vae"]
    assert not [c for c in configs if "_name_or_path" in c.read_text()]
    assert UNet2DConditionModel.from_pretrained(out, subfolder="unet").config.cross_attention_dim == \
        parts["unet"].config.cross_attention_dim


def test_outline_weights_mark_a_band_around_each_object():
    image = np.full((1, 64, 64, 3), 120, np.uint8)  # grey background
    image[0, 20:40, 20:40] = (230, 40, 40)  # a red square, rows and columns 20..39
    w = train.outline_weights(train.to_tensor(image), 4.0)[0, 0].numpy()
    assert w.shape == (64, 64)
    assert w[30, 30] == 1.0 and w[5, 5] == 1.0  # deep inside, far outside
    for y, x in [(20, 30), (19, 30), (39, 30), (40, 30), (30, 18), (30, 41)]:  # on and beside the outline
        assert w[y, x] == 5.0, (y, x)
    assert w[30, 23] == 1.0 and w[30, 16] == 1.0  # three pixels in, four out
    # a weighted loss counts an error on the outline more than the plain mean does
    x = train.to_tensor(image)
    rec = x.clone()
    rec[..., 20, 20:40] -= 0.5
    weight = train.outline_weights(x, 4.0)
    assert torch.allclose(train.reconstruction_loss(rec, x, torch.ones_like(weight)), train.reconstruction_loss(rec, x))
    assert train.reconstruction_loss(rec, x, weight) > 2 * train.reconstruction_loss(rec, x)


def test_a_decoder_only_run_exports_the_unet_and_text_encoder_unchanged(tmp_path, tiny_model):
    """--init-from M --unet-steps 0 --decoder-steps N: the documented way to fine-tune the decoder alone."""
    from safetensors.torch import load_file

    out = tmp_path / "model"
    train.main(["--work", str(tmp_path / "work"), "--out", str(out), "--init-from", tiny_model, "--scenes", "8",
                "--batch", "4", "--decoder-steps", "2", "--decoder-edge-weight", "4", "--unet-steps", "0",
                "--device", "cpu"])
    for part in ("unet", "text_encoder"):
        name = "diffusion_pytorch_model.safetensors" if part == "unet" else "model.safetensors"
        a, b = load_file(f"{tiny_model}/{part}/{name}"), load_file(out / part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a = load_file(f"{tiny_model}/vae/diffusion_pytorch_model.safetensors")
    b = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


def test_class_weights_are_parsed_and_bad_ones_named():
    assert train.parse_class_weights("square=3, cross=2.5") == {"square": 3.0, "cross": 2.5}
    assert train.parse_class_weights(None) == {} == train.parse_class_weights("")
    for bad, says in (("sqare=3", "unknown class 'sqare'"), ("square", "not CLASS=NUMBER"),
                      ("square=x", "not CLASS=NUMBER"), ("square=0", "must be > 0")):
        with pytest.raises(ValueError, match=says):
            train.parse_class_weights(bad)


def test_scenes_are_drawn_by_the_mean_weight_of_their_classes():
    captions = ["a red square on noise", "a blue circle", "a red square and a blue circle on stripes",
                "a green cross and a red square and a blue ring"]
    assert train.scene_probabilities(captions, {}) is None
    probs = train.scene_probabilities(captions, {"square": 3.0, "cross": 2.0})
    assert np.allclose(probs * (3 + 1 + 2 + 2), [3, 1, 2, 2])
    shares = train.class_shares(captions, probs)  # objects per scene: square 1, circle 1, square+circle, 3 objects
    assert np.isclose(shares["square"], (3 + 2 + 2) / (3 + 1 + 2 * 2 + 2 * 3))
    assert np.isclose(sum(shares.values()), 1.0) and shares["triangle"] == 0.0
    drawn = train.draw_scenes(np.random.default_rng(0), len(captions), 40_000, probs)
    assert np.allclose(np.bincount(drawn, minlength=4) / len(drawn), probs, atol=0.01)
    uniform = train.draw_scenes(np.random.default_rng(0), len(captions), 40_000, None)
    assert np.allclose(np.bincount(uniform, minlength=4) / len(uniform), 0.25, atol=0.01)


def test_a_bad_class_weight_stops_the_run_before_any_work(tmp_path):
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="unknown class 'hexagon'"):
        train.main(["--work", str(work), "--out", str(tmp_path / "out"), "--scenes", "8",
                    "--class-weights", "hexagon=2", "--device", "cpu"])
    assert not work.exists()
