"""Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G (their penultimate hidden states concatenated per token,
their pooled outputs concatenated as ``pooled_prompt_embeds``) and an optional T5 (``text_encoder_3``;
a folder may list it as ``[null, null]``, the pipeline then feeds zeros), joint text = [77 CLIP tokens,
256 T5 tokens]; an ``SD3Transformer2DModel`` (MM-DiT, image tokens first in the joint sequence; SD3.5's
dual-attention blocks have an extra image-only attention that is not captured); flow-matching Euler;
classifier-free guidance on one [uncond, cond] batch. ``StableDiffusion3Pipeline`` and
``StableDiffusion3Img2ImgPipeline`` on the same components."""
from __future__ import annotations

from typing import Any

from .mmdit import MMDiTFamily


class SD3Family(MMDiTFamily):
    name = "sd3"
    title = "Stable Diffusion 3/3.5"
    layout = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    denoiser_classes = ("SD3Transformer2DModel",)
    components = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "text_encoder_2": "config.json", "text_encoder_3": "config.json",
                  "tokenizer": "tokenizer_config.json", "tokenizer_2": "tokenizer_config.json",
                  "tokenizer_3": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    weighted = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    optional = ("text_encoder_3", "tokenizer_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    t5_tokenizer = "tokenizer_3"
    max_sequence_length = 256
    pipeline_class_name = "StableDiffusion3Pipeline"
    img2img_class_name = "StableDiffusion3Img2ImgPipeline"
    inpaint_class_name = "StableDiffusion3InpaintPipeline"
    cfg_tensors = ("prompt_embeds", "pooled_prompt_embeds")  # each [uncond, cond] under CFG

    @classmethod
    def guidance_cutoff_problem(cls, image_guided: bool = False) -> str | None:
        """diffusers' SD3 img2img / inpainting pipelines do not pass ``pooled_prompt_embeds`` to the step-end
        callback, so their CFG batch cannot be cut: refused for a job with references."""
        if image_guided:
            return (f"{cls.title} ({cls.name}) img2img / inpainting pipelines do not hand pooled_prompt_embeds to "
                    "the step-end callback, so their CFG batch cannot be cut; remove the option or the references")
        return super().guidance_cutoff_problem(image_guided)

    def clip_length(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def text_length(self) -> int:
        """Joint text tokens: the CLIP sequence, then the T5 sequence (zeros without T5)."""
        return self.clip_length() + self.max_sequence_length

    def encode(self, text: str) -> dict[str, Any]:
        """{"prompt_embeds": (1, 77 + 256, D_T5), "pooled_prompt_embeds": (1, D_L + D_G)}, as the pipeline
        encodes them."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def capture_token_index(self, prompt: str, token_index: list[list[int]]) -> list[list[int]]:
        """CLIP positions stay (both CLIP encoders share the BPE and its positions); with T5, each class also
        gets ``77 + p`` for every T5 token p covering its word."""
        if self.pipe.tokenizer_3 is None:
            return [list(g) for g in token_index]
        t5 = self.t5_positions(prompt, token_index)
        offset = self.clip_length()
        return [list(g) + [offset + p for p in extra] for g, extra in zip(token_index, t5)]
