"""Build the components of the bundled tiny model in the layout of a Stable Diffusion 1.x checkpoint.

The architecture is Stable Diffusion's, shrunk: an AutoencoderKL (64×64×3 ⇄ 16×16×4), a
UNet2DConditionModel with cross-attention at two resolutions (16×16 and 8×8), a CLIP text
encoder and a CLIP BPE tokenizer whose vocabulary makes every shapes-world word one token.
``save_pipeline`` writes the folder ``StableDiffusionPipeline.from_pretrained`` reads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stages.model import scheduler_from_config

from .world import VOCABULARY

MAX_TOKENS = 24  # tokenizer.model_max_length: captions are short (real SD uses 77)
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-tiny-sd"

# Stable Diffusion's noise schedule, with v-prediction (as SD 2.x) so sampling from pure
# noise works for a small model.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    timestep_spacing="leading",
)


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Train a CLIP-format BPE (vocab.json + merges.txt) on the world's words, save, and load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=1)
    corpus = [" ".join(VOCABULARY)] * 50
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # CLIP's BPE needs every single character and its end-of-word form in the vocabulary
    for ch in alphabet:
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(out_dir)
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits world word {word!r} into {len(ids)} tokens")
    return tokenizer


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16,
    )


@torch.no_grad()
def vae_round_trip(vae: AutoencoderKL, images, batch: int = 256):
    """uint8 images (N, H, W, 3) encoded and decoded by ``vae`` (the latent mean), as uint8: what the model's
    decoder makes of them."""
    import numpy as np

    out = np.empty_like(images)
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out[s:s + batch] = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return out


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    )


def build_scheduler() -> DDIMScheduler:
    """The training noise schedule (its ``alphas_cumprod``)."""
    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_sampler():
    """The scheduler written to the folder: DPM-Solver++ (2M, the loader's "dpm++") on the same noise schedule.
    At 20 steps it draws the prompted shapes more often than DDIM (README, model card); a job can still pick another."""
    return scheduler_from_config("dpm++", build_scheduler().config)


def save_pipeline(out_dir: str | Path, tokenizer, text_encoder, vae, unet) -> Path:
    """Write an SD 1.x folder (safetensors, fp32) atomically: a temp folder renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_sampler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    drop_source_paths(tmp)
    return replace_folder(tmp, out_dir)


def drop_source_paths(folder: Path) -> None:
    """A model loaded with ``from_pretrained`` (a fine-tune's ``--init-from``) keeps where it came from as
    ``_name_or_path``, and ``save_pretrained`` writes it into its config.json: a path, not part of the model."""
    for path in folder.glob("*/config.json"):
        cfg = json.loads(path.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def replace_folder(tmp: Path, out_dir: Path) -> Path:
    """Move the finished folder ``tmp`` (a sibling of ``out_dir``) to ``out_dir``, replacing what was there."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def build_random(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight model in the bundled layout (plumbing tests before training)."""
    torch.manual_seed(seed)
    tmp_tok = tempfile.mkdtemp()
    tokenizer = build_tokenizer(tmp_tok)
    return save_pipeline(out_dir, tokenizer, build_text_encoder(tokenizer), build_vae(), build_unet())
