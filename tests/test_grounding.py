"""The training-only token grounding loss: the processor reproduces diffusers' attention output, the
loss is 0 for attention entirely on the object and near 1 for attention entirely off it, and the
training data's token positions and latent masks line up with the captions and scenes."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTokenizer

from benchmarks.training import grounding, train
from pipeline.shapes.world import render_scene


def test_probability_processor_keeps_the_unet_output(tiny_model):
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    torch.manual_seed(0)
    x, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 24, 64)
    t = torch.tensor([500, 50])
    with torch.no_grad():
        ref = unet(x, t, cond).sample
        store = grounding.install(unet)
        out = unet(x, t, cond).sample
    assert torch.allclose(out, ref, atol=1e-5)
    n_cross = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    assert len(store) == n_cross > 0
    assert {p.shape[1] for p in store} == {256, 64, 16}  # 16x16, 8x8 and the 4x4 mid block
    for p in store:
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)  # softmax over the 24 tokens


def test_token_loss_rewards_attention_inside_the_mask():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1.0
    inside = mask.flatten(2).transpose(1, 2)  # B, N, 1
    probs_in = torch.cat([inside, 1 - inside], -1)  # token 0 only where the object is
    probs_out = torch.cat([1 - inside, inside], -1)  # token 0 only on the background
    pos = torch.tensor([[0]])
    assert grounding.token_loss([probs_in], pos, mask, 16, 16).item() == 0.0
    assert grounding.token_loss([probs_out], pos, mask, 16, 16).item() == 1.0
    # an 8x8 layer sees the pooled mask; padding positions (-1) are left out
    pooled = torch.nn.functional.avg_pool2d(mask, 2).flatten(2).transpose(1, 2)
    probs8 = torch.cat([(pooled > 0).float(), (pooled == 0).float()], -1)
    both = grounding.token_loss([probs_in, probs8], torch.tensor([[0, -1]]), torch.cat([mask, mask], 1), 16, 16)
    assert both.item() == 0.0


def test_training_token_positions_and_latent_masks(tmp_path, tiny_model):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    images, captions, short, masks = train.render_dataset(tmp_path, 6, 64)
    pos = train.object_token_positions(tokenizer, captions)
    assert (train.object_token_positions(tokenizer, short) == pos).all()
    for i, text in enumerate(captions):
        scene = render_scene(i, 64)
        ids = tokenizer(text).input_ids
        for k, obj in enumerate(scene.objects):
            assert tokenizer.decode([ids[pos[i, 2 * k]]]).strip() == obj.color
            assert tokenizer.decode([ids[pos[i, 2 * k + 1]]]).strip() == obj.cls
            assert np.isclose(masks[i, k].astype(np.float32).sum() * 16, obj.mask.sum(), atol=0.1)
        assert (pos[i, 2 * len(scene.objects):] == -1).all()
        assert not masks[i, len(scene.objects):].any()


def test_pixel_loss_asks_the_map_to_cover_the_whole_object():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1.0
    inside = mask.flatten(2).transpose(1, 2)
    pos = torch.tensor([[0]])
    full = torch.cat([inside, 1 - inside], -1)  # token 0 takes every object pixel's whole attention
    core = torch.zeros_like(inside)
    core[:, [5 * 16 + 5, 5 * 16 + 6, 6 * 16 + 5, 6 * 16 + 6]] = 1.0  # only the object's 2x2 centre
    partial = torch.cat([core, 1 - core], -1)
    perfect = grounding.pixel_loss([full], pos, mask, 16, 16).item()
    peaked = grounding.pixel_loss([partial], pos, mask, 16, 16).item()
    assert perfect < 1e-4
    # token_loss cannot tell the two apart (all mass inside either way); pixel_loss can
    assert grounding.token_loss([partial], pos, mask, 16, 16).item() == 0.0
    assert peaked > 0.5
