"""The training script's data and decoder phases (the UNet phase is covered in test_grounding.py)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipeline.shapes import train


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
