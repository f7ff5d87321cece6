"""What the UNet families (SD 1.x/2.x, SDXL) share: loading, capture levels, cross-attention capture.

Capture levels resolve at the job's latent size by ``stages/unet_layout.py``'s rule (integers:
the grid's shorter side; "1/2**i": a fraction of the latent side), so ``masks.capture_resolutions:
[16, 32]`` names the same 16×16 and 32×32 maps at 512² on SD 1.5, SD 2.1-768 and SDXL. The capture
itself is ``stages/attention.py``'s ``AttentionCapture`` (cross-attention ``attn2``; ``attn1`` for
self-attention refinement). Torch and diffusers are imported inside the methods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..unet_layout import MAX_SELF_ATTENTION_TOKENS, capture_level, expected_layers, level_grid, unet_config
from .base import CaptureLevel, ModelFamily, read_json


def _level_name(value: Any) -> str:
    return str(value)


class UNetCapture:
    """``AttentionCapture`` bound to one job's latent size and context length (the family capture protocol)."""

    def __init__(self, capture, latent_hw: tuple[int, int], context_length: int, info: dict):
        self.capture, self.latent_hw, self.context_length, self.info = capture, latent_hw, context_length, info
        self.on_step_end = capture.on_step_end

    def begin(self, token_index, num_classes: int, num_steps: int) -> None:
        self.capture.begin(token_index, num_classes, self.latent_hw, num_steps, self.context_length)

    def finish(self):
        return self.capture.finish()

    def so_far(self):
        return self.capture.so_far()

    def keep(self, rows) -> None:
        self.capture.keep(rows)

    def allow_partial_steps(self) -> None:
        """Feature reuse (generation.cache_interval) skips the deep levels on some steps: average each level over
        the steps it ran."""
        self.capture.partial_steps = True

    def remove(self) -> None:
        self.capture.remove()


class UNetFamily(ModelFamily):
    """A text-to-image pipeline around a ``UNet2DConditionModel`` with cross-attention."""

    denoiser = "unet"
    denoiser_classes = ("UNet2DConditionModel",)

    @classmethod
    def capture_plan(cls, folder: Path, masks: Any, height: int, width: int) -> list[CaptureLevel]:
        """The cross-attention levels (and the self-attention level when ``refine_power > 0``) a job names at
        ``height`` × ``width``, from ``unet/config.json`` and ``vae/config.json``; ValueError naming the field
        first (``capture_resolutions: ...``) when the UNet lacks one or self-attention is too large."""
        folder = Path(folder)
        config = unet_config(read_json(folder / cls.denoiser / "config.json"))
        scale = cls.vae_scale_factor(folder)
        return cls.plan_from_config(config, masks, (height // scale, width // scale), height, width)

    @staticmethod
    def plan_from_config(config: Any, masks: Any, latent_hw: tuple[int, int], height: int,
                         width: int) -> list[CaptureLevel]:
        expected = expected_layers(config)
        plan, seen = [], set()
        for r in masks.capture_resolutions:
            try:
                level = capture_level("attn2", r, config, expected, latent_hw)
            except ValueError as e:
                raise ValueError(f"capture_resolutions: {e}") from None
            if level not in seen:
                seen.add(level)
                plan.append(CaptureLevel("cross", _level_name(r), level, level_grid(*latent_hw, level),
                                         expected[("attn2", level)]))
        if masks.refine_power > 0:
            if masks.self_attention_resolution is None:
                raise ValueError(f"self_attention_resolution: refine_power {masks.refine_power} on a UNet model "
                                 "needs the self-attention level to refine with; set it (e.g. 32 or \"1/4\")")
            try:
                level = capture_level("attn1", masks.self_attention_resolution, config, expected, latent_hw)
            except ValueError as e:
                raise ValueError(f"self_attention_resolution: {e}") from None
            h, w = level_grid(*latent_hw, level)
            if h * w > MAX_SELF_ATTENTION_TOKENS:
                raise ValueError(f"self_attention_resolution: {masks.self_attention_resolution} is a {h}×{w} grid at "
                                 f"generation {height}×{width} ({h * w} tokens), too large to capture (at most "
                                 f"{MAX_SELF_ATTENTION_TOKENS}); pick a coarser level or smaller images")
            plan.append(CaptureLevel("self", _level_name(masks.self_attention_resolution), level, (h, w),
                                     expected[("attn1", level)]))
        return plan

    # --- loading ------------------------------------------------------------------------------------
    pipeline_class_name: str = ""
    img2img_class_name: str = ""

    def _pipeline_classes(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name), getattr(diffusers, self.img2img_class_name)

    def _img2img_class(self):
        return self._pipeline_classes()[1]

    def _load_kwargs(self) -> dict[str, Any]:
        return {}

    def _load(self, path: str, dtype: str, device: str, scheduler: str | None):
        from ..model import load_pipeline

        return load_pipeline(path, dtype, device, scheduler, pipeline_class=self._pipeline_classes()[0],
                             **self._load_kwargs())

    # --- capture ------------------------------------------------------------------------------------
    def context_length(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def excitation(self, excite: Any, masks: Any, height: int, width: int):
        """``generation.excite``'s step-end callback, reading the job's first captured cross-attention level."""
        from .excite import Excite

        config = unet_config(self.pipe.unet.config)
        level = self.plan_from_config(config, masks, self.latent_hw(height, width), height, width)[0]
        return Excite(self.pipe.unet, level.index, len(config.down_block_types), excite.steps, excite.scale), \
            tuple(level.grid)

    def attach_capture(self, masks: Any, height: int, width: int) -> UNetCapture:
        from ..attention import AttentionCapture, CaptureConfig

        latent_hw = self.latent_hw(height, width)
        config = CaptureConfig(resolutions=tuple(masks.capture_resolutions),
                               self_resolution=masks.self_attention_resolution,
                               refine_power=masks.refine_power, step_window=tuple(masks.step_window))
        capture = AttentionCapture(self.pipe.unet, config, latent_hw=latent_hw)
        info = {"resolutions": list(config.resolutions), "self_resolution": config.self_resolution,
                "refine_power": config.refine_power, "step_window": list(config.step_window),
                "layers": capture.layer_counts, "grids": capture.grids(latent_hw),
                "map_grid": list(latent_hw)}
        return UNetCapture(capture, latent_hw, self.context_length(), info)
