"""Random-weight models of each diffusers family, built offline at tiny widths for tests.

Each ``build_*(dir)`` writes a complete diffusers folder (``save_pretrained(safe_serialization=True)``:
model_index.json, configs, safetensors, tokenizers) with the family's real *layout* (block types,
text encoders, prediction type, projections, micro-conditioning) and tiny widths, and returns the
folder. Nothing is downloaded.

Tokenizers: :func:`clip_tokenizer` builds a transformers ``CLIPTokenizer`` from the real CLIP BPE
vocabulary, ``bpe_simple_vocab_16e6.txt.gz``, read (never imported) from the installed
``openai-clip`` package, a test dependency that ships the file and needs only ftfy, regex and tqdm
(``open_clip_torch`` ships it too, but pulls torchvision, whose PyPI build does not import beside the
CPU torch), or from ``open_clip_torch`` when that is installed.

Shared with the SD3 / Flux builders (they reuse :func:`clip_tokenizer` and :func:`tiny_vae`).
"""
from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT_WIDTH = 32  # hidden size of every tiny CLIP text encoder


def clip_vocab() -> Path:
    """The real CLIP BPE merges file of an installed package (not imported): ``benchmarks.family_capture.clip_bpe``."""
    from benchmarks.family_capture import clip_bpe

    found = clip_bpe()
    if found is None:
        raise FileNotFoundError("no installed package ships CLIP's bpe_simple_vocab_16e6.txt.gz; install the test "
                                "extra (pip install -c .ci/constraints-cpu.txt -e '.[test]': openai-clip)")
    return found


def _clip_files() -> tuple[str, str]:
    """(vocab.json text, merges.txt text) of the real CLIP BPE (``benchmarks.family_capture.clip_bpe_files``)."""
    from benchmarks.family_capture import clip_bpe_files

    clip_vocab()  # the one error a missing test extra gives
    return clip_bpe_files()


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A CLIPTokenizer with the real CLIP vocabulary, saved to ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "_src"
    src.mkdir(exist_ok=True)
    vocab, merges = _clip_files()
    (src / "vocab.json").write_text(vocab)
    (src / "merges.txt").write_text(merges)
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), bos_token="<|startoftext|>",
                        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad_token,
                        model_max_length=model_max_length)
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    tok.save_pretrained(str(folder))
    return tok


def clip_text_encoder(vocab_size: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, **extra):
    """An AutoencoderKL with 4 blocks (vae_scale_factor 8, as every real family) at widths 8-16."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, norm_num_groups=8, layers_per_block=1, **extra).eval()


def _unet(seed: int, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=8, **config).eval()


def build_sd15(folder: Path) -> Path:
    """SD 1.x layout: 4 blocks (3 CrossAttnDownBlock2D + DownBlock2D), conv projections, epsilon, PNDM-free DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    tok = clip_tokenizer(folder / "_tok")
    unet = _unet(1, sample_size=64, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=8, cross_attention_dim=TEXT_WIDTH)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _save(pipe, folder)
    return folder


def build_sd2(folder: Path) -> Path:
    """SD 2.x layout (2.1-768): v-prediction, linear projections, attention_head_dim [5, 10, 20, 20] (heads),
    native sample_size 96; channels 40-160 so each head is 8 wide."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    tok = clip_tokenizer(folder / "_tok")
    unet = _unet(2, sample_size=96, block_out_channels=(40, 80, 160, 160), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, cross_attention_dim=TEXT_WIDTH,
                 upcast_attention=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _save(pipe, folder)
    return folder


def build_sdxl(folder: Path) -> Path:
    """SDXL layout: DownBlock2D then two CrossAttnDownBlock2D (transformer depth 1, 2), linear projections,
    two CLIP text encoders (the second with projection: pooled) concatenated to 64 features, text_time
    micro-conditioning (6 time ids x 8 + pooled 32 = 80 inputs), Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = Path(folder)
    tok = clip_tokenizer(folder / "_tok")
    tok2 = clip_tokenizer(folder / "_tok2", pad_token="!")
    unet = _unet(3, sample_size=128, block_out_channels=(16, 32, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(scaling_factor=0.13025), text_encoder=clip_text_encoder(len(tok), seed=4),
                                     text_encoder_2=clip_text_encoder(len(tok2), projection=True, seed=5),
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    _save(pipe, folder)
    return folder


def _save(pipe, folder: Path) -> None:
    """``save_pretrained(safe_serialization=True)`` without progress bars (tests capture stderr); the tokenizer
    staging folders are removed (the pipeline saved its own copies)."""
    import contextlib
    import io
    import shutil

    with contextlib.redirect_stderr(io.StringIO()):
        pipe.save_pretrained(str(folder), safe_serialization=True)
    for staging in folder.glob("_tok*"):
        shutil.rmtree(staging)


BUILDERS = {"sd15": build_sd15, "sd2": build_sd2, "sdxl": build_sdxl}
