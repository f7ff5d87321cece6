"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet with cross-attention (epsilon or
v-prediction, linear or conv projections: the capture reads only q/k), ``StableDiffusionPipeline`` and
``StableDiffusionImg2ImgPipeline`` on the same components."""
from __future__ import annotations

from typing import Any

from .unet import UNetFamily


class SDFamily(UNetFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    components = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    weighted = ("unet", "vae", "text_encoder")
    tokenizers = ("tokenizer",)
    pipeline_class_name = "StableDiffusionPipeline"
    img2img_class_name = "StableDiffusionImg2ImgPipeline"
    inpaint_class_name = "StableDiffusionInpaintPipeline"

    @classmethod
    def mismatch(cls, index: dict, denoiser_config: dict | None) -> str | None:
        why = super().mismatch(index, denoiser_config)
        if why is None and denoiser_config.get("addition_embed_type") is not None:
            return (f"its unet takes added conditioning (addition_embed_type "
                    f"{denoiser_config.get('addition_embed_type')!r}), as SDXL's does")
        return why

    def encode(self, text: str) -> dict[str, Any]:
        """{"prompt_embeds": (1, 77, D)}: the text encoder's last hidden state, as the pipeline encodes it."""
        return {"prompt_embeds": self.pipe.encode_prompt([text], self.device, 1, False)[0]}
