"""Flux (dev / schnell): CLIP-L for the pooled vector only (``pooled_prompt_embeds``) and T5 for the
token sequence (``prompt_embeds``: 512 tokens on dev, the pipeline's default; 256 on schnell, whose guidance-free
transformer was distilled with 256, as diffusers' schnell examples set); a ``FluxTransformer2DModel``
(MM-DiT: text tokens first, RoPE on q/k, double-stream then single-stream blocks); flow-matching Euler
with the resolution-dependent shift; no classifier-free guidance by default: dev takes the guidance
scale as an embedding (``guidance_embeds``), schnell ignores it. ``FluxPipeline`` and
``FluxImg2ImgPipeline`` on the same components. Capture blocks count the double-stream blocks first
(0..18 on dev), then the single-stream blocks (19..56)."""
from __future__ import annotations

from typing import Any

from .mmdit import MMDiTFamily


class FluxFamily(MMDiTFamily):
    name = "flux"
    title = "Flux"
    layout = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    denoiser_classes = ("FluxTransformer2DModel",)
    components = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                  "tokenizer_2": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    weighted = ("transformer", "vae", "text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    t5_tokenizer = "tokenizer_2"
    max_sequence_length = 512
    pipeline_class_name = "FluxPipeline"
    img2img_class_name = "FluxImg2ImgPipeline"
    inpaint_class_name = "FluxInpaintPipeline"
    cfg_tensors = None  # guidance-distilled: one conditional batch, no CFG pair to cut (guidance_cutoff refused)

    def _load(self, path: str, dtype: str, device: str, scheduler: str | None):
        pipe = super()._load(path, dtype, device, scheduler)
        if not pipe.transformer.config.guidance_embeds:  # schnell
            self.max_sequence_length = 256
        return pipe

    @classmethod
    def patch(cls, config: dict) -> int:
        return 2  # the pipeline packs 2×2 latent pixels into one token (the transformer's patch_size is 1)

    @classmethod
    def block_count(cls, config: dict) -> int:
        return int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0))

    def text_length(self) -> int:
        return self.max_sequence_length

    def encode(self, text: str) -> dict[str, Any]:
        """{"prompt_embeds": (1, 512 or 256, D_T5), "pooled_prompt_embeds": (1, D_CLIP)}, as the pipeline encodes
        them."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def capture_token_index(self, prompt: str, token_index: list[list[int]]) -> list[list[int]]:
        """The T5 positions of the words the sampler's CLIP positions name (Flux's joint text is T5 only)."""
        return self.t5_positions(prompt, token_index)
