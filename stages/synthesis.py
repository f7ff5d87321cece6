"""Diffusion synthesis: one batched pipeline call per batch, with cross-attention capture."""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch

from .attention import AttentionCapture, CaptureConfig
from .base import Batch, Stage, passthrough
from .model import load_pipeline


def capture_config(masks: Any) -> CaptureConfig:
    """The capture settings of a job spec's ``masks`` section."""
    return CaptureConfig(resolutions=tuple(masks.capture_resolutions),
                         self_resolution=masks.self_attention_resolution,
                         refine_power=masks.refine_power, step_window=tuple(masks.step_window))


class SynthesisStage(Stage):
    """Generates ``image`` and the per-class maps ``attn`` / ``attn_raw`` (zero-padded to K classes).

    Every row gets its own CPU ``torch.Generator`` seeded from ``seed``, so an image does not
    depend on its batch neighbours or on the device. ``capture=False`` (benchmarks) skips the
    attention capture and outputs only ``image`` and ``gen``.
    """

    name = "synthesis"
    kind = "actor"
    inputs = ("prompt", "seed", "token_index", "class_names")
    outputs = ("image", "attn", "attn_raw", "gen")

    def __init__(self, spec: Any, capture: bool = True):
        super().__init__(spec)
        model, gen = spec.model, spec.generation
        self.pipe = load_pipeline(model.path, model.dtype, model.device, gen.scheduler)
        self.max_classes = spec.prompts.max_classes_per_image
        self.latent_hw = (gen.height // self.pipe.vae_scale_factor, gen.width // self.pipe.vae_scale_factor)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(gen.steps)
        self.loop_steps = len(scheduler.timesteps)  # callbacks per call (PNDM runs steps + 1)
        self.capture = AttentionCapture(self.pipe.unet, capture_config(spec.masks)) if capture else None
        capture_info = None
        if self.capture is not None:
            config = self.capture.config
            capture_info = {"resolutions": list(config.resolutions), "self_resolution": config.self_resolution,
                            "refine_power": config.refine_power, "step_window": list(config.step_window),
                            "layers": self.capture.layer_counts}
        self.gen_json = json.dumps({
            "model": model.path, "dtype": model.dtype, "scheduler": gen.scheduler or "default",
            "scheduler_class": type(self.pipe.scheduler).__name__, "steps": gen.steps,
            "guidance_scale": gen.guidance_scale, "height": gen.height, "width": gen.width,
            "capture": capture_info,
        })

    def __call__(self, batch: Batch) -> Batch:
        gen = self.spec.generation
        prompts = [str(p) for p in batch["prompt"]]
        rows = len(prompts)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in batch["seed"]]
        kwargs = {}
        if self.capture is not None:
            token_index = [json.loads(t) for t in batch["token_index"]]
            names = [json.loads(c) for c in batch["class_names"]]
            for i, (groups, classes) in enumerate(zip(token_index, names)):
                if len(groups) != len(classes):
                    raise ValueError(f"row {i}: {len(classes)} class names but {len(groups)} token groups")
            self.capture.begin(token_index, self.max_classes, self.latent_hw, self.loop_steps,
                               self.pipe.tokenizer.model_max_length)
            kwargs["callback_on_step_end"] = self.capture.on_step_end
        out = self.pipe(prompt=prompts, num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
                        height=gen.height, width=gen.width, generator=generators, output_type="np", **kwargs)
        images = (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        new = {"image": images, "gen": np.full(rows, self.gen_json)}
        if self.capture is not None:
            maps = self.capture.finish()
            new.update({k: v.to(torch.float16).cpu().numpy() for k, v in maps.items()})
        return passthrough(batch, **new)
