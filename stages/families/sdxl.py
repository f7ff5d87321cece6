"""Stable Diffusion XL: two CLIP text encoders (CLIP-L and OpenCLIP-G, same BPE vocabulary and
positions), their penultimate hidden states concatenated per token as ``prompt_embeds``, the second
encoder's pooled output as ``pooled_prompt_embeds``, and the size / crop micro-conditioning
(``add_time_ids``) that ``StableDiffusionXLPipeline`` builds from the call's ``height`` / ``width``
(original = target = the job's size, crop (0, 0)). Img2img: ``StableDiffusionXLImg2ImgPipeline`` on the
same components. The UNet has no cross-attention at the latent grid itself (its first block is a
plain DownBlock2D): at 1024² its levels with cross-attention are 64×64 and 32×32 ("1/2", "1/4")."""
from __future__ import annotations

from typing import Any

from .unet import UNetFamily


class SDXLFamily(UNetFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    components = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                  "tokenizer_2": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    weighted = ("unet", "vae", "text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipeline_class_name = "StableDiffusionXLPipeline"
    img2img_class_name = "StableDiffusionXLImg2ImgPipeline"
    inpaint_class_name = "StableDiffusionXLInpaintPipeline"
    cfg_tensors = ("prompt_embeds", "add_text_embeds", "add_time_ids")  # each [uncond, cond] under CFG

    @classmethod
    def mismatch(cls, index: dict, denoiser_config: dict | None) -> str | None:
        why = super().mismatch(index, denoiser_config)
        if why is None and denoiser_config.get("addition_embed_type") != "text_time":
            return (f"its unet has addition_embed_type {denoiser_config.get('addition_embed_type')!r}, not SDXL's "
                    "'text_time' (pooled text + time ids)")
        return why

    def _load_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    def encode(self, text: str) -> dict[str, Any]:
        """{"prompt_embeds": (1, 77, D1 + D2), "pooled_prompt_embeds": (1, D2)}, as the pipeline encodes them."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=text, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
