"""Joint-attention capture (stages/families/joint_attention.py) against an explicit softmax(QKᵀ/√d).

Tiny random-weight SD3 (with an SD3.5 dual-attention block and RMS q/k norms) and Flux transformers
(double- and single-stream blocks, RoPE). The reference recomputes q and k from each hooked attention
module's own projections and norms (RoPE applied with diffusers' ``apply_rotary_emb`` on Flux), in a
forward pre-hook that does not touch the capture's code path, and takes the image-query rows and the
class-token columns of the softmax over the whole joint key set.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from torch.nn.attention import SDPBackend, sdpa_kernel

from stages.families import joint_attention
from stages.families.joint_attention import (FluxCaptureProcessor, JointAttentionCapture, JointCaptureConfig,
                                             SD3CaptureProcessor, attention_with_lse, block_names, default_blocks,
                                             joint_logsumexp, middle_blocks)

GRID = (4, 6)  # image-token grid (non-square): latent 8×12 for SD3, packed 4×6 for Flux
N = GRID[0] * GRID[1]
TEXT = 10  # text tokens in the joint sequence
TOKENS = [[[1], [3, 4]], [[7]]]  # image 0: two classes (the second named by two tokens); image 1: one
K = 3
B = len(TOKENS)


def sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                 num_attention_heads=3, joint_attention_dim=12, caption_projection_dim=24,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(1,), qk_norm="rms_norm").eval()


def flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=16, num_attention_heads=3, joint_attention_dim=12,
                                  pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def sd3_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2 * GRID[0], 2 * GRID[1], generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 12, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.full((batch,), 500.0))


def flux_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, GRID[0], GRID[1], "cpu", torch.float32)
    return dict(hidden_states=torch.randn(batch, N, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 12, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=img_ids, txt_ids=torch.zeros(TEXT, 3), guidance=torch.full((batch,), 3.5))


FAMILIES = {"sd3": (sd3, sd3_inputs), "flux": (flux, flux_inputs)}


def in_dtype(inputs, dtype: torch.dtype):
    """``inputs`` with its float tensors in ``dtype`` (Flux's position ids stay float32, as the pipeline makes them)."""
    def make(model, batch: int, seed: int) -> dict:
        return {k: v.to(dtype) if v.is_floating_point() and not k.endswith("_ids") else v
                for k, v in inputs(model, batch, seed).items()}
    return make


def reference_probs(model) -> dict[int, list[torch.Tensor]]:
    """{block index: [(batch, heads, N image queries, TEXT text keys) per call]} from an explicit fp32
    softmax over the whole joint key set, recomputed from each attention module's own weights."""
    records: dict[int, list[torch.Tensor]] = defaultdict(list)
    is_flux = isinstance(model, FluxTransformer2DModel)

    def split(x, attn):
        return x.unflatten(-1, (attn.heads, -1))  # (B, S, H, D)

    def hook(block, attn, args, kwargs):
        hidden = kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        q, k = attn.norm_q(split(attn.to_q(hidden), attn)), attn.norm_k(split(attn.to_k(hidden), attn))
        if context is not None:
            cq = attn.norm_added_q(split(attn.add_q_proj(context), attn))
            ck = attn.norm_added_k(split(attn.add_k_proj(context), attn))
            # SD3: image first; Flux: text first
            q, k = ((torch.cat([cq, q], 1), torch.cat([ck, k], 1)) if is_flux
                    else (torch.cat([q, cq], 1), torch.cat([k, ck], 1)))
        if is_flux:
            rope = kwargs["image_rotary_emb"]
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, S, S)
        text, image = (slice(0, TEXT), slice(TEXT, None)) if is_flux else (slice(N, None), slice(0, N))
        records[block].append(probs[:, :, image, text].float())

    for block, name in enumerate(block_names(model)):
        attn = model.get_submodule(name.removesuffix(".processor"))
        attn.register_forward_pre_hook(functools.partial(hook, block), with_kwargs=True)
    return records


def class_maps(probs: list[torch.Tensor]) -> torch.Tensor:
    """(B, K, h, w): mean over the given (block, step) calls and heads, mean over each class's tokens."""
    mean = torch.stack([p[-B:].mean(dim=1) for p in probs]).mean(dim=0)  # (B, N, TEXT)
    out = torch.zeros(B, K, *GRID)
    for b, groups in enumerate(TOKENS):
        for k, tokens in enumerate(groups):
            out[b, k] = mean[b][:, tokens].mean(dim=-1).view(GRID)
    return out / out.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def run(model, inputs, capture, steps: int, copies: int, calls_per_step: int = 1) -> list[torch.Tensor]:
    """``steps`` steps of ``calls_per_step`` transformer calls each (batch ``copies``·B); the outputs."""
    outs = []
    if capture is not None:
        capture.begin(TOKENS, K, GRID, steps, TEXT)
    with torch.no_grad():
        for step in range(steps):
            for call in range(calls_per_step):
                outs.append(model(**inputs(model, copies * B, seed=10 * step + call), return_dict=False)[0])
            if capture is not None:
                capture.on_step_end(None, step, 0, {})
    return outs


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_maps_equal_explicit_softmax_and_output_is_bitwise_unchanged(family):
    build, inputs = FAMILIES[family]
    model = build()
    copies, calls = (2, 1) if family == "sd3" else (1, 2)  # SD3: one CFG [uncond, cond] call; Flux: true CFG
    bare = run(model, inputs, None, steps=2, copies=copies, calls_per_step=calls)
    blocks = tuple(range(len(block_names(model))))  # every block: SD3's last (context_pre_only), Flux single
    capture = JointAttentionCapture(model, JointCaptureConfig(blocks=blocks))
    hooked = {n for n, p in model.attn_processors.items() if isinstance(p, (SD3CaptureProcessor, FluxCaptureProcessor))}
    assert hooked == set(block_names(model))  # SD3.5's image-only attn2 keeps its processor
    reference = reference_probs(model)
    captured = run(model, inputs, capture, steps=2, copies=copies, calls_per_step=calls)
    for a, b in zip(bare, captured):
        assert torch.equal(a, b)  # the whole transformer's output, bitwise
    maps = capture.finish()
    for block in blocks:
        assert len(reference[block]) == 2 * calls
    conditional = [reference[b][i] for b in blocks for i in range(0, 2 * calls, calls)]  # each step's first call
    expected = class_maps(conditional)
    torch.testing.assert_close(maps["attn_raw"], expected, rtol=0, atol=1e-5)
    assert torch.equal(maps["attn"], maps["attn_raw"])
    assert maps["attn_raw"].shape == (B, K, *GRID)
    assert maps["attn_raw"][0, 2].abs().max() == 0 and maps["attn_raw"][1, 1:].abs().max() == 0  # padding classes
    # one block alone differs from the mean over blocks (the blocks do contribute)
    single = [reference[blocks[-1]][i] for i in range(0, 2 * calls, calls)]
    assert not torch.allclose(class_maps(single), expected, atol=1e-4)
    capture.remove()
    assert not any(isinstance(p, (SD3CaptureProcessor, FluxCaptureProcessor)) for p in model.attn_processors.values())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_each_layer_output_bitwise_and_one_block(family):
    build, inputs = FAMILIES[family]
    model = build()
    outputs: dict[str, list] = defaultdict(list)

    def keep(name, module, args, kwargs, out):
        outputs[name].append(out)

    for name in block_names(model):
        model.get_submodule(name.removesuffix(".processor")).register_forward_hook(
            functools.partial(keep, name), with_kwargs=True)
    run(model, inputs, None, steps=1, copies=1)
    block = len(block_names(model)) - 2  # SD3: a dual-attention-free middle block; Flux: a single-stream block
    capture = JointAttentionCapture(model, JointCaptureConfig(blocks=(block,)), chunk_bytes=1)  # one head at a time
    reference = reference_probs(model)
    run(model, inputs, capture, steps=1, copies=1)
    for name, (off, on) in outputs.items():
        off, on = (off, on) if isinstance(off, tuple) else ((off,), (on,))
        assert all(torch.equal(a, b) for a, b in zip(off, on)), name
    torch.testing.assert_close(capture.finish()["attn_raw"], class_maps(reference[block]), rtol=0, atol=1e-5)


def test_step_window_and_refinement():
    model = flux()
    capture = JointAttentionCapture(model, JointCaptureConfig(blocks=(1, 2), step_window=(0.5, 1.0), refine_power=2))
    reference = reference_probs(model)
    maps = run(model, flux_inputs, capture, steps=2, copies=1)
    out = capture.finish()
    raw = class_maps([reference[1][1], reference[2][1]])  # second step only
    torch.testing.assert_close(out["attn_raw"], raw, rtol=0, atol=1e-5)
    assert len(maps) == 2
    assert out["attn"].shape == raw.shape and not torch.allclose(out["attn"], out["attn_raw"])
    assert torch.isfinite(out["attn"]).all() and out["attn"][0, :2].amax(dim=(-2, -1)).sub(1).abs().max() < 1e-6


def test_defaults_and_bad_blocks():
    assert middle_blocks(24, 0.25) == tuple(range(9, 15))
    assert default_blocks("sd3", 24) == tuple(range(9, 15))
    assert default_blocks("sd3", 38) == tuple(range(14, 24))
    assert default_blocks("flux", 19, 38) == tuple(range(23, 33))
    assert default_blocks("sd3", 2) == (0,) and default_blocks("flux", 2, 3) == (2,)
    model = sd3()
    capture = JointAttentionCapture(model, JointCaptureConfig())
    assert capture.blocks == default_blocks("sd3", 4) and capture.layer_counts == {
        "joint": {"blocks": list(capture.blocks), "of": 4}}
    with pytest.raises(RuntimeError, match="already has a joint-attention capture"):
        JointAttentionCapture(model, JointCaptureConfig())
    capture.remove()
    with pytest.raises(ValueError, match=r"blocks \[4\] out of range.*0\.\.3"):
        JointAttentionCapture(model, JointCaptureConfig(blocks=(0, 4)))


def test_misuse_fails_loudly():
    model = sd3()
    capture = JointAttentionCapture(model, JointCaptureConfig(blocks=(1,)))
    with pytest.raises(RuntimeError, match="begin"):
        run(model, sd3_inputs, None, steps=1, copies=2)
    capture.begin(TOKENS, K, GRID, 1, TEXT)
    with torch.no_grad():
        model(**sd3_inputs(model, 2 * B, 0))
    with pytest.raises(RuntimeError, match="callback_on_step_end"):
        capture.finish()
    capture.begin(TOKENS, K, (GRID[0], GRID[1] + 2), 1, TEXT)
    with pytest.raises(RuntimeError, match="image tokens"), torch.no_grad():
        model(**sd3_inputs(model, 2 * B, 0))
    with pytest.raises(ValueError, match=r"within \[0, 10\)"):
        capture.begin([[[10]]], K, GRID, 1, TEXT)


# --- text columns + row normaliser (no image × joint probability matrix) -----------------------------------------
def explicit_logsumexp(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return (query.double() @ key.double().transpose(-1, -2) / math.sqrt(query.shape[-1])).logsumexp(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_attention_gives_sdpa_output_and_its_logsumexp(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).mul(2).to(dtype) for n in (37, 45, 45))
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) views, as Flux's
    out, lse = attention_with_lse(q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert lse is not None and lse.dtype == torch.float32 and lse.shape == (2, 3, 37)  # CPU flash returns it
    torch.testing.assert_close(lse.double(), explicit_logsumexp(q, k), rtol=0, atol=1e-4)
    with sdpa_kernel([SDPBackend.MATH]):  # a kernel without a logsumexp: SDPA's output alone
        out, lse = attention_with_lse(q, k, v)
        assert lse is None and torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 2 * 24 * 7, 2**20], ids=["one-key", "seven-keys", "one-chunk"])
def test_chunked_logsumexp_equals_explicit(dtype, chunk_bytes):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 24, 8, generator=g).mul(3).to(dtype), torch.randn(2, 3, 50, 8, generator=g).to(dtype)
    lse = joint_logsumexp(q, k, chunk_bytes)  # one-key / seven-keys: more keys than one chunk, heads one at a time
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 24)
    torch.testing.assert_close(lse.double(), explicit_logsumexp(q, k), rtol=0, atol=1e-5)


def test_a_fused_kernel_that_disagrees_with_sdpa_is_dropped(monkeypatch):
    monkeypatch.setattr(joint_attention, "_LSE_OK", {})
    wrong = dict(joint_attention._LSE_OPS)
    wrong["cpu", "FLASH_ATTENTION"] = lambda q, k, v: (lambda o: (o[0], o[1] + 0.01))(
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v))
    monkeypatch.setattr(joint_attention, "_LSE_OPS", wrong)
    q = k = v = torch.randn(1, 2, 9, 8)
    with pytest.warns(UserWarning, match="row normaliser separately"):
        out, lse = attention_with_lse(q, k, v)
    assert lse is None and torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert attention_with_lse(q, k, v)[1] is None  # remembered: no second check


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normaliser", ["fused", "chunked"])
def test_text_columns_and_normaliser_equal_the_explicit_softmax(family, dtype, normaliser, monkeypatch):
    """The maps (fp32 and bf16 models) equal the explicit fp64 softmax over the whole joint key set within 1e-3,
    with the normaliser from the fused kernel's logsumexp or (math kernel) chunked one key at a time; every
    transformer output is bitwise the same as without capture."""
    build, inputs = FAMILIES[family]
    model, inputs = build().to(dtype), in_dtype(inputs, dtype)
    copies = 2 if family == "sd3" else 1
    given = []
    record = JointAttentionCapture.record

    def spy(self, *args, lse=None, **kwargs):
        given.append(lse is not None)
        return record(self, *args, lse=lse, **kwargs)

    monkeypatch.setattr(JointAttentionCapture, "record", spy)
    kernel = sdpa_kernel([SDPBackend.MATH]) if normaliser == "chunked" else contextlib.nullcontext()
    with kernel:
        bare = run(model, inputs, None, steps=1, copies=copies)
        blocks = tuple(range(len(block_names(model))))
        capture = JointAttentionCapture(model, JointCaptureConfig(blocks=blocks),
                                        chunk_bytes=1 if normaliser == "chunked" else joint_attention.CHUNK_BYTES)
        reference = reference_probs(model)
        captured = run(model, inputs, capture, steps=1, copies=copies)
    assert len(bare) == len(captured) == 1 and torch.equal(bare[0], captured[0])
    assert given == [normaliser == "fused"] * len(blocks)
    maps = capture.finish()["attn_raw"]
    expected = class_maps([reference[b][0] for b in blocks])
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-3)
    assert maps.dtype == torch.float32


def test_the_fp32_output_matmul_is_checked_once_and_dropped_when_missing_or_wrong(monkeypatch):
    """The CUDA path of the class logits (fp32 output from bf16 queries), exercised on the CPU: an op that raises
    (the CPU has none) or disagrees with the fp32 path is dropped for good; one that agrees is used."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 20, 8, generator=g).bfloat16(), torch.randn(2, 3, 4, 8, generator=g).bfloat16()
    lse = joint_logsumexp(q, torch.cat([k, q], dim=2))
    expected = joint_attention._class_log_probs_fp32(q, k, lse, 8 ** -0.5)
    monkeypatch.setattr(joint_attention, "_FP32_OUT_DEVICES", ("cpu",))
    for op, used in [(None, False),  # the real op: not on the CPU
                     (lambda bias, a, b, alpha, out: out.copy_(torch.baddbmm(bias, a.float(), b.float(), alpha=alpha)),
                      True),
                     (lambda bias, a, b, alpha, out: out.fill_(0.0), False)]:
        monkeypatch.setattr(joint_attention, "_FP32_OUT_OK", {})
        if op is not None:
            monkeypatch.setattr(joint_attention, "_baddbmm_fp32_out", op)
        for _ in range(2):
            torch.testing.assert_close(joint_attention._class_log_probs(q, k, lse, 8 ** -0.5), expected,
                                       rtol=0, atol=1e-5)
        assert joint_attention._FP32_OUT_OK == {torch.bfloat16: used}
