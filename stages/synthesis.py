"""Diffusion synthesis: batched pipeline calls with cross-attention capture.

Text-to-image rows go through ``StableDiffusionPipeline``; rows whose ``cond`` names a reference
image go through ``StableDiffusionImg2ImgPipeline`` built from the same components (same weights,
same capture), one call per strength. A ``cond["embedding"]`` is turned into ``prompt_embeds``
here: the prompts are encoded one at a time, then interpolated (slerp / lerp per token) or
jittered (seeded noise scaled by each token vector's RMS). Each row's ``gen`` names the model by
its content (``model_id``, 16 hex digits of ``model_identity``'s ``id``) and by the path the user
gave (``model``, ``stages.identity.public_path``), never by where it lies on this machine.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from .attention import AttentionCapture, CaptureConfig
from .base import Batch, Stage, passthrough
from .identity import model_identity, public_path, short_id
from .model import load_pipeline
from .references import ReferenceImages, list_references


def capture_config(masks: Any) -> CaptureConfig:
    """The capture settings of a job spec's ``masks`` section."""
    return CaptureConfig(resolutions=tuple(masks.capture_resolutions),
                         self_resolution=masks.self_attention_resolution,
                         refine_power=masks.refine_power, step_window=tuple(masks.step_window))


def img2img_loop_steps(scheduler: Any, steps: int, strength: float) -> int:
    """Denoising-loop iterations (= step-end callbacks) of an img2img call, as diffusers' ``get_timesteps``
    counts them: the scheduler's timesteps after skipping the first ``steps - int(steps x strength)``."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    start = max(steps - min(int(steps * strength), steps), 0)
    return len(scheduler.timesteps[start * scheduler.order:])


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation per token vector (last dim), lerp where the vectors are parallel."""
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1, keepdim=True) / (a64.norm(dim=-1, keepdim=True) * b64.norm(dim=-1, keepdim=True))
    omega = cos.clamp(-1.0, 1.0).nan_to_num(1.0).acos()
    sin = omega.sin()
    curved = (torch.sin((1 - weight) * omega) * a64 + torch.sin(weight * omega) * b64) / sin.clamp_min(1e-12)
    return torch.where(sin > 1e-6, curved, torch.lerp(a64, b64, weight)).to(a.dtype)


def jitter(embeds: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``embeds`` plus CPU-seeded Gaussian noise, ``sigma`` x each token vector's RMS."""
    noise = torch.randn(embeds.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(embeds.device)
    rms = embeds.float().pow(2).mean(-1, keepdim=True).sqrt()
    return (embeds.float() + sigma * rms * noise).to(embeds.dtype)


class SynthesisStage(Stage):
    """Generates ``image`` and the per-class maps ``attn`` / ``attn_raw`` (zero-padded to K classes).

    Every row gets its own CPU ``torch.Generator`` seeded from ``seed``, so an image does not
    depend on its batch neighbours or on the device. ``capture=False`` (benchmarks) skips the
    attention capture and outputs only ``image`` and ``gen``. An optional ``cond`` column (JSON,
    written by the sampling stage) selects img2img and embedding conditioning per row.
    """

    name = "synthesis"
    kind = "actor"
    fusable = False  # its own actor pool: resources.synthesis sizes it and reserves the GPUs
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
        # the model by content and by the name the user gave it: no local path, so two checkouts write the same bytes
        name = getattr(spec, "model_name", None) or public_path(model.path)
        self.gen_json = json.dumps({
            "model": name, "model_id": short_id(model_identity(model.path, name)), "dtype": model.dtype,
            "scheduler": gen.scheduler or "default",
            "scheduler_class": type(self.pipe.scheduler).__name__, "steps": gen.steps,
            "guidance_scale": gen.guidance_scale, "height": gen.height, "width": gen.width,
            "capture": capture_info,
        })
        refs = getattr(spec, "references", None)
        if refs is not None:
            self.img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)
            self.img2img.set_progress_bar_config(disable=True)
            self.reference_images = ReferenceImages(list_references(spec), gen.height, gen.width)
            self.img2img_steps = {s: img2img_loop_steps(self.pipe.scheduler, gen.steps, s) for s in refs.strengths}

    @torch.no_grad()
    def embed(self, cond: dict | None, prompt: str) -> torch.Tensor:
        """(1, L, D) prompt embedding of one row: ``prompt`` encoded, or ``cond``'s interpolation / jitter."""
        device = self.pipe.device
        encode = lambda text: self.pipe.encode_prompt([text], device, 1, False)[0]  # noqa: E731
        if cond is None:
            return encode(prompt)
        if cond["mode"] == "jitter":
            return jitter(encode(cond["prompt"]), float(cond["sigma"]), int(cond["seed"]))
        first, second = (encode(p) for p in cond["prompts"])
        if cond["method"] == "lerp":
            return torch.lerp(first, second, float(cond["weight"]))
        return slerp(first, second, float(cond["weight"]))

    def _generate(self, batch: Batch, rows: list[int], conds: list[dict], strength: float | None) -> Batch:
        """Images, ``gen`` and (with capture) maps of ``rows``: one text-to-image call, or one img2img
        call at ``strength``."""
        gen = self.spec.generation
        prompts = [str(batch["prompt"][i]) for i in rows]
        kwargs: dict[str, Any] = {"generator": [torch.Generator("cpu").manual_seed(int(batch["seed"][i]))
                                                for i in rows]}
        if any("embedding" in conds[i] for i in rows):
            kwargs["prompt_embeds"] = torch.cat([self.embed(conds[i].get("embedding"), p)
                                                 for i, p in zip(rows, prompts)])
        else:
            kwargs["prompt"] = prompts
        if strength is None:
            pipe, steps, gen_json = self.pipe, self.loop_steps, self.gen_json
            kwargs.update(height=gen.height, width=gen.width)
        else:
            if strength not in self.img2img_steps:
                raise ValueError(f"reference strength {strength} is not in the job's references.strengths")
            pipe, steps = self.img2img, self.img2img_steps[strength]
            gen_json = json.dumps({**json.loads(self.gen_json), "strength": strength})
            images = [self.reference_images(conds[i]["reference"]["key"]) for i in rows]
            kwargs.update(image=np.stack(images).astype(np.float32) / 255.0, strength=strength)
        if self.capture is not None:
            token_index = [json.loads(batch["token_index"][i]) for i in rows]
            for i, groups in zip(rows, token_index):
                classes = json.loads(batch["class_names"][i])
                if len(groups) != len(classes):
                    raise ValueError(f"row {i}: {len(classes)} class names but {len(groups)} token groups")
            self.capture.begin(token_index, self.max_classes, self.latent_hw, steps,
                               self.pipe.tokenizer.model_max_length)
            kwargs["callback_on_step_end"] = self.capture.on_step_end
        out = pipe(num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale, output_type="np", **kwargs)
        images = (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        new = {"image": images, "gen": np.full(len(rows), gen_json)}
        if self.capture is not None:
            maps = self.capture.finish()
            new.update({k: v.to(torch.float16).cpu().numpy() for k, v in maps.items()})
        return new

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["prompt"])
        conds = [json.loads(str(c)) if str(c) else {} for c in batch.get("cond", [""] * n)]
        groups: dict[float | None, list[int]] = {}  # strength (None: text-to-image) -> rows, in row order
        for i, cond in enumerate(conds):
            groups.setdefault(cond["reference"]["strength"] if "reference" in cond else None, []).append(i)
        parts = [(rows, self._generate(batch, rows, conds, strength)) for strength, rows in groups.items()]
        inverse = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
        new = {col: np.concatenate([out[col] for _, out in parts])[inverse] for col in parts[0][1]}
        return passthrough(batch, **new)
