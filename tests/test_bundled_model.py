"""The bundled tiny model: SD 1.x folder layout, loads through the project's loader, generates."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from pipeline.shapes.tiny_sd import BUNDLED_MODEL, SCHEDULER_CONFIG
from pipeline.shapes.world import VOCABULARY
from stages.model import load_pipeline

SD_LAYOUT = {
    "model_index.json": None,
    "unet/config.json": None, "unet/diffusion_pytorch_model.safetensors": None,
    "vae/config.json": None, "vae/diffusion_pytorch_model.safetensors": None,
    "text_encoder/config.json": None, "text_encoder/model.safetensors": None,
    "tokenizer/tokenizer_config.json": None,
    "scheduler/scheduler_config.json": None,
}


def test_bundled_model_is_committed_in_sd_layout():
    root = Path(BUNDLED_MODEL)
    missing = [rel for rel in SD_LAYOUT if not (root / rel).is_file()]
    assert not missing, f"bundled model lacks {missing}"
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    # the folder samples with DPM-Solver++ on the noise schedule the model was trained with
    sched = json.loads((root / "scheduler/scheduler_config.json").read_text())
    assert index["scheduler"] == ["diffusers", sched["_class_name"]] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert sched["algorithm_type"] == "dpmsolver++"
    assert {k: sched.get(k) for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt")), "weights must be safetensors only"
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"bundled model is {total / 2**20:.1f} MiB, over the 30 MiB budget"


def test_loader_returns_sd_components_in_float32():
    pipe = load_pipeline(str(BUNDLED_MODEL), dtype="float32", device="cpu")
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    # cross-attention at two resolutions of the 16×16 latent grid
    cross = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) >= 2 and any(n.startswith("down_blocks.0") for n in cross) and any(
        n.startswith("down_blocks.1") for n in cross)
    # every world word is one token
    for word in VOCABULARY:
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_two_step_generation_is_deterministic_finite_and_64px():
    pipe = load_pipeline(str(BUNDLED_MODEL))
    prompts = ["a red circle on noise", "a blue star and a green square"]

    def generate(seed: int) -> np.ndarray:
        return pipe(prompts, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    images = generate(0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.01  # not a constant image
    # the seed alone decides the image: the same seed gives the same bytes, another seed another image
    assert generate(0).tobytes() == images.tobytes()
    other = generate(1)
    assert other.shape == images.shape and np.abs(other - images).mean() > 0.01
