"""Cross-attention capture (stages/attention.py) against diffusers' own attention scores."""
from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

import stages.attention as attention
from stages.attention import AttentionCapture, CaptureConfig, CaptureProcessor, expected_layers, level_grid

CONTEXT = 24  # bundled tokenizer's model_max_length
TOKENS = [[[2], [4, 5]], [[3]]]  # image 0: two classes (the second named by two tokens); image 1: one
K = 3  # maps per image (zero-padded)


@pytest.fixture
def unet(tiny_model):
    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()


def record_reference(unet, kind: str) -> dict[str, list[torch.Tensor]]:
    """Hook every ``kind`` ("attn1"/"attn2") module and keep diffusers' own ``get_attention_scores``
    per forward call: {module name: [(batch, heads, N, L) per call]}."""
    records: dict[str, list[torch.Tensor]] = defaultdict(list)

    def hook(name, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        context = hidden if context is None else context
        query = module.head_to_batch_dim(module.to_q(hidden)).float()
        key = module.head_to_batch_dim(module.to_k(context)).float()
        probs = module.get_attention_scores(query, key)
        records[name].append(probs.view(hidden.shape[0], module.heads, *probs.shape[1:]))

    for name, module in unet.named_modules():
        if name.endswith("." + kind):
            module.register_forward_pre_hook(functools.partial(hook, name), with_kwargs=True)
    return records


def layers_at(records: dict[str, list[torch.Tensor]], tokens: int, call: int = 0) -> list[torch.Tensor]:
    """The recorded probabilities of forward call ``call`` from the layers with ``tokens`` queries."""
    return [calls[call] for calls in records.values() if calls[call].shape[2] == tokens]


def class_maps(probs: list[torch.Tensor], batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Reference per-class maps (batch, K, h, w) from one call's layers: conditional half, mean over
    layers and heads, mean over each class's tokens."""
    mean = torch.stack([p[-batch:].mean(dim=1) for p in probs]).mean(dim=0)  # (B, N, L)
    out = torch.zeros(batch, K, *grid)
    for b, groups in enumerate(TOKENS):
        for k, tokens in enumerate(groups):
            out[b, k] = mean[b][:, tokens].mean(dim=-1).view(grid)
    return out


def max_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def forward(unet, copies: int, latent_hw=(16, 16), seed: int = 0) -> None:
    """One UNet call on random inputs for len(TOKENS) images (``copies``=2: a CFG [uncond, cond] batch)."""
    gen = torch.Generator().manual_seed(seed)
    batch = copies * len(TOKENS)
    sample = torch.randn(batch, 4, *latent_hw, generator=gen)
    context = torch.randn(batch, CONTEXT, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        unet(sample, 500, encoder_hidden_states=context)


def run(capture: AttentionCapture, unet, steps: int = 1, copies: int = 2, latent_hw=(16, 16)):
    capture.begin(TOKENS, K, latent_hw, steps, CONTEXT)
    for step in range(steps):
        forward(unet, copies, latent_hw, seed=step)
        capture.on_step_end(None, step, 500, {})
    return capture.finish()


def test_expected_layers_tiny_and_sd15(unet):
    tiny = expected_layers(unet.config)
    assert {lv: n for (kind, lv), n in tiny.items() if kind == "attn2"} == {0: 3, 1: 3, 2: 1}
    assert tiny[("attn1", 0)] == 3
    sd15 = SimpleNamespace(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=2, transformer_layers_per_block=1,
        reverse_transformer_layers_per_block=None)
    counts = expected_layers(sd15)
    assert {lv: n for (kind, lv), n in counts.items() if kind == "attn2"} == {0: 5, 1: 5, 2: 5, 3: 1}
    assert sum(n for (kind, _), n in counts.items() if kind == "attn2") == 16  # SD 1.x's 16 cross-attn layers


def test_install_counts_and_restore(unet):
    original = {name: type(p) for name, p in unet.attn_processors.items()}
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16, 8), self_resolution=16, refine_power=1))
    assert capture.layer_counts == {"cross": {"16": 3, "8": 3}, "self": {"16": 3}}
    hooked = [n for n, p in unet.attn_processors.items() if isinstance(p, CaptureProcessor)]
    assert len(hooked) == 3 + 3 + 3
    assert all(".attn2." in n or n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in hooked)
    capture.remove()
    assert {name: type(p) for name, p in unet.attn_processors.items()} == original


def test_unknown_resolution_lists_available(unet):
    with pytest.raises(ValueError, match=r"no attn2 layers at resolution 32.*\{16: 3, 8: 3, 4: 1\}"):
        AttentionCapture(unet, CaptureConfig(resolutions=(32,)))


def test_config_layout_mismatch_fails_loudly(unet):
    unet.register_to_config(layers_per_block=2)  # the modules still have one layer per block
    with pytest.raises(RuntimeError, match="differ from what its config implies"):
        AttentionCapture(unet, CaptureConfig(resolutions=(16,)))


def test_replaced_processors_fail_loudly(unet):
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    unet.set_attn_processor(AttnProcessor2_0())  # e.g. someone resets the processors after install
    with pytest.raises(RuntimeError, match="processors replaced"):
        run(capture, unet)


def test_missing_step_callback_fails_loudly(unet):
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    capture.begin(TOKENS, K, (16, 16), 1, CONTEXT)
    forward(unet, 2)
    with pytest.raises(RuntimeError, match="callback_on_step_end"):
        capture.finish()


@pytest.mark.parametrize("copies", [2, 1], ids=["cfg", "no-cfg"])
def test_maps_match_diffusers_attention_scores(unet, copies):
    reference = record_reference(unet, "attn2")
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    maps = run(capture, unet, copies=copies)
    expected = max_normalise(class_maps(layers_at(reference, 256), len(TOKENS), (16, 16)))
    torch.testing.assert_close(maps["attn_raw"], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(maps["attn"], maps["attn_raw"])  # no refinement
    assert maps["attn_raw"][0, 2].abs().max() == 0 and maps["attn_raw"][1, 1:].abs().max() == 0  # padding
    assert torch.allclose(maps["attn_raw"][0, :2].amax(dim=(-2, -1)), torch.ones(2))


def test_step_window_keeps_only_window_steps(unet):
    reference = record_reference(unet, "attn2")
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,), step_window=(0.5, 1.0)))
    maps = run(capture, unet, steps=2)
    second_step = max_normalise(class_maps(layers_at(reference, 256, call=1), len(TOKENS), (16, 16)))
    torch.testing.assert_close(maps["attn_raw"], second_step, rtol=1e-4, atol=1e-6)


def test_resolutions_are_combined_on_the_latent_grid(unet):
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16, 8)))
    maps = run(capture, unet)
    assert maps["attn_raw"].shape == (2, K, 16, 16)
    with pytest.raises(RuntimeError, match="already has an attention capture"):
        AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    capture.remove()
    fine = AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    assert not torch.allclose(run(fine, unet)["attn_raw"], maps["attn_raw"])  # the 8×8 level contributes


def test_self_attention_refinement(unet):
    cross, self_ = record_reference(unet, "attn2"), record_reference(unet, "attn1")
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,), self_resolution=16, refine_power=2))
    maps = run(capture, unet)
    affinity = torch.stack([p[-2:].mean(dim=1) for p in layers_at(self_, 256)]).mean(dim=0)  # (B, 256, 256)
    raw = max_normalise(class_maps(layers_at(cross, 256), len(TOKENS), (16, 16)))
    refined = affinity @ (affinity @ raw.flatten(2).transpose(1, 2))
    torch.testing.assert_close(maps["attn"], refined.transpose(1, 2).reshape(2, K, 16, 16), rtol=1e-4, atol=1e-6)


def test_non_square_latent(unet):
    # a 16×24 latent (384 queries) against diffusers' own softmax(QKᵀ/√d), raw and refined
    cross, self_ = record_reference(unet, "attn2"), record_reference(unet, "attn1")
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,), self_resolution=16, refine_power=1))
    maps = run(capture, unet, latent_hw=(16, 24))
    capture.remove()
    raw = max_normalise(class_maps(layers_at(cross, 16 * 24), len(TOKENS), (16, 24)))
    torch.testing.assert_close(maps["attn_raw"], raw, rtol=1e-4, atol=1e-6)
    affinity = torch.stack([p[-2:].mean(dim=1) for p in layers_at(self_, 16 * 24)]).mean(dim=0)  # (B, 384, 384)
    refined = affinity @ raw.flatten(2).transpose(1, 2)
    torch.testing.assert_close(maps["attn"], refined.transpose(1, 2).reshape(2, K, 16, 24), rtol=1e-4, atol=1e-6)

    # two levels (16×24 and 8×12) and refinement at the coarse one keep the non-square latent grid
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16, 8), self_resolution=8, refine_power=1))
    maps = run(capture, unet, latent_hw=(16, 24))
    assert level_grid(16, 24, 1) == (8, 12) and level_grid(5, 7, 1) == (3, 4)
    assert maps["attn"].shape == maps["attn_raw"].shape == (2, K, 16, 24)
    assert torch.isfinite(maps["attn"]).all() and maps["attn"][0, :2].amin(dim=(-2, -1)).gt(0).all()


def test_latent_shape_mismatch_fails_loudly(unet):
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    capture.begin(TOKENS, K, (16, 16), 1, CONTEXT)
    with pytest.raises(RuntimeError, match="expected 16×16"):
        forward(unet, 2, latent_hw=(16, 24))


def test_bad_token_positions_and_batch(unet):
    capture = AttentionCapture(unet, CaptureConfig(resolutions=(16,)))
    with pytest.raises(ValueError, match="token positions"):
        capture.begin([[[CONTEXT]]], K, (16, 16), 1, CONTEXT)
    with pytest.raises(ValueError, match="more than 1"):
        capture.begin(TOKENS, 1, (16, 16), 1, CONTEXT)
    capture.begin(TOKENS[:1], K, (16, 16), 1, CONTEXT)  # one image, but the UNet gets two (+CFG)
    with pytest.raises(RuntimeError, match="neither 1 images"):
        forward(unet, 2)


def test_capture_config_validation(unet, monkeypatch):
    with pytest.raises(ValueError, match="step_window"):
        CaptureConfig(step_window=(0.5, 0.5))
    with pytest.raises(ValueError, match="self_attention_resolution"):
        CaptureConfig(refine_power=2)
    with pytest.raises(ValueError, match="contains none of 2 steps"):
        CaptureConfig(step_window=(0.6, 0.7)).captured_steps(2)
    assert CaptureConfig(step_window=(0.0, 0.5)).captured_steps(4) == range(0, 2)
    monkeypatch.setattr(attention, "MAX_SELF_ATTENTION_TOKENS", 100)
    with pytest.raises(ValueError, match="too large"):
        AttentionCapture(unet, CaptureConfig(resolutions=(16,), self_resolution=16, refine_power=1))
