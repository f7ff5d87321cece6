"""Random-weight MM-DiT pipelines (SD3 / SD3.5 and Flux) built offline at tiny widths, saved as diffusers folders.

``build_sd3(dir)`` and ``build_flux(dir)`` write a complete ``save_pretrained(safe_serialization=True)``
folder (``model_index.json`` naming ``StableDiffusion3Pipeline`` / ``FluxPipeline``) with the real
component classes at tiny widths: CLIP BPE tokenizers from tests/family_models.py's ``clip_tokenizer`` (the real
49408-token vocabulary of the ``open_clip_torch`` wheel when installed) and a T5-format SentencePiece-Unigram tokenizer
trained offline on a few hundred captions (``build_t5_tokenizer``, the ``tokenizers`` library, no
sentencepiece needed). Nothing is downloaded. SD3's last block is ``context_pre_only``; the builder gives
it SD3.5's dual-attention block and RMS q/k norms so one tiny model covers both; Flux gets double- and
single-stream blocks and the guidance embedding (dev).
"""
from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

#: the 80 COCO class names (multi-word names such as "traffic light" are one name each)
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
TEMPLATES = ("a photo of {}", "{} on a table", "{} in the street", "a close-up photograph of {}",
             "a painting of {} and a dog", "{} next to a red car", "a blurry picture of {} at night")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def captions() -> list[str]:
    """A few hundred deterministic captions over every COCO class name, colours and templates."""
    out = []
    for i, (name, template) in enumerate(zip(COCO80, itertools.cycle(TEMPLATES))):
        colour = COLOURS[i % len(COLOURS)]
        out += [template.format(f"a {name}"), template.format(f"a {colour} {name}"),
                f"{colour} {name} and a {COCO80[(i * 7) % 80]}", f"two {name}s on grass"]
    return out


def build_t5_tokenizer(out_dir: str | Path, vocab_size: int = 600):
    """A T5-format tokenizer (Unigram, Metaspace ``▁``, ``<pad>``=0, ``</s>``=1, ``<unk>``=2, EOS appended)
    trained offline on ``captions()`` with the ``tokenizers`` library, saved to ``out_dir`` and reloaded."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), unk_token="<unk>",
                                      initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789"),
                                      shrinking_factor=0.75, max_piece_length=12)
    tok.train_from_iterator(captions(), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == list(T5_SPECIALS), vocab[:3]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return T5TokenizerFast.from_pretrained(out_dir)


def clip_tokenizer(out_dir: str | Path):
    """The CLIP BPE tokenizer of tests/family_models.py (the real vocabulary from the open_clip wheel when it is
    installed, else the bundled shapes model's), saved to ``out_dir``."""
    try:
        from family_models import clip_tokenizer as build
    except ImportError:  # imported as tests.mmdit_models (repository root on sys.path)
        from tests.family_models import clip_tokenizer as build
    return build(Path(out_dir))


def _vae(latent_channels: int, flux: bool):
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.1159, scaling_factor=0.3611) if flux else dict(shift_factor=0.0609,
                                                                                 scaling_factor=1.5305)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False, **extra)


def _clip_config(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model,
                                   num_layers=2, num_heads=d_model // 16, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _save(pipe, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sd3(out_dir: str | Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny random SD3 / SD3.5 folder: CLIP-L and CLIP-G (projection, pooled 2×16), T5 (optional: ``t5=False``
    saves ``text_encoder_3`` / ``tokenizer_3`` as None), an ``SD3Transformer2DModel`` of 4 blocks × 2 heads of 8
    (block 1 with SD3.5's dual attention, RMS q/k norms), a 16-channel VAE (scale 8), flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "clip")
        tokenizer_3 = build_t5_tokenizer(Path(tmp) / "t5") if t5 else None
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 16, 16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, 24, 16))
    text_encoder_3 = _t5(tokenizer_3, 48) if t5 else None
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
                                        pos_embed_max_size=32, dual_attention_layers=(1,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, flux=False),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return _save(pipe, Path(out_dir))


def build_flux(out_dir: str | Path, seed: int = 0, guidance: bool = True) -> Path:
    """A tiny random Flux folder: CLIP-L (pooled 16), T5, a ``FluxTransformer2DModel`` with 2 double-stream and 3
    single-stream blocks × 2 heads of 16 (RoPE axes 4+6+6), the guidance embedding (dev; ``guidance=False``:
    schnell), a 16-channel VAE (scale 8, packed 2×2), flow matching with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "clip")
        tokenizer_2 = build_t5_tokenizer(Path(tmp) / "t5")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 16, 16))
    text_encoder_2 = _t5(tokenizer_2, 32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(16, flux=True),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2)
    return _save(pipe, Path(out_dir))
